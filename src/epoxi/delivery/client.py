"""The outbound SMTP client: one connection, many transactions, pipelined (RFC 2920).

Built on :class:`asyncio.Protocol` so the receive buffer is ours: replies are parsed from it as
they complete, and whatever a server sends between its ``220`` to STARTTLS and the end of the
TLS handshake is thrown away (RFC 3207 §4.2, the STARTTLS injection class of bugs).

Errors (all :class:`~epoxi.errors.DeliveryError`):

- :class:`~epoxi.errors.ConnectionFailed`: connecting, the banner, EHLO, TLS or AUTH failed (with
  the server's ``reply`` when there was one), or any phase timed out ("timeout waiting for the
  data-end reply from ...").
- :class:`~epoxi.errors.ProtocolError`: the server sent something that is not SMTP, or closed the
  connection in the middle of a transaction.

After either, the client is unusable. A ``421`` reply is the server closing: the transaction
ends with that reply for everything still pending (a result, not an exception) and the client
is unusable too. A data-end reply that never came (timeout, closed connection) leaves the
message in an unknown state: the caller must treat it as a transient failure and retry, which
may deliver it twice (RFC 1047); never as delivered, never as a bounce.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from epoxi.config import TimeoutSettings, TlsMode
from epoxi.delivery.dane import dane_mismatch
from epoxi.dns.tlsa import Tlsa
from epoxi.errors import ConnectionFailed, DeliveryError, ProtocolError, TlsFailed
from epoxi.message import MessageMeta
from epoxi.smtp.client_parse import (
    dot_stuff,
    mail_dsn_params,
    parse_ehlo,
    parse_reply,
    rcpt_dsn_params,
)
from epoxi.smtp.downgrade import Unconvertible, downgrade_8bit
from epoxi.smtp.replies import Reply

if TYPE_CHECKING:
    from epoxi.delivery.hops import Hop

log = logging.getLogger(__name__)


NO_SMTPUTF8 = Reply(553, "5.6.7", "remote server does not support SMTPUTF8")
TOO_BIG_FOR_REMOTE = Reply(552, "5.3.4", "message size exceeds remote limit")
BAD_SENDER = Reply(553, "5.1.7", "sender address contains a line break")
BAD_RECIPIENT = Reply(553, "5.1.3", "recipient address contains a line break")
NOT_ATTEMPTED = Reply(451, "4.5.0", "transaction not completed")
TLS_NOT_OFFERED = Reply(421, "4.7.4", "TLS required but not offered")
NOT_CONVERTIBLE = "8-bit message to a server without 8BITMIME: conversion required but not possible"
_DEFAULT_TIMEOUTS = TimeoutSettings()
_MAX_UNREAD = 1024 * 1024  # octets of replies not yet read before the connection is dropped


@dataclass(frozen=True)
class TlsPolicy:
    """How to use TLS on a connection.

    - ``opportunistic``: STARTTLS when the server offers it, plain text otherwise (and when the
      server refuses the STARTTLS command). A failed handshake raises ``TlsFailed`` (no reply):
      the connection is gone, and the transport retries that host in plain text.
    - ``required``: STARTTLS or fail; no offer raises ``ConnectionFailed`` whose ``reply`` is a
      ``421 4.7.4 TLS required but not offered``; a failed handshake or verification raises
      ``TlsFailed`` with a ``421 4.7.5`` reply. Never plain text.
    - ``disabled``: never TLS. ``implicit``: TLS from the first byte (port 465).

    ``verify`` checks the certificate chain (against the system store plus ``ca_file``) and
    the name; off by default, as opportunistic MX delivery cannot expect valid certificates
    (Postfix's default too). ``server_name`` overrides the name sent in SNI and verified.
    ``tlsa`` (DANE, RFC 7672): the certificate must match one of these records instead of
    the CA store (``epoxi.delivery.dane``). ``policy`` names the policy in the records of each
    attempt ("mta-sts enforce", "dane"); empty, it is named after ``mode`` and ``verify``.
    """

    mode: TlsMode = "opportunistic"
    verify: bool = False
    ca_file: str | None = None
    server_name: str | None = None
    policy: str = ""
    tlsa: tuple[Tlsa, ...] = ()
    note: str = ""  # said in the records of the attempts (why plain text, what failed)

    @property
    def name(self) -> str:
        """The policy's name as recorded: ``policy``, or the mode ("required-verified")."""
        if self.policy:
            return self.policy
        return "required-verified" if self.mode == "required" and self.verify else self.mode

    @property
    def required(self) -> bool:
        """True when the connection must have TLS: no offer, no mail."""
        return self.mode in ("required", "implicit") or bool(self.tlsa)

    @property
    def strict(self) -> bool:
        """True when a failed TLS handshake or check must never end in plain text: TLS is
        required, or the certificate is to be verified."""
        return self.required or self.verify

    def context(self) -> ssl.SSLContext:
        """The client TLS context for this policy; built once per (verify, ca_file), shared.
        DANE checks the certificate itself (against the TLSA records), not through the CAs."""
        return _client_context(self.verify and not self.tlsa, self.ca_file)


@functools.lru_cache(maxsize=32)
def _client_context(verify: bool, ca_file: str | None) -> ssl.SSLContext:
    if verify:
        context = ssl.create_default_context()
        if ca_file is not None:
            context.load_verify_locations(cafile=ca_file)
        return context
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # no CA store to load: nothing to verify
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@dataclass(frozen=True)
class TlsInfo:
    """What TLS a connection got, as recorded with each attempt on it.

    ``version`` and ``cipher`` are empty in plain text; ``verified`` says the certificate was
    checked (CA chain and name, or DANE); ``policy`` is the policy applied; ``note`` says
    anything else worth knowing ("TLS broken at this host, remembered: plain text").
    """

    version: str = ""
    cipher: str = ""
    verified: bool = False
    policy: str = "opportunistic"
    note: str = ""

    @functools.cached_property
    def text(self) -> str:
        """The compact form for records: ``TLSv1.3 TLS_AES_256_GCM_SHA384 verified
        policy=mta-sts enforce``; computed once per connection."""
        if self.version:
            checked = "verified" if self.verified else "unverified"
            parts = [self.version, self.cipher, checked, f"policy={self.policy}"]
        else:
            parts = ["plaintext", f"policy={self.policy}"]
        if self.note:
            parts.append(f"({self.note})")
        return " ".join(parts)


@dataclass(frozen=True, repr=False)
class ClientAuth:
    """Credentials for AUTH PLAIN (or LOGIN when PLAIN is not offered); never shown in a repr."""

    username: str
    password: str = field(repr=False)

    def __repr__(self) -> str:
        return f"ClientAuth(username={self.username!r}, password='***')"


@dataclass(frozen=True, slots=True)
class DsnEnvelope:
    """The RFC 3461 parameters of a message, to pass on to a next hop that offers DSN.

    Values as :class:`~epoxi.message.MessageMeta` holds them: ``ret`` ``FULL`` or ``HDRS``
    ("" for none); ``envid`` decoded ("" for none); ``notify`` maps a recipient to ``NEVER``
    or a comma list of SUCCESS, FAILURE, DELAY; ``orcpt`` maps a recipient to
    ``type;address``, decoded. The client encodes them (xtext) and leaves out what is absent
    or not valid.
    """

    ret: str = ""
    envid: str = ""
    notify: Mapping[str, str] | None = None
    orcpt: Mapping[str, str] | None = None

    @classmethod
    def of(cls, meta: MessageMeta) -> DsnEnvelope | None:
        """The message's DSN parameters, or None when it has none (the cheap case)."""
        if not (meta.dsn_ret or meta.dsn_envid or meta.dsn_notify or meta.dsn_orcpt):
            return None
        return cls(meta.dsn_ret, meta.dsn_envid, meta.dsn_notify, meta.dsn_orcpt)

    def mail_params(self) -> str:
        """`` RET=... ENVID=...``, or ""."""
        return mail_dsn_params(self.ret, self.envid)

    def rcpt_params(self, recipients: list[str]) -> list[str]:
        """`` NOTIFY=... ORCPT=...`` (or "") for each recipient, in order."""
        notify, orcpt = self.notify or {}, self.orcpt or {}
        return [rcpt_dsn_params(notify.get(r), orcpt.get(r)) for r in recipients]


@dataclass(slots=True)
class TransactionResult:
    """The replies of one transaction.

    ``mail`` is the MAIL reply; ``rcpts`` has one ``(recipient, reply)`` per recipient, in the
    order given (a recipient whose RCPT was never sent carries the reply that stopped the
    transaction); ``data`` is the data-end reply, or the refusal of DATA itself, or None when
    the message was not sent. ``round_trips`` counts the flights written and waited for.
    ``dsn_passed`` is True when DSN parameters were given and the server offers DSN, so they
    went with MAIL and RCPT: the next hop now reports as the sender asked (RFC 3461 §6.2).
    False means a recipient delivered with ``NOTIFY=SUCCESS`` needs a "relayed" DSN from us.
    """

    mail: Reply
    rcpts: list[tuple[str, Reply]]
    data: Reply | None = None
    round_trips: int = 0
    dsn_passed: bool = False

    @classmethod
    def refused(cls, reply: Reply, recipients: list[str]) -> TransactionResult:
        """A transaction never started: ``reply`` for every recipient."""
        return cls(reply, [(recipient, reply) for recipient in recipients])

    def outcomes(self) -> list[tuple[str, Reply]]:
        """Each recipient's final reply: MAIL's if it failed, RCPT's if that failed, else data's."""
        if not self.mail.is_positive:
            return [(recipient, self.mail) for recipient, _ in self.rcpts]
        final = self.data or NOT_ATTEMPTED
        return [(rcpt, reply if not reply.is_positive else final) for rcpt, reply in self.rcpts]


class _ReplyReader(asyncio.Protocol):
    """The connection's protocol: buffers what arrives and hands out complete replies."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.lost: Exception | None = None
        self.loss_error: type[DeliveryError] = ConnectionFailed
        self.discarding = False
        self._waiter: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        if self.discarding:
            return
        self.buf += data
        if len(self.buf) > _MAX_UNREAD and self.transport is not None:
            self.transport.abort()  # a server flooding us: connection_lost follows
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionResetError("connection closed by the server")
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait_reply(self, phase: str, timeout: float) -> Reply:
        """The next reply, once the buffer holds no complete one; ``timeout`` seconds in all."""
        loop = self._loop
        if loop is None:  # looked up once: on Python 3.11 each lookup is a getpid call
            loop = self._loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self.lost is not None:
                raise self.loss_error(
                    f"connection closed waiting for the {phase} reply from {self.label}: "
                    f"{self.lost}"
                )
            await self._wait(loop, deadline, phase)
            reply = parse_reply(self.buf)
            if reply is not None:
                return reply

    async def _wait(self, loop: asyncio.AbstractEventLoop, deadline: float, phase: str) -> None:
        waiter = self._waiter = loop.create_future()
        timer = loop.call_at(deadline, self._expire, waiter, phase)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def _expire(self, waiter: asyncio.Future[None], phase: str) -> None:
        if not waiter.done():
            message = f"timeout waiting for the {phase} reply from {self.label}"
            waiter.set_exception(ConnectionFailed(message))


class SmtpClient:
    """One open SMTP session: greeted, maybe encrypted and authenticated, ready for mail.

    Build it with :meth:`connect`; run transactions one at a time with :meth:`send`; end it
    with :meth:`quit` (polite) or :meth:`close` (abrupt).
    """

    def __init__(
        self,
        reader: _ReplyReader,
        peer: tuple[str, int],
        timeouts: TimeoutSettings,
        *,
        tls_active: bool,
    ) -> None:
        self._reader = reader
        self._peer = peer
        self._timeouts = timeouts
        self._tls_active = tls_active
        self.tls_info = TlsInfo()  # set once the session is set up
        self._extensions: dict[str, str] = {}
        self.greeting_name = ""  # the host name the server gave in its 220 banner
        self._max_size: int | None = None
        self._broken = False
        self._busy = False
        self._needs_reset = False  # a transaction was left open at the server
        self._closing: Reply | None = None  # the server's 421, once it said it is closing
        self._flights = 0

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
        timeouts: TimeoutSettings = _DEFAULT_TIMEOUTS,
        hop: Hop | None = None,
    ) -> SmtpClient:
        """Connect to ``address:port`` and get the session ready for mail.

        Binds ``source_address`` when given; reads the banner (not 2xx: ``ConnectionFailed``
        with the reply); EHLO (HELO when EHLO gets a 5xx); STARTTLS as ``tls`` says, then EHLO
        again; AUTH when ``auth`` is given (refused: ``ConnectionFailed`` with the reply, a
        configuration problem rather than the message's). ``server_name`` is the name for SNI
        and certificate checks unless ``tls.server_name`` is set. With ``hop`` the connection
        goes through it (a SOCKS5 proxy, an HAProxy), within the connect timeout. Raises
        ``ConnectionFailed`` or ``ProtocolError``; nothing is left open then.
        """
        name = tls.server_name or server_name
        implicit = tls.mode == "implicit"
        context = tls.context() if implicit else None
        reader = await _open(address, port, source_address, timeouts.connect, context, name, hop)
        client = cls(reader, (address, port), timeouts, tls_active=implicit)
        client.tls_info = TlsInfo(policy=tls.name, note=tls.note)
        try:
            if implicit:
                client._check_peer(tls, name)
            await client._start_session(ehlo_name, name, tls, auth)
        except BaseException:
            client.close()
            raise
        reader.loss_error = ProtocolError  # from now on, a close is an early close
        return client

    # ----------------------------------------------------------------- state

    @property
    def extensions(self) -> dict[str, str]:
        """EHLO keywords (upper-case) and parameters, from the latest EHLO (a copy)."""
        return dict(self._extensions)

    @property
    def peer(self) -> tuple[str, int]:
        """The server's address and port, as given to :meth:`connect`."""
        return self._peer

    @property
    def tls_active(self) -> bool:
        """True once the session is encrypted (implicit TLS or STARTTLS)."""
        return self._tls_active

    @property
    def is_usable(self) -> bool:
        """True while another transaction may be started on this connection.

        False after an error, a 421, :meth:`close`, the server closing the connection or
        sending anything unasked while idle.
        """
        reader = self._reader
        return not self._broken and reader.lost is None and not reader.buf

    @property
    def max_size(self) -> int | None:
        """The server's SIZE limit in octets, or None when it states none (or 0)."""
        return self._max_size

    def __repr__(self) -> str:
        return f"<SmtpClient {self._reader.label} tls={self._tls_active} usable={self.is_usable}>"

    # ----------------------------------------------------------------- session set-up

    async def _start_session(
        self, ehlo_name: str, server_name: str, tls: TlsPolicy, auth: ClientAuth | None
    ) -> None:
        await self._read_banner()
        await self._ehlo(ehlo_name)
        if await self._maybe_starttls(tls, server_name):
            await self._ehlo(ehlo_name)
        if auth is not None:
            await self._authenticate(auth)

    async def _read_banner(self) -> None:
        banner = await self._read("banner", self._timeouts.banner)
        self.greeting_name = banner.text.split(" ", 1)[0].split("\n", 1)[0]
        if banner.code // 100 != 2:
            self._write_quietly(b"QUIT\r\n")  # RFC 5321 §3.1, best effort
            raise ConnectionFailed(f"{self._reader.label} refused at greeting: {banner}", banner)

    async def _ehlo(self, name: str) -> None:
        reply = await self._exchange(f"EHLO {name}", "EHLO", self._timeouts.ehlo)
        if reply.code == 250:
            self._set_extensions(parse_ehlo(reply))
            return
        if reply.is_permanent:
            reply = await self._exchange(f"HELO {name}", "HELO", self._timeouts.ehlo)
            self._set_extensions({})
        if reply.code != 250:
            raise ConnectionFailed(f"{self._reader.label} refused EHLO/HELO: {reply}", reply)

    def _set_extensions(self, extensions: dict[str, str]) -> None:
        self._extensions = extensions
        size = extensions.get("SIZE", "").split(" ")[0]
        self._max_size = int(size) if size.isdigit() and int(size) > 0 else None

    async def _maybe_starttls(self, tls: TlsPolicy, server_name: str) -> bool:
        """STARTTLS if the policy and the server want it; True when TLS was started."""
        if self._tls_active or tls.mode in ("disabled", "implicit"):
            return False
        if "STARTTLS" not in self._extensions:
            if tls.required:
                message = f"{self._reader.label}: TLS required but not offered"
                raise TlsFailed(message, TLS_NOT_OFFERED, policy=tls.name)
            return False
        reply = await self._exchange("STARTTLS", "STARTTLS", self._timeouts.starttls)
        if reply.code != 220:
            return self._starttls_refused(tls, reply)
        await self._handshake(tls, server_name)
        self._check_peer(tls, server_name)
        return True

    def _starttls_refused(self, tls: TlsPolicy, reply: Reply) -> bool:
        if tls.required:
            message = f"{self._reader.label} refused STARTTLS: {reply}"
            refusal = Reply(421, "4.7.4", f"TLS required ({tls.name}), STARTTLS refused: {reply}")
            raise TlsFailed(message, reply if reply.is_transient else refusal, policy=tls.name)
        if reply.code == 421:
            raise ConnectionFailed(f"{self._reader.label} refused STARTTLS: {reply}", reply)
        log.info("[%s] STARTTLS refused, going on in plain text: %s", self._reader.label, reply)
        return False

    async def _handshake(self, tls: TlsPolicy, server_name: str) -> None:
        reader = self._reader
        reader.buf.clear()  # sent before the handshake: must never be read as a reply
        reader.discarding = True
        try:
            transport = await self._start_tls(tls, server_name)
        finally:
            reader.discarding = False
        reader.buf.clear()
        reader.transport = transport
        self._tls_active = True

    async def _start_tls(self, tls: TlsPolicy, server_name: str) -> asyncio.Transport:
        reader, timeout = self._reader, self._timeouts.starttls
        assert reader.transport is not None
        try:
            async with asyncio.timeout(timeout):
                transport = await asyncio.get_running_loop().start_tls(
                    reader.transport,
                    reader,
                    tls.context(),
                    server_hostname=server_name,
                    ssl_handshake_timeout=timeout,
                )
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            self._broken = True
            raise _tls_failed(tls, f"TLS handshake with {reader.label} failed", exc) from exc
        if transport is None:  # typeshed allows it; a closed connection would do it
            self._broken = True
            raise _tls_failed(tls, f"TLS handshake with {reader.label} failed", "closed")
        return transport

    def _check_peer(self, tls: TlsPolicy, server_name: str) -> None:
        """After the handshake: DANE's check of the certificate, then what TLS we got."""
        transport = self._reader.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        if ssl_object is None:
            return
        verified = tls.verify
        if tls.tlsa:
            mismatch = dane_mismatch(tls.tlsa, _peer_chain(ssl_object), server_name)
            if mismatch is not None:
                self.close()
                raise _tls_failed(tls, f"DANE: {self._reader.label} ({server_name})", mismatch)
            verified = True
        cipher = ssl_object.cipher()
        version = ssl_object.version() or "TLS"
        self.tls_info = TlsInfo(version, cipher[0] if cipher else "", verified, tls.name, tls.note)

    async def _authenticate(self, auth: ClientAuth) -> None:
        mechanisms = self._extensions.get("AUTH", "").upper().split()
        if "PLAIN" not in mechanisms and "LOGIN" in mechanisms:
            reply = await self._auth_login(auth)
        else:
            token = _b64(f"\0{auth.username}\0{auth.password}")
            reply = await self._exchange(f"AUTH PLAIN {token}", "AUTH", self._timeouts.auth)
        if reply.code != 235:
            message = f"{self._reader.label} refused AUTH as {auth.username!r}: {reply}"
            raise ConnectionFailed(message, reply)

    async def _auth_login(self, auth: ClientAuth) -> Reply:
        timeout = self._timeouts.auth
        reply = await self._exchange("AUTH LOGIN", "AUTH", timeout)
        if reply.code == 334:
            reply = await self._exchange(_b64(auth.username), "AUTH", timeout)
        if reply.code == 334:
            reply = await self._exchange(_b64(auth.password), "AUTH", timeout)
        return reply

    # ----------------------------------------------------------------- transactions

    async def send(
        self,
        sender: str,
        recipients: list[str],
        body: bytes,
        *,
        smtputf8: bool = False,
        body_8bit: bool = False,
        dsn: DsnEnvelope | None = None,
    ) -> TransactionResult:
        """Run one mail transaction and return every reply.

        ``body`` is the message as stored (CRLF line ends expected; bare CR/LF are fixed and
        dots stuffed here). Without a round trip, every recipient gets a synthetic permanent
        reply when SMTPUTF8 is needed (``smtputf8``, or a non-ASCII address) but not offered
        (``553 5.6.7``), or the body exceeds the server's SIZE (``552 5.3.4``). An address with
        a CR or LF is never sent: ``553 5.1.7`` for all (sender) or ``553 5.1.3`` for it.
        MAIL carries ``SIZE=`` when offered, ``BODY=8BITMIME`` for ``body_8bit`` when offered
        and ``SMTPUTF8`` when needed.

        8-bit content never goes to a server without 8BITMIME (RFC 6152 §3): when the server
        lacks it and the body is 8-bit (``body_8bit``, or found so then), the 8-bit MIME parts
        are converted to quoted-printable (:mod:`epoxi.smtp.downgrade`) before SIZE is
        checked; a message that cannot be converted (not MIME, 8-bit headers) gets
        ``554 5.6.3 ... conversion required but not possible`` for every recipient, without a
        round trip. A SMTPUTF8 transaction is not converted: SMTPUTF8 implies 8BITMIME.

        ``dsn`` (see :class:`DsnEnvelope`, e.g. ``DsnEnvelope.of(meta)``) adds ``RET=`` and
        ``ENVID=`` to MAIL and ``NOTIFY=`` and ``ORCPT=`` to each RCPT when the server offers
        DSN, and nothing otherwise; ``TransactionResult.dsn_passed`` tells which.

        With PIPELINING, MAIL, every RCPT and DATA go in one write, then the message in a
        second (``round_trips == 2``); without it, one command per round trip, stopping early.
        Transaction-level replies (a refused RCPT, a 5xx data-end) are results, not errors.
        Raises ``ConnectionFailed`` (timeout) or ``ProtocolError`` (garbage, early close) and
        leaves the client unusable; see the module documentation for a lost data-end reply.
        Raises ``ValueError`` without recipients, ``ConnectionFailed`` if not ``is_usable``.
        """
        if not recipients:
            raise ValueError("send() needs at least one recipient")
        self._begin()
        try:
            return await self._transaction(sender, recipients, body, smtputf8, body_8bit, dsn)
        except BaseException:
            self._broken = True  # whatever happened, the session state is unknown now
            raise
        finally:
            self._busy = False

    def _begin(self) -> None:
        if self._busy:
            raise RuntimeError("one transaction at a time on an SmtpClient")
        if not self.is_usable:
            raise ConnectionFailed(f"connection to {self._reader.label} is not usable")
        self._busy = True

    async def _transaction(
        self,
        sender: str,
        recipients: list[str],
        body: bytes,
        smtputf8: bool,
        body_8bit: bool,
        dsn: DsnEnvelope | None,
    ) -> TransactionResult:
        utf8 = smtputf8 or not (sender.isascii() and all(r.isascii() for r in recipients))
        if "8BITMIME" not in self._extensions and not utf8:
            converted = _seven_bit(body, body_8bit)
            if isinstance(converted, Reply):
                return TransactionResult.refused(converted, recipients)
            body = converted
        refusal = self._refusal(utf8, len(body))
        if refusal is not None:
            return TransactionResult.refused(refusal, recipients)
        if _has_line_break(sender):
            return TransactionResult.refused(BAD_SENDER, recipients)
        clean = [r for r in recipients if not _has_line_break(r)]
        if not clean:
            return TransactionResult.refused(BAD_RECIPIENT, recipients)
        mail = f"MAIL FROM:<{sender}>{self._mail_params(len(body), utf8, body_8bit)}"
        if dsn is not None and "DSN" in self._extensions:
            result = await self._run(mail + dsn.mail_params(), clean, body, dsn.rcpt_params(clean))
            result.dsn_passed = True
        else:
            result = await self._run(mail, clean, body, None)
        if len(clean) < len(recipients):
            result.rcpts = _merge_refused(recipients, result.rcpts)
        return result

    def _refusal(self, utf8: bool, size: int) -> Reply | None:
        if utf8 and "SMTPUTF8" not in self._extensions:
            return NO_SMTPUTF8
        limit = self._max_size
        if limit is not None and size > limit:
            return TOO_BIG_FOR_REMOTE
        return None

    def _mail_params(self, size: int, utf8: bool, body_8bit: bool) -> str:
        extensions = self._extensions
        params = f" SIZE={size}" if "SIZE" in extensions else ""
        if body_8bit and "8BITMIME" in extensions:
            params += " BODY=8BITMIME"
        if utf8:
            params += " SMTPUTF8"
        return params

    async def _run(
        self, mail: str, recipients: list[str], body: bytes, params: list[str] | None
    ) -> TransactionResult:
        """The transaction; ``params`` holds each recipient's RCPT parameters, if any."""
        flights = self._flights
        if "PIPELINING" in self._extensions:
            result = await self._pipelined(mail, recipients, body, params)
        else:
            result = await self._stepwise(mail, recipients, body, params)
        result.round_trips = self._flights - flights
        if log.isEnabledFor(logging.DEBUG):
            log.debug("[%s] %s -> %s", self._reader.label, mail, _summary(result))
        return result

    async def _pipelined(
        self, mail: str, recipients: list[str], body: bytes, params: list[str] | None
    ) -> TransactionResult:
        timeouts = self._timeouts
        reset = self._needs_reset
        self._write(_envelope(mail, recipients, reset, params))
        if reset:
            self._after_reset(await self._read("RSET", timeouts.rset))
        result = TransactionResult(await self._read("MAIL", timeouts.mail), [])
        for recipient in recipients:
            result.rcpts.append((recipient, await self._read("RCPT", timeouts.rcpt)))
        return await self._finish(result, await self._read("DATA", timeouts.data), body)

    async def _stepwise(
        self, mail: str, recipients: list[str], body: bytes, params: list[str] | None
    ) -> TransactionResult:
        timeouts = self._timeouts
        if self._needs_reset:
            self._after_reset(await self._exchange("RSET", "RSET", timeouts.rset))
        result = TransactionResult(await self._exchange(mail, "MAIL", timeouts.mail), [])
        if not result.mail.is_positive:
            result.rcpts = [(recipient, result.mail) for recipient in recipients]
            return result
        self._needs_reset = True
        for index, recipient in enumerate(recipients):
            rcpt = f"RCPT TO:<{recipient}>{params[index] if params else ''}"
            result.rcpts.append((recipient, await self._exchange(rcpt, "RCPT", timeouts.rcpt)))
        if not any(reply.is_positive for _, reply in result.rcpts):
            return result
        return await self._finish(result, await self._exchange("DATA", "DATA", timeouts.data), body)

    async def _finish(
        self, result: TransactionResult, data: Reply, body: bytes
    ) -> TransactionResult:
        """Send the message after a 354; record the reply that decides the accepted recipients."""
        self._needs_reset = result.mail.is_positive  # until a data-end reply closes it
        accepted = result.mail.is_positive and any(r.is_positive for _, r in result.rcpts)
        if data.code != 354:
            result.data = data if accepted else None
            return result
        if not accepted:
            # RFC 2920 §3.1: DATA was pipelined, every RCPT failed, yet the server said 354.
            # End the (empty) message at once; its reply means nothing to any recipient.
            self._write(b".\r\n")
            await self._read("data-end", self._timeouts.data_end)
        else:
            self._write(dot_stuff(body))
            result.data = await self._read("data-end", self._timeouts.data_end)
        self._needs_reset = False
        return result

    def _after_reset(self, reply: Reply) -> None:
        self._needs_reset = False
        if not reply.is_positive and reply.code != 421:  # a 421 ends the transaction anyway
            raise ProtocolError(f"{self._reader.label} refused RSET: {reply}", reply)

    async def rset(self) -> Reply:
        """Send RSET and return its reply; a refusal leaves the client unusable."""
        reply = await self._exchange("RSET", "RSET", self._timeouts.rset)
        self._needs_reset = False
        if not reply.is_positive:
            self._broken = True
        return reply

    async def quit(self) -> None:
        """Send QUIT, wait briefly for the reply, close. Best effort: never raises."""
        try:
            if self.is_usable:
                await self._exchange("QUIT", "QUIT", self._timeouts.quit)
        except Exception as exc:  # QUIT is a courtesy
            log.debug("[%s] QUIT: %s", self._reader.label, exc)
        finally:
            self.close()

    def close(self) -> None:
        """Drop the connection now (no QUIT); the client is unusable afterwards."""
        self._broken = True
        transport = self._reader.transport
        if transport is not None:
            transport.abort()

    # ----------------------------------------------------------------- wire

    def _write(self, data: bytes) -> None:
        """Hand one flight to the transport."""
        reader = self._reader
        transport = reader.transport
        if transport is None or transport.is_closing() or reader.lost is not None:
            raise reader.loss_error(f"connection to {reader.label} is closed")
        self._flights += 1
        transport.write(data)

    def _write_quietly(self, data: bytes) -> None:
        transport = self._reader.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    async def _read(self, phase: str, timeout: float) -> Reply:
        """The next reply; after a 421 the same 421 for everything still expected."""
        if self._closing is not None:
            return self._closing
        try:
            reader = self._reader
            reply = parse_reply(reader.buf) if reader.buf else None  # often already here
            if reply is None:
                reply = await reader.wait_reply(phase, timeout)
        except DeliveryError:
            self._broken = True
            raise
        if reply.code == 421:
            self._closing = reply
            self._broken = True
        return reply

    async def _exchange(self, line: str, phase: str, timeout: float) -> Reply:
        """Send one command line and read its reply (not sent once the server said 421)."""
        if self._closing is not None:
            return self._closing
        self._write(line.encode("utf-8", "surrogateescape") + b"\r\n")
        reply = await self._read(phase, timeout)
        log.debug("[%s] %s -> %s", self._reader.label, _loggable(line), reply)
        return reply


def _tls_failed(tls: TlsPolicy, what: str, detail: object) -> TlsFailed:
    """The error of a failed handshake or check; with a 4.7.5 reply when plain text is out."""
    message = f"{what}: {detail or 'timeout'}"
    if not tls.strict:
        return TlsFailed(message, policy=tls.name)
    reply = Reply(421, "4.7.5", f"TLS failed ({tls.name}): {detail or 'timeout'}")
    return TlsFailed(message, reply, policy=tls.name)


def _peer_chain(ssl_object: ssl.SSLObject) -> list[bytes]:
    """The certificates the server sent (DER, its own first).

    Python 3.13 has ``SSLObject.get_unverified_chain``; 3.10 to 3.12 have it on the
    underlying ``_ssl`` object only. Without either, the server's own certificate alone.
    """
    getter = getattr(ssl_object, "get_unverified_chain", None)
    if getter is None:
        getter = getattr(getattr(ssl_object, "_sslobj", None), "get_unverified_chain", None)
    if getter is not None:
        chain = getter() or []
        return [c if isinstance(c, bytes) else c.public_bytes(_DER) for c in chain]
    leaf = ssl_object.getpeercert(binary_form=True)
    return [leaf] if leaf else []


_DER = 2  # _ssl.ENCODING_DER


async def _open(
    address: str,
    port: int,
    source: str | None,
    timeout: float,
    context: ssl.SSLContext | None,
    server_name: str,
    hop: Hop | None = None,
) -> _ReplyReader:
    """Connect (TLS from the first byte when ``context`` is given); errors as ConnectionFailed."""
    loop = asyncio.get_running_loop()
    label = f"{address}:{port}"
    try:
        async with asyncio.timeout(timeout):
            if hop is not None:
                return await _open_through(hop, address, port, context, server_name, label)
            _, reader = await loop.create_connection(
                lambda: _ReplyReader(label),
                address,
                port,
                ssl=context,
                server_hostname=server_name if context is not None else None,
                local_addr=(source, 0) if source else None,
            )
    except TimeoutError as exc:
        through = f" through {hop}" if hop is not None else ""
        raise ConnectionFailed(f"timeout connecting to {label}{through}") from exc
    except OSError as exc:  # ssl.SSLError included
        origin = f" from {source}" if source else ""
        raise ConnectionFailed(f"cannot connect to {label}{origin}: {exc}") from exc
    return reader


async def _open_through(
    hop: Hop,
    address: str,
    port: int,
    context: ssl.SSLContext | None,
    server_name: str,
    label: str,
) -> _ReplyReader:
    """The session over the socket the hop connected (the caller times it out)."""
    sock = await hop.open(address, port)
    try:
        _, reader = await asyncio.get_running_loop().create_connection(
            lambda: _ReplyReader(label),
            sock=sock,
            ssl=context,
            server_hostname=server_name if context is not None else None,
        )
    except BaseException:
        sock.close()
        raise
    return reader


def _envelope(mail: str, recipients: list[str], reset: bool, params: list[str] | None) -> bytes:
    """MAIL, every RCPT and DATA (after RSET when ``reset``) as one pipelined flight."""
    if params is None:
        rcpts = "".join([f"RCPT TO:<{recipient}>\r\n" for recipient in recipients])
    else:
        rcpts = "".join([f"RCPT TO:<{r}>{p}\r\n" for r, p in zip(recipients, params, strict=True)])
    reset_line = "RSET\r\n" if reset else ""
    return f"{reset_line}{mail}\r\n{rcpts}DATA\r\n".encode("utf-8", "surrogateescape")


def _seven_bit(body: bytes, body_8bit: bool) -> bytes | Reply:
    """``body`` fit for a server without 8BITMIME, or the reply refusing it."""
    if not body_8bit and body.isascii():
        return body
    converted = downgrade_8bit(body)
    if isinstance(converted, Unconvertible):
        return Reply(554, "5.6.3", f"{NOT_CONVERTIBLE} ({converted.reason})")
    return converted


def _has_line_break(address: str) -> bool:
    return "\n" in address or "\r" in address


def _merge_refused(recipients: list[str], sent: list[tuple[str, Reply]]) -> list[tuple[str, Reply]]:
    """All recipients in order: the replies of those sent, BAD_RECIPIENT for the others."""
    replies = iter(sent)
    return [(r, BAD_RECIPIENT) if _has_line_break(r) else next(replies) for r in recipients]


def _summary(result: TransactionResult) -> str:
    codes = " ".join(str(reply.code) for _, reply in result.rcpts)
    data = result.data.code if result.data is not None else "-"
    return f"MAIL {result.mail.code}, RCPT {codes}, data {data}, {result.round_trips} round trips"


def _loggable(line: str) -> str:
    """The command line as it may be logged: no AUTH argument, no AUTH LOGIN response."""
    if line == "AUTH LOGIN" or line.partition(" ")[0].upper() in _LOGGABLE_VERBS:
        return line
    return "AUTH ..."


_LOGGABLE_VERBS = frozenset({"EHLO", "HELO", "STARTTLS", "MAIL", "RCPT", "DATA", "RSET", "QUIT"})


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")
