"""Pure parts of dns/ and the test DNS server: no sockets (see tests/e2e/test_dns_e2e.py)."""

from __future__ import annotations

import random
from pathlib import Path

import dns.flags
import dns.message
import dns.rcode
import dns.rdata
import dns.rdatatype
import pytest

from epoxi.dns.mx import MxHost, MxPlan, resolve_mx, site_name
from epoxi.dns.resolver import Rdata, Resolver, ip_literal
from epoxi.errors import ConfigError, DnsPermanent, DnsTransient
from epoxi.testing.dnsserver import DnsServer, Zone

# ---------------------------------------------------------------------- Zone parsing


def test_zone_from_text_reads_ttl_class_comments_and_quoted_semicolons() -> None:
    zone = Zone.from_text(
        """
        ; a comment line
        a.test.   60 IN MX 10 mx.a.test   ; trailing comment
        a.test       TXT "v=spf1 -all; really"  "second  part"
        mx.a.test    A  127.0.0.2
        """
    )
    mx = answer(zone, "a.test", "MX")
    assert mx.answer[0].ttl == 60 and mx.answer[0][0].to_text() == "10 mx.a.test."
    txt = answer(zone, "A.TEST.", "TXT")
    assert txt.answer[0].ttl == 300
    assert txt.answer[0][0].strings == (b"v=spf1 -all; really", b"second  part")


def test_zone_from_text_names_the_bad_line() -> None:
    with pytest.raises(ValueError, match=r"line 3: 'b.test MX nonsense'"):
        Zone.from_text("a.test A 127.0.0.1\n\nb.test MX nonsense\n")
    with pytest.raises(ValueError, match="line 1"):
        Zone.from_text("lonely.test\n")


def test_zone_from_file(tmp_path: Path) -> None:
    path = tmp_path / "zone.txt"
    path.write_text("f.test 5 A 127.0.0.9\n")
    zone = Zone.from_file(path)
    assert answer(zone, "f.test", "A").answer[0].ttl == 5


def test_zone_add_rejects_bad_records() -> None:
    zone = Zone()
    with pytest.raises(ValueError, match="bad A record"):
        zone.add("x.test", "A", "not-an-address")
    with pytest.raises(ValueError, match="bad NOPE record"):
        zone.add("x.test", "NOPE", "1")
    zone.add("x.test", "A", "127.0.0.1")
    with pytest.raises(ValueError, match="CNAME"):
        zone.add("x.test", "CNAME", "y.test")
    with pytest.raises(ValueError, match="unknown failure"):
        zone.fail("x.test", "BROKEN")  # type: ignore[arg-type]


def test_zone_ttl_given_later_applies_to_the_set() -> None:
    zone = Zone(default_ttl=100)
    zone.add("m.test", "A", "127.0.0.1")
    zone.add("m.test", "A", "127.0.0.2", ttl=7)
    rrset = answer(zone, "m.test", "A").answer[0]
    assert rrset.ttl == 7 and len(rrset) == 2


# ---------------------------------------------------------------------- Zone answers


def answer(zone: Zone, name: str, rdtype: str) -> dns.message.Message:
    response = zone.answer(dns.message.make_query(name, rdtype))
    assert response is not None
    return response


def test_zone_answers_nxdomain_nodata_and_empty_non_terminals_with_an_soa() -> None:
    zone = Zone(negative_ttl=9)
    zone.add("host.sub.z.test", "A", "127.0.0.1")
    missing = answer(zone, "missing.z.test", "A")
    assert missing.rcode() == dns.rcode.NXDOMAIN and not missing.answer
    soa = missing.authority[0]
    assert soa.rdtype == dns.rdatatype.SOA and soa.ttl == 9 and soa[0].minimum == 9
    nodata = answer(zone, "host.sub.z.test", "AAAA")
    assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer and nodata.authority
    assert answer(zone, "sub.z.test", "A").rcode() == dns.rcode.NOERROR  # RFC 8020
    assert answer(zone, "host.sub.z.test", "A").flags & dns.flags.AA


def test_zone_uses_its_own_soa_when_it_has_one() -> None:
    zone = Zone()
    zone.add("z.test", "SOA", "ns.z.test hostmaster.z.test 1 2 3 4 42", ttl=100)
    soa = answer(zone, "missing.z.test", "A").authority[0]
    assert soa.name.to_text() == "z.test." and soa[0].minimum == 42


def test_zone_follows_cnames_and_stops_at_a_loop() -> None:
    zone = Zone()
    zone.add("alias.test", "CNAME", "target.test")
    zone.add("target.test", "A", "127.0.0.5")
    zone.add("loop1.test", "CNAME", "loop2.test")
    zone.add("loop2.test", "CNAME", "loop1.test")
    chain = answer(zone, "alias.test", "A")
    assert [r.rdtype for r in chain.answer] == [dns.rdatatype.CNAME, dns.rdatatype.A]
    assert answer(zone, "alias.test", "CNAME").answer[0][0].to_text() == "target.test."
    loop = answer(zone, "loop1.test", "A")
    assert len(loop.answer) == 2 and loop.rcode() == dns.rcode.NOERROR


def test_zone_failures_and_healing() -> None:
    zone = Zone()
    zone.add("f.test", "A", "127.0.0.1")
    zone.fail("f.test", "SERVFAIL")
    assert answer(zone, "f.test", "A").rcode() == dns.rcode.SERVFAIL
    zone.fail("f.test", "REFUSED")
    assert answer(zone, "f.test", "A").rcode() == dns.rcode.REFUSED
    zone.fail("f.test", "TIMEOUT")
    assert zone.answer(dns.message.make_query("f.test", "A")) is None
    zone.heal("f.test")
    assert answer(zone, "f.test", "A").answer


def test_zone_remove() -> None:
    zone = Zone()
    zone.add("r.test", "A", "127.0.0.1")
    zone.add("r.test", "MX", "10 r.test")
    zone.remove("r.test", "MX")
    assert answer(zone, "r.test", "MX").rcode() == dns.rcode.NOERROR
    zone.remove("r.test")
    assert answer(zone, "r.test", "A").rcode() == dns.rcode.NXDOMAIN


# ---------------------------------------------------------------------- server framing


def big_zone() -> Zone:
    zone = Zone()
    for i in range(40):
        zone.add("big.test", "TXT", f'"{"x" * 60}-{i}"')
    return zone


def test_udp_answers_over_the_limit_are_truncated() -> None:
    server = DnsServer(big_zone())
    wire = server.respond(dns.message.make_query("big.test", "TXT").to_wire(), max_size=512)
    assert wire is not None and len(wire) <= 512
    reply = dns.message.from_wire(wire)
    assert reply.flags & dns.flags.TC and not reply.answer
    full = server.respond(dns.message.make_query("big.test", "TXT").to_wire())
    assert full is not None and len(dns.message.from_wire(full).answer[0]) == 40
    assert server.queries == 2 and server.questions["big.test", "TXT"] == 2


def test_udp_limit_grows_with_the_queries_edns_size() -> None:
    server = DnsServer(big_zone())
    query = dns.message.make_query("big.test", "TXT", use_edns=0, payload=4096)
    wire = server.respond(query.to_wire(), max_size=512)
    assert wire is not None and len(dns.message.from_wire(wire).answer[0]) == 40


def test_garbage_gets_no_answer() -> None:
    server = DnsServer(Zone())
    assert server.respond(b"\x00\x01garbage") is None
    assert server.queries == 1


# ---------------------------------------------------------------------- mx.py


def test_site_name_is_the_sorted_host_set() -> None:
    assert site_name(["mx2.e.net", "mx1.e.net", "mx2.e.net"]) == "mx1.e.net,mx2.e.net"


def test_attempt_order_shuffles_only_within_a_preference() -> None:
    hosts = tuple(MxHost(f"h{i}", pref) for i, pref in enumerate([1, 1, 1, 2, 2, 3]))
    plan = MxPlan("d.test", hosts, site_name(h.name for h in hosts))
    seen = set()
    for seed in range(50):
        order = plan.attempt_order(random.Random(seed))
        assert [h.preference for h in order] == [1, 1, 1, 2, 2, 3]
        assert sorted(order, key=lambda h: h.name) == list(hosts)
        seen.add(tuple(h.name for h in order))
    assert len(seen) > 1


class FakeResolver(Resolver):
    """Answers from a dict instead of the network: {(name, type): records or an error}."""

    def __init__(self, answers: dict[tuple[str, str], list[Rdata] | Exception]) -> None:
        super().__init__([("127.0.0.1", 9)])
        self.answers = answers

    async def query(self, name: str, rdtype: str) -> list[Rdata]:
        result = self.answers.get((name, rdtype), [])
        if isinstance(result, Exception):
            raise result
        return result


def rdata(rdtype: str, text: str) -> Rdata:
    return dns.rdata.from_text("IN", rdtype, text)


async def test_null_mx_beside_other_hosts_is_ignored() -> None:
    resolver = FakeResolver({("m.test", "MX"): [rdata("MX", "0 ."), rdata("MX", "10 mx.test.")]})
    plan = await resolve_mx(resolver, "m.test")
    assert [h.name for h in plan.hosts] == ["mx.test"]


async def test_a_host_listed_twice_keeps_its_best_preference() -> None:
    resolver = FakeResolver(
        {("m.test", "MX"): [rdata("MX", "20 MX.test."), rdata("MX", "10 mx.test.")]}
    )
    plan = await resolve_mx(resolver, "m.test")
    assert plan.hosts == (MxHost("mx.test", 10),)


async def test_empty_domain_is_permanent() -> None:
    with pytest.raises(DnsPermanent, match="empty domain"):
        await resolve_mx(FakeResolver({}), " . ")


async def test_implicit_mx_with_a_transient_address_failure_is_transient() -> None:
    resolver = FakeResolver({("m.test", "AAAA"): DnsTransient("AAAA timed out")})
    with pytest.raises(DnsTransient):
        await resolve_mx(resolver, "m.test")


# ---------------------------------------------------------------------- resolver.py


async def test_addresses_from_one_family_survive_a_failure_of_the_other() -> None:
    resolver = FakeResolver(
        {("h.test", "A"): [rdata("A", "192.0.2.1")], ("h.test", "AAAA"): DnsTransient("x")}
    )
    assert await resolver.addresses("h.test") == ["192.0.2.1"]


async def test_addresses_transient_failure_wins_over_nxdomain() -> None:
    resolver = FakeResolver(
        {("h.test", "A"): DnsPermanent("NXDOMAIN"), ("h.test", "AAAA"): DnsTransient("x")}
    )
    with pytest.raises(DnsTransient):
        await resolver.addresses("h.test")


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("[192.0.2.1]", "192.0.2.1"),
        ("[IPv6:2001:DB8::1]", "2001:db8::1"),
        ("[ipv6:::1]", "::1"),
        ("2001:db8::1", "2001:db8::1"),
        ("mx.example.net", None),
        ("[mx.example.net]", None),
        ("192.0.2.999", None),
    ],
)
def test_ip_literal(host: str, expected: str | None) -> None:
    assert ip_literal(host) == expected


def test_nameservers_must_be_addresses() -> None:
    with pytest.raises(ConfigError, match="localhost:53"):
        Resolver([("localhost", 53)])
    with pytest.raises(ConfigError, match="70000"):
        Resolver([("127.0.0.1", 70000)])


async def test_invalid_names_and_types() -> None:
    resolver = Resolver([("127.0.0.1", 9)])
    with pytest.raises(DnsPermanent, match="not a valid domain name"):
        await resolver.query("a..b", "A")
    with pytest.raises(DnsPermanent, match="not a valid domain name"):
        await resolver.query("x" * 64 + ".test", "A")
    with pytest.raises(ValueError, match="unknown DNS record type"):
        await resolver.query("a.test", "NOPE")
    assert resolver.queries == 0
