"""Self-signed TLS material for tests: a server context, and the certificate a client can trust.

The certificate is its own CA (``BasicConstraints ca=True``), so a client context built with
``cafile=cert`` verifies it, host name included, for ``hostname``, ``localhost`` and the
loopback addresses listed.
"""

from __future__ import annotations

import datetime
import ssl
import tempfile
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from epoxi.reception.tls import make_self_signed, server_context

DEFAULT_ADDRESSES = ("127.0.0.1", "::1")


def make_test_tls_context(
    hostname: str = "localhost",
    *,
    addresses: Iterable[str] = DEFAULT_ADDRESSES,
    directory: Path | None = None,
) -> tuple[ssl.SSLContext, Path, Path]:
    """A server context for ``hostname``, with the paths of its certificate and key.

    ``addresses`` are IP addresses the certificate is also valid for (a client that connects
    to ``127.0.0.2`` checks the certificate against that address). The files go to
    ``directory``, or to a new private temporary directory.
    """
    folder = directory if directory is not None else Path(tempfile.mkdtemp(prefix="epoxi-tls-"))
    cert_pem, key_pem = make_self_signed_pem(hostname, addresses)
    cert, key = folder / "cert.pem", folder / "key.pem"
    key.touch(mode=0o600)
    key.write_bytes(key_pem)
    cert.write_bytes(cert_pem)
    return server_tls_context(cert, key), cert, key


def server_tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A TLS 1.2+ server context from PEM files."""
    return server_context(cert, key)


def client_tls_context(cert: Path) -> ssl.SSLContext:
    """A client context that trusts exactly ``cert`` (and verifies host names against it)."""
    return ssl.create_default_context(cafile=str(cert))


def make_self_signed_pem(
    hostname: str, addresses: Iterable[str] = DEFAULT_ADDRESSES, days: int = 30
) -> tuple[bytes, bytes]:
    """A PEM certificate and PEM key (ECDSA P-256, unencrypted) for ``hostname``."""
    return make_self_signed(hostname, addresses, days)


def issue_cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[str, ec.EllipticCurvePrivateKey] | None = None,
    names: Iterable[str] = (),
    *,
    ca: bool = False,
) -> x509.Certificate:
    """A certificate for ``key`` named ``subject``, signed by ``issuer`` (name, key) or by
    itself, valid a day either side of now, with DNS ``names`` as subject alternative names."""
    issuer_name, issuer_key = issuer or (subject, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    dns_names = [x509.DNSName(name) for name in names]
    if dns_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(dns_names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_test_chain(hostname: str, directory: Path) -> tuple[x509.Certificate, Path, Path]:
    """A test CA and a certificate it issued for ``hostname``: (the CA certificate, the PEM
    chain file the server sends: its certificate then the CA's, the server's PEM key)."""
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = issue_cert("Epoxi Test CA", ca_key, ca=True)
    leaf = issue_cert(hostname, key, ("Epoxi Test CA", ca_key), [hostname])
    chain, key_file = directory / "chain.pem", directory / "chain-key.pem"
    key_file.touch(mode=0o600)
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pem = serialization.Encoding.PEM
    chain.write_bytes(leaf.public_bytes(pem) + ca.public_bytes(pem))
    return ca, chain, key_file
