"""The feedback mailbox: reports to the bounce domain or an FBL address become OOB and
Feedback records for the message their VERP token names, and are quarantined."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from epoxi.bounce.classify import Classifier
from epoxi.bounce.verp import Verp
from epoxi.events.records import RecordType, Response
from epoxi.ingest import Ingest
from epoxi.ingest.feedback import UNCONFIRMED, FeedbackMailbox, Quarantine
from epoxi.message import MessageMeta
from epoxi.reception.policy import RelayPolicy
from epoxi.smtp.parser import Mailbox
from epoxi.testing.fakes import MemorySpool, Recorder
from tests.unit.test_inbound import delivery_status, dsn

VERP = Verp("bounce.example", b"k" * 32)
ID = "01HZX3T8M2QK7R9V5W4Y"
ANN = "ann@mail.example"
SAYS = {"5.1.1": "no such user", "5.2.2": "mailbox full", "4.4.1": "no answer"}


def mailbox(tmp_path: Path, size: int = 10) -> tuple[FeedbackMailbox, Recorder]:
    records = Recorder()
    box = FeedbackMailbox(
        verp=VERP,
        classifier=Classifier.default(),
        records=records,
        quarantine=Quarantine(tmp_path / "bounces", size),
        fbl_addresses=frozenset({"fbl@shop.example"}),
    )
    return box, records


def bounce_for(*recipients: tuple[str, str, str]) -> bytes:
    blocks = [
        f"Final-Recipient: rfc822; {address}\nAction: {action}\nStatus: {status}\n"
        f"Remote-MTA: dns; mx.mail.example\nDiagnostic-Code: smtp; 550 {status} {SAYS[status]}\n"
        for address, action, status in recipients
    ]
    return dsn(delivery_status("Reporting-MTA: dns; mail.example\n", *blocks))


def meta(*recipients: str) -> MessageMeta:
    return MessageMeta(
        id="INBOUND1",
        sender="",
        recipients=list(recipients),
        received_at=0,
        size=0,
        peer="192.0.2.9",
    )


async def test_bounce_to_verp_address_becomes_oob_record(tmp_path: Path) -> None:
    box, records = mailbox(tmp_path)
    to = VERP.sender(ID, [ANN])
    left = await box.take(meta(to), bounce_for((ANN, "failed", "5.1.1")))
    assert left == []
    (record,) = records.records
    assert record.type is RecordType.OOB
    assert (record.message_id, record.recipient, record.sender) == (ID, ANN, to)
    assert record.response == Response(550, "5.1.1", "550 5.1.1 no such user")
    assert record.classification == "InvalidRecipient"
    assert record.peer_address == "mx.mail.example" and record.reporter == "mail.example"
    assert record.reason == ""
    (kept,) = (tmp_path / "bounces").iterdir()
    assert kept.name.endswith("-dsn-INBOUND1.eml")


async def test_only_failed_recipients_the_token_names(tmp_path: Path) -> None:
    box, records = mailbox(tmp_path)
    raw = bounce_for((ANN, "failed", "5.1.1"), ("bob@mail.example", "failed", "5.1.1"))
    await box.take(meta(VERP.sender(ID, [ANN])), raw)
    assert [r.recipient for r in records.records] == [ANN]


async def test_per_message_token_takes_every_failed_recipient(tmp_path: Path) -> None:
    box, records = mailbox(tmp_path)
    raw = bounce_for(
        (ANN, "failed", "5.1.1"),
        ("bob@mail.example", "failed", "5.2.2"),
        ("c@x", "delayed", "4.4.1"),
    )
    await box.take(meta(VERP.sender(ID, [ANN, "bob@mail.example"])), raw)
    assert [(r.recipient, r.classification) for r in records.records] == [
        (ANN, "InvalidRecipient"),
        ("bob@mail.example", "MailboxFull"),
    ]


async def test_forwarded_recipient_is_recorded_unconfirmed(tmp_path: Path) -> None:
    box, records = mailbox(tmp_path)
    await box.take(
        meta(VERP.sender(ID, [ANN])), bounce_for(("ann@forward.example", "failed", "5.1.1"))
    )
    (record,) = records.records
    assert record.recipient == "ann@forward.example" and record.reason == UNCONFIRMED


async def test_forged_token_is_quarantined_without_records(tmp_path: Path) -> None:
    box, records = mailbox(tmp_path)
    forged = f"b+{Verp('bounce.example', b'guess').token(ID, ANN)}@bounce.example"
    left = await box.take(meta(forged), bounce_for((ANN, "failed", "5.1.1")))
    assert left == [] and records.records == []
    assert len(list((tmp_path / "bounces").iterdir())) == 1


def complaint(mail_from: str) -> bytes:
    return (
        "From: <staff@isp.example>\nMIME-Version: 1.0\n"
        'Content-Type: multipart/report; report-type=feedback-report; boundary="B"\n'
        "\n--B\nContent-Type: text/plain\n\nAn abuse report.\n"
        "--B\nContent-Type: message/feedback-report\n\n"
        "Feedback-Type: abuse\nUser-Agent: FBL/1\nVersion: 1\n"
        f"Original-Mail-From: <{mail_from}>\nOriginal-Rcpt-To: <{ANN}>\n"
        "\n--B\nContent-Type: text/rfc822-headers\n\n"
        f"Return-Path: <{mail_from}>\nMessage-ID: <m1@shop.example>\nTo: {ANN}\n"
        "\n--B--\n"
    ).encode()


async def test_complaint_to_fbl_address_becomes_feedback_record(tmp_path: Path) -> None:
    box, records = mailbox(tmp_path)
    verp = VERP.sender(ID, [ANN])
    left = await box.take(meta("FBL@shop.example", "other@elsewhere.example"), complaint(verp))
    assert left == ["other@elsewhere.example"]
    (record,) = records.records
    assert record.type is RecordType.FEEDBACK
    assert (record.message_id, record.recipient, record.sender) == (ID, ANN, verp)
    assert (record.feedback_type, record.reporter) == ("abuse", "FBL/1")
    assert record.peer_address == "192.0.2.9"


async def test_autoreply_and_other_mail_make_no_record(tmp_path: Path) -> None:
    box, records = mailbox(tmp_path)
    to = VERP.sender(ID, [ANN])
    await box.take(meta(to), b"Auto-Submitted: auto-replied\nSubject: away\n\nBack Monday.\n")
    await box.take(meta("postmaster@bounce.example"), b"Subject: hi\n\nhello\n")
    assert records.records == []
    assert len(list((tmp_path / "bounces").iterdir())) == 2


def test_quarantine_keeps_the_newest(tmp_path: Path) -> None:
    quarantine = Quarantine(tmp_path, 3)
    paths = [quarantine.keep(f"m{n}".encode(), "dsn", f"Q{n}") for n in range(5)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in paths[2:] if p]
    assert Quarantine(tmp_path / "none", 0).keep(b"x", "dsn", "Q") is None


def test_quarantine_lists_reads_and_removes_only_its_own_names(tmp_path: Path) -> None:
    quarantine = Quarantine(tmp_path / "bounces", 10)
    assert quarantine.newest(5) == ([], 0)  # no directory yet
    paths = [quarantine.keep(f"m{n}".encode(), kind, f"Q{n}") for n, kind in enumerate("ab")]
    (tmp_path / "bounces" / "notes.txt").write_text("not a report")
    (tmp_path / "1-dsn-OUT.eml").write_bytes(b"outside")
    found, total = quarantine.newest(1)
    assert total == 2 and [(k.kind, k.queue_id, k.size) for k in found] == [("b", "Q1", 2)]
    assert paths[1] is not None and found[0].name == paths[1].name
    assert quarantine.read(paths[1].name) == b"m1"
    for name in ("../1-dsn-OUT.eml", "1-dsn-OUT.eml/..", "/etc/passwd", "notes.txt", ""):
        assert quarantine.find(name) is None and quarantine.read(name) is None
        assert quarantine.remove(name) is None
    removed = quarantine.remove(paths[1].name)
    assert removed is not None and removed.queue_id == "Q1" and not paths[1].exists()
    assert quarantine.remove(paths[1].name) is None and quarantine.newest(5)[1] == 1
    assert (tmp_path / "1-dsn-OUT.eml").exists()


async def test_ingest_hands_reports_to_the_mailbox_and_queues_nothing(tmp_path: Path) -> None:
    box, records = mailbox(tmp_path)
    spool = MemorySpool()
    jobs: list[object] = []
    ingest = Ingest(spool=spool, records=records, schedule=jobs.append, feedback=box)
    await ingest.accept(
        meta(VERP.sender(ID, [ANN])), bounce_for((ANN, "failed", "5.1.1")), trusted=False
    )
    assert jobs == [] and [r.type for r in records.records] == [RecordType.OOB]


@pytest.mark.parametrize(
    ("address", "local"),
    [("b+x@bounce.example", True), ("fbl@shop.example", True), ("ann@shop.example", False)],
)
def test_relay_policy_takes_the_bounce_domain_and_fbl_addresses(address: str, local: bool) -> None:
    policy = RelayPolicy.build(["bounce.example"], [], local_addresses=["FBL@shop.example"])
    mailbox_ = Mailbox(*address.split("@"))
    assert policy.is_local(mailbox_) is local


async def test_records_carry_their_messages_tenant_and_campaign(tmp_path: Path) -> None:
    box, records = mailbox(tmp_path)
    owners = {ID: ("shop", "spring")}

    async def owner(message_id: str) -> tuple[str, str] | None:
        return owners.get(message_id)

    box = dataclasses.replace(box, owner=owner)
    await box.take(meta(VERP.sender(ID, [ANN])), bounce_for((ANN, "failed", "5.1.1")))
    (record,) = records.records
    assert (record.tenant, record.campaign) == ("shop", "spring")


async def test_a_failing_tenant_lookup_still_records(tmp_path: Path) -> None:
    box, records = mailbox(tmp_path)

    async def owner(message_id: str) -> tuple[str, str] | None:
        raise OSError("store down")

    box = dataclasses.replace(box, owner=owner)
    await box.take(meta(VERP.sender(ID, [ANN])), bounce_for((ANN, "failed", "5.1.1")))
    assert [r.tenant for r in records.records] == [""]


async def test_gauges_count_reports_and_forged_tokens(tmp_path: Path) -> None:
    box, _ = mailbox(tmp_path)
    await box.take(meta(VERP.sender(ID, [ANN])), bounce_for((ANN, "failed", "5.1.1")))
    forged = f"b+{Verp('bounce.example', b'guess').token(ID, ANN)}@bounce.example"
    await box.take(meta(forged), bounce_for((ANN, "failed", "5.1.1")))
    figures = {name: value for name, (_, value) in box.gauges().items()}
    assert figures["inbound_reports_dsn"] == 2 and figures["inbound_reports_arf"] == 0
    assert figures["inbound_forged_tokens"] == 1
