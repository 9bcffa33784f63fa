"""Real DSNs from a real Postfix: Epoxi sends with VERP return paths through a private Postfix
instance that bounces (unknown user, mailbox full, relay denied) and sends its DSNs back to
Epoxi's bounce domain; Epoxi reads each into an OOB record for the right message and
recipient, and keeps the DSN in its quarantine."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from epoxi.events.records import Record, RecordType
from tests.conftest import eventually
from tests.e2e.conftest import Api, MakeWorld, World, run_cli, send
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


# --------------------------------------------------------------------- the quarantine


def dsn_to(verp: str, recipient: str) -> bytes:
    """An RFC 3464 DSN for ``recipient``, as a receiving MTA sends one to the return path."""
    return (
        f"From: MAILER-DAEMON@mx.far.test\r\nTo: <{verp}>\r\nSubject: Undelivered Mail\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
        "--B\r\nContent-Type: text/plain\r\n\r\nThe mail could not be delivered.\r\n"
        "--B\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.far.test\r\n\r\n"
        f"Final-Recipient: rfc822; {recipient}\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        "Remote-MTA: dns; mx.far.test\r\n"
        "Diagnostic-Code: smtp; 550 5.1.1 no such user\r\n\r\n"
        "--B\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"Return-Path: <{verp}>\r\nTo: {recipient}\r\nSubject: hello\r\n\r\n--B--\r\n"
    ).encode()


async def test_a_kept_dsn_is_listed_fetched_and_deleted_over_the_api_and_the_cli(
    api: Api,
) -> None:
    world, client = await api(bounce_domain="bounce.test")
    assert (await client.get("/admin/quarantine")).json() == {"reports": [], "total": 0}
    (message_id,) = await send(world, ["gone@a.test"])
    await world.wait_records(RecordType.DELIVERY, 1)
    (sent,) = [m for sink in world.sinks.values() for m in sink.messages]
    dsn = dsn_to(sent.mail_from, "gone@a.test")
    (first,) = await send(world, [sent.mail_from], sender="", body=dsn)
    (second,) = await send(world, [sent.mail_from], sender="", body=dsn)
    await world.wait_records(RecordType.OOB, 2, where=lambda r: r.message_id == message_id)

    listed = (await client.get("/admin/quarantine")).json()
    assert listed["total"] == 2
    newest, oldest = listed["reports"]
    assert [(r["kind"], r["queue_id"]) for r in (newest, oldest)] == [
        ("dsn", second),
        ("dsn", first),
    ]
    directory = world.app.settings.data_dir / "bounces"
    kept = (directory / newest["name"]).read_bytes()
    assert newest["size"] == len(kept) and dsn in kept  # the report as it came in
    assert oldest["kept_at"] <= newest["kept_at"] and newest["name"].endswith(f"-{second}.eml")
    (one,) = (await client.get("/admin/quarantine", params={"limit": 1})).json()["reports"]
    assert one == newest

    fetched = await client.get(f"/admin/quarantine/{newest['name']}")
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "message/rfc822"
    assert fetched.content == kept

    shown = await run_cli(client, "bounce", "quarantine", "ls")
    assert shown.returncode == 0, shown.stderr
    assert b"2 of 2 reports kept" in shown.stdout and newest["name"].encode() in shown.stdout
    as_json = await run_cli(client, "bounce", "quarantine", "ls", "--json", "--limit", "1")
    assert json.loads(as_json.stdout) == {"reports": [newest], "total": 2}
    printed = await run_cli(client, "bounce", "quarantine", "show", oldest["name"])
    assert printed.returncode == 0 and printed.stdout == (directory / oldest["name"]).read_bytes()
    removed = await run_cli(client, "bounce", "quarantine", "rm", oldest["name"])
    assert removed.returncode == 0 and f"removed {oldest['name']}".encode() in removed.stdout
    assert not (directory / oldest["name"]).exists()
    missing = await run_cli(client, "bounce", "quarantine", "show", oldest["name"])
    assert missing.returncode == 1 and b"404" in missing.stderr

    gone = await client.delete(f"/admin/quarantine/{newest['name']}")
    assert gone.status_code == 200 and gone.json() == newest
    for method in ("GET", "DELETE"):
        again = await client.request(method, f"/admin/quarantine/{newest['name']}")
        assert again.status_code == 404, again.text
        assert again.headers["content-type"] == "application/problem+json"
    assert (await client.get("/admin/quarantine")).json() == {"reports": [], "total": 0}
    assert (await client.get("/admin/quarantine", params={"limit": 0})).status_code in (400, 422)


async def test_a_name_that_leaves_the_quarantine_reaches_no_file(api: Api) -> None:
    world, client = await api(bounce_domain="bounce.test")
    data_dir = world.app.settings.data_dir
    (data_dir / "bounces").mkdir(exist_ok=True)
    outside = data_dir / "1-dsn-OUTSIDE.eml"  # a name of the quarantine's shape, one level up
    outside.write_bytes(b"Subject: not a report\r\n\r\nsecret\r\n")
    names = [
        "..%2F1-dsn-OUTSIDE.eml",
        "%2E%2E%2F1-dsn-OUTSIDE.eml",
        "..%2F..%2Fetc%2Fpasswd",
        "..%5C1-dsn-OUTSIDE.eml",
        "..",
        "%2E%2E",
        "store.db",
        "..%2Fstore.db",
        "%2Fetc%2Fpasswd",
    ]
    for name in names:
        for method in ("GET", "DELETE"):
            reply = await client.request(method, f"/admin/quarantine/{name}")
            assert reply.status_code in (404, 422), (method, name, reply.status_code)
            assert b"secret" not in reply.content and b"root:" not in reply.content
    assert outside.exists() and (data_dir / "store.db").exists()


async def test_a_node_without_a_bounce_domain_has_an_empty_quarantine(api: Api) -> None:
    _, client = await api()
    assert (await client.get("/admin/quarantine")).json() == {"reports": [], "total": 0}
    assert (await client.get("/admin/quarantine/1-dsn-X.eml")).status_code == 404
    assert (await client.delete("/admin/quarantine/1-dsn-X.eml")).status_code == 404
