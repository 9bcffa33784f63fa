"""A tiny HTTPS server for tests: serves MTA-STS policy files by ``Host`` header.

``policies`` maps a host name (``mta-sts.example.test``) to the body of its
``/.well-known/mta-sts.txt``; other hosts and paths get 404. Each host given at start gets a
self-signed certificate of its own, chosen by SNI; ``ca_pem`` holds them all, for a client to
trust. One request per connection (``Connection: close``), HTTP/1.1, enough for httpx.
``requests`` counts the requests served, so a test can see whether a policy was fetched again
or came from a cache.
"""

from __future__ import annotations

import asyncio
import ssl
import tempfile
from pathlib import Path

from epoxi.testing._service import Service
from epoxi.testing.certs import make_self_signed_pem, server_tls_context

_WELL_KNOWN = "/.well-known/mta-sts.txt"
_MAX_HEAD = 16 * 1024


class PolicyServer(Service):
    def __init__(self, policies: dict[str, str], host: str = "127.0.0.1", port: int = 0) -> None:
        self.policies: dict[str, str] = dict(policies)
        self.ca_pem = b""
        self._contexts: dict[str, ssl.SSLContext] = {}
        self.host = host
        self._port = port
        self.requests = 0
        self._server: asyncio.AbstractServer | None = None

    @property
    def port(self) -> int:
        return self._port

    async def start(self) -> None:
        folder = Path(tempfile.mkdtemp(prefix="epoxi-policy-"))
        for name in self.policies:
            cert_pem, key_pem = make_self_signed_pem(name)
            cert, key = folder / f"{name}.pem", folder / f"{name}.key"
            key.write_bytes(key_pem)
            cert.write_bytes(cert_pem)
            self._contexts[name] = server_tls_context(cert, key)
            self.ca_pem += cert_pem
        context = server_tls_context(cert, key)
        context.sni_callback = self._by_name
        self._server = await asyncio.start_server(self._serve, self.host, self._port, ssl=context)
        self._port = self._server.sockets[0].getsockname()[1]

    def _by_name(self, ssl_object: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
        context = self._contexts.get((name or "").lower())
        if context is not None:
            ssl_object.context = context

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            writer.close()
            return
        self.requests += 1
        status, body = self._answer(head[:_MAX_HEAD].decode("latin-1"))
        payload = body.encode("utf-8")
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
            + payload
        )
        try:
            await writer.drain()
        finally:
            writer.close()

    def _answer(self, head: str) -> tuple[str, str]:
        lines = head.split("\r\n")
        parts = lines[0].split(" ")
        path = parts[1] if len(parts) > 1 else ""
        host = next(
            (
                line.split(":", 1)[1].strip()
                for line in lines[1:]
                if line.lower().startswith("host:")
            ),
            "",
        )
        body = self.policies.get(host.split(":")[0].lower())
        if path != _WELL_KNOWN or body is None:
            return "404 Not Found", "not found\n"
        return "200 OK", body
