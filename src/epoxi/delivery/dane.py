"""DANE for SMTP (RFC 7672): does a server's certificate chain match its TLSA records?

Only what RFC 7672 §3.1 asks of SMTP is used: ``DANE-EE(3)`` and ``DANE-TA(2)``; ``PKIX-TA(0)``
and ``PKIX-EE(1)`` records are unusable and ignored. Selectors ``Cert(0)`` and ``SPKI(1)``,
matching types ``Full(0)``, ``SHA2-256(1)`` and ``SHA2-512(2)``.

- DANE-EE: the server's own certificate (or its public key) matches; no name check, no
  expiry check (RFC 7672 §3.1.1).
- DANE-TA: a certificate the server sent besides its own matches, the chain from the
  server's certificate up to it is signed link by link, and the server's certificate names
  the MX host (RFC 7672 §3.2.2): a DNS subject alternative name, ``*.`` matching one label.
  A trust anchor published only as a key that the server does not send is not supported.

Pure functions over DER bytes (parsed with ``cryptography``): no I/O, unit-tested.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from epoxi.dns.tlsa import Tlsa

DANE_TA = 2
DANE_EE = 3


def usable(record: Tlsa) -> bool:
    """Whether SMTP can use ``record`` (RFC 7672 §3.1): DANE-TA or DANE-EE, known parameters."""
    return record.usage in (DANE_TA, DANE_EE) and record.selector in (0, 1) and record.matching < 3


def matches(record: Tlsa, certificate: x509.Certificate) -> bool:
    """Whether ``certificate`` (or its key, by the selector) is what ``record`` names."""
    if record.selector == 0:
        selected = certificate.public_bytes(Encoding.DER)
    else:
        key = certificate.public_key()
        selected = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return digest(selected, record.matching) == record.data


def digest(selected: bytes, matching: int) -> bytes:
    """The association data of ``selected`` for a matching type (0 full, 1 SHA-256, 2 SHA-512)."""
    if matching == 1:
        return hashlib.sha256(selected).digest()
    if matching == 2:
        return hashlib.sha512(selected).digest()
    return selected


def dane_mismatch(records: Sequence[Tlsa], chain: Sequence[bytes], host: str) -> str | None:
    """None when ``chain`` (DER, the server's certificate first) satisfies ``records`` for
    MX host ``host``; otherwise why not, in words for a log and a record. A certificate that
    cannot even be examined (an unknown key type, duplicate extensions: ``cryptography``
    raises errors of its own for those) is a mismatch, never an exception."""
    try:
        return _mismatch(records, chain, host)
    except Exception as exc:  # a hostile or broken chain must not escape into the engine
        return f"certificate not usable: {type(exc).__name__}: {exc}"


def _mismatch(records: Sequence[Tlsa], chain: Sequence[bytes], host: str) -> str | None:
    usable_records = [r for r in records if usable(r)]
    if not usable_records:
        return "no usable TLSA record"
    if not chain:
        return "the server sent no certificate"
    try:
        certificates = [x509.load_der_x509_certificate(der) for der in chain]
    except ValueError as exc:
        return f"unreadable certificate: {exc}"
    if any(r.usage == DANE_EE and matches(r, certificates[0]) for r in usable_records):
        return None
    anchors = [r for r in usable_records if r.usage == DANE_TA]
    if anchors and _trust_anchor_path(anchors, certificates):
        return None if names_host(certificates[0], host) else f"certificate does not name {host}"
    return "no TLSA record matches the certificate chain"


def _trust_anchor_path(anchors: Sequence[Tlsa], certificates: list[x509.Certificate]) -> bool:
    """Whether the server's certificate chains, signature by signature, to a certificate it
    sent that a DANE-TA record matches."""
    current = certificates[0]
    others = certificates[1:]
    for _ in range(len(others)):
        issuer = _issuer_of(current, others)
        if issuer is None:
            return False
        if any(matches(r, issuer) for r in anchors):
            return True
        others.remove(issuer)
        current = issuer
    return False


def _issuer_of(
    certificate: x509.Certificate, candidates: list[x509.Certificate]
) -> x509.Certificate | None:
    for candidate in candidates:
        if candidate.subject != certificate.issuer:
            continue
        try:
            certificate.verify_directly_issued_by(candidate)
        except (InvalidSignature, ValueError, TypeError):
            continue
        return candidate
    return None


def names_host(certificate: x509.Certificate, host: str) -> bool:
    """Whether a DNS subject alternative name of ``certificate`` is ``host`` (``*.`` stands
    for exactly one leftmost label), case-insensitively."""
    try:
        extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return False
    wanted = host.lower().rstrip(".")
    return any(
        name_matches(name.lower(), wanted)
        for name in extension.value.get_values_for_type(x509.DNSName)
    )


def name_matches(pattern: str, host: str) -> bool:
    """``pattern`` ("mx.example.com" or "*.example.com") matches ``host`` (both lowercase)."""
    if pattern.startswith("*."):
        label, dot, rest = host.partition(".")
        return bool(label and dot) and rest == pattern[2:]
    return pattern == host
