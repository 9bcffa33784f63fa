"""The platform's reading of records (events/lifecycle.py): statuses only move forward, the
"once" counts count once per email, and mail of no template is counted under ""."""

from __future__ import annotations

from epoxi.events.lifecycle import (
    EmailState,
    EmailStatus,
    platform_records,
    status_of,
    tally,
)
from epoxi.events.records import Record, RecordType, Response

T0 = 1_764_590_400.0  # 2025-12-01 12:00 UTC, the start of an hour


def _record(kind: RecordType, **fields: object) -> Record:
    base: dict[str, object] = {
        "message_id": "m1",
        "tenant": "shop",
        "template": "tpl",
        "recipient": "a@x.test",
        "timestamp": T0 + 60,
    }
    return Record(type=kind, **{**base, **fields})  # type: ignore[arg-type]


def _state(status: EmailStatus = EmailStatus.QUEUED, **fields: object) -> EmailState:
    return EmailState(id="m1", tenant_id="shop", template_id="tpl", status=status, **fields)  # type: ignore[arg-type]


def test_a_reception_and_a_delivery_make_a_new_row_and_count_in_their_hour() -> None:
    known: dict[str, EmailState] = {}
    result = tally(
        [
            _record(RecordType.RECEPTION, recipients=["a@x.test"], recipient=""),
            _record(RecordType.DELIVERY, timestamp=T0 + 3700),
        ],
        known,
    )
    state = result.changed["m1"]
    assert (state.status, state.new, state.recipient) == (EmailStatus.DELIVERED, True, "a@x.test")
    assert result.counts == {
        ("shop", "tpl", int(T0)): {"accepted": 1},
        ("shop", "tpl", int(T0) + 3600): {"delivered": 1},
    }


def test_statuses_only_move_forward() -> None:
    known = {"m1": _state(EmailStatus.CLICKED)}
    result = tally([_record(RecordType.OPEN), _record(RecordType.DELIVERY)], known)
    assert known["m1"].status is EmailStatus.CLICKED
    assert "m1" not in result.changed
    complained = tally([_record(RecordType.FEEDBACK, feedback_type="abuse")], known)
    assert complained.changed["m1"].status is EmailStatus.COMPLAINED


def test_opens_clicks_and_provider_deliveries_count_once_per_email() -> None:
    known = {"m1": _state(EmailStatus.QUEUED)}
    records = [
        _record(RecordType.DELIVERY),
        _record(RecordType.REMOTE_DELIVERY, reporter="mock", template=""),
        _record(RecordType.OPEN, template=""),
        _record(RecordType.OPEN, template=""),
        _record(RecordType.CLICK, url="https://x.test", template=""),
        _record(RecordType.CLICK, url="https://x.test/2", template=""),
    ]
    result = tally(records, known)
    assert result.counts == {("shop", "tpl", int(T0)): {"delivered": 1, "opened": 1, "clicked": 1}}
    assert known["m1"].counted == {"delivered", "opened", "clicked"}
    later = tally([_record(RecordType.OPEN, template="")], known)
    assert later.counts == {}


def test_a_permanent_oob_bounces_a_delivered_email_and_a_temporary_one_changes_nothing() -> None:
    known = {"m1": _state(EmailStatus.DELIVERED, counted={"delivered"})}
    soft = _record(RecordType.OOB, response=Response(450, "4.2.2", "full"), template="")
    assert status_of(soft) is None
    assert tally([soft], known).counts == {}
    hard = _record(RecordType.OOB, response=Response(550, "5.1.1", "gone"), template="")
    result = tally([hard], known)
    assert known["m1"].status is EmailStatus.BOUNCED
    assert known["m1"].last_error == "550 5.1.1 gone"
    assert result.counts == {("shop", "tpl", int(T0)): {"bounced": 1}}
    (dead,) = result.dead  # failed for good: a dead letter, under the email's template
    assert (dead.email_id, dead.reason, dead.template_id) == ("m1", "bounced", "tpl")
    assert tally([soft], known).dead == []  # a 4xx report is no failure for good


def test_mail_without_a_template_is_counted_under_the_empty_template() -> None:
    records = [
        _record(RecordType.RECEPTION, template="", recipients=["a@x.test", "b@x.test"]),
        _record(RecordType.TRANSIENT_FAILURE, template="", response=Response(451, "4.3.0", "x")),
        _record(RecordType.OPEN, template=""),
        _record(RecordType.OPEN, template=""),
    ]
    result = tally(records, {})
    assert result.changed == {}  # no email row: /messages or SMTP mail
    assert result.counts == {("shop", "", int(T0)): {"accepted": 2, "deferred": 1, "opened": 2}}


def test_a_scheduled_reception_and_the_records_the_platform_ignores() -> None:
    scheduled = _record(RecordType.RECEPTION, next_attempt=T0 + 86400, recipients=["a@x.test"])
    assert status_of(scheduled) is EmailStatus.SCHEDULED
    rerouted = _record(RecordType.REROUTED)
    no_tenant = _record(RecordType.DELIVERY, tenant="")
    assert platform_records([scheduled, rerouted, no_tenant]) == [scheduled]
    unsubscribed = tally([_record(RecordType.UNSUBSCRIBE, template="")], {"m1": _state()})
    assert unsubscribed.changed == {}
    assert unsubscribed.counts == {("shop", "tpl", int(T0)): {"unsubscribed": 1}}
