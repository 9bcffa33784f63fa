"""Priority and tenant fairness on real sockets: a priority message passes a backlog, a small
tenant is not stuck behind a big one's, a tenant's message rate holds (by the records' own
timestamps and order, never by timing the test)."""

from __future__ import annotations

import asyncio
import smtplib
from pathlib import Path
from typing import Any

from epoxi.config import TenantRateSettings
from epoxi.events.records import Record, RecordType
from tests.e2e.conftest import Api, World, message_request, send

SITE = "mx1.a.test,mx2.a.test"


def body(tenant: str = "", priority: str = "") -> bytes:
    controls = f"X-Epoxi-Tenant: {tenant}\r\n" if tenant else ""
    controls += f"X-Epoxi-Priority: {priority}\r\n" if priority else ""
    return f"{controls}Subject: p\r\nFrom: s@sender.test\r\n\r\nHi.\r\n".encode()


def one_connection(**shaping: Any) -> dict[str, Any]:
    defaults = {"idle_timeout": 0.5, "connection_limit": 1, **shaping}
    return {"defaults": defaults}


def deliveries(world: World) -> list[Record]:
    return [r for r in world.records if r.type is RecordType.DELIVERY]


def delivered_before_reception(world: World, message_id: str) -> int:
    """Deliveries recorded before ``message_id`` was spooled (records are in emission order)."""
    count = 0
    for record in world.records:
        if record.type is RecordType.RECEPTION and record.message_id == message_id:
            return count
        count += record.type is RecordType.DELIVERY
    raise AssertionError(f"no reception of {message_id}")


async def test_a_priority_message_passes_the_backlog_of_its_ready_queue(api: Api) -> None:
    world, _ = await api(delivery=one_connection(max_message_rate="40/s"))
    backlog = await send(world, ["x@a.test"], body=body(), count=100)  # 2.5 s of sending
    [urgent] = await send(world, ["x@a.test"], body=body(priority="50"))
    await world.wait_records(RecordType.DELIVERY, 1, where=lambda r: r.message_id == urgent)
    order = [r.message_id for r in deliveries(world)]
    ahead = delivered_before_reception(world, urgent)
    # At most the one on the connection when it arrived went before it, and it did not wait
    # for the backlog: most of it was still to be sent.
    assert order.index(urgent) <= ahead + 1, (order.index(urgent), ahead)
    assert len(backlog) - ahead >= 30, f"the backlog was sent too fast to tell ({ahead})"


async def test_a_small_tenant_is_not_delayed_behind_a_big_tenants_backlog(api: Api) -> None:
    world, client = await api(delivery=one_connection())
    suspended = await client.post("/admin/suspend", json={"site": SITE})
    assert suspended.status_code == 200
    bulk = await send(world, ["x@a.test"], body=body(tenant="bulk"), count=200)
    shop = await send(world, ["y@a.test"], body=body(tenant="shop"), count=5)
    pipeline = (await client.get("/admin/pipelines/a.test")).json()
    assert pipeline["ready"][0]["queued"] == 205  # all of it waits in the one ready queue
    await client.delete("/admin/suspend", params={"site": SITE})
    await world.wait_records(RecordType.DELIVERY, 5, where=lambda r: r.message_id in shop)
    order = [r.message_id for r in deliveries(world)]
    positions = [order.index(message_id) for message_id in shop]
    assert positions == [1, 3, 5, 7, 9], positions  # in turn with the bulk tenant
    assert set(order[:10]) - set(shop) <= set(bulk)


async def test_a_tenant_rate_holds_over_connections_and_other_tenants_pass(api: Api) -> None:
    world, _ = await api(
        delivery={
            "defaults": {"idle_timeout": 0.5, "connection_limit": 4},
            "tenant_rates": {"bulk": {"max_message_rate": "20/s"}},
        }
    )
    bulk = await send(world, ["x@a.test"], body=body(tenant="bulk"), count=11)
    free = await send(world, ["y@a.test"], body=body(tenant="free"), count=10)
    await world.wait_records(RecordType.DELIVERY, 21, timeout=20)
    times = sorted(r.timestamp for r in deliveries(world) if r.message_id in bulk)
    assert times[-1] - times[0] >= 10 / 20 - 0.02, times  # 11 at 20/s: 0.5 s at least
    last_free = max(r.timestamp for r in deliveries(world) if r.message_id in free)
    assert last_free < times[-1]  # the other tenant was not held up by bulk's rate


async def test_priority_from_the_api_and_the_header_and_their_bad_values(api: Api) -> None:
    world, client = await api()
    for bad in (101, -101, "high", 1.5):
        answer = await client.post("/messages", json={**message_request(), "priority": bad})
        assert answer.status_code == 422, (bad, answer.text)
        raw = {"from": "s@sender.test", "to": ["x@a.test"], "content": "Subject: s\n\nhi\n"}
        assert (
            await client.post("/messages/raw", json={**raw, "priority": bad})
        ).status_code == 422
    sent = await client.post("/messages", json={**message_request(), "priority": 60})
    raw = {"from": "s@sender.test", "to": ["x@a.test"], "content": "Subject: s\n\nhi\n"}
    sent_raw = await client.post("/messages/raw", json={**raw, "priority": -60})
    assert (sent.status_code, sent_raw.status_code) == (202, 202)

    def refused() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", world.port, timeout=20) as smtp:
            smtp.ehlo("client.test")
            smtp.mail("s@sender.test")
            smtp.rcpt("x@a.test")
            return smtp.data(body(priority="urgent"))

    code, text = await asyncio.to_thread(refused)
    assert (code, text[:5]) == (550, b"5.6.0") and b"X-Epoxi-Priority" in text
    [by_header] = await send(world, ["x@a.test"], body=body(priority="-7"))
    await world.wait_records(RecordType.DELIVERY, 3)
    delivered = b"".join(m.data for sink in world.sinks.values() for m in sink.messages)
    assert b"X-Epoxi-Priority" not in delivered
    receptions = [r.message_id for r in world.records if r.type is RecordType.RECEPTION]
    assert len(receptions) == 3 and by_header in receptions


async def test_a_reload_applies_new_tenant_priorities_and_rates_to_live_queues(
    api: Api,
) -> None:
    world, _ = await api()
    await send(world, ["x@a.test"], body=body(tenant="bulk"))
    await world.wait_records(RecordType.DELIVERY, 1)  # its ready queue is live now
    delivery = world.app.settings.delivery.model_copy(
        update={
            "tenant_priorities": {"shop": 90},
            "tenant_rates": {"bulk": TenantRateSettings(max_message_rate="20/s")},
        }
    )
    world.app.reload(world.app.settings.model_copy(update={"delivery": delivery}))
    assert world.app.dispatcher.tenants.priorities == {"shop": 90}
    bulk = await send(world, ["x@a.test"], body=body(tenant="bulk"), count=6)
    await world.wait_records(RecordType.DELIVERY, 7)
    times = sorted(r.timestamp for r in deliveries(world) if r.message_id in bulk)
    assert times[-1] - times[0] >= 5 / 20 - 0.02, times


async def test_a_tenants_provider_rate_holds_at_that_providers_sites_only(
    api: Api, tmp_path: Path
) -> None:
    shaping = tmp_path / "shaping.toml"
    shaping.write_text('[providers.acme]\nmatch_domains = ["a.test"]\n')
    world, _ = await api(
        shaping_files=[str(shaping)],
        delivery={"tenant_rates": {"bulk": {"providers": {"acme": "20/s"}}}},
    )
    limited = await send(world, ["x@a.test"], body=body(tenant="bulk"), count=11)
    other = await send(world, ["x@plain.test"], body=body(tenant="bulk"), count=6)
    await world.wait_records(RecordType.DELIVERY, 17)
    assert {rq.provider for rq in world.app.dispatcher.ready.values()} == {"acme", None}
    times = sorted(r.timestamp for r in deliveries(world) if r.message_id in limited)
    assert times[-1] - times[0] >= 10 / 20 - 0.02, times
    last_other = max(r.timestamp for r in deliveries(world) if r.message_id in other)
    assert last_other < times[-1]  # plain.test is not acme's: not held to acme's rate
