"""Outbound TLS policy on real sockets: modes, broken TLS, MTA-STS; each attempt's TLS recorded.

| case | outcome |
|---|---|
| ``required``, the receiver offers no STARTTLS | deferred 421 4.7.4, never plain text |
| ``required-verified``, certificate from the trusted test CA for the MX name | delivered, "verified" |
| ``required-verified``, certificate for another name | deferred 4.7.5 |
| opportunistic, the receiver's TLS handshake breaks | delivered in plain text, host remembered |
| MTA-STS enforce, MX matches, TLS verifies | delivered, "policy=mta-sts enforce" |
| MTA-STS enforce, MX outside the policy | deferred 4.7.5 |
| MTA-STS enforce, MX matches, certificate for another name | deferred 4.7.5 |
| MTA-STS testing, MX outside the policy | delivered, the record says what was not enforced |
| DANE, the MX's validated TLSA record matches the certificate | delivered, "policy=dane" |
| DANE, the TLSA record matches nothing | deferred 4.7.5, never plain text |

The MTA-STS policies come from a local HTTPS server (``epoxi.testing.policyserver``) with its
own test certificates, on a free loopback port (``[delivery] mta_sts_port``); the suite's DNS
server answers ``_mta-sts.<domain>`` TXT and ``mta-sts.<domain>`` A. DANE: a zone signed with
``ldns-signzone``, served by NSD, behind unbound validating it (``epoxi.testing.dnssec``).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from epoxi.delivery.client import SmtpClient, TlsPolicy
from epoxi.delivery.transport import SmtpTransport
from epoxi.dns.tlsa import Tlsa
from epoxi.errors import TlsFailed
from epoxi.events.records import Record, RecordType
from epoxi.testing.certs import make_test_chain, make_test_tls_context, server_tls_context
from epoxi.testing.dnssec import ValidatingResolver
from epoxi.testing.dnsserver import Zone
from epoxi.testing.policyserver import PolicyServer
from epoxi.testing.sink import Sink
from tests.e2e.conftest import Api, MakeWorld, World, message_request, send, zone_for_tests

FAST = {"retry_interval": 60, "max_retry_interval": 60}


def _zone() -> Zone:
    zone = zone_for_tests()
    zone.add("secure.test", "MX", "10 mx1.a.test.")
    zone.add("wrongname.test", "MX", "10 mx.wrongname.test.")
    zone.add("mx.wrongname.test", "A", "127.0.0.2")
    for domain, mx in [
        ("sts.test", "mx1.a.test."),
        ("sts-outside.test", "mx.wrongname.test."),
        ("sts-badcert.test", "mx.wrongname.test."),
        ("sts-testing.test", "mx.wrongname.test."),
    ]:
        zone.add(domain, "MX", f"10 {mx}")
        zone.add(f"_mta-sts.{domain}", "TXT", '"v=STSv1; id=20261201"')
        zone.add(f"mta-sts.{domain}", "A", "127.0.0.1")
    return zone


def _policy(mode: str, *mx: str) -> str:
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx), "max_age: 86400"]
    return "\r\n".join(lines) + "\r\n"


POLICIES = {
    "mta-sts.sts.test": _policy("enforce", "mx1.a.test", "*.b.test"),
    "mta-sts.sts-outside.test": _policy("enforce", "mx1.a.test"),
    "mta-sts.sts-badcert.test": _policy("enforce", "*.wrongname.test"),
    "mta-sts.sts-testing.test": _policy("testing", "mx1.a.test"),
}


def _reply(record: Record) -> str:
    assert record.response is not None
    return f"{record.response.code} {record.response.enhanced} {record.response.text}"


async def _delivered(world: World, recipient: str, tls_ending: str) -> Record:
    """``recipient``'s first outcome, which must be a Delivery over TLS, ``tls`` ending so."""
    delivery = await _outcome(world, recipient)
    assert delivery.type is RecordType.DELIVERY, delivery
    assert delivery.tls.startswith("TLSv1.") and delivery.tls.endswith(tls_ending), delivery.tls
    return delivery


async def _deferred(world: World, recipient: str, reply_start: str) -> Record:
    """``recipient``'s first outcome, which must be a TransientFailure replied so, while no
    sink got anything."""
    failure = await _outcome(world, recipient)
    assert failure.type is RecordType.TRANSIENT_FAILURE, failure
    assert _reply(failure).startswith(reply_start), _reply(failure)
    assert not any(sink.messages for sink in world.sinks.values())
    return failure


async def _outcome(world: World, recipient: str) -> Record:
    """The first outcome record of ``recipient``: Delivery, TransientFailure or Bounce."""
    kinds = (RecordType.DELIVERY, RecordType.TRANSIENT_FAILURE, RecordType.BOUNCE)
    for _ in range(750):
        for record in world.records:
            if record.recipient == recipient and record.type in kinds:
                return record
        await asyncio.sleep(0.02)
    raise AssertionError(f"no outcome for {recipient}: {world.records}")


@pytest.fixture
def tls_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "tls"
    folder.mkdir()
    return folder


async def test_required_without_starttls_defers_with_4_7_4(make_world: MakeWorld) -> None:
    world: World = await make_world(delivery={**FAST, "shaping": {"a.test": {"tls": "required"}}})
    await send(world, ["x@a.test"])
    (failure,) = await world.wait_records(RecordType.TRANSIENT_FAILURE, 1)
    assert _reply(failure).startswith("421 4.7.4"), failure
    assert failure.tls == "policy=required"
    assert not any(sink.messages for sink in world.sinks.values())


async def test_opportunistic_with_a_broken_handshake_goes_plain_and_remembers(
    make_world: MakeWorld,
) -> None:
    world: World = await make_world(sink_options={"break_tls": True})
    await send(world, ["x@a.test"])
    (delivery,) = await world.wait_records(RecordType.DELIVERY, 1)
    assert delivery.tls.startswith("plaintext policy=opportunistic (TLS handshake broken")
    sink = world.sinks["127.0.0.2"]
    assert [m.tls for m in sink.messages] == [False]
    assert sink.connections == 2  # the broken handshake, then plain text at once
    transport = world.app.dispatcher.transport
    assert isinstance(transport, SmtpTransport) and "127.0.0.2" in transport.tls.broken
    await _no_connections(world)
    await send(world, ["y@a.test"])  # remembered: plain text, no handshake tried
    (_, second) = await world.wait_records(RecordType.DELIVERY, 2)
    assert second.tls == delivery.tls
    assert sink.connections == 3


async def _no_connections(world: World) -> None:
    """Return once every delivery connection has closed (idle_timeout is 0.5 s here)."""
    for _ in range(750):
        if world.app.dispatcher.gauges()["outbound_connections"][1] == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("delivery connections stay open")


@pytest.fixture
async def secure_world(make_world: MakeWorld, tls_dir: Path) -> AsyncIterator[World]:
    """Sinks with a certificate for mx1.a.test, policy server up, both trusted by Epoxi."""
    context, sink_cert, _ = make_test_tls_context("mx1.a.test", directory=tls_dir)
    server = PolicyServer(POLICIES)
    await server.start()
    bundle = tls_dir / "ca.pem"
    bundle.write_bytes(sink_cert.read_bytes() + server.ca_pem)
    shaping = {
        "secure.test": {"tls": "required-verified"},
        "wrongname.test": {"tls": "required-verified"},
    }
    world: World = await make_world(
        zone=_zone(),
        sink_options={"tls": context},
        delivery={
            **FAST,
            "shaping": shaping,
            "tls_ca_file": str(bundle),
            "mta_sts_port": server.port,
        },
    )
    yield world
    await server.stop()


async def test_required_verified_delivers_over_verified_tls(secure_world: World) -> None:
    await send(secure_world, ["x@secure.test"])
    await _delivered(secure_world, "x@secure.test", " verified policy=required-verified")
    assert secure_world.sinks["127.0.0.2"].messages[0].tls


async def test_required_verified_with_the_wrong_name_defers(secure_world: World) -> None:
    await send(secure_world, ["x@wrongname.test"])
    await _deferred(secure_world, "x@wrongname.test", "421 4.7.5 TLS failed (required-verified)")


async def test_mta_sts_enforce_delivers_over_verified_tls(secure_world: World) -> None:
    await send(secure_world, ["x@sts.test"])
    await _delivered(secure_world, "x@sts.test", " verified policy=mta-sts enforce")


@pytest.mark.parametrize(
    ("domain", "why"),
    [
        ("sts-outside.test", "MTA-STS: MX host mx.wrongname.test is not in the policy"),
        ("sts-badcert.test", "TLS failed (mta-sts enforce)"),
    ],
)
async def test_mta_sts_enforce_defers_what_it_cannot_verify(
    secure_world: World, domain: str, why: str
) -> None:
    await send(secure_world, [f"x@{domain}"])
    await _deferred(secure_world, f"x@{domain}", f"421 4.7.5 {why}")


async def test_mta_sts_testing_delivers_and_says_what_was_not_enforced(
    secure_world: World,
) -> None:
    await send(secure_world, ["x@sts-testing.test"])
    delivery = await _outcome(secure_world, "x@sts-testing.test")
    assert delivery.type is RecordType.DELIVERY, delivery
    assert "unverified policy=mta-sts testing (not enforced: MTA-STS: MX host" in delivery.tls


async def test_message_status_shows_the_tls_of_each_attempt(api: Api, tls_dir: Path) -> None:
    context, cert, _ = make_test_tls_context("mx1.a.test", directory=tls_dir)
    world, client = await api(
        sink_options={"tls": context},
        delivery={"shaping": {"a.test": {"tls": "required-verified"}}, "tls_ca_file": str(cert)},
    )
    reply = await client.post("/messages", json=message_request(to=["x@a.test"]))
    (queued,) = reply.json()["messages"]
    await world.wait_records(RecordType.DELIVERY, 1)
    status = (await client.get(f"/messages/{queued['id']}")).json()
    (delivery,) = [e for e in status["events"] if e["type"] == "Delivery"]
    assert delivery["tls"].endswith(" verified policy=required-verified"), delivery


# ----------------------------------------------------------------------------- DANE


@pytest.fixture
async def dane_world(make_world: MakeWorld, tls_dir: Path) -> AsyncIterator[World]:
    """dane.test's MX has a TLSA record matching the sinks' key; bad.dane.test's MX has one
    that matches nothing. Signed zone, NSD and unbound: epoxi.testing.dnssec."""
    context, cert, _ = make_test_tls_context("mx1.dane.test", directory=tls_dir)
    leaf = x509.load_pem_x509_certificate(cert.read_bytes())
    spki = leaf.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    records = [
        "@ IN MX 10 mx1.dane.test.",
        "mx1 IN A 127.0.0.2",
        f"_25._tcp.mx1 IN TLSA 3 1 1 {hashlib.sha256(spki).hexdigest()}",
        "bad IN MX 10 mx2.dane.test.",
        "mx2 IN A 127.0.0.3",
        f"_25._tcp.mx2 IN TLSA 3 1 1 {hashlib.sha256(b'some other key').hexdigest()}",
    ]
    resolver = ValidatingResolver("dane.test", records)
    try:
        await resolver.start()
        world: World = await make_world(
            sink_options={"tls": context},
            dns={"nameservers": [resolver.nameserver], "timeout": 5},
            delivery={**FAST, "dane": True},
        )
        yield world
    finally:
        await resolver.stop()


async def test_dane_delivers_when_the_tlsa_record_matches(dane_world: World) -> None:
    await send(dane_world, ["x@dane.test"])
    await _delivered(dane_world, "x@dane.test", " verified policy=dane")
    assert dane_world.sinks["127.0.0.2"].messages[0].tls


async def test_dane_mismatch_defers_and_never_goes_plain(dane_world: World) -> None:
    await send(dane_world, ["x@bad.dane.test"])
    await _deferred(dane_world, "x@bad.dane.test", "421 4.7.5 TLS failed (dane): no TLSA record")


@pytest.mark.both_loops
async def test_dane_checks_the_chain_the_server_sends(tls_dir: Path) -> None:
    """DANE-TA needs the certificates the server sent beyond its own: read on both loops."""
    ca, chain, key = make_test_chain("mx.chain.test", tls_dir)
    ca_spki = ca.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    anchor = Tlsa(2, 1, 1, hashlib.sha256(ca_spki).digest())
    tls = TlsPolicy("required", policy="dane", tlsa=(anchor,))
    async with Sink("127.0.0.2", tls=server_tls_context(chain, key)) as sink:
        client = await SmtpClient.connect(
            sink.host, sink.port, server_name="mx.chain.test", ehlo_name="c.test", tls=tls
        )
        assert client.tls_info.verified and client.tls_info.policy == "dane"
        await client.quit()
        with pytest.raises(TlsFailed, match=r"does not name other\.chain\.test"):
            await SmtpClient.connect(
                sink.host, sink.port, server_name="other.chain.test", ehlo_name="c.test", tls=tls
            )
