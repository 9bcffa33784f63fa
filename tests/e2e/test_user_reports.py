"""Bugs a user hit trying Epoxi as a newcomer would, each pinned end to end.

Sending (send_at and max_age, cancelling, ip_pool), admin (retry, pipelines with a smarthost),
security (per-domain TLS, control headers from strangers, mail loops).
"""

from __future__ import annotations

import asyncio
import smtplib
from datetime import UTC, datetime, timedelta

import pytest

from epoxi.events.records import RecordType
from epoxi.store import KeyStore, Scope, store_path
from tests.e2e.conftest import Api, MakeWorld, World, message_request, send


def _later(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


async def test_send_at_later_than_max_age_is_sent_not_expired(api: Api) -> None:
    world, client = await api(delivery={"max_age": 1})
    reply = await client.post("/messages", json={**message_request(), "send_at": _later(1.5)})
    assert reply.status_code == 202, reply.text
    [delivered] = await world.wait_records(RecordType.DELIVERY, 1)
    assert delivered.recipient == "x@a.test"
    assert not [r for r in world.records if r.type is RecordType.EXPIRATION]


async def test_retry_leaves_scheduled_mail_alone_and_a_sender_can_cancel_it(api: Api) -> None:
    world, client = await api()
    keys = KeyStore(store_path(world.app.settings.data_dir))
    _, acme = keys.create("acme", {Scope.SEND, Scope.READ}, tenant="acme")
    _, other = keys.create("other", {Scope.SEND, Scope.READ}, tenant="other")
    _, ops = keys.create("ops", {Scope.ADMIN})
    keys.close()
    reply = await client.post(
        "/messages",
        json={**message_request(), "send_at": _later(3600)},
        headers={"Authorization": f"Bearer {acme}"},
    )
    [queued] = reply.json()["messages"]
    path = f"/messages/{queued['id']}"
    retried = await client.post("/admin/retry", json={}, headers={"Authorization": f"Bearer {ops}"})
    assert retried.status_code == 200 and retried.json()["retried"] == 0
    assert world.app.scheduler.next_due()  # still waiting for its send_at
    stranger = await client.delete(path, headers={"Authorization": f"Bearer {other}"})
    assert stranger.status_code == 404  # another tenant's message does not exist for it
    cancelled = await client.delete(path, headers={"Authorization": f"Bearer {acme}"})
    assert cancelled.status_code == 200 and cancelled.json() == {"id": queued["id"], "cancelled": 1}
    [record] = await world.wait_records(RecordType.CANCELLED, 1)
    assert record.message_id == queued["id"]
    again = await client.delete(path, headers={"Authorization": f"Bearer {acme}"})
    assert again.status_code == 409 and "not waiting" in again.json()["detail"]
    status = await client.get(path, headers={"Authorization": f"Bearer {acme}"})
    assert status.json()["recipients"][0]["state"] == "cancelled"


@pytest.mark.parametrize("pool", ["second", "nonsense"])
async def test_ip_pool_that_is_not_a_pool_is_422(api: Api, pool: str) -> None:
    _, client = await api(
        delivery={"sources": [{"name": "first"}, {"name": "second", "bind": "127.0.0.11"}]}
    )
    refused = await client.post("/messages", json={**message_request(), "ip_pool": pool})
    assert refused.status_code == 422, refused.text
    assert f"no egress pool '{pool}'; the pools are: default" in refused.text
    used = await client.post("/messages", json={**message_request(), "ip_pool": "default"})
    assert used.status_code == 202


async def test_pipelines_of_an_unknown_key_is_404_with_a_smarthost(api: Api) -> None:
    world, _ = await api()
    relayed, relayed_client = await api(relay={"host": "127.0.0.2", "port": world.sink_port})
    assert (await relayed_client.post("/messages", json=message_request())).status_code == 202
    await relayed.wait_records(RecordType.DELIVERY, 1)
    assert (await relayed_client.get("/admin/pipelines/a.test")).status_code == 200
    missing = await relayed_client.get("/admin/pipelines/nothing-here.test")
    assert missing.status_code == 404


async def test_tls_required_for_one_domain_is_honoured(make_world: MakeWorld) -> None:
    world: World = await make_world(delivery={"shaping": {"a.test": {"tls": "required"}}})
    await send(world, ["x@a.test", "y@plain.test"])
    [deferred] = await world.wait_records(RecordType.TRANSIENT_FAILURE, 1)
    await world.wait_records(RecordType.DELIVERY, 1)
    assert deferred.recipient == "x@a.test"
    assert deferred.response is not None and deferred.response.enhanced == "4.7.4"
    received = [m.rcpt_tos for sink in world.sinks.values() for m in sink.messages]
    assert received == [["y@plain.test"]]  # never in plain text to a.test


async def test_control_headers_from_an_untrusted_client_are_stripped(
    make_world: MakeWorld,
) -> None:
    world: World = await make_world(local_domains=["a.test"], trusted_networks=["10.0.0.0/8"])
    body = (
        b"X-Epoxi-Tenant: shop\r\n\tfolded-on\r\nX-Epoxi-Campaign: welcome\r\n"
        b"Subject: hello\r\n\r\nHi.\r\n"
    )
    await send(world, ["x@a.test"], body=body)
    [reception] = await world.wait_records(RecordType.RECEPTION, 1)
    [delivery] = await world.wait_records(RecordType.DELIVERY, 1)
    assert (reception.tenant, reception.campaign) == ("", "")
    assert delivery.queue == "a.test"
    [message] = [m for sink in world.sinks.values() for m in sink.messages]
    assert b"X-Epoxi" not in message.data and b"folded-on" not in message.data
    assert b"\r\nSubject: hello\r\n" in message.data


async def test_a_mail_loop_is_refused_with_554_5_4_6(make_world: MakeWorld) -> None:
    world: World = await make_world(max_hops=10)
    looping = b"Received: from elsewhere\r\n" * 10 + b"Subject: loop\r\n\r\nHi.\r\n"

    def deliver() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", world.port, timeout=20) as smtp:
            smtp.ehlo("client.test")
            smtp.mail("s@sender.test")
            smtp.rcpt("x@a.test")
            return smtp.data(looping)  # plus our own Received: 11 hops

    code, text = await asyncio.to_thread(deliver)
    assert (code, text.split()[0]) == (554, b"5.4.6")
    assert not [r for r in world.records if r.type is RecordType.RECEPTION]


def _send_with_dsn(world: World, mail: str, rcpts: list[tuple[str, str]]) -> None:
    with smtplib.SMTP("127.0.0.1", world.port, timeout=20) as smtp:
        smtp.ehlo("client.test")
        assert smtp.has_extn("dsn")
        smtp.mail("s@sender.test", [mail] if mail else [])
        for rcpt, options in rcpts:
            smtp.rcpt(rcpt, [options] if options else [])
        code, _ = smtp.data(b"Subject: dsn\r\nFrom: s@sender.test\r\n\r\nHi.\r\n")
        assert code == 250


async def test_dsn_extension_end_to_end(make_world: MakeWorld) -> None:
    """NOTIFY=SUCCESS to a next hop without DSN: a "relayed" DSN; NOTIFY=NEVER: no DSN for a
    bounce; ENVID and ORCPT come back in the report."""
    world: World = await make_world()
    await asyncio.to_thread(
        _send_with_dsn,
        world,
        "RET=HDRS ENVID=batch-27",
        [
            ("ok@a.test", "NOTIFY=SUCCESS ORCPT=rfc822;first@origin.test"),
            ("reject-quiet@a.test", "NOTIFY=NEVER"),
        ],
    )
    await world.wait_records(RecordType.BOUNCE, 1)
    [dsn] = await world.wait_records(RecordType.RECEPTION, 1, where=lambda r: r.origin == "dsn")
    await world.wait_records(RecordType.DELIVERY, 2)  # the original, then the DSN to the sender
    [report] = [
        m for sink in world.sinks.values() for m in sink.messages if m.rcpt_tos == ["s@sender.test"]
    ]
    assert b"Action: relayed" in report.data and b"reject-quiet" not in report.data
    assert b"Original-Envelope-Id: batch-27" in report.data
    assert b"Original-Recipient: rfc822; first@origin.test" in report.data
    assert dsn.recipients == ["s@sender.test"]


async def test_a_server_greeting_us_with_our_own_name_is_a_loop(make_world: MakeWorld) -> None:
    """A local domain whose MX is this very host would come straight back: bounce 5.4.6, as
    Postfix's "loops back to myself", and never send (the DSN loops too, and stops there)."""
    world: World = await make_world(sink_options={"hostname": "mx.test"})  # our own name
    await send(world, ["x@a.test"])
    [bounce] = await world.wait_records(
        RecordType.BOUNCE, 1, where=lambda r: r.recipient == "x@a.test"
    )
    assert bounce.response is not None and bounce.response.enhanced == "5.4.6"
    assert "loops back to myself" in bounce.response.text
    assert not [m for sink in world.sinks.values() for m in sink.messages]
