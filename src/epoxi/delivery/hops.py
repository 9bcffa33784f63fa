"""Egress hops: a source's connections leave through a SOCKS5 proxy or an HAProxy.

A :class:`Hop` opens a connected, non-blocking socket on which the SMTP session to the
destination starts as if it were direct (implicit TLS and STARTTLS included): a SOCKS5 proxy
after its CONNECT succeeded (RFC 1928, username/password of RFC 1929), an HAProxy after the
PROXY v2 header that asks it to connect from the source's ``bind`` to the destination.

Errors: the proxy cannot be reached, refuses us or breaks its protocol:
:class:`~epoxi.errors.SourceUnusable` (the source's failure, not the site's). A SOCKS5 proxy
that reports the destination unreachable or refusing: :class:`~epoxi.errors.ConnectionFailed`,
as a direct connection's failure would be.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field
from typing import Protocol

from epoxi.config import SourceSettings, parse_hostport
from epoxi.errors import ConnectionFailed, SourceUnusable
from epoxi.smtp.hops import (
    REPLY_HEAD,
    USERNAME_PASSWORD,
    Socks5Reply,
    check_auth_reply,
    parse_method_choice,
    parse_socks5_reply,
    proxy_v2_header,
    socks5_auth,
    socks5_connect,
    socks5_greeting,
    socks5_reply_length,
)


class Hop(Protocol):
    async def open(self, address: str, port: int) -> socket.socket:
        """A connected non-blocking socket that reaches ``address:port``; nothing is left
        open on failure."""
        ...


def hop_of(source: SourceSettings) -> Hop | None:
    """The hop a source's connections take, or None for direct connections."""
    if source.socks5:
        password = source.socks5_password
        return Socks5Hop(parse_hostport(source.socks5), source.socks5_username, password)
    if source.proxy_protocol:
        assert source.bind is not None  # the settings require it
        return ProxyProtocolHop(parse_hostport(source.proxy_protocol), source.bind)
    return None


@dataclass(frozen=True, slots=True)
class Socks5Hop:
    """Connections through a SOCKS5 proxy, which chooses the address they leave from."""

    proxy: tuple[str, int]
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        return f"socks5 proxy {_label(*self.proxy)}"

    async def open(self, address: str, port: int) -> socket.socket:
        sock = await _connect(self.proxy, str(self))
        try:
            reply = await self._negotiate(sock, address, port)
        except (OSError, SourceUnusable) as exc:
            sock.close()
            raise SourceUnusable(f"{self}: {exc}") from exc
        except BaseException:
            sock.close()
            raise
        if reply.code != 0:
            sock.close()
            raise _refused(str(self), reply, _label(address, port))
        return sock

    async def _negotiate(self, sock: socket.socket, address: str, port: int) -> Socks5Reply:
        loop = asyncio.get_running_loop()
        with_password = self.username is not None and self.password is not None
        await loop.sock_sendall(sock, socks5_greeting(with_password))
        method = parse_method_choice(await _receive(sock, 2), with_password)
        if method == USERNAME_PASSWORD:
            assert self.username is not None and self.password is not None
            await loop.sock_sendall(sock, socks5_auth(self.username, self.password))
            check_auth_reply(await _receive(sock, 2))
        await loop.sock_sendall(sock, socks5_connect(address, port))
        head = await _receive(sock, REPLY_HEAD)
        rest = await _receive(sock, socks5_reply_length(head) - REPLY_HEAD)
        return parse_socks5_reply(head + rest)


@dataclass(frozen=True, slots=True)
class ProxyProtocolHop:
    """Connections through an HAProxy (``accept-proxy``, ``usesrc clientip``): each starts
    with a PROXY v2 header from ``source`` to the destination."""

    proxy: tuple[str, int]
    source: str

    def __str__(self) -> str:
        return f"haproxy {_label(*self.proxy)}"

    async def open(self, address: str, port: int) -> socket.socket:
        sock = await _connect(self.proxy, str(self))
        try:
            local_port = sock.getsockname()[1]
            header = proxy_v2_header((self.source, local_port), (address, port))
            await asyncio.get_running_loop().sock_sendall(sock, header)
        except OSError as exc:
            sock.close()
            raise SourceUnusable(f"{self}: {exc}") from exc
        except BaseException:
            sock.close()
            raise
        return sock


async def _connect(proxy: tuple[str, int], what: str) -> socket.socket:
    """A non-blocking socket connected to the proxy."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(*proxy, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise SourceUnusable(f"cannot reach {what}: {exc}") from exc
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, address)
    except BaseException as exc:
        sock.close()
        if isinstance(exc, OSError):
            raise SourceUnusable(f"cannot reach {what}: {exc}") from exc
        raise
    return sock


async def _receive(sock: socket.socket, size: int) -> bytes:
    """Exactly ``size`` octets; the proxy closing first is a broken protocol."""
    loop = asyncio.get_running_loop()
    data = b""
    while len(data) < size:
        chunk = await loop.sock_recv(sock, size - len(data))
        if not chunk:
            raise SourceUnusable("closed the connection in the middle of the handshake")
        data += chunk
    return data


def _refused(proxy: str, reply: Socks5Reply, destination: str) -> ConnectionFailed:
    """The destination's failure when the proxy says so, else the proxy's (the source's)."""
    error = ConnectionFailed if reply.destination_fault else SourceUnusable
    return error(f"{proxy} refused CONNECT to {destination}: {reply.meaning} ({reply.code})")


def _label(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
