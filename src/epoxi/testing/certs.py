"""Self-signed TLS material for tests: a server context and the certificate to trust."""

from __future__ import annotations

import ssl
import tempfile
from pathlib import Path

from epoxi.reception.tls import make_self_signed, server_context


def make_test_tls_context(hostname: str = "localhost") -> tuple[ssl.SSLContext, Path, Path]:
    """A server context for ``hostname``, with the paths of its certificate and key."""
    directory = Path(tempfile.mkdtemp(prefix="epoxi-tls-"))
    cert_pem, key_pem = make_self_signed(hostname)
    cert, key = directory / "cert.pem", directory / "key.pem"
    cert.write_bytes(cert_pem)
    key.write_bytes(key_pem)
    return server_context(cert, key), cert, key
