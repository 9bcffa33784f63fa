"""DNS that misbehaves, seen from delivery: each case ends as Postfix would end it.

| case | outcome |
|---|---|
| SERVFAIL, REFUSED, timeout | deferred (4.4.3), tried again |
| NXDOMAIN | bounced (5.1.2) with a DSN |
| null MX (RFC 7505) | bounced |
| no MX, no address | bounced |
| MX host names that do not exist | bounced (5.4.4), as Postfix's "Host not found" |
| MX host names that fail transiently | deferred |
| MX as an IP address, CNAME chains | delivered |
| CNAME loop | deferred |
"""

from __future__ import annotations

import pytest

from epoxi.events.records import Record, RecordType
from epoxi.testing.dnsserver import Zone
from tests.e2e.conftest import MakeWorld, World, send, zone_for_tests

FAST = {"retry_interval": 0.3, "max_retry_interval": 0.5}


def zone() -> Zone:
    z = zone_for_tests()
    z.add("servfail.test", "MX", "10 mx1.a.test.")
    z.fail("servfail.test", "SERVFAIL")
    z.add("refused.test", "MX", "10 mx1.a.test.")
    z.fail("refused.test", "REFUSED")
    z.add("slowdns.test", "MX", "10 mx1.a.test.")
    z.fail("slowdns.test", "TIMEOUT")
    z.add("ghost-mx.test", "MX", "10 ghost1.nowhere.test.")
    z.add("ghost-mx.test", "MX", "20 ghost2.nowhere.test.")
    z.add("flaky-mx.test", "MX", "10 flaky.flaky-mx.test.")
    z.add("flaky.flaky-mx.test", "A", "127.0.0.2")
    z.fail("flaky.flaky-mx.test", "SERVFAIL")
    z.add("literal-mx.test", "MX", "10 127.0.0.2.")
    z.add("alias.test", "CNAME", "alias2.test.")
    z.add("alias2.test", "CNAME", "a.test.")
    z.add("loop.test", "CNAME", "loop2.test.")
    z.add("loop2.test", "CNAME", "loop.test.")
    z.add("empty.test", "TXT", '"nothing for mail here"')
    return z


def reply_of(record: Record) -> str:
    assert record.response is not None
    return f"{record.response.code} {record.response.enhanced}"


@pytest.mark.parametrize("domain", ["servfail.test", "refused.test", "slowdns.test", "loop.test"])
async def test_transient_dns_failures_defer(make_world: MakeWorld, domain: str) -> None:
    world: World = await make_world(zone=zone(), delivery=FAST)
    await send(world, [f"x@{domain}"])
    failures = await world.wait_records(RecordType.TRANSIENT_FAILURE, 2, timeout=20)
    assert reply_of(failures[0]).startswith("451 4.4.3")
    assert world.app.spool.count() == 1 and not any(
        r.type is RecordType.BOUNCE for r in world.records
    )


@pytest.mark.parametrize(
    ("domain", "enhanced"),
    [
        ("nowhere-at-all.test", "5.1.2"),  # NXDOMAIN
        ("nullmx.test", "5.1.10"),  # null MX (RFC 7505 §4.2: 556 5.1.10)
        ("empty.test", "5.1.2"),  # the name exists, but has no MX and no address
        ("ghost-mx.test", "5.4.4"),  # every MX host name is NXDOMAIN
    ],
)
async def test_permanent_dns_answers_bounce(
    make_world: MakeWorld, domain: str, enhanced: str
) -> None:
    world: World = await make_world(zone=zone(), delivery=FAST)
    await send(world, [f"x@{domain}"])
    (bounce,) = await world.wait_records(RecordType.BOUNCE, 1)
    assert bounce.response is not None and bounce.response.code // 100 == 5
    assert bounce.response.enhanced == enhanced, bounce
    dsn = await world.wait_records(RecordType.RECEPTION, 1, where=lambda r: r.origin == "dsn")
    assert dsn


async def test_mx_host_failing_transiently_defers(make_world: MakeWorld) -> None:
    world: World = await make_world(zone=zone(), delivery=FAST)
    await send(world, ["x@flaky-mx.test"])
    (failure, *_) = await world.wait_records(RecordType.TRANSIENT_FAILURE, 1)
    assert reply_of(failure).startswith("4")
    assert not any(r.type is RecordType.BOUNCE for r in world.records)


@pytest.mark.parametrize("domain", ["literal-mx.test", "alias.test"])
async def test_ip_literal_mx_and_cname_chains_deliver(make_world: MakeWorld, domain: str) -> None:
    world: World = await make_world(zone=zone())
    await send(world, [f"x@{domain}"])
    (delivery,) = await world.wait_records(RecordType.DELIVERY, 1)
    assert delivery.peer_address == "127.0.0.2"
