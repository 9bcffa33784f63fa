"""A scriptable SMTP sink: the receiving end of delivery tests and benchmarks.

It is a second SMTP server, written apart from ``reception/`` and ``smtp/parser.py`` on
purpose: an independent reading of RFC 5321 that checks the delivery client from the other
side, so a misreading shared by both ends cannot hide.

It accepts mail, records what it got, and misbehaves on purpose when a recipient's local part
asks for it. A fault name matches the whole local part or its start followed by ``-``, case
insensitively: ``reject@``, ``reject-7@`` and ``Reject-x@`` all fail at RCPT.

=========================  =====================================================================
``tempfail``               450 4.2.0 at RCPT
``reject``                 550 5.1.1 (user unknown) at RCPT
``quota``                  552 5.2.2 (mailbox full) at RCPT. Only there: a data-end reply is for
                           every recipient, so a full mailbox fails one recipient at RCPT.
``quota-data``             552 5.2.2 at the end of data, for the whole message
``tempfail-data``          451 4.3.0 at the end of data
``reject-data``            554 5.7.1 at the end of data
``slow``                   the end-of-data reply comes ``slow_delay`` seconds late
``disconnect-in-data``     once some message data has arrived, the sink closes the connection
                           without a reply (nothing is recorded)
``reset-after-data``       the whole message is read and recorded (``reply_lost=True``), then the
                           connection is reset without the final reply: the "reply lost" case
=========================  =====================================================================

The data-time faults apply to a transaction if any accepted recipient carries them. Refused
recipients and messages are counted in ``rejections`` and never appear in ``messages``.

Flights: every time the sink has input to work on (one ``data_received`` call, or the input
buffered while it was busy with a TLS handshake or a ``slow`` reply), it answers every complete
command line and writes all the replies in one ``transport.write``: that is one *flight*.
``ReceivedMessage.envelope_flights`` counts the flights in which the transaction's MAIL, RCPT and
DATA commands (or its first BDAT) were answered: 1 means the client sent MAIL, every RCPT and
DATA at once, and waited for replies once; a client that waits for each reply scores
``2 + number of RCPTs``. Only flights that answer one of the transaction's commands count: a
read that completes no command line (say the first half of ``MAIL FROM:<...>``) adds nothing.
If TCP splits a pipelined envelope so that two reads each complete some of its commands, that
is 2 flights, and the client gets its replies in two writes too. Flights are counted when the
commands are answered; ``reply_delay`` does not change them. ``ConnectionRecord.command_reads``
counts a connection's flights that answered at least one command line (reads carrying only
message data do not count); ``ConnectionRecord.reads`` counts every ``data_received`` call.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import re
import secrets
import ssl
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TextIO, cast

from epoxi.smtp import replies as r
from epoxi.smtp.replies import Reply
from epoxi.testing._service import Service

__all__ = ["DEFAULT_ADVERTISE", "ConnectionRecord", "ReceivedMessage", "Sink", "run_sink"]

log = logging.getLogger(__name__)

DEFAULT_ADVERTISE = frozenset({"PIPELINING", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "SIZE"})
DEFAULT_MAX_SIZE = 50 * 1024 * 1024
MAX_COMMAND_LINE = 64 * 1024
_DROP_THRESHOLD = 64 * 1024  # data bytes kept before dropping them when they are not stored

_FAULT = re.compile(
    r"(tempfail-data|reject-data|quota-data|disconnect-in-data|reset-after-data|slow"
    r"|tempfail|reject|quota)(?:-|$)",
    re.IGNORECASE,
)
_RCPT_FAULTS = {
    "tempfail": Reply(450, "4.2.0", "Mailbox temporarily unavailable"),
    "reject": Reply(550, "5.1.1", "User unknown"),
    "quota": Reply(552, "5.2.2", "Mailbox full"),
}
_DATA_FAULTS = {
    "tempfail-data": Reply(451, "4.3.0", "Local error in processing"),
    "reject-data": Reply(554, "5.7.1", "Message rejected as spam"),
    "quota-data": Reply(552, "5.2.2", "Mailbox full"),
}
_NOT_NOW = Reply(421, "4.3.2", "Service not available, closing transmission channel")
_MUST_STARTTLS = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
_BINARY_NEEDS_BDAT = Reply(503, "5.5.1", "BODY=BINARYMIME requires BDAT")
_BAD_BASE64 = Reply(501, "5.5.2", "Invalid base64 data")
_HELP = Reply(214, "2.0.0", "See RFC 5321")

# Parameter -> extension that must be advertised for it ("" = always allowed).
_MAIL_PARAMS = {
    "SIZE": "SIZE",
    "SMTPUTF8": "SMTPUTF8",
    "AUTH": "AUTH",
    "RET": "DSN",
    "ENVID": "DSN",
}
_BODY_TYPES = {"7BIT": "", "8BITMIME": "8BITMIME", "BINARYMIME": "BINARYMIME"}
_RCPT_PARAMS = {"NOTIFY": "DSN", "ORCPT": "DSN"}


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    """One accepted message, as the sink saw it."""

    mail_from: str
    rcpt_tos: list[str]  # accepted recipients only, in order
    data: bytes  # dot-unstuffed content, CRLF line ends as sent
    peer: str  # the client's IP address
    local: str  # the sink address the client connected to
    tls: bool
    auth_user: str  # "" when the client did not authenticate
    connection: int  # 1 for the sink's first connection (since the last reset())
    transaction: int  # 1 for the first MAIL accepted on its connection
    mail_params: str  # the MAIL parameters as sent, e.g. "SIZE=120 BODY=8BITMIME"
    rcpt_params: list[str]  # RCPT parameters of each accepted recipient, as sent
    envelope_flights: int  # see the module documentation
    received_at: float  # time.monotonic() at the end of data
    reply_lost: bool = False  # reset-after-data: recorded, but the client never got the reply
    helo: str = ""  # the name the client gave in its last EHLO or HELO


@dataclass(slots=True)
class ConnectionRecord:
    """What happened on one connection (kept when ``store`` is true)."""

    index: int
    peer: str
    local: str
    opened_at: float  # time.monotonic()
    closed_at: float | None = None
    reads: int = 0  # data_received calls
    command_reads: int = 0  # flights that answered at least one command line
    transactions: int = 0  # MAIL commands accepted
    messages: int = 0  # messages accepted
    tls: bool = False
    auth_user: str = ""


@dataclass(slots=True)
class _Transaction:
    mail_from: str
    mail_params: str
    smtputf8: bool
    binary: bool
    rcpt_tos: list[str] = field(default_factory=list)
    rcpt_params: list[str] = field(default_factory=list)
    faults: set[str] = field(default_factory=set)
    flights: int = 0
    last_pass: int = -1
    chunks: int = 0  # BDAT chunks received


class Sink(Service):
    """An SMTP server on ``asyncio.Protocol`` that keeps (or only counts) what it receives.

    ``advertise`` lists the EHLO keywords; STARTTLS and AUTH are only shown when ``tls`` /
    ``auth`` are set (AUTH after TLS, or before it too with ``auth_plaintext``). Leave one out
    to test a client's fallback; without ENHANCEDSTATUSCODES replies carry no enhanced codes.
    ``reply_delay`` delays every write by that many seconds (order kept), like a slow link.
    ``fail_connections``: the first N connections get a 421 greeting and are closed.
    ``fault_times``: each recipient's fault fires at most that many times (then it is served
    normally, as a receiver that recovers); None means every time.
    ``rcpt_answer(client address, recipient)`` may return a reply that refuses a recipient
    (a 421 also closes the connection), as a receiver throttling one sending IP does.
    ``break_tls``: STARTTLS is offered and answered 220, then plain text comes instead of a
    TLS handshake and the connection is closed (a broken TLS stack, as some receivers have).
    With ``store=False`` only counters are kept: no messages, records or times.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        name: str = "sink",
        hostname: str = "sink.test",
        store: bool = True,
        tls: ssl.SSLContext | None = None,
        require_tls: bool = False,
        auth: dict[str, str] | None = None,
        auth_plaintext: bool = False,
        require_auth: bool = False,
        advertise: set[str] | frozenset[str] | None = None,
        greeting: Reply | None = None,
        reply_delay: float = 0.0,
        slow_delay: float = 2.0,
        max_size: int = DEFAULT_MAX_SIZE,
        max_recipients: int = 1000,
        fail_connections: int = 0,
        fault_times: int | None = None,
        break_tls: bool = False,
        rcpt_answer: Callable[[str, str], Reply | None] | None = None,
    ) -> None:
        self.rcpt_answer = rcpt_answer  # (client address, recipient) -> a refusal, or None
        self.host, self._port, self.name, self.hostname = host, port, name, hostname
        self.fault_times = fault_times
        self.break_tls = break_tls
        self._faults_fired: dict[str, int] = {}
        self.store = store
        self.tls = tls
        self.require_tls = require_tls
        self.auth: dict[str, str] = dict(auth or {})
        self.auth_plaintext, self.require_auth = auth_plaintext, require_auth
        self.advertise = _advertised(advertise, tls is not None or break_tls, bool(auth))
        self.greeting, self.reply_delay, self.slow_delay = greeting, reply_delay, slow_delay
        self.max_size, self.max_recipients = max_size, max_recipients
        self.fail_connections = fail_connections
        self._server: asyncio.AbstractServer | None = None
        self._sessions: set[_Session] = set()
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._rendered: dict[Reply, bytes] = {}
        self.current_connections = 0
        self.reset()

    def reset(self) -> None:
        """Forget what was received; connection numbering starts again at 1."""
        self.messages: list[ReceivedMessage] = []
        self.connection_records: list[ConnectionRecord] = []
        self.connection_times: list[float] = []
        self.message_times: list[float] = []
        self.connections = 0
        self.max_concurrent_connections = self.current_connections
        self.transactions = 0  # MAIL commands accepted
        self.received = 0  # messages accepted (also counted when store=False)
        self.rejections = 0  # recipients and messages refused (faults, size, limits)
        self.protocol_errors = 0  # refused commands: syntax, sequence, unadvertised params
        self.auth_failures = 0

    @property
    def port(self) -> int:
        """The listening port (the real one once started with port 0)."""
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` to give a client."""
        return f"{self.host}:{self._port}"

    async def start(self) -> None:
        """Listen on ``host:port``."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Session(self), self.host, self._port, reuse_address=True, backlog=1024
        )
        self._port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop listening and drop every open connection."""
        if self._server is None:
            return
        self._server.close()
        for session in list(self._sessions):
            session.abort()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 2)
        for _ in range(100):
            if not self._sessions:
                break
            await asyncio.sleep(0.01)
        self._server = None

    def fault_for(self, address: str) -> str:
        """The fault ``address`` asks for, unless it has fired ``fault_times`` already."""
        fault = _fault_of(address)
        if fault and self.fault_times is not None:
            fired = self._faults_fired.get(address.lower(), 0)
            if fired >= self.fault_times:
                return ""
            self._faults_fired[address.lower()] = fired + 1
        return fault

    async def wait_for(self, count: int, timeout: float = 10.0) -> None:
        """Return once ``count`` messages were accepted; ``TimeoutError`` after ``timeout``."""
        if self.received >= count:
            return
        waiter = (count, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter[1], timeout)
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    def stats_line(self) -> str:
        """The counters on one line, as ``epoxi sink`` prints them."""
        return (
            f"messages={self.received} transactions={self.transactions} "
            f"rejections={self.rejections} connections={self.connections} "
            f"current={self.current_connections} max_concurrent={self.max_concurrent_connections}"
        )

    def ehlo_keywords(self, tls_active: bool) -> list[str]:
        """The EHLO extension lines offered on a connection with or without TLS."""
        lines = []
        for keyword in sorted(self.advertise):
            if keyword == "SIZE":
                lines.append(f"SIZE {self.max_size}")
            elif keyword == "STARTTLS":
                if (self.tls is not None or self.break_tls) and not tls_active:
                    lines.append(keyword)
            elif keyword == "AUTH":
                if self.auth and (tls_active or self.auth_plaintext):
                    lines.append("AUTH PLAIN LOGIN")
            else:
                lines.append(keyword)
        return lines

    # ------------------------------------------------------------ for the sessions

    def _render(self, reply: Reply) -> bytes:
        """Wire bytes of a fixed reply, without enhanced code if not advertised; cached."""
        rendered = self._rendered.get(reply)
        if rendered is None:
            rendered = self._render_once(reply)
            self._rendered[reply] = rendered
        return rendered

    def _queued_reply(self, number: int) -> bytes:
        """``250 2.0.0 Ok: queued as <name>-<number>``, built cheaply."""
        prefix = self._render(Reply(250, "2.0.0", f"Ok: queued as {self.name}-"))
        return b"%s%d\r\n" % (prefix[:-2], number)

    def _render_once(self, reply: Reply) -> bytes:
        if reply.enhanced and "ENHANCEDSTATUSCODES" not in self.advertise:
            reply = Reply(reply.code, "", reply.text)
        return reply.encode()

    def _opened(self, session: _Session) -> int:
        self._sessions.add(session)
        self.connections += 1
        self.current_connections += 1
        if self.current_connections > self.max_concurrent_connections:
            self.max_concurrent_connections = self.current_connections
        if self.store:
            self.connection_times.append(time.monotonic())
        return self.connections

    def _closed(self, session: _Session) -> None:
        self._sessions.discard(session)
        self.current_connections -= 1

    def _accepted(self, message: ReceivedMessage | None) -> int:
        self.received += 1
        if message is not None:
            self.messages.append(message)
            self.message_times.append(message.received_at)
        if self._waiters:
            self._wake_waiters()
        return self.received

    def _wake_waiters(self) -> None:
        for count, future in self._waiters:
            if self.received >= count and not future.done():
                future.set_result(None)


def _advertised(
    advertise: set[str] | frozenset[str] | None, tls: bool, auth: bool
) -> frozenset[str]:
    if advertise is not None:
        return frozenset(keyword.upper() for keyword in advertise)
    extra = {"STARTTLS"} if tls else set()
    return DEFAULT_ADVERTISE | extra | ({"AUTH"} if auth else set())


Handler = Callable[["_Session", str], None]


class _Session(asyncio.Protocol):
    """One SMTP connection to the sink."""

    _commands: ClassVar[dict[str, Handler]]

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.out: list[bytes] = []
        self.index = 0
        self.peer = self.local = self.helo = ""
        self.record: ConnectionRecord | None = None
        self.greeted = self.tls = False
        self.auth_user = ""
        self.txn: _Transaction | None = None
        self.transactions = 0
        self.busy = self.closing = False
        self.passes = 0
        self.data_scan = -1  # >= 0 while reading DATA: where to resume looking for the end
        self.data_dropped = 0  # DATA bytes dropped (not stored, or over max_size)
        self.chunk_left = -1  # >= 0 while reading a BDAT chunk
        self.chunk_last = False
        self.chunk_error: Reply | None = None
        self.chunk_body = bytearray()
        self.chunk_size = 0
        self.auth_step: Callable[[str], None] | None = None
        self.delayed: deque[tuple[float, bytes, Callable[[], None] | None]] = deque()
        self.drain_timer: asyncio.TimerHandle | None = None
        self.slow_timer: asyncio.TimerHandle | None = None
        self.tls_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.peer = _host_of(transport.get_extra_info("peername"))
        self.local = _host_of(transport.get_extra_info("sockname"))
        self.index = self.sink._opened(self)
        if self.sink.store:
            self.record = ConnectionRecord(self.index, self.peer, self.local, time.monotonic())
            self.sink.connection_records.append(self.record)
        self._greet()

    def _greet(self) -> None:
        greeting = self.sink.greeting or Reply(
            220, "", f"{self.sink.hostname} ESMTP {self.sink.name}"
        )
        if self.index <= self.sink.fail_connections:
            greeting = _NOT_NOW
        self._reply(greeting)
        self._flush()
        if greeting.code != 220:
            self._close_after_output()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        for timer in (self.drain_timer, self.slow_timer):
            if timer is not None:
                timer.cancel()
        if self.record is not None:
            self.record.closed_at = time.monotonic()
        self.sink._closed(self)

    def abort(self) -> None:
        """Drop the connection now (the sink is stopping)."""
        self.closing = True
        if self.tls_task is not None:
            self.tls_task.cancel()
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        if self.record is not None:
            self.record.reads += 1
        self.buf += data
        if not self.busy:
            self._process()

    # ------------------------------------------------------------ input

    def _process(self) -> None:
        """Answer everything complete in the buffer, then write the replies at once."""
        self.passes += 1
        answered = 0
        while not self.busy and not self.closing:
            if self.data_scan >= 0:
                if not self._take_data():
                    break
            elif self.chunk_left >= 0:
                if not self._take_chunk():
                    break
            else:
                line = self._next_line()
                if line is None:
                    break
                answered += 1
                self._line(line)
        if answered and self.record is not None:
            self.record.command_reads += 1
        self._flush()

    def _next_line(self) -> str | None:
        end = self.buf.find(b"\n")
        if end < 0:
            if len(self.buf) > MAX_COMMAND_LINE:
                self._error(r.LINE_TOO_LONG)
                self._close_after_output()
            return None
        raw = self.buf[:end]
        del self.buf[: end + 1]
        if raw.endswith(b"\r"):
            del raw[-1:]
        return raw.decode("utf-8", "replace")

    def _line(self, line: str) -> None:
        if self.auth_step is not None:
            step, self.auth_step = self.auth_step, None
            step(line)
            return
        verb, _, arg = line.partition(" ")
        handler = self._commands.get(verb.upper())
        if handler is None:
            self._error(r.UNKNOWN_COMMAND)
        else:
            handler(self, arg.strip())

    # ------------------------------------------------------------ output

    def _reply(self, reply: Reply) -> None:
        self.out.append(self.sink._render(reply))

    def _error(self, reply: Reply) -> None:
        self.sink.protocol_errors += 1
        self._reply(reply)

    def _reject(self, reply: Reply) -> None:
        self.sink.rejections += 1
        self._reply(reply)

    def _flush(self) -> None:
        if not self.out:
            return
        payload = self.out[0] if len(self.out) == 1 else b"".join(self.out)
        self.out.clear()
        if self.sink.reply_delay > 0 or self.delayed:
            self._write_later(payload, self.sink.reply_delay)
        else:
            self._write(payload)

    def _write(self, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(payload)

    def _write_later(self, payload: bytes, delay: float) -> None:
        loop = asyncio.get_running_loop()
        due = max(loop.time() + delay, self.delayed[-1][0] if self.delayed else 0.0)
        self.delayed.append((due, payload, None))
        if len(self.delayed) == 1:
            self.drain_timer = loop.call_at(due, self._drain_delayed)

    def _drain_delayed(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time() + 0.001
        while self.delayed and self.delayed[0][0] <= now:
            _, payload, action = self.delayed.popleft()
            self._write(payload)
            if action is not None:
                action()
        self.drain_timer = None
        if self.delayed:
            self.drain_timer = loop.call_at(self.delayed[0][0], self._drain_delayed)

    def _after_output(self, action: Callable[[], None]) -> None:
        """Run ``action`` once everything flushed so far is written (now, without delays)."""
        if self.delayed:
            self.delayed.append((self.delayed[-1][0], b"", action))
        else:
            action()

    def _close_after_output(self) -> None:
        self.closing = True
        self._after_output(self._close_transport)

    def _close_transport(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _hang_up(self, *, reset: bool) -> None:
        """Drop the connection without another reply: a FIN, or a reset (abort)."""
        self.closing = True
        self.out.clear()
        if self.transport is None:
            return
        if reset:
            self.transport.abort()
        else:
            self.transport.close()

    # ------------------------------------------------------------ session commands

    def do_ehlo(self, arg: str) -> None:
        if not arg:
            self._error(r.SYNTAX_ERROR)
            return
        self.greeted, self.txn, self.helo = True, None, arg
        lines = [f"{self.sink.hostname} greets {arg}", *self.sink.ehlo_keywords(self.tls)]
        self.out.append(Reply(250, "", "\n".join(lines)).encode())

    def do_helo(self, arg: str) -> None:
        if not arg:
            self._error(r.SYNTAX_ERROR)
            return
        self.greeted, self.txn, self.helo = True, None, arg
        self.out.append(Reply(250, "", f"{self.sink.hostname} greets {arg}").encode())

    def do_noop(self, arg: str) -> None:
        self._reply(r.NOOP_OK)

    def do_rset(self, arg: str) -> None:
        self.txn = None
        self._reply(r.RESET_OK)

    def do_vrfy(self, arg: str) -> None:
        self._reply(r.VRFY_CANNOT)

    def do_help(self, arg: str) -> None:
        self._reply(_HELP)

    def do_quit(self, arg: str) -> None:
        self._reply(r.CLOSING)
        self._flush()
        self._close_after_output()

    # ------------------------------------------------------------ STARTTLS

    def do_starttls(self, arg: str) -> None:
        refusal = self._starttls_refusal(arg)
        if refusal is not None:
            self._error(refusal)
            return
        self._reply(r.READY_FOR_TLS)
        self._flush()
        self.busy = True
        self.buf.clear()  # anything sent before the handshake is discarded, never answered
        assert self.transport is not None
        self.transport.pause_reading()
        self._after_output(self._begin_tls)

    def _starttls_refusal(self, arg: str) -> Reply | None:
        if self.sink.tls is None and not self.sink.break_tls:
            return r.TLS_NOT_AVAILABLE
        if self.tls:
            return r.ALREADY_TLS
        return r.SYNTAX_ERROR if arg else None

    def _begin_tls(self) -> None:
        self.tls_task = asyncio.get_running_loop().create_task(self._upgrade())

    async def _upgrade(self) -> None:
        if self.sink.break_tls:
            assert self.transport is not None
            self.transport.write(b"this is not a TLS handshake\r\n")
            self.transport.close()
            return
        transport, context = self.transport, self.sink.tls
        assert transport is not None and context is not None
        loop = asyncio.get_running_loop()
        try:
            upgraded = await loop.start_tls(
                transport, self, context, server_side=True, ssl_handshake_timeout=10
            )
        except (OSError, RuntimeError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            log.info("sink %s #%d: TLS handshake failed: %s", self.sink.name, self.index, exc)
            transport.abort()
            return
        if upgraded is None:
            transport.abort()
            return
        self._tls_started(upgraded)

    def _tls_started(self, transport: asyncio.Transport) -> None:
        self.transport, self.tls = transport, True
        self.greeted, self.txn, self.busy = False, None, False
        if self.record is not None:
            self.record.tls = True
        self._process()

    # ------------------------------------------------------------ AUTH

    def do_auth(self, arg: str) -> None:
        refusal = self._auth_refusal()
        if refusal is not None:
            self._error(refusal)
            return
        mechanism, _, initial = arg.partition(" ")
        mechanism = mechanism.upper()
        if mechanism == "PLAIN":
            self._auth_start(initial, "", self._auth_plain)
        elif mechanism == "LOGIN":
            self._auth_start(initial, "VXNlcm5hbWU6", self._auth_login_user)
        else:
            self._error(r.AUTH_MECH_UNKNOWN)

    def _auth_refusal(self) -> Reply | None:
        if not self.sink.auth:
            return r.NOT_IMPLEMENTED
        if not self.greeted:
            return r.NEED_EHLO
        if self.auth_user:
            return r.ALREADY_AUTH
        if self.txn is not None:
            return r.BAD_SEQUENCE
        if not (self.tls or self.sink.auth_plaintext):
            return r.AUTH_NEEDS_TLS
        return None

    def _auth_start(self, initial: str, challenge: str, step: Callable[[str], None]) -> None:
        if initial:
            step(initial)
        else:
            self._challenge(challenge, step)

    def _challenge(self, text: str, step: Callable[[str], None]) -> None:
        self.out.append(f"334 {text}\r\n".encode())
        self.auth_step = step

    def _auth_plain(self, response: str) -> None:
        text = self._auth_decode(response)
        if text is None:
            return
        parts = text.split("\0")
        if len(parts) != 3 or parts[0] not in ("", parts[1]):
            self._auth_failed()
            return
        self._auth_check(parts[1], parts[2])

    def _auth_login_user(self, response: str) -> None:
        user = self._auth_decode(response)
        if user is not None:
            self._challenge("UGFzc3dvcmQ6", lambda answer: self._auth_login_password(user, answer))

    def _auth_login_password(self, user: str, response: str) -> None:
        password = self._auth_decode(response)
        if password is not None:
            self._auth_check(user, password)

    def _auth_decode(self, response: str) -> str | None:
        """The decoded response; None (and the reply sent) if cancelled or not base64."""
        if response == "*":
            self._error(r.AUTH_CANCELLED)
            return None
        text = _unb64(response)
        if text is None:
            self._error(_BAD_BASE64)
        return text

    def _auth_check(self, user: str, password: str) -> None:
        expected = self.sink.auth.get(user)
        if expected is None or not secrets.compare_digest(expected.encode(), password.encode()):
            self._auth_failed()
            return
        self.auth_user = user
        if self.record is not None:
            self.record.auth_user = user
        self._reply(r.AUTH_OK)

    def _auth_failed(self) -> None:
        self.sink.auth_failures += 1
        self._reply(r.AUTH_FAILED)

    # ------------------------------------------------------------ envelope

    def do_mail(self, arg: str) -> None:
        refusal = self._mail_refusal()
        if refusal is not None:
            self._error(refusal)
            return
        path = _parse_path(arg, "FROM:")
        if path is None:
            self._error(r.SYNTAX_ERROR)
            return
        address, params = path
        pairs = _split_params(params)
        if self._mail_params_refused(address, pairs):
            return
        self._begin_transaction(address, params, pairs)

    def _mail_refusal(self) -> Reply | None:
        if not self.greeted:
            return r.NEED_EHLO
        if self.txn is not None:
            return r.NESTED_MAIL
        if self.sink.require_tls and not self.tls:
            return _MUST_STARTTLS
        if self.sink.require_auth and not self.auth_user:
            return r.AUTH_REQUIRED
        return None

    def _mail_params_refused(self, address: str, pairs: list[tuple[str, str]]) -> bool:
        """Check MAIL parameters against what is advertised; reply and return True if bad."""
        for key, value in pairs:
            if not self._param_allowed(key, value, _MAIL_PARAMS):
                self._error(r.PARAM_NOT_RECOGNIZED)
                return True
            if key == "SIZE" and not value.isdigit():
                self._error(r.SYNTAX_ERROR)
                return True
            if key == "SIZE" and int(value) > self.sink.max_size:
                self._reject(r.MESSAGE_TOO_BIG)
                return True
        if not address.isascii() and ("SMTPUTF8", "") not in pairs:
            self._error(r.NEEDS_SMTPUTF8)
            return True
        return False

    def _param_allowed(self, key: str, value: str, table: dict[str, str]) -> bool:
        needed = _BODY_TYPES.get(value.upper()) if key == "BODY" else table.get(key)
        return needed is not None and (not needed or needed in self.sink.advertise)

    def _begin_transaction(self, address: str, params: str, pairs: list[tuple[str, str]]) -> None:
        smtputf8 = any(key == "SMTPUTF8" for key, _ in pairs)
        binary = ("BODY", "BINARYMIME") in ((key, value.upper()) for key, value in pairs)
        self.txn = _Transaction(address, params, smtputf8, binary)
        self._note_flight(self.txn)
        self.transactions += 1
        self.sink.transactions += 1
        if self.record is not None:
            self.record.transactions += 1
        self._reply(r.SENDER_OK)

    def _note_flight(self, txn: _Transaction) -> None:
        if txn.last_pass != self.passes:
            txn.last_pass = self.passes
            txn.flights += 1

    def do_rcpt(self, arg: str) -> None:
        txn = self.txn
        if txn is None:
            self._error(r.NEED_MAIL)
            return
        self._note_flight(txn)
        path = _parse_path(arg, "TO:")
        if path is None or not path[0]:
            self._error(r.SYNTAX_ERROR)
            return
        refusal = self._rcpt_refusal(txn, *path)
        if refusal is not None:
            self._error(refusal)
            return
        self._rcpt_verdict(txn, *path)

    def _rcpt_refusal(self, txn: _Transaction, address: str, params: str) -> Reply | None:
        for key, value in _split_params(params):
            if not self._param_allowed(key, value, _RCPT_PARAMS):
                return r.PARAM_NOT_RECOGNIZED
        if not address.isascii() and not txn.smtputf8:
            return r.NEEDS_SMTPUTF8
        return None

    def _rcpt_verdict(self, txn: _Transaction, address: str, params: str) -> None:
        fault = self.sink.fault_for(address)
        answer = self.sink.rcpt_answer(self.peer, address) if self.sink.rcpt_answer else None
        if answer is not None:
            self._reject(answer)
            if answer.code == 421:  # "closing the transmission channel" (RFC 5321 3.8)
                self._flush()  # the flight's replies so far, this one last
                self._close_after_output()
        elif fault in _RCPT_FAULTS:
            self._reject(_RCPT_FAULTS[fault])
        elif len(txn.rcpt_tos) >= self.sink.max_recipients:
            self._reject(r.TOO_MANY_RECIPIENTS)
        else:
            if fault:
                txn.faults.add(fault)
            txn.rcpt_tos.append(address)
            txn.rcpt_params.append(params)
            self._reply(r.RECIPIENT_OK)

    # ------------------------------------------------------------ DATA

    def do_data(self, arg: str) -> None:
        txn = self.txn
        if txn is not None:
            self._note_flight(txn)
        refusal = self._data_refusal(txn, arg)
        if refusal is not None:
            self._error(refusal)
            return
        self._reply(r.START_DATA)
        self.buf[:0] = b"\r\n"  # so that a first line "." also ends the data
        self.data_scan, self.data_dropped = 0, 0

    def _data_refusal(self, txn: _Transaction | None, arg: str) -> Reply | None:
        if txn is None:
            return r.NEED_MAIL
        if arg:
            return r.SYNTAX_ERROR
        if txn.chunks:
            return r.MIXED_DATA_BDAT
        if txn.binary:
            return _BINARY_NEEDS_BDAT
        return None if txn.rcpt_tos else r.NO_VALID_RECIPIENTS

    def _take_data(self) -> bool:
        """Consume DATA input; True once the end was found and answered."""
        txn = self.txn
        assert txn is not None
        if "disconnect-in-data" in txn.faults and len(self.buf) > 2:
            self._hang_up(reset=False)
            return False
        end = self.buf.find(b"\r\n.\r\n", max(self.data_scan - 4, 0))
        if end < 0:
            self.data_scan = len(self.buf)
            self._drop_unkept_data()
            return False
        self.data_scan = -1
        size = self.data_dropped + end
        content = self._unstuffed(end) if self.data_dropped == 0 and self.sink.store else b""
        del self.buf[: end + 5]
        self._end_of_message(txn, content, size)
        return True

    def _unstuffed(self, end: int) -> bytes:
        raw = bytes(self.buf[: end + 2])
        if b"\r\n.." in raw:
            raw = raw.replace(b"\r\n..", b"\r\n.")
        return raw[2:]

    def _drop_unkept_data(self) -> None:
        """Keep data in memory only if stored and within max_size; always keep the last 4 bytes."""
        if len(self.buf) <= _DROP_THRESHOLD:
            return
        if self.sink.store and self.data_dropped + len(self.buf) <= self.sink.max_size:
            return
        self.data_dropped += len(self.buf) - 4
        del self.buf[:-4]
        self.data_scan = 4

    # ------------------------------------------------------------ BDAT (RFC 3030)

    def do_bdat(self, arg: str) -> None:
        if "CHUNKING" not in self.sink.advertise:
            self._error(r.UNKNOWN_COMMAND)
            return
        parts = arg.split()
        if not 1 <= len(parts) <= 2 or not parts[0].isdigit() or parts[1:] not in ([], ["LAST"]):
            self._error(r.SYNTAX_ERROR)  # the chunk size is unknown: nothing to skip
            return
        if self.txn is not None and self.txn.chunks == 0:
            self._note_flight(self.txn)
        self.chunk_left, self.chunk_last = int(parts[0]), len(parts) == 2
        self.chunk_error = self._bdat_refusal(self.txn)

    @staticmethod
    def _bdat_refusal(txn: _Transaction | None) -> Reply | None:
        if txn is None:
            return r.NEED_MAIL
        return None if txn.rcpt_tos else r.NO_VALID_RECIPIENTS

    def _take_chunk(self) -> bool:
        """Consume BDAT chunk bytes; True once the chunk is complete and answered."""
        txn = self.txn
        if txn is not None and "disconnect-in-data" in txn.faults and self.buf:
            self._hang_up(reset=False)
            return False
        taken = min(self.chunk_left, len(self.buf))
        if taken:
            self._keep_chunk_bytes(taken)
        if self.chunk_left > 0:
            return False
        self.chunk_left = -1
        self._chunk_done(txn)
        return True

    def _keep_chunk_bytes(self, taken: int) -> None:
        keep = self.sink.store and self.chunk_size + taken <= self.sink.max_size
        if keep and self.chunk_error is None:
            self.chunk_body += self.buf[:taken]
        del self.buf[:taken]
        self.chunk_left -= taken
        self.chunk_size += taken

    def _chunk_done(self, txn: _Transaction | None) -> None:
        if self.chunk_error is not None or txn is None:
            self.chunk_size = 0
            self.chunk_body.clear()
            self._error(self.chunk_error or r.NEED_MAIL)
            return
        txn.chunks += 1
        if not self.chunk_last:
            octets = Reply(250, "2.0.0", f"{self.chunk_size} octets received")
            self.out.append(self.sink._render_once(octets))
            return
        kept = len(self.chunk_body) == self.chunk_size
        content = bytes(self.chunk_body) if kept and self.sink.store else b""
        size, self.chunk_size = self.chunk_size, 0
        self.chunk_body.clear()
        self._end_of_message(txn, content, size)

    # ------------------------------------------------------------ end of a message

    def _end_of_message(self, txn: _Transaction, content: bytes, size: int) -> None:
        self.txn = None
        if "reset-after-data" in txn.faults:
            self._accept(txn, content, reply_lost=True)
            self._hang_up(reset=True)
            return
        reply = self._final_reply(txn, content, size)
        if "slow" in txn.faults:
            self._reply_later(reply, self.sink.slow_delay)
        else:
            self.out.append(reply)

    def _final_reply(self, txn: _Transaction, content: bytes, size: int) -> bytes:
        refusal = _data_fault(txn)
        if refusal is None and size > self.sink.max_size:
            refusal = r.MESSAGE_TOO_BIG
        if refusal is not None:
            self.sink.rejections += 1
            return self.sink._render(refusal)
        return self.sink._queued_reply(self._accept(txn, content))

    def _accept(self, txn: _Transaction, content: bytes, *, reply_lost: bool = False) -> int:
        if self.record is not None:
            self.record.messages += 1
        message = self._message(txn, content, reply_lost) if self.sink.store else None
        return self.sink._accepted(message)

    def _message(self, txn: _Transaction, content: bytes, reply_lost: bool) -> ReceivedMessage:
        return ReceivedMessage(
            mail_from=txn.mail_from,
            rcpt_tos=txn.rcpt_tos,
            data=content,
            peer=self.peer,
            local=self.local,
            tls=self.tls,
            auth_user=self.auth_user,
            connection=self.index,
            transaction=self.transactions,
            mail_params=txn.mail_params,
            rcpt_params=txn.rcpt_params,
            envelope_flights=txn.flights,
            received_at=time.monotonic(),
            helo=self.helo,
            reply_lost=reply_lost,
        )

    def _reply_later(self, payload: bytes, delay: float) -> None:
        """Hold this reply (and all input after it) for ``delay`` seconds."""
        self.busy = True
        self.slow_timer = asyncio.get_running_loop().call_later(delay, self._late_reply, payload)

    def _late_reply(self, payload: bytes) -> None:
        self.slow_timer = None
        if self.closing:
            return
        self.busy = False
        self.out.append(payload)
        self._process()


_Session._commands = {
    "EHLO": _Session.do_ehlo,
    "HELO": _Session.do_helo,
    "MAIL": _Session.do_mail,
    "RCPT": _Session.do_rcpt,
    "DATA": _Session.do_data,
    "BDAT": _Session.do_bdat,
    "RSET": _Session.do_rset,
    "NOOP": _Session.do_noop,
    "VRFY": _Session.do_vrfy,
    "HELP": _Session.do_help,
    "QUIT": _Session.do_quit,
    "STARTTLS": _Session.do_starttls,
    "AUTH": _Session.do_auth,
}


def _fault_of(address: str) -> str:
    """The fault a recipient asks for ("" if none), from the start of its local part."""
    match = _FAULT.match(address.rpartition("@")[0] or address)
    return match.group(1).lower() if match else ""


def _data_fault(txn: _Transaction) -> Reply | None:
    for fault in txn.faults:
        reply = _DATA_FAULTS.get(fault)
        if reply is not None:
            return reply
    return None


def _parse_path(arg: str, keyword: str) -> tuple[str, str] | None:
    """``FROM:<path> params`` -> (address, params); None when malformed."""
    if arg[: len(keyword)].upper() != keyword:
        return None
    rest = arg[len(keyword) :].lstrip()
    if not rest.startswith("<"):
        address, _, params = rest.partition(" ")
        return (address, params.strip()) if address else None
    end = rest.find(">")
    if end < 0:
        return None
    return rest[1:end], rest[end + 1 :].strip()


def _split_params(params: str) -> list[tuple[str, str]]:
    """``SIZE=10 SMTPUTF8`` -> [("SIZE", "10"), ("SMTPUTF8", "")]; keys upper-cased."""
    pairs = []
    for token in params.split():
        key, _, value = token.partition("=")
        pairs.append((key.upper(), value))
    return pairs


def _unb64(text: str) -> str | None:
    if text == "=":
        return ""
    try:
        return base64.b64decode(text, validate=True).decode("utf-8", "replace")
    except (binascii.Error, ValueError):
        return None


def _host_of(address: Any) -> str:
    """The host part of a socket address tuple ("" when unknown)."""
    return str(address[0]) if isinstance(address, tuple) and address else ""


async def run_sink(
    host: str,
    port: int,
    *,
    report_every: float = 1.0,
    file: TextIO | None = None,
    **options: Any,
) -> None:
    """Serve a sink until cancelled, printing the counters every ``report_every`` seconds.

    ``options`` are the keyword arguments of :class:`Sink`; ``store`` defaults to False here,
    so a long run keeps only counters. A line is printed for each interval in which something
    changed, with the message rate over that interval; nothing while idle.
    """
    options.setdefault("store", False)
    out = file if file is not None else sys.stdout
    async with Sink(host, port, **options) as sink:
        print(f"sink {sink.name} listening on {sink.address}", file=out, flush=True)
        await _report_forever(sink, report_every, out)


async def _report_forever(sink: Sink, every: float, out: TextIO) -> None:
    last = ""
    last_received = sink.received
    while True:
        await asyncio.sleep(every)
        line = sink.stats_line()
        if line != last:
            rate = (sink.received - last_received) / every
            print(f"{line} rate={rate:.1f}/s", file=out, flush=True)
        last, last_received = line, sink.received
