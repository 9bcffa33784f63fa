"""The resolver and MX resolution against the loopback DNS server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from epoxi.dns.mx import resolve_mx
from epoxi.dns.resolver import Resolver
from epoxi.errors import DnsPermanent, DnsTransient
from epoxi.testing.dnsserver import DnsServer, Zone

ZONE_TEXT = """
; test zone
a.test        300 MX  20 mx2.a.test.
a.test        300 MX  10 mx1.a.test.
mx1.a.test    300 A   127.0.0.2
mx2.a.test        A   127.0.0.3
b.test            MX  5 mx1.a.test.
b.test            MX  7 mx2.a.test.
implicit.test     A   127.0.0.4
implicit.test     AAAA ::1
nullmx.test       MX  0 .
nothing.test      TXT "no mail here"
alias.test        CNAME target.test.
target.test       A   127.0.0.5
loop1.test        CNAME loop2.test.
loop2.test        CNAME loop1.test.
short.test    1   A   127.0.0.6
"""


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def server() -> AsyncIterator[DnsServer]:
    zone = Zone.from_text(ZONE_TEXT)
    zone.fail("broken.test", "SERVFAIL")
    zone.fail("slow.test", "TIMEOUT")
    for i in range(40):
        zone.add("big.test", "TXT", f'"{"x" * 60}-{i}"')
    async with DnsServer(zone) as running:
        yield running


def resolver_for(server: DnsServer, **kwargs: object) -> Resolver:
    return Resolver([("127.0.0.1", server.port)], timeout=0.5, **kwargs)  # type: ignore[arg-type]


async def test_mx_in_preference_order(server: DnsServer) -> None:
    plan = await resolve_mx(resolver_for(server), "A.test.")
    assert [h.name for h in plan.hosts] == ["mx1.a.test", "mx2.a.test"]
    assert plan.site == "mx1.a.test,mx2.a.test" and not plan.implicit


async def test_site_is_shared_by_domains_with_the_same_mx_set(server: DnsServer) -> None:
    resolver = resolver_for(server)
    assert (await resolve_mx(resolver, "a.test")).site == (
        await resolve_mx(resolver, "b.test")
    ).site


async def test_implicit_mx_and_addresses(server: DnsServer) -> None:
    resolver = resolver_for(server)
    plan = await resolve_mx(resolver, "implicit.test")
    assert plan.implicit and [h.name for h in plan.hosts] == ["implicit.test"]
    assert await resolver.addresses("implicit.test") == ["127.0.0.4", "::1"]
    assert await resolver.addresses("192.0.2.1") == ["192.0.2.1"]


async def test_null_mx_nxdomain_and_no_address_are_permanent(server: DnsServer) -> None:
    resolver = resolver_for(server)
    with pytest.raises(DnsPermanent, match="null MX"):
        await resolve_mx(resolver, "nullmx.test")
    with pytest.raises(DnsPermanent, match="NXDOMAIN"):
        await resolve_mx(resolver, "missing.test")
    with pytest.raises(DnsPermanent, match="no MX and no address"):
        await resolve_mx(resolver, "nothing.test")


async def test_servfail_and_timeout_are_transient(server: DnsServer) -> None:
    resolver = resolver_for(server)
    with pytest.raises(DnsTransient):
        await resolve_mx(resolver, "broken.test")
    with pytest.raises(DnsTransient, match="timed out"):
        await resolve_mx(resolver, "slow.test")


async def test_cname_chain_and_loop(server: DnsServer) -> None:
    resolver = resolver_for(server)
    assert await resolver.addresses("alias.test") == ["127.0.0.5"]
    with pytest.raises((DnsTransient, DnsPermanent)):
        await resolver.addresses("loop1.test")


async def test_cache_honours_ttl(server: DnsServer) -> None:
    clock = Clock()
    resolver = resolver_for(server, clock=clock)
    await resolver.query("short.test", "A")
    await resolver.query("short.test", "A")
    assert resolver.queries == 1
    clock.now = 2.0
    await resolver.query("short.test", "A")
    assert resolver.queries == 2
    with pytest.raises(DnsPermanent):
        await resolver.query("missing.test", "A")
    with pytest.raises(DnsPermanent):
        await resolver.query("missing.test", "A")
    assert resolver.queries == 3  # NXDOMAIN cached too


async def test_large_answer_falls_back_to_tcp(server: DnsServer) -> None:
    texts = await resolver_for(server).txt("big.test")
    assert len(texts) == 40


async def test_domain_literal_needs_no_dns(server: DnsServer) -> None:
    plan = await resolve_mx(resolver_for(server), "[127.0.0.2]")
    assert [h.name for h in plan.hosts] == ["127.0.0.2"] and server.queries == 0
