"""Real DSNs from a real Postfix: Epoxi sends with VERP return paths through a private Postfix
instance that bounces (unknown user, mailbox full, relay denied) and sends its DSNs back to
Epoxi's bounce domain; Epoxi reads each into an OOB record for the right message and
recipient, and keeps the DSN in its quarantine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from epoxi.events.records import Record, RecordType
from tests.conftest import eventually
from tests.e2e.conftest import MakeWorld, World, send
from tests.e2e.exim import Exim
from tests.e2e.postfix import Postfix


@pytest.fixture
async def postfix() -> AsyncIterator[Postfix]:
    assert Postfix.available(), "needs Postfix and root (scripts/bootstrap test installs it)"
    instance = Postfix(relay_port=0)
    yield instance
    await asyncio.to_thread(instance.stop)


async def bouncing_world(make_world: MakeWorld, postfix: Postfix) -> World:
    world = await make_world(
        bounce_domain="bounce.test",
        relay={"host": "127.0.0.1", "port": postfix.port, "tls": "disabled"},
    )
    postfix.relay_port = world.port
    await asyncio.to_thread(postfix.start)
    return world


@pytest.fixture
async def exim() -> AsyncIterator[Exim]:
    assert Exim.available(), "needs Exim and root (scripts/bootstrap test unpacks it)"
    instance = Exim(epoxi_port=0, sink=("127.0.0.2", 0))
    yield instance
    await asyncio.to_thread(instance.stop)


def oob(world: World) -> list[Record]:
    return [r for r in world.records if r.type is RecordType.OOB]


@pytest.mark.timeout(120)
async def test_postfix_dsns_become_oob_records(make_world: MakeWorld, postfix: Postfix) -> None:
    world = await bouncing_world(make_world, postfix)
    cases = {
        "nosuchuser@pf.test": ("5.1.1", "InvalidRecipient"),
        "nobody@pf.test": ("5.2.2", "MailboxFull"),
        "anyone@far.test": ("5.7.1", "RelayDenied"),
    }
    ids = {}
    body = b"Subject: offers\r\nFrom: s@sender.test\r\nX-Epoxi-Tenant: shop\r\n\r\nHi.\r\n"
    for recipient in cases:
        (ids[recipient],) = await send(world, [recipient], body=body)
    try:
        await eventually(lambda: len(oob(world)) >= len(cases), timeout=90, what="3 OOB records")
    except AssertionError:
        raise AssertionError(postfix.log()) from None
    by_recipient = {r.recipient: r for r in oob(world)}
    for recipient, (status, category) in cases.items():
        record = by_recipient[recipient]
        assert record.message_id == ids[recipient]
        assert record.response is not None and record.response.enhanced == status, record
        assert record.response.code == 550
        assert record.classification == category, record
        assert record.sender.startswith("b+") and record.sender.endswith("@bounce.test")
        assert record.reporter == "pf.test" and record.reason == ""
        assert record.tenant == "shop"
    kept = sorted((world.app.settings.data_dir / "bounces").iterdir())
    assert len(kept) == 3 and all("-dsn-" in p.name for p in kept)
    assert b"Postfix" in kept[0].read_bytes()


async def test_complaint_to_fbl_address_becomes_feedback(make_world: MakeWorld) -> None:
    """No Postfix needed: the test is the mailbox provider, and sends an ARF report about a
    message Epoxi delivered (to its test sink) to Epoxi's FBL address."""
    world = await make_world(bounce_domain="bounce.test", fbl_addresses=["fbl@local.test"])
    (message_id,) = await send(world, ["ann@a.test"])
    await eventually(lambda: any(r.type is RecordType.DELIVERY for r in world.records))
    (sent,) = [m for sink in world.sinks.values() for m in sink.messages]
    verp = sent.mail_from
    assert verp.startswith("b+") and verp.endswith("@bounce.test")
    report = (
        "From: <fbl@isp.example>\r\nSubject: complaint\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=feedback-report; boundary="B"\r\n\r\n'
        "--B\r\nContent-Type: text/plain\r\n\r\nA complaint.\r\n"
        "--B\r\nContent-Type: message/feedback-report\r\n\r\n"
        "Feedback-Type: abuse\r\nUser-Agent: TestFBL/1.0\r\nVersion: 1\r\n"
        f"Original-Mail-From: <{verp}>\r\nOriginal-Rcpt-To: <ann@a.test>\r\n\r\n"
        "--B\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"Return-Path: <{verp}>\r\nTo: ann@a.test\r\nSubject: hello\r\n\r\n--B--\r\n"
    ).encode()
    await send(world, ["fbl@local.test"], sender="", body=report)
    await eventually(lambda: any(r.type is RecordType.FEEDBACK for r in world.records))
    (feedback,) = [r for r in world.records if r.type is RecordType.FEEDBACK]
    assert (feedback.message_id, feedback.recipient) == (message_id, "ann@a.test")
    assert (feedback.feedback_type, feedback.reporter) == ("abuse", "TestFBL/1.0")
    forged = verp[: -len("@bounce.test") - 1] + ("a" if verp[-13] != "a" else "b") + "@bounce.test"
    await send(world, [forged], sender="", body=report.replace(verp.encode(), forged.encode()))
    await eventually(lambda: len(list((world.app.settings.data_dir / "bounces").iterdir())) == 2)
    assert [r.type for r in world.records].count(RecordType.FEEDBACK) == 1


@pytest.mark.timeout(120)
async def test_exim_dsns_become_oob_records(make_world: MakeWorld, exim: Exim) -> None:
    """Epoxi relays through Exim, which sends on to the test sink; what the sink refuses
    (user unknown, mailbox full at RCPT; a policy refusal at the end of data) Exim bounces
    with its own DSNs, back to Epoxi's bounce domain."""
    world = await make_world(
        bounce_domain="bounce.test",
        relay={"host": "127.0.0.1", "port": exim.port, "tls": "disabled"},
    )
    exim.epoxi_port = world.port
    exim.sink = ("127.0.0.2", world.sink_port)
    await asyncio.to_thread(exim.start)
    cases = {
        "reject@sink.test": ("5.1.1", "InvalidRecipient"),
        "quota@sink.test": ("5.2.2", "MailboxFull"),
        "reject-data@sink.test": ("5.7.1", "SpamBlock"),  # the sink says "spam"
    }
    ids = {}
    for recipient in cases:
        (ids[recipient],) = await send(world, [recipient])
    try:
        await eventually(lambda: len(oob(world)) >= len(cases), timeout=90, what="3 OOB records")
    except AssertionError:
        raise AssertionError(exim.log()) from None
    by_recipient = {r.recipient: r for r in oob(world)}
    for recipient, (status, category) in cases.items():
        record = by_recipient[recipient]
        assert record.message_id == ids[recipient]
        assert record.response is not None and record.response.enhanced == status, record
        assert record.classification == category, record
        assert record.reporter == "ex.test" and record.reason == ""
