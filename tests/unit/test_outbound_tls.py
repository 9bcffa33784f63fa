"""Outbound TLS policy, the pure parts: MTA-STS parsing and caching, DANE matching, the
per-host policy decisions and the memory of hosts whose TLS is broken."""

from __future__ import annotations

import hashlib
from typing import Any, cast

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from epoxi.delivery.client import TlsInfo, TlsPolicy
from epoxi.delivery.dane import dane_mismatch, name_matches
from epoxi.delivery.dispatcher import with_tls
from epoxi.delivery.hosttls import BROKEN_NOTE, BrokenTls, HostTls
from epoxi.delivery.mtasts import MtaSts, StsPolicy, parse_policy, parse_txt
from epoxi.delivery.routing import Destination
from epoxi.dns.resolver import Resolver
from epoxi.dns.tlsa import Tlsa, lookup_tlsa
from epoxi.errors import DnsTransient, MtaStsError, TlsFailed
from epoxi.shaping.policy import Shaping
from epoxi.testing.certs import issue_cert
from epoxi.testing.dnsserver import DnsServer, Zone
from epoxi.testing.fakes import ManualClock

# ----------------------------------------------------------------------------- MTA-STS parsing


@pytest.mark.parametrize(
    ("texts", "expected"),
    [
        (["v=STSv1; id=20160831085700Z;"], "20160831085700Z"),
        (["v=STSv1;id=abc"], "abc"),
        (["something else", "v=STSv1; id=1"], "1"),
        (["v=STSv1; id=1", "v=STSv1; id=2"], None),  # two policies: none (RFC 8461 §3.1)
        (["v=STSv1;"], None),
        (["v=STSv1; id=not-alnum"], None),
        (["v=STSv1; id=" + "a" * 33], None),
        (["v=STSv10; id=1"], None),
        ([], None),
    ],
)
def test_parse_txt(texts: list[str], expected: str | None) -> None:
    assert parse_txt(texts) == expected


def test_parse_policy_reads_the_rfc_example() -> None:
    text = "version: STSv1\nmode: enforce\nmx: mail.example.com\nmx: *.example.net\n"
    policy = parse_policy(text + "mx: backupmx.example.com\nmax_age: 604800\n", "id1")
    assert policy == StsPolicy(
        "id1", "enforce", ("mail.example.com", "*.example.net", "backupmx.example.com"), 604800
    )
    crlf = parse_policy(text.replace("\n", "\r\n") + "max_age: 86400\r\nfuture: x\r\n", "i")
    assert crlf.mode == "enforce" and crlf.max_age == 86400


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("version: STSv2\nmode: enforce\nmx: a.b\nmax_age: 1\n", "version"),
        ("version: STSv1\nmode: strict\nmx: a.b\nmax_age: 1\n", "mode"),
        ("version: STSv1\nmode: enforce\nmax_age: 1\n", "needs an mx"),
        ("version: STSv1\nmode: testing\nmx: a.b\nmax_age: soon\n", "max_age"),
        ("version: STSv1\nmode: testing\nmx: a.*.b\nmax_age: 1\n", "mx pattern"),
    ],
)
def test_parse_policy_refuses_what_is_not_a_policy(text: str, error: str) -> None:
    with pytest.raises(MtaStsError, match=error):
        parse_policy(text, "id")


def test_policy_max_age_is_capped_and_none_needs_no_mx() -> None:
    policy = parse_policy("version: STSv1\nmode: none\nmax_age: 9999999999\n", "x")
    assert policy.max_age == 31_557_600 and policy.mx == ()


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("mail.example.com", True),
        ("MAIL.example.com.", True),
        ("a.example.net", True),
        ("a.b.example.net", False),  # a wildcard stands for one label only
        ("example.net", False),
        ("other.example.com", False),
    ],
)
def test_policy_mx_patterns(host: str, allowed: bool) -> None:
    policy = StsPolicy("i", "enforce", ("mail.example.com", "*.example.net"), 60)
    assert policy.allows(host) is allowed


# ----------------------------------------------------------------------------- MTA-STS cache


class _Dns:
    def __init__(self) -> None:
        self.txt_records: dict[str, list[str]] = {}
        self.failing = False

    async def txt(self, name: str) -> list[str]:
        if self.failing:
            raise DnsTransient(f"{name}: SERVFAIL")
        return self.txt_records.get(name, [])


ENFORCE = "version: STSv1\nmode: enforce\nmx: mx.example.com\nmax_age: 100\n"


class _Fetching(MtaSts):
    def __init__(self, dns: _Dns, clock: ManualClock) -> None:
        super().__init__(cast(Resolver, dns), clock=clock)
        self.bodies: list[str | Exception] = []

    async def _fetch(self, domain: str) -> str:
        self.fetches += 1
        body = self.bodies.pop(0)
        if isinstance(body, Exception):
            raise body
        return body


async def test_mta_sts_policy_is_cached_by_id_and_max_age() -> None:
    dns, clock = _Dns(), ManualClock()
    sts = _Fetching(dns, clock)
    assert await sts.policy("example.com") is None and sts.fetches == 0  # no TXT, no fetch
    dns.txt_records["_mta-sts.example.com"] = ["v=STSv1; id=1"]
    sts.bodies = [ENFORCE, ENFORCE.replace("enforce", "testing"), ENFORCE]
    first = await sts.policy("Example.COM.")
    assert first is not None and first.mode == "enforce" and sts.fetches == 1
    assert await sts.policy("example.com") == first and sts.fetches == 1  # same id: cached
    dns.txt_records["_mta-sts.example.com"] = ["v=STSv1; id=2"]
    second = await sts.policy("example.com")
    assert second is not None and second.mode == "testing" and sts.fetches == 2
    clock.advance(101)  # max_age passed: fetched again even with the same id
    assert await sts.policy("example.com") is not None and sts.fetches == 3


async def test_mta_sts_failures_keep_a_cached_policy_and_are_no_policy_without_one() -> None:
    dns, clock = _Dns(), ManualClock()
    sts = _Fetching(dns, clock)
    dns.txt_records["_mta-sts.example.com"] = ["v=STSv1; id=1"]
    sts.bodies = [MtaStsError("404"), ENFORCE, MtaStsError("503")]
    assert await sts.policy("example.com") is None  # fetch failed, nothing cached
    cached = await sts.policy("example.com")
    assert cached is not None
    dns.failing = True  # TXT lookup fails: the cached policy still applies
    assert await sts.policy("example.com") == cached
    dns.failing = False
    dns.txt_records["_mta-sts.example.com"] = ["v=STSv1; id=2"]
    assert await sts.policy("example.com") == cached  # new id, fetch failed: cached one
    clock.advance(101)
    dns.failing = True
    assert await sts.policy("example.com") is None  # expired and nothing new


async def test_mta_sts_mode_none_is_no_policy() -> None:
    dns, clock = _Dns(), ManualClock()
    sts = _Fetching(dns, clock)
    dns.txt_records["_mta-sts.example.com"] = ["v=STSv1; id=1"]
    sts.bodies = ["version: STSv1\nmode: none\nmax_age: 100\n"]
    assert await sts.policy("example.com") is None
    assert await sts.policy("example.com") is None and sts.fetches == 1


# ----------------------------------------------------------------------------- DANE


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


def _spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture(scope="module")
def chain() -> tuple[x509.Certificate, x509.Certificate]:
    """A leaf for mx.example.com signed by a CA: (leaf, CA)."""
    ca_key, leaf_key = _key(), _key()
    ca = issue_cert("Test CA", ca_key, ca=True)
    leaf = issue_cert("mx", leaf_key, ("Test CA", ca_key), ["mx.example.com"])
    return leaf, ca


def test_dane_ee_matches_the_leaf_with_any_selector_and_matching_type(chain: Any) -> None:
    leaf, ca = chain
    wire = [_der(leaf), _der(ca)]
    for record in [
        Tlsa(3, 1, 1, hashlib.sha256(_spki(leaf)).digest()),
        Tlsa(3, 0, 2, hashlib.sha512(_der(leaf)).digest()),
        Tlsa(3, 0, 0, _der(leaf)),
    ]:
        assert dane_mismatch([record], wire, "any.name.test") is None  # DANE-EE: no name check
    other = Tlsa(3, 1, 1, hashlib.sha256(b"another key").digest())
    assert dane_mismatch([other], wire, "mx.example.com") is not None


def test_dane_ta_needs_the_signature_chain_and_the_mx_name(chain: Any) -> None:
    leaf, ca = chain
    anchor = Tlsa(2, 1, 1, hashlib.sha256(_spki(ca)).digest())
    assert dane_mismatch([anchor], [_der(leaf), _der(ca)], "mx.example.com") is None
    assert dane_mismatch([anchor], [_der(leaf), _der(ca)], "other.example.com") == (
        "certificate does not name other.example.com"
    )
    assert dane_mismatch([anchor], [_der(leaf)], "mx.example.com") is not None  # CA not sent
    forger_key = _key()  # a CA of the same name but another key did not sign the leaf
    forged = issue_cert("Test CA", forger_key, ca=True)
    forged_anchor = Tlsa(2, 1, 1, hashlib.sha256(_spki(forged)).digest())
    assert dane_mismatch([forged_anchor], [_der(leaf), _der(forged)], "mx.example.com")


def test_dane_ignores_unusable_records(chain: Any) -> None:
    leaf, _ = chain
    pkix = Tlsa(1, 1, 1, hashlib.sha256(_spki(leaf)).digest())  # PKIX-EE: not for SMTP
    assert dane_mismatch([pkix], [_der(leaf)], "mx.example.com") == "no usable TLSA record"
    assert dane_mismatch([Tlsa(3, 1, 1, b"x")], [], "mx") == "the server sent no certificate"


@pytest.mark.parametrize(
    ("pattern", "host", "expected"),
    [
        ("*.a.test", "mx.a.test", True),
        ("*.a.test", "a.test", False),
        ("mx.a.test", "mx.a.test", True),
    ],
)
def test_name_matches(pattern: str, host: str, expected: bool) -> None:
    assert name_matches(pattern, host) is expected


# ----------------------------------------------------------------------------- per-host policy


def _mx(tls: TlsPolicy | None = None, sts: StsPolicy | None = None) -> Destination:
    tls = tls or TlsPolicy()
    return Destination("mx.test", (("mx.test", 25),), tls, via_mx=True, mta_sts=sts)


async def test_broken_tls_hosts_get_plain_text_for_a_while() -> None:
    clock = ManualClock()
    host_tls = HostTls(broken=BrokenTls(ttl=3600, max_entries=2, clock=clock))
    first = await host_tls.policy(_mx(), "mx.test", "192.0.2.1")
    assert first == TlsPolicy()
    plain = host_tls.after_failure(_mx(), first, "192.0.2.1", TlsFailed("handshake"))
    assert plain is not None and plain.mode == "disabled" and plain.note == BROKEN_NOTE
    assert plain.name == "opportunistic"
    assert (await host_tls.policy(_mx(), "mx.test", "192.0.2.1")).mode == "disabled"
    clock.advance(3601)
    assert (await host_tls.policy(_mx(), "mx.test", "192.0.2.1")).mode == "opportunistic"
    for address in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
        host_tls.broken.remember(address)
    assert len(host_tls.broken) == 2 and "192.0.2.1" not in host_tls.broken


async def test_strict_policies_never_fall_back() -> None:
    host_tls = HostTls()
    for tls in (TlsPolicy("required"), TlsPolicy(verify=True), TlsPolicy("required", True)):
        assert host_tls.after_failure(_mx(tls), tls, "192.0.2.1", TlsFailed("x")) is None
    assert "192.0.2.1" not in host_tls.broken


async def test_mta_sts_decides_the_policy_of_mx_hosts() -> None:
    host_tls = HostTls(ca_file="/ca.pem")
    enforce = StsPolicy("1", "enforce", ("*.test",), 60)
    tls = await host_tls.policy(_mx(sts=enforce), "mx.test", "192.0.2.1")
    assert (tls.mode, tls.verify, tls.name, tls.ca_file) == (
        "required",
        True,
        "mta-sts enforce",
        "/ca.pem",
    )
    with pytest.raises(TlsFailed, match="not in the policy") as info:
        await host_tls.policy(_mx(sts=enforce), "mx.other", "192.0.2.1")
    assert info.value.reply is not None and info.value.reply.enhanced == "4.7.5"
    testing = StsPolicy("1", "testing", ("*.test",), 60)
    outside = await host_tls.policy(_mx(sts=testing), "mx.other", "192.0.2.1")
    assert outside.mode == "opportunistic" and outside.note.startswith("not enforced: MTA-STS")
    tried = await host_tls.policy(_mx(sts=testing), "mx.test", "192.0.2.1")
    relaxed = host_tls.after_failure(_mx(sts=testing), tried, "192.0.2.1", TlsFailed("cert"))
    assert relaxed is not None and relaxed.mode == "opportunistic" and not relaxed.verify
    assert relaxed.name == "mta-sts testing" and relaxed.note == "not enforced: cert"
    required = _mx(TlsPolicy("required"), testing)  # testing never relaxes below the shaping
    kept = host_tls.after_failure(required, tried, "192.0.2.1", TlsFailed("cert"))
    assert kept is not None and kept.mode == "required"
    assert kept.name == "required + mta-sts testing"
    disabled = await host_tls.policy(_mx(TlsPolicy("disabled"), enforce), "mx.test", "192.0.2.1")
    assert disabled.mode == "disabled"  # the operator's word wins


def test_required_verified_shaping() -> None:
    shaping = Shaping(1, 1, 1.0, 1, tls="required-verified")
    tls = with_tls(_mx(), shaping).tls
    assert (tls.mode, tls.verify, tls.name) == ("required", True, "required-verified")


def test_tls_info_text() -> None:
    info = TlsInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384", True, "mta-sts enforce")
    assert info.text == "TLSv1.3 TLS_AES_256_GCM_SHA384 verified policy=mta-sts enforce"
    assert TlsInfo(note="why").text == "plaintext policy=opportunistic (why)"


# ----------------------------------------------------------------------------- TLSA lookups


async def test_tlsa_from_a_resolver_that_does_not_validate_is_not_used(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The suite's DNS server sets no AD bit: TLSA records are read but not trusted, so DANE
    does not apply and the host keeps the destination's policy."""
    zone = Zone()
    zone.add("_25._tcp.mx.test", "TLSA", "3 1 1 " + "ab" * 32)
    async with DnsServer(zone) as server:
        resolver = Resolver([server.nameserver], timeout=2)
        found = await lookup_tlsa(resolver, "mx.test")
        assert found.records == (Tlsa(3, 1, 1, bytes.fromhex("ab" * 32)),)
        assert not found.secure
        assert (await lookup_tlsa(resolver, "none.test")).records == ()  # NXDOMAIN: none
        assert await resolver.query("_25._tcp.mx.test", "TLSA")  # cached apart, same answer
        host_tls = HostTls(resolver, dane=True)
        assert await host_tls.policy(_mx(), "mx.test", "192.0.2.1") == TlsPolicy()
        assert "not validated (no AD bit)" in caplog.text  # the operator is told, once


# ----------------------------------------------------------------------------- review fixes


async def test_an_enforced_mta_sts_policy_is_checked_before_dane(monkeypatch: Any) -> None:
    """A spoofed MX host in the attacker's own signed zone, with TLSA that matches its own
    certificate, must not receive mail the domain's enforced policy does not let it have."""
    from epoxi.delivery import hosttls
    from epoxi.dns.tlsa import TlsaLookup

    asked: list[str] = []

    async def secure_tlsa(resolver: Any, host: str, port: int = 25) -> TlsaLookup:
        asked.append(host)
        return TlsaLookup((Tlsa(3, 1, 1, b"x" * 32),), True)

    monkeypatch.setattr(hosttls, "lookup_tlsa", secure_tlsa)
    host_tls = HostTls(cast(Resolver, object()), dane=True)
    enforce = StsPolicy("1", "enforce", ("mail.example.com",), 60)
    with pytest.raises(TlsFailed, match="not in the policy"):
        await host_tls.policy(_mx(sts=enforce), "mx.attacker.test", "192.0.2.9")
    assert asked == []  # refused before any TLSA was looked at
    dane = await host_tls.policy(_mx(sts=enforce), "mail.example.com", "192.0.2.1")
    assert dane.name == "dane" and dane.tlsa


async def test_only_unusable_tlsa_records_mean_tls_without_a_match(monkeypatch: Any) -> None:
    from epoxi.delivery import hosttls
    from epoxi.dns.tlsa import TlsaLookup

    async def pkix_only(resolver: Any, host: str, port: int = 25) -> TlsaLookup:
        return TlsaLookup((Tlsa(1, 1, 1, b"x" * 32),), True)  # PKIX-EE: not for SMTP

    monkeypatch.setattr(hosttls, "lookup_tlsa", pkix_only)
    tls = await HostTls(cast(Resolver, object()), dane=True).policy(_mx(), "mx.test", "192.0.2.1")
    assert (tls.mode, tls.tlsa, tls.name) == ("required", (), "dane (no usable TLSA)")


async def test_broken_tls_memory_never_weakens_a_verifying_policy() -> None:
    host_tls = HostTls()
    host_tls.broken.remember("192.0.2.1")
    verifying = await host_tls.policy(_mx(TlsPolicy(verify=True)), "mx.test", "192.0.2.1")
    assert verifying.mode == "opportunistic" and verifying.verify
    plain = await host_tls.policy(_mx(), "mx.test", "192.0.2.1")
    assert plain.mode == "disabled"


def test_a_certificate_that_cannot_be_examined_is_a_mismatch(monkeypatch: Any) -> None:
    from cryptography.exceptions import UnsupportedAlgorithm

    from epoxi.delivery import dane

    def unsupported(*args: Any) -> str | None:
        raise UnsupportedAlgorithm("an unknown key type")

    monkeypatch.setattr(dane, "_mismatch", unsupported)
    found = dane_mismatch([Tlsa(3, 1, 1, b"x")], [b"der"], "mx.test")
    assert found == "certificate not usable: UnsupportedAlgorithm: an unknown key type"


async def test_an_idn_domain_asks_for_its_policy_under_its_a_label() -> None:
    asked: list[str] = []

    class Txt:
        async def txt(self, name: str) -> list[str]:
            asked.append(name)
            raise DnsTransient("no answer")

    assert await MtaSts(cast(Resolver, Txt())).policy("Bücher.example.") is None
    assert asked == ["_mta-sts.xn--bcher-kva.example"]


async def test_a_failed_tlsa_lookup_defers_only_for_a_signed_host(monkeypatch: Any) -> None:
    from epoxi.delivery import hosttls

    async def failing(resolver: Any, host: str, port: int = 25) -> Any:
        raise DnsTransient("SERVFAIL")

    class Addresses:
        def __init__(self, secure: bool) -> None:
            self.secure = secure

        async def secure_query(self, name: str, rdtype: str) -> tuple[list[str], bool]:
            return (["192.0.2.1"] if rdtype == "A" else []), self.secure

    monkeypatch.setattr(hosttls, "lookup_tlsa", failing)
    unsigned = HostTls(cast(Resolver, Addresses(secure=False)), dane=True)
    assert await unsigned.policy(_mx(), "mx.test", "192.0.2.1") == TlsPolicy()
    signed = HostTls(cast(Resolver, Addresses(secure=True)), dane=True)
    with pytest.raises(TlsFailed, match=r"TLSA lookup for mx\.test failed"):
        await signed.policy(_mx(), "mx.test", "192.0.2.1")
