"""Delivery end to end: Epoxi between smtplib and sinks on 127.0.0.x, DNS on loopback."""

from __future__ import annotations

import email
import email.policy
import time
from pathlib import Path
from typing import Any

import pytest
from flufl.bounce import all_failures

from epoxi.events.records import RecordType, decode_record
from epoxi.ids import new_message_id
from epoxi.message import MessageMeta
from epoxi.spool import Spool
from epoxi.testing.sink import Sink
from tests.conftest import free_port
from tests.e2e.conftest import MakeWorld, World, send, wait_left_spool


async def test_delivers_to_the_preferred_mx(make_world: MakeWorld) -> None:
    world: World = await make_world()
    (queue_id,) = await send(world, ["x@a.test"])
    (record,) = await world.wait_records(RecordType.DELIVERY, 1)
    assert record.message_id == queue_id and record.peer_address == "127.0.0.2"
    assert record.site == "mx1.a.test,mx2.a.test" and record.queue == "a.test"
    (message,) = world.sinks["127.0.0.2"].messages
    assert message.rcpt_tos == ["x@a.test"] and message.mail_from == "s@sender.test"
    assert [r.type for r in world.records][:1] == [RecordType.RECEPTION]


async def test_falls_back_to_the_next_mx(make_world: MakeWorld) -> None:
    world: World = await make_world()
    await send(world, ["x@fallback.test"])
    (record,) = await world.wait_records(RecordType.DELIVERY, 1)
    assert record.peer_address == "127.0.0.3"


async def test_no_mx_uses_the_address_record(make_world: MakeWorld) -> None:
    world: World = await make_world()
    await send(world, ["x@plain.test"])
    (record,) = await world.wait_records(RecordType.DELIVERY, 1)
    assert record.peer_address == "127.0.0.2"


async def test_null_mx_bounces_with_a_dsn(make_world: MakeWorld) -> None:
    world: World = await make_world()
    (queue_id,) = await send(world, ["x@nullmx.test"])
    (bounce,) = await world.wait_records(RecordType.BOUNCE, 1)
    assert bounce.message_id == queue_id and bounce.response and bounce.response.code >= 500
    (dsn,) = await world.wait_records(RecordType.DELIVERY, 1)
    assert dsn.recipient == "s@sender.test" and dsn.sender == ""


async def test_domains_sharing_mx_hosts_share_a_site(make_world: MakeWorld) -> None:
    world: World = await make_world()
    await send(world, ["x@a.test", "y@shared.test"])
    records = await world.wait_records(RecordType.DELIVERY, 2)
    assert {r.site for r in records} == {"mx1.a.test,mx2.a.test"}
    assert len(world.app.dispatcher.ready) == 1


async def test_connection_reuse_and_pipelining(make_world: MakeWorld) -> None:
    world: World = await make_world(
        delivery={"defaults": {"connection_limit": 2, "idle_timeout": 2}}
    )
    await send(world, ["x@a.test"], count=40)
    await world.wait_records(RecordType.DELIVERY, 40)
    sink = world.sinks["127.0.0.2"]
    assert len(sink.messages) == 40
    assert sink.connections <= 2
    assert all(m.envelope_flights == 1 for m in sink.messages)


async def test_connection_limit_and_message_rate(make_world: MakeWorld) -> None:
    world: World = await make_world(
        delivery={
            "defaults": {"connection_limit": 1, "max_message_rate": "20/s", "idle_timeout": 2}
        }
    )
    await send(world, ["x@a.test"], count=20)
    await world.wait_records(RecordType.DELIVERY, 20)
    sink = world.sinks["127.0.0.2"]
    assert sink.max_concurrent_connections == 1
    times = sorted(m.received_at for m in sink.messages)
    assert times[-1] - times[0] >= 0.8  # 20 messages at 20/s: about 0.95 s


async def test_transient_failure_is_retried_then_delivered(make_world: MakeWorld) -> None:
    world: World = await make_world()
    (queue_id,) = await send(world, ["x@later.test"])
    (failure,) = await world.wait_records(RecordType.TRANSIENT_FAILURE, 1)
    assert failure.message_id == queue_id and failure.next_attempt > failure.timestamp
    sink = Sink("127.0.0.6", world.sink_port)
    await sink.start()
    try:
        (delivery,) = await world.wait_records(RecordType.DELIVERY, 1)
        assert delivery.attempt >= 2 and delivery.peer_address == "127.0.0.6"
    finally:
        await sink.stop()


async def test_tempfail_reply_is_a_transient_failure(make_world: MakeWorld) -> None:
    world: World = await make_world()
    await send(world, ["tempfail-x@a.test", "ok@a.test"])
    await world.wait_records(RecordType.DELIVERY, 1)
    (failure, *_) = await world.wait_records(RecordType.TRANSIENT_FAILURE, 1)
    assert failure.recipient == "tempfail-x@a.test" and failure.response
    assert failure.response.code == 450


async def test_permanent_failure_bounces_with_a_parseable_dsn(make_world: MakeWorld) -> None:
    world: World = await make_world()
    await send(world, ["reject-x@a.test", "ok@a.test"])
    (bounce,) = await world.wait_records(RecordType.BOUNCE, 1)
    assert bounce.recipient == "reject-x@a.test" and bounce.classification
    await world.wait_records(RecordType.DELIVERY, 2)
    dsn = next(m for m in world.sinks["127.0.0.2"].messages if m.mail_from == "")
    assert dsn.rcpt_tos == ["s@sender.test"]
    parsed = email.message_from_bytes(
        dsn.data.split(b"\r\n", 1)[1] if dsn.data.startswith(b"Received:") else dsn.data,
        policy=email.policy.default,
    )
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "delivery-status"
    _temporary, permanent = all_failures(email.message_from_bytes(dsn.data))
    assert b"reject-x@a.test" in {a if isinstance(a, bytes) else a.encode() for a in permanent}


async def test_no_dsn_for_the_null_sender(make_world: MakeWorld) -> None:
    world: World = await make_world()
    (queue_id,) = await send(world, ["reject-x@a.test"], sender="")
    await world.wait_records(RecordType.BOUNCE, 1)
    await wait_left_spool(world, queue_id)  # a DSN would have been spooled before this
    assert not any(
        r.type is RecordType.RECEPTION and r.sender == "" and r.origin == "dsn"
        for r in world.records
    )


async def test_expiry_of_a_message_stuck_in_a_ready_queue(make_world: MakeWorld) -> None:
    world: World = await make_world(
        sink_options={"slow_delay": 4.0},
        delivery={
            "max_age": 1.5,
            "defaults": {"connection_limit": 1, "idle_timeout": 5},
            "timeouts": {"data_end": 10},
        },
    )
    _first, second = await send(world, ["slow-x@a.test"], count=2)
    (expired,) = await world.wait_records(
        RecordType.EXPIRATION, 1, timeout=6, where=lambda r: r.message_id == second
    )
    assert expired.response and expired.response.enhanced == "4.4.7"


async def test_suspend_and_resume_a_domain(make_world: MakeWorld) -> None:
    world: World = await make_world()
    world.app.admin.suspend("domain", "a.test", reason="maintenance")
    (held_id,) = await send(world, ["x@a.test"])
    (held,) = await world.wait_records(RecordType.SUSPENDED, 1)
    assert "maintenance" in held.reason
    # Barrier: a later message to the same sink (shared.test has a.test's MX hosts) is
    # delivered; a held message that leaked out would have been sent before it.
    (later_id,) = await send(world, ["y@shared.test"])
    await world.wait_records(RecordType.DELIVERY, 1, where=lambda r: r.message_id == later_id)
    assert [m.rcpt_tos for m in world.sinks["127.0.0.2"].messages] == [["y@shared.test"]]
    assert not any(r.type is RecordType.DELIVERY and r.message_id == held_id for r in world.records)
    assert world.app.admin.resume("domain", "a.test") == 1
    await world.wait_records(RecordType.DELIVERY, 1, where=lambda r: r.message_id == held_id)


async def test_tenant_and_campaign_headers_name_the_queue_and_are_removed(
    make_world: MakeWorld,
) -> None:
    world: World = await make_world()
    body = b"X-Epoxi-Tenant: acme\r\nX-Epoxi-Campaign: spring\r\nSubject: s\r\n\r\nhi\r\n"
    await send(world, ["x@a.test"], body=body)
    (record,) = await world.wait_records(RecordType.DELIVERY, 1)
    assert record.queue == "spring:acme@a.test"
    assert b"X-Epoxi" not in world.sinks["127.0.0.2"].messages[0].data


async def test_smarthost_with_starttls_and_auth(make_world: MakeWorld, tmp_path: Path) -> None:
    from epoxi.testing.certs import make_test_tls_context

    context, _, _ = make_test_tls_context("relay.test")
    relay_port = free_port("127.0.0.5")
    relay = Sink(
        "127.0.0.5",
        relay_port,
        tls=context,
        auth={"user": "pw"},
        require_tls=True,
        require_auth=True,
    )
    await relay.start()
    try:
        world: World = await make_world(
            relay={
                "host": "127.0.0.5",
                "port": relay_port,
                "username": "user",
                "password": "pw",
                "tls": "required",
            }
        )
        await send(world, ["x@anywhere.example"])
        (record,) = await world.wait_records(RecordType.DELIVERY, 1)
        (message,) = relay.messages
        assert message.tls and message.auth_user == "user"
        assert record.site.startswith("route:127.0.0.5")
    finally:
        await relay.stop()


async def test_egress_source_binds_its_address(make_world: MakeWorld) -> None:
    world: World = await make_world(
        delivery={"sources": [{"name": "pool-a", "bind": "127.0.0.10", "ehlo": "out.example"}]}
    )
    await send(world, ["x@a.test"])
    (record,) = await world.wait_records(RecordType.DELIVERY, 1)
    assert record.source == "pool-a"
    assert world.sinks["127.0.0.2"].messages[0].peer == "127.0.0.10"
    assert "pool-a->mx1.a.test,mx2.a.test" in world.app.dispatcher.ready


async def test_records_are_written_as_json_lines(make_world: MakeWorld) -> None:
    world: World = await make_world()
    (queue_id,) = await send(world, ["x@a.test"])
    await world.wait_records(RecordType.DELIVERY, 1)
    await world.app.records.flush()
    lines = (world.app.settings.data_dir / "logs" / "records.jsonl").read_bytes().splitlines()
    records = [decode_record(line) for line in lines]
    assert [(r.type, r.message_id) for r in records] == [
        (RecordType.RECEPTION, queue_id),
        (RecordType.DELIVERY, queue_id),
    ]
    assert records[1].response is not None and records[1].response.code == 250


@pytest.mark.parametrize("delivery", [{"dsn": False}, {"dsn_disabled_tenants": ["acme"]}])
async def test_dsn_can_be_turned_off(make_world: MakeWorld, delivery: dict[str, Any]) -> None:
    world: World = await make_world(delivery=delivery)
    body = b"X-Epoxi-Tenant: acme\r\nSubject: s\r\n\r\nhi\r\n"
    (queue_id,) = await send(world, ["reject-x@a.test"], body=body)
    await world.wait_records(RecordType.BOUNCE, 1)
    await wait_left_spool(world, queue_id)  # a DSN would have been spooled before this
    assert [r.type for r in world.records] == [RecordType.RECEPTION, RecordType.BOUNCE]


async def test_connection_rate_and_deliveries_per_connection(make_world: MakeWorld) -> None:
    world: World = await make_world(
        delivery={
            "defaults": {
                "max_deliveries_per_connection": 1,
                "max_connection_rate": "10/s",
                "idle_timeout": 2,
            }
        }
    )
    await send(world, ["x@a.test"], count=8)
    await world.wait_records(RecordType.DELIVERY, 8)
    sink = world.sinks["127.0.0.2"]
    assert sink.connections == 8 and all(m.transaction == 1 for m in sink.messages)
    times = sorted(sink.connection_times)
    assert times[-1] - times[0] >= 0.6  # 8 connections at 10/s: about 0.7 s


@pytest.mark.slow
async def test_mail_accepted_while_the_spool_loads_is_delivered_once(
    make_world: MakeWorld, tmp_path: Path
) -> None:
    """Listeners open before the start-up load; nothing is queued twice meanwhile."""
    spool = Spool(tmp_path / "data" / "spool.db")
    spool.open()
    body = b"Subject: old\r\n\r\nqueued before the restart\r\n"
    old = [
        MessageMeta(
            id=new_message_id(),
            sender="s@sender.test",
            recipients=[f"old{i}@a.test"],
            received_at=time.time(),
            size=len(body),
        )
        for i in range(12_000)
    ]
    for start in range(0, len(old), 2000):
        await spool.store_many([(meta, body) for meta in old[start : start + 2000]])
    await spool.close()
    world: World = await make_world(
        delivery={"defaults": {"connection_limit": 8, "idle_timeout": 1}}
    )
    assert world.app.loaded is not None and not world.app.loaded.done()  # still loading
    new_ids = await send(world, ["new@a.test"], count=20)
    assert await world.app.loaded == 12_000
    await world.wait_records(RecordType.DELIVERY, 12_020, timeout=90)
    delivered = [r.message_id for r in world.records if r.type is RecordType.DELIVERY]
    assert len(delivered) == len(set(delivered)) == 12_020
    assert set(new_ids) <= set(delivered)
    assert sum(sink.received for sink in world.sinks.values()) == 12_020
