"""Self-signed TLS material for tests: a server context, and the certificate a client can trust.

The certificate is its own CA (``BasicConstraints ca=True``), so a client context built with
``cafile=cert`` verifies it, host name included, for ``hostname``, ``localhost`` and the
loopback addresses listed.
"""

from __future__ import annotations

import ssl
import tempfile
from collections.abc import Iterable
from pathlib import Path

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
