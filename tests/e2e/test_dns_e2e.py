"""The resolver and MX resolution against the loopback DNS server, on real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator

import pytest

from epoxi.dns.mx import resolve_host_addresses, resolve_mx
from epoxi.dns.resolver import Resolver
from epoxi.errors import DnsPermanent, DnsTransient
from epoxi.testing.dnsserver import DnsServer, Zone, serve_forever
from tests.conftest import free_port

pytestmark = pytest.mark.both_loops

ZONE_TEXT = """
; test zone
a.test        300 MX  20 mx2.a.test.
a.test        300 MX  10 mx1.a.test.
mx1.a.test    300 A   127.0.0.2
mx2.a.test        A   127.0.0.3
b.test            MX  7 mx1.a.test   ; same hosts as a.test, other order and preferences
b.test            MX  5 mx2.a.test
equal.test        MX  10 mx-b.equal.test.
equal.test        MX  10 mx-a.equal.test.
equal.test        MX  20 mx-c.equal.test.
implicit.test     A   127.0.0.4
implicit.test     AAAA ::1
v6only.test       AAAA 2001:db8::25
nullmx.test       MX  0 .
nothing.test      TXT "no mail here"
alias.test        CNAME middle.test.
middle.test   30  CNAME target.test.
target.test       A   127.0.0.5
aliased-mx.test   CNAME a.test.
dangling.test     CNAME gone.test.
loop1.test        CNAME loop2.test.
loop2.test        CNAME loop1.test.
numeric.test      MX  10 192.0.2.1
short.test    1   A   127.0.0.6
long.test 86400   A   127.0.0.7
"""

TIMEOUT = 2.0  # generous: a loaded test machine must not turn answers into timeouts
SHORT_TIMEOUT = 0.3  # for the tests that expect a timeout


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def zone() -> Zone:
    zone = Zone.from_text(ZONE_TEXT)
    zone.negative_ttl = 5
    zone.fail("broken.test", "SERVFAIL")
    zone.fail("refused.test", "REFUSED")
    zone.fail("slow.test", "TIMEOUT")
    for i in range(40):
        zone.add("big.test", "TXT", f'"{"x" * 60}-{i}"')
    return zone


@pytest.fixture
async def server(zone: Zone) -> AsyncIterator[DnsServer]:
    async with DnsServer(zone) as running:
        yield running


def resolver_for(server: DnsServer, timeout: float = TIMEOUT, **kwargs: object) -> Resolver:
    return Resolver([server.nameserver], timeout=timeout, **kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- MX plans


async def test_mx_in_preference_order(server: DnsServer) -> None:
    plan = await resolve_mx(resolver_for(server), "A.test.")
    assert plan.domain == "a.test"
    assert [(h.name, h.preference) for h in plan.hosts] == [("mx1.a.test", 10), ("mx2.a.test", 20)]
    assert plan.site == "mx1.a.test,mx2.a.test" and not plan.implicit


async def test_site_is_shared_by_domains_with_the_same_mx_set(server: DnsServer) -> None:
    resolver = resolver_for(server)
    a, b = await resolve_mx(resolver, "a.test"), await resolve_mx(resolver, "b.test")
    assert a.site == b.site == "mx1.a.test,mx2.a.test"
    assert [h.name for h in b.hosts] == ["mx2.a.test", "mx1.a.test"]


async def test_equal_preferences_are_stable_in_the_plan_and_shuffled_per_attempt(
    server: DnsServer,
) -> None:
    plan = await resolve_mx(resolver_for(server), "equal.test")
    assert [h.name for h in plan.hosts] == ["mx-a.equal.test", "mx-b.equal.test", "mx-c.equal.test"]
    orders = {tuple(h.name for h in plan.attempt_order(random.Random(i))) for i in range(30)}
    assert {order[:2] for order in orders} == {
        ("mx-a.equal.test", "mx-b.equal.test"),
        ("mx-b.equal.test", "mx-a.equal.test"),
    }
    assert {order[2] for order in orders} == {"mx-c.equal.test"}


async def test_no_mx_falls_back_to_the_domain_itself(server: DnsServer) -> None:
    resolver = resolver_for(server)
    plan = await resolve_mx(resolver, "implicit.test")
    assert plan.implicit and [h.name for h in plan.hosts] == ["implicit.test"]
    assert plan.site == "implicit.test"
    assert (await resolve_mx(resolver, "v6only.test")).implicit


async def test_addresses_ipv4_first_and_literals_without_dns(server: DnsServer) -> None:
    resolver = resolver_for(server)
    assert await resolve_host_addresses(resolver, "implicit.test") == ["127.0.0.4", "::1"]
    assert await resolver.addresses("v6only.test") == ["2001:db8::25"]
    assert await resolver.addresses("nothing.test") == []
    before = server.queries
    assert await resolver.addresses("192.0.2.1") == ["192.0.2.1"]
    assert await resolver.addresses("[IPv6:2001:DB8::1]") == ["2001:db8::1"]
    assert server.queries == before


async def test_null_mx_is_permanent(server: DnsServer) -> None:
    with pytest.raises(DnsPermanent, match="null MX"):
        await resolve_mx(resolver_for(server), "nullmx.test")


async def test_nxdomain_is_permanent(server: DnsServer) -> None:
    resolver = resolver_for(server)
    with pytest.raises(DnsPermanent, match="NXDOMAIN"):
        await resolve_mx(resolver, "missing.test")
    with pytest.raises(DnsPermanent, match="NXDOMAIN"):
        await resolver.addresses("missing.test")


async def test_no_mx_and_no_address_is_permanent(server: DnsServer) -> None:
    with pytest.raises(DnsPermanent, match="no MX and no address"):
        await resolve_mx(resolver_for(server), "nothing.test")


async def test_servfail_and_refused_are_transient(server: DnsServer) -> None:
    resolver = resolver_for(server)
    with pytest.raises(DnsTransient, match="SERVFAIL"):
        await resolve_mx(resolver, "broken.test")
    with pytest.raises(DnsTransient, match="REFUSED"):
        await resolve_mx(resolver, "refused.test")


async def test_timeout_is_transient(server: DnsServer) -> None:
    with pytest.raises(DnsTransient, match="timed out"):
        await resolve_mx(resolver_for(server, SHORT_TIMEOUT), "slow.test")
    assert server.questions["slow.test", "MX"] >= 1


async def test_no_server_listening_is_transient() -> None:
    resolver = Resolver([("127.0.0.1", free_port())], timeout=SHORT_TIMEOUT)
    with pytest.raises(DnsTransient):
        await resolve_mx(resolver, "a.test")


async def test_transient_failures_are_not_cached(server: DnsServer, zone: Zone) -> None:
    resolver = resolver_for(server)
    with pytest.raises(DnsTransient):
        await resolver.query("broken.test", "A")
    zone.heal("broken.test")
    zone.add("broken.test", "A", "127.0.0.8")
    assert await resolver.addresses("broken.test") == ["127.0.0.8"]


async def test_cname_chain_is_followed(server: DnsServer) -> None:
    resolver = resolver_for(server)
    assert await resolver.addresses("alias.test") == ["127.0.0.5"]
    plan = await resolve_mx(resolver, "aliased-mx.test")
    assert plan.site == "mx1.a.test,mx2.a.test"
    assert server.questions["alias.test", "A"] == 1  # the server sent the whole chain
    with pytest.raises(DnsPermanent, match="NXDOMAIN"):
        await resolver.addresses("dangling.test")


async def test_cname_loop_ends_in_an_error(server: DnsServer) -> None:
    with pytest.raises((DnsTransient, DnsPermanent)):
        await asyncio.wait_for(resolver_for(server).addresses("loop1.test"), 5)


async def test_numeric_mx_host_is_used_as_an_address(
    server: DnsServer, caplog: pytest.LogCaptureFixture
) -> None:
    resolver = resolver_for(server)
    plan = await resolve_mx(resolver, "numeric.test")
    assert [h.name for h in plan.hosts] == ["192.0.2.1"] and plan.site == "192.0.2.1"
    assert await resolve_host_addresses(resolver, plan.hosts[0].name) == ["192.0.2.1"]
    assert "numeric host name in MX record" in caplog.text


async def test_domain_literal_needs_no_dns(server: DnsServer) -> None:
    resolver = resolver_for(server)
    plan = await resolve_mx(resolver, "[127.0.0.2]")
    assert [h.name for h in plan.hosts] == ["127.0.0.2"]
    assert plan.site == "[127.0.0.2]" and plan.implicit
    v6 = await resolve_mx(resolver, "[IPv6:::1]")
    assert [h.name for h in v6.hosts] == ["::1"]
    with pytest.raises(DnsPermanent, match="address literal"):
        await resolve_mx(resolver, "[not-an-address]")
    assert server.queries == 0


# ---------------------------------------------------------------------- cache


async def test_cache_honours_ttl(server: DnsServer) -> None:
    clock = Clock()
    resolver = resolver_for(server, clock=clock)
    assert await resolver.addresses("short.test") == ["127.0.0.6"]
    await resolver.addresses("short.test")
    assert server.questions["short.test", "A"] == 1
    assert resolver.queries == 2 and resolver.hits == 2  # A and AAAA, twice
    clock.now += 1.5
    await resolver.addresses("short.test")
    assert server.questions["short.test", "A"] == 2


async def test_cache_ttl_is_capped(server: DnsServer) -> None:
    clock = Clock()
    resolver = resolver_for(server, clock=clock, max_ttl=60)
    await resolver.query("long.test", "A")
    clock.now += 59
    await resolver.query("long.test", "A")
    assert server.questions["long.test", "A"] == 1
    clock.now += 2
    await resolver.query("long.test", "A")
    assert server.questions["long.test", "A"] == 2


async def test_cname_chain_is_cached_for_its_shortest_ttl(server: DnsServer) -> None:
    clock = Clock()
    resolver = resolver_for(server, clock=clock)
    await resolver.query("alias.test", "A")
    clock.now += 29
    await resolver.query("alias.test", "A")
    assert server.questions["alias.test", "A"] == 1
    clock.now += 2  # middle.test's CNAME has TTL 30
    await resolver.query("alias.test", "A")
    assert server.questions["alias.test", "A"] == 2


async def test_negative_answers_are_cached_for_the_soa_minimum(server: DnsServer) -> None:
    clock = Clock()
    resolver = resolver_for(server, clock=clock)
    for _ in range(2):
        with pytest.raises(DnsPermanent):
            await resolver.query("missing.test", "A")
        assert await resolver.query("nothing.test", "A") == []
    assert server.questions["missing.test", "A"] == 1
    assert server.questions["nothing.test", "A"] == 1
    clock.now += 6  # the zone's negative TTL is 5
    with pytest.raises(DnsPermanent):
        await resolver.query("missing.test", "A")
    assert await resolver.query("nothing.test", "A") == []
    assert server.questions["missing.test", "A"] == 2
    assert server.questions["nothing.test", "A"] == 2


async def test_cache_is_bounded_least_recently_used_first(server: DnsServer) -> None:
    resolver = resolver_for(server, max_entries=2)
    await resolver.query("mx1.a.test", "A")
    await resolver.query("mx2.a.test", "A")
    await resolver.query("mx1.a.test", "A")  # mx2 is now the least recently used
    await resolver.query("target.test", "A")
    assert len(resolver) == 2
    await resolver.query("mx1.a.test", "A")
    assert server.questions["mx1.a.test", "A"] == 1
    await resolver.query("mx2.a.test", "A")
    assert server.questions["mx2.a.test", "A"] == 2


async def test_concurrent_identical_lookups_share_one_query(server: DnsServer) -> None:
    resolver = resolver_for(server)
    results = await asyncio.gather(*(resolver.mx("a.test") for _ in range(20)))
    assert all(r == results[0] for r in results) and len(results[0]) == 2
    assert server.questions["a.test", "MX"] == 1 and resolver.queries == 1


async def test_a_cancelled_caller_does_not_cancel_the_shared_query(server: DnsServer) -> None:
    resolver = resolver_for(server)
    first = asyncio.ensure_future(resolver.query("target.test", "A"))
    second = asyncio.ensure_future(resolver.query("target.test", "A"))
    await asyncio.sleep(0)
    first.cancel()
    assert [r.to_text() for r in await second] == ["127.0.0.5"]
    assert first.cancelled() and server.questions["target.test", "A"] == 1


async def test_coalesced_failures_reach_every_caller(server: DnsServer) -> None:
    resolver = resolver_for(server)
    results = await asyncio.gather(
        *(resolver.query("broken.test", "MX") for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, DnsTransient) for r in results)
    assert server.questions["broken.test", "MX"] == 1


# ---------------------------------------------------------------------- server


async def test_large_answer_falls_back_to_tcp(server: DnsServer) -> None:
    texts = await resolver_for(server).txt("big.test")
    assert sorted(texts) == sorted(f"{'x' * 60}-{i}" for i in range(40))
    assert server.questions["big.test", "TXT"] == 2  # truncated over UDP, then over TCP


async def test_serve_forever_until_cancelled(zone: Zone) -> None:
    port, ready = free_port(), asyncio.Event()
    task = asyncio.ensure_future(serve_forever(zone, "127.0.0.1", port, ready=ready))
    try:
        await asyncio.wait_for(ready.wait(), 5)
        resolver = Resolver([("127.0.0.1", port)], timeout=2.0)
        assert await resolver.addresses("mx1.a.test") == ["127.0.0.2"]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_start_cancelled_half_way_leaves_nothing_open(zone: Zone) -> None:
    for turns in range(10):
        server = DnsServer(zone, port=free_port())
        task = asyncio.ensure_future(server.start())
        for _ in range(turns):
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if not task.cancelled():  # started before the cancel arrived
            await server.stop()
        async with DnsServer(zone, port=server.port) as again:  # the port is free again
            assert again.port == server.port
