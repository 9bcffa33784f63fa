"""Provider webhook events, the pure parts: the body, the signature, the records made."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import pytest

from epoxi.bounce.classify import Classifier
from epoxi.errors import InvalidField, SignatureRefused, UnknownProvider
from epoxi.events.records import RecordType
from epoxi.webhooks.provider import (
    MAX_EVENTS,
    ProviderEvent,
    parse_events,
    record_of,
    record_type,
    secret_for,
    verify,
)

NOW = 1_800_000_000.0


def _body(*events: dict[str, Any]) -> bytes:
    return json.dumps({"events": list(events)}).encode()


def _event(**fields: Any) -> dict[str, Any]:
    return {"id": "e1", "type": "delivered", "email_id": "m1", "recipient": "a@x.test", **fields}


def test_a_single_event_object_is_a_call_of_one() -> None:
    (event,) = parse_events(json.dumps(_event()).encode(), NOW)
    assert (event.id, event.type, event.message_id, event.recipient) == (
        "e1",
        "delivered",
        "m1",
        "a@x.test",
    )
    assert event.time == NOW  # no time given: when it came


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"timestamp": 1_700_000_000}, 1_700_000_000.0),
        ({"time": 1_700_000_000.5}, 1_700_000_000.5),
        ({"timestamp": "2023-11-14T22:13:20Z"}, 1_700_000_000.0),
        ({"timestamp": "2023-11-14T23:13:20+01:00"}, 1_700_000_000.0),
    ],
)
def test_times_are_unix_seconds_or_iso_8601(fields: dict[str, Any], expected: float) -> None:
    (event,) = parse_events(_body(_event(**fields)), NOW)
    assert event.time == expected


def test_mailsystem_and_epoxi_field_names_both_read() -> None:
    mailsystem = _event(provider_event_id="p1", recipient={"email": "b@x.test", "name": "B"})
    epoxi = {"id": "p2", "type": "OOB", "message_id": "m2", "recipient": "c@x.test"}
    first, second = parse_events(_body(mailsystem, epoxi), NOW)
    assert (first.id, first.recipient) == ("p1", "b@x.test")
    assert (second.id, second.type, second.message_id) == ("p2", "oob", "m2")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"[1, 2]", "body"),
        (b"{nope", "body"),
        (_body(), "events"),
        (json.dumps({"events": "x"}).encode(), "events"),
        (_body(_event(email_id=None)), "events[0].email_id"),
        (_body(_event(), _event(recipient="nobody")), "events[1].recipient"),
        (_body(_event(code=700)), "events[0].code"),
        (_body(_event(code="550")), "events[0].code"),
        (_body(_event(timestamp="yesterday")), "events[0].timestamp"),
        (_body(_event(reason=["a"])), "events[0].reason"),
        (_body(*[_event()] * (MAX_EVENTS + 1)), "events"),
    ],
)
def test_a_bad_body_names_the_field(body: bytes, field: str) -> None:
    with pytest.raises(InvalidField) as caught:
        parse_events(body, NOW)
    assert caught.value.field == field


def _header(secret: str, t: int, body: bytes) -> str:
    digest = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={digest}"


def test_a_signature_with_the_secret_and_a_recent_time_passes() -> None:
    body = b'{"events": []}'
    verify(_header("s", int(NOW) - 10, body), body, "s", NOW, 300)
    # while a provider rotates, it may send one v1 per secret: any one may match
    both = _header("old", int(NOW), body) + "," + _header("s", int(NOW), body).split(",")[1]
    verify(both, body, "s", NOW, 300)


@pytest.mark.parametrize(
    ("header", "why"),
    [
        (None, "no Webhook-Signature"),
        ("", "no Webhook-Signature"),
        ("v1=abc", "must be t="),
        ("t=soon,v1=abc", "must be t="),
        (f"t={int(NOW)}", "must be t="),
        (_header("s", int(NOW) - 301, b"{}"), "from now"),
        (_header("s", int(NOW) + 301, b"{}"), "from now"),
        (_header("other", int(NOW), b"{}"), "does not match"),
        (_header("s", int(NOW), b"{ }"), "does not match"),
    ],
)
def test_a_bad_signature_is_refused_with_the_reason(header: str | None, why: str) -> None:
    with pytest.raises(SignatureRefused, match=why):
        verify(header, b"{}", "s", NOW, 300)


def test_the_environment_secret_wins_over_the_configured_one() -> None:
    configured = {"esp": "from-config", "mock": "m"}
    assert secret_for("esp", configured, {"WEBHOOK_SECRET_ESP": "from-env"}) == "from-env"
    assert secret_for("esp", configured, {}) == "from-config"
    assert secret_for("my-esp", {}, {"WEBHOOK_SECRET_MY_ESP": "x"}) == "x"
    with pytest.raises(UnknownProvider, match="WEBHOOK_SECRET_NOPE"):
        secret_for("nope", configured, {})


def _made(**fields: Any) -> Any:
    event = ProviderEvent(
        **{"id": "e1", "message_id": "m1", "recipient": "a@x.test", "time": NOW, **fields}
    )
    kind = record_type(event)
    assert kind is not None
    return record_of("esp", event, kind, ("shop", "spring"), Classifier.default())


def test_each_type_makes_its_record_with_the_owner_and_the_providers_id() -> None:
    made = {
        name: _made(type=name).type
        for name in ("delivered", "opened", "clicked", "complained", "unsubscribed", "bounced")
    }
    assert made == {
        "delivered": RecordType.REMOTE_DELIVERY,
        "opened": RecordType.OPEN,
        "clicked": RecordType.CLICK,
        "complained": RecordType.FEEDBACK,
        "unsubscribed": RecordType.UNSUBSCRIBE,
        "bounced": RecordType.OOB,
    }
    record = _made(type="delivered")
    assert (record.tenant, record.campaign, record.reporter, record.external_id) == (
        "shop",
        "spring",
        "esp",
        "e1",
    )
    assert record.timestamp == NOW
    assert (
        record_type(
            ProviderEvent(id="x", type="processed", message_id="m", recipient="a@b", time=0)
        )
        is None
    )


@pytest.mark.parametrize(
    ("fields", "code", "category"),
    [
        ({"type": "bounced"}, 550, "Other"),
        ({"type": "bounced", "bounce_type": "soft"}, 450, "Other"),
        ({"type": "deferred", "code": 550}, 450, "Other"),
        (
            {"type": "failed", "code": 552, "enhanced": "5.2.2", "text": "mailbox full"},
            552,
            "MailboxFull",
        ),
        ({"type": "bounced", "text": "550 5.1.1 user unknown"}, 550, "InvalidRecipient"),
    ],
)
def test_a_bounce_is_classified_like_any_reply(
    fields: dict[str, Any], code: int, category: str
) -> None:
    record = _made(**fields)
    assert record.response.code == code
    assert record.classification == category


def test_the_same_event_makes_the_same_record() -> None:
    """So a redelivered event's record, and its event for webhooks, are the same."""
    assert _made(type="opened") == _made(type="opened")
