"""The outbound SMTP client: one connection, many transactions, pipelined (RFC 2920).

Built on :class:`asyncio.Protocol` so the receive buffer is ours: replies are parsed from it
as they complete, and whatever a server sends between its ``220`` to STARTTLS and the end of
the TLS handshake is thrown away. Every phase has its own timeout; a timeout, a broken
connection or a reply that is not SMTP raises :class:`~epoxi.errors.ConnectionFailed` or
:class:`~epoxi.errors.ProtocolError`, and the client is unusable from then on.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
from dataclasses import dataclass, field
from typing import Literal

from epoxi.errors import ConnectionFailed, DeliveryError
from epoxi.smtp.client_parse import dot_stuff, parse_ehlo, parse_reply
from epoxi.smtp.replies import Reply

log = logging.getLogger(__name__)

TlsMode = Literal["opportunistic", "required", "disabled", "implicit"]
NO_SMTPUTF8 = Reply(553, "5.6.7", "remote server does not support SMTPUTF8")
TOO_BIG_FOR_REMOTE = Reply(552, "5.3.4", "message size exceeds the remote server's limit")
NOT_ATTEMPTED = Reply(451, "4.5.0", "transaction not completed")


@dataclass(frozen=True)
class ClientTimeouts:
    """Seconds to wait in each phase (Postfix-like defaults)."""

    connect: float = 30.0
    banner: float = 300.0
    ehlo: float = 300.0
    starttls: float = 300.0
    auth: float = 300.0
    mail: float = 300.0
    rcpt: float = 300.0
    data: float = 120.0
    data_end: float = 600.0
    rset: float = 60.0
    quit: float = 10.0


@dataclass(frozen=True)
class TlsPolicy:
    """``opportunistic`` uses STARTTLS when offered; ``required`` fails without it."""

    mode: TlsMode = "opportunistic"
    verify: bool = False  # opportunistic MX delivery does not verify, as Postfix's default
    ca_file: str | None = None
    server_name: str | None = None

    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca_file)
        if not self.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


@dataclass(frozen=True)
class ClientAuth:
    username: str
    password: str = field(repr=False)


@dataclass
class TransactionResult:
    mail: Reply
    rcpts: list[tuple[str, Reply]]
    data: Reply | None  # the data-end reply, or DATA's refusal; None if DATA was not reached
    round_trips: int = 0

    def outcomes(self) -> list[tuple[str, Reply]]:
        """Each recipient's final reply."""
        out = []
        for recipient, reply in self.rcpts:
            if not self.mail.is_positive:
                reply = self.mail
            elif reply.is_positive:
                reply = self.data or NOT_ATTEMPTED
            out.append((recipient, reply))
        return out


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.lost: Exception | None = None
        self.discarding = False
        self._waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if not self.discarding:
            self.buf += data
            self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionResetError("connection closed by the server")
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def reply(self, phase: str, timeout: float) -> Reply:
        while True:
            reply = parse_reply(self.buf)
            if reply is not None:
                return reply
            if self.lost is not None:
                raise ConnectionFailed(
                    f"connection lost waiting for the {phase} reply: {self.lost}"
                )
            await self._wait(phase, timeout)

    async def _wait(self, phase: str, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        handle = loop.call_later(timeout, _expire, waiter, phase)
        try:
            await waiter
        finally:
            handle.cancel()
            self._waiter = None


def _expire(waiter: asyncio.Future[None], phase: str) -> None:
    if not waiter.done():
        waiter.set_exception(ConnectionFailed(f"timeout waiting for the {phase} reply"))


class SmtpClient:
    """A connected, greeted (and maybe encrypted and authenticated) SMTP client."""

    def __init__(
        self, protocol: _Protocol, peer: tuple[str, int], timeouts: ClientTimeouts, tls_active: bool
    ) -> None:
        self._protocol = protocol
        self.peer = peer
        self.timeouts = timeouts
        self.tls_active = tls_active
        self.extensions: dict[str, str] = {}
        self._broken = False

    @classmethod
    async def connect(
        cls,
        address: str,
        port: int,
        *,
        server_name: str,
        ehlo_name: str,
        source_address: str | None = None,
        tls: TlsPolicy = TlsPolicy(),
        auth: ClientAuth | None = None,
        timeouts: ClientTimeouts = ClientTimeouts(),
    ) -> SmtpClient:
        """Connect, read the banner, EHLO, STARTTLS per ``tls``, AUTH if ``auth`` is given."""
        implicit = tls.mode == "implicit"
        protocol = await _open(
            address,
            port,
            source_address,
            timeouts.connect,
            tls.context() if implicit else None,
            server_name,
        )
        client = cls(protocol, (address, port), timeouts, tls_active=implicit)
        try:
            await client._handshake(ehlo_name, server_name, tls, auth)
        except BaseException:
            client.close()
            raise
        return client

    @property
    def is_usable(self) -> bool:
        return not self._broken and self._protocol.lost is None

    @property
    def max_size(self) -> int | None:
        value = self.extensions.get("SIZE", "")
        return int(value) if value.isdigit() and int(value) > 0 else None

    # ----------------------------------------------------------------- session set-up

    async def _handshake(
        self, ehlo_name: str, server_name: str, tls: TlsPolicy, auth: ClientAuth | None
    ) -> None:
        banner = await self._read("banner", self.timeouts.banner)
        if banner.code != 220:
            raise ConnectionFailed(f"refused at greeting: {banner}", banner)
        await self._ehlo(ehlo_name)
        if not self.tls_active and tls.mode in ("opportunistic", "required"):
            if "STARTTLS" in self.extensions:
                await self._starttls(tls.context(), server_name)
                await self._ehlo(ehlo_name)
            elif tls.mode == "required":
                raise ConnectionFailed(
                    "TLS required but the server does not offer STARTTLS",
                    Reply(421, "4.7.10", "TLS required but not offered"),
                )
        if auth is not None:
            await self._authenticate(auth)

    async def _ehlo(self, name: str) -> None:
        reply = await self._command(f"EHLO {name}", "ehlo", self.timeouts.ehlo)
        if reply.code == 250:
            self.extensions = parse_ehlo(reply)
            return
        reply = await self._command(f"HELO {name}", "ehlo", self.timeouts.ehlo)
        if reply.code != 250:
            raise ConnectionFailed(f"EHLO and HELO refused: {reply}", reply)
        self.extensions = {}

    async def _starttls(self, context: ssl.SSLContext, server_name: str) -> None:
        reply = await self._command("STARTTLS", "starttls", self.timeouts.starttls)
        if reply.code != 220:
            raise ConnectionFailed(f"STARTTLS refused: {reply}", reply)
        protocol = self._protocol
        assert protocol.transport is not None
        protocol.buf.clear()  # nothing sent before the handshake may be read as a reply
        protocol.discarding = True
        try:
            async with asyncio.timeout(self.timeouts.starttls):
                transport = await asyncio.get_running_loop().start_tls(
                    protocol.transport, protocol, context, server_hostname=server_name
                )
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            self._broken = True
            raise ConnectionFailed(f"TLS handshake failed: {exc or 'timeout'}") from exc
        finally:
            protocol.discarding = False
        protocol.buf.clear()
        protocol.transport = transport
        self.tls_active = True

    async def _authenticate(self, auth: ClientAuth) -> None:
        mechanisms = self.extensions.get("AUTH", "").upper().split()
        if "PLAIN" in mechanisms or "LOGIN" not in mechanisms:
            token = _b64(f"\0{auth.username}\0{auth.password}")
            reply = await self._command(
                f"AUTH PLAIN {token}", "auth", self.timeouts.auth, secret=True
            )
        else:
            reply = await self._command("AUTH LOGIN", "auth", self.timeouts.auth)
            if reply.code == 334:
                reply = await self._command(_b64(auth.username), "auth", self.timeouts.auth)
            if reply.code == 334:
                reply = await self._command(
                    _b64(auth.password), "auth", self.timeouts.auth, secret=True
                )
        if reply.code != 235:
            raise ConnectionFailed(f"authentication as {auth.username} failed: {reply}", reply)

    # ----------------------------------------------------------------- transactions

    async def send(
        self,
        sender: str,
        recipients: list[str],
        body: bytes,
        *,
        smtputf8: bool = False,
        body_8bit: bool = False,
    ) -> TransactionResult:
        """One transaction; per-recipient replies. Raises DeliveryError if the link fails."""
        refusal = self._refusal(sender, recipients, body, smtputf8)
        if refusal is not None:
            return TransactionResult(refusal, [(r, refusal) for r in recipients], None)
        mail = f"MAIL FROM:<{sender}>{self._mail_params(body, smtputf8, body_8bit)}"
        try:
            if "PIPELINING" in self.extensions:
                result = await self._pipelined(mail, recipients, body)
            else:
                result = await self._stepwise(mail, recipients, body)
            if result.data is None or not result.data.is_positive:
                await self.rset()
        except DeliveryError:
            self._broken = True
            raise
        return result

    def _refusal(
        self, sender: str, recipients: list[str], body: bytes, smtputf8: bool
    ) -> Reply | None:
        needs_utf8 = smtputf8 or not (sender.isascii() and all(r.isascii() for r in recipients))
        if needs_utf8 and "SMTPUTF8" not in self.extensions:
            return NO_SMTPUTF8
        limit = self.max_size
        if limit is not None and len(body) > limit:
            return TOO_BIG_FOR_REMOTE
        return None

    def _mail_params(self, body: bytes, smtputf8: bool, body_8bit: bool) -> str:
        params = ""
        if "SIZE" in self.extensions:
            params += f" SIZE={len(body)}"
        if body_8bit and "8BITMIME" in self.extensions:
            params += " BODY=8BITMIME"
        if smtputf8 and "SMTPUTF8" in self.extensions:
            params += " SMTPUTF8"
        return params

    async def _pipelined(self, mail: str, recipients: list[str], body: bytes) -> TransactionResult:
        lines = [mail, *(f"RCPT TO:<{r}>" for r in recipients), "DATA"]
        self._write("\r\n".join(lines).encode("utf-8") + b"\r\n")
        t = self.timeouts
        mail_reply = await self._read("MAIL", t.mail)
        rcpts = [(r, await self._read("RCPT", t.rcpt)) for r in recipients]
        data = await self._read("DATA", t.data)
        result = TransactionResult(mail_reply, rcpts, None, round_trips=1)
        return await self._finish(result, data, body)

    async def _stepwise(self, mail: str, recipients: list[str], body: bytes) -> TransactionResult:
        t = self.timeouts
        result = TransactionResult(await self._command(mail, "MAIL", t.mail), [], None)
        result.round_trips = 1
        if not result.mail.is_positive:
            result.rcpts = [(r, result.mail) for r in recipients]
            return result
        for recipient in recipients:
            result.rcpts.append(
                (recipient, await self._command(f"RCPT TO:<{recipient}>", "RCPT", t.rcpt))
            )
            result.round_trips += 1
        if not any(reply.is_positive for _, reply in result.rcpts):
            return result
        result.round_trips += 1
        return await self._finish(result, await self._command("DATA", "DATA", t.data), body)

    async def _finish(
        self, result: TransactionResult, data: Reply, body: bytes
    ) -> TransactionResult:
        accepted = result.mail.is_positive and any(r.is_positive for _, r in result.rcpts)
        if data.code != 354:
            result.data = data if accepted else None
            return result
        if not accepted:
            # RFC 2920 §3.1: DATA got 354 though no recipient was accepted: end it empty.
            self._write(b".\r\n")
            await self._read("data-end", self.timeouts.data_end)
            return result
        self._write(dot_stuff(body))
        result.round_trips += 1
        result.data = await self._read("data-end", self.timeouts.data_end)
        return result

    async def rset(self) -> Reply:
        return await self._command("RSET", "RSET", self.timeouts.rset)

    async def quit(self) -> None:
        """Say goodbye and close; never raises."""
        try:
            if self.is_usable:
                await self._command("QUIT", "QUIT", self.timeouts.quit)
        except (DeliveryError, OSError):
            pass
        finally:
            self.close()

    def close(self) -> None:
        self._broken = True
        if self._protocol.transport is not None:
            self._protocol.transport.abort()

    # ----------------------------------------------------------------- wire

    def _write(self, data: bytes) -> None:
        transport = self._protocol.transport
        if transport is None or transport.is_closing() or self._protocol.lost is not None:
            raise ConnectionFailed(f"connection to {self.peer[0]} is closed")
        transport.write(data)

    async def _read(self, phase: str, timeout: float) -> Reply:
        try:
            return await self._protocol.reply(phase, timeout)
        except DeliveryError:
            self._broken = True
            raise

    async def _command(
        self, line: str, phase: str, timeout: float, *, secret: bool = False
    ) -> Reply:
        self._write(line.encode("utf-8") + b"\r\n")
        reply = await self._read(phase, timeout)
        log.debug("[%s] %s -> %s", self.peer[0], "AUTH ..." if secret else line, reply)
        return reply


async def _open(
    address: str,
    port: int,
    source: str | None,
    timeout: float,
    context: ssl.SSLContext | None,
    server_name: str,
) -> _Protocol:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            _, protocol = await loop.create_connection(
                _Protocol,
                address,
                port,
                ssl=context,
                server_hostname=server_name if context else None,
                local_addr=(source, 0) if source else None,
            )
    except TimeoutError as exc:
        raise ConnectionFailed(f"timeout connecting to {address}:{port}") from exc
    except (OSError, ssl.SSLError) as exc:
        raise ConnectionFailed(f"cannot connect to {address}:{port}: {exc}") from exc
    return protocol


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")
