"""Self-signed TLS material for tests: a server context, and the certificate a client can trust.

The certificate is its own CA (``BasicConstraints ca=True``), so a client context built with
``cafile=cert`` verifies it, host name included, for ``hostname``, ``localhost`` and the
loopback addresses listed.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import tempfile
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

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
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


def client_tls_context(cert: Path) -> ssl.SSLContext:
    """A client context that trusts exactly ``cert`` (and verifies host names against it)."""
    return ssl.create_default_context(cafile=str(cert))


def make_self_signed_pem(
    hostname: str, addresses: Iterable[str] = DEFAULT_ADDRESSES, days: int = 30
) -> tuple[bytes, bytes]:
    """A PEM certificate and PEM key (ECDSA P-256, unencrypted) for ``hostname``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(_alt_names(hostname, addresses), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _alt_names(hostname: str, addresses: Iterable[str]) -> x509.SubjectAlternativeName:
    """DNS names ``hostname`` and ``localhost``, and every address (``hostname`` too if an IP)."""
    names: list[x509.GeneralName] = []
    ips: list[str] = list(addresses)
    if _is_ip(hostname):
        ips.insert(0, hostname)
    else:
        names.append(x509.DNSName(hostname))
    if hostname != "localhost":
        names.append(x509.DNSName("localhost"))
    for ip in dict.fromkeys(ips):
        names.append(x509.IPAddress(ipaddress.ip_address(ip)))
    return x509.SubjectAlternativeName(names)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
