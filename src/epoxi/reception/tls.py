"""TLS for the SMTP server: the configured certificate, or a self-signed one made at first start."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import ssl
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

log = logging.getLogger(__name__)


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context for STARTTLS and implicit TLS: TLS 1.2 or newer."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


def ensure_self_signed(directory: Path, hostname: str) -> tuple[Path, Path]:
    """Return the self-signed pair in ``directory``, generating it the first time."""
    cert_path, key_path = directory / "tls-cert.pem", directory / "tls-key.pem"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    directory.mkdir(parents=True, exist_ok=True)
    cert_pem, key_pem = make_self_signed(hostname)
    key_path.touch(mode=0o600)
    key_path.write_bytes(key_pem)
    cert_path.write_bytes(cert_pem)
    log.warning("no TLS certificate configured: generated a self-signed one in %s", cert_path)
    return cert_path, key_path


def make_self_signed(
    hostname: str, addresses: Iterable[str] = ("127.0.0.1", "::1"), days: int = 3650
) -> tuple[bytes, bytes]:
    """A PEM certificate and key (ECDSA P-256) for ``hostname``, ``localhost`` and ``addresses``.

    The certificate is its own CA, so a client that trusts the file verifies it, host name or
    IP address included.
    """
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
    """DNS names ``hostname`` and ``localhost``, and every IP address (``hostname`` if one)."""
    names: list[x509.GeneralName] = []
    ips = list(addresses)
    if _is_ip(hostname):
        ips.insert(0, hostname)
    else:
        names.append(x509.DNSName(hostname))
    if hostname != "localhost":
        names.append(x509.DNSName("localhost"))
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in dict.fromkeys(ips)]
    return x509.SubjectAlternativeName(names)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
