"""A scriptable SMTP sink: the receiving end of delivery tests and benchmarks.

It accepts everything, records what it got, and misbehaves on purpose when a recipient's
local part asks for it (case-insensitive prefixes):

=========================  =====================================================
``tempfail-*``             450 4.2.0 at RCPT
``reject-*``               550 5.1.1 at RCPT
``quota-*``                552 5.2.2 (mailbox full) at RCPT
``tempfail-data-*``        451 4.3.0 at the end of DATA
``reject-data-*``          554 5.7.1 at the end of DATA
``slow-*``                 the end-of-DATA reply comes ``slow_delay`` seconds late
``disconnect-in-data-*``   the connection is dropped during DATA, without a reply
``reset-after-data-*``     all data is read, then the connection is dropped (reply lost)
=========================  =====================================================

``envelope_flights`` of a received message is how many separate reads from the client it took
from MAIL to DATA: 1 means the client pipelined MAIL, every RCPT and DATA in one flight.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

from epoxi.smtp.replies import Reply

log = logging.getLogger(__name__)

_RCPT_FAULTS = (
    ("tempfail-data-", None),
    ("reject-data-", None),
    ("tempfail-", Reply(450, "4.2.0", "Mailbox temporarily unavailable")),
    ("reject-", Reply(550, "5.1.1", "User unknown")),
    ("quota-", Reply(552, "5.2.2", "Mailbox full")),
)
_DATA_FAULTS = (
    ("tempfail-data-", Reply(451, "4.3.0", "Local error in processing")),
    ("reject-data-", Reply(554, "5.7.1", "Message rejected as spam")),
)


@dataclass
class ReceivedMessage:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    peer: str
    local: str  # the sink address the client connected to
    tls: bool
    auth_user: str
    connection: int  # 1 for the sink's first connection
    transaction: int  # 1 for the first message on its connection
    mail_params: str
    envelope_flights: int
    received_at: float  # time.monotonic()


@dataclass
class _Txn:
    mail_from: str = ""
    mail_params: str = ""
    rcpts: list[str] = field(default_factory=list)
    mail_read: int = 0


class Sink:
    """An SMTP server that keeps (or counts) what it receives."""

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
        advertise: set[str] | None = None,
        greeting: Reply | None = None,
        reply_delay: float = 0.0,
        slow_delay: float = 2.0,
        max_size: int = 50 * 1024 * 1024,
        fail_connections: int = 0,
    ) -> None:
        self.host, self._port, self.name, self.hostname = host, port, name, hostname
        self.store, self.tls, self.require_tls = store, tls, require_tls
        self.auth, self.auth_plaintext, self.require_auth = auth or {}, auth_plaintext, require_auth
        default = {"PIPELINING", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "SIZE"}
        self.advertise = advertise if advertise is not None else default
        self.greeting, self.reply_delay, self.slow_delay = greeting, reply_delay, slow_delay
        self.max_size, self.fail_connections = max_size, fail_connections
        self._server: asyncio.Server | None = None
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._sessions: set[_SinkSession] = set()
        self.reset()

    def reset(self) -> None:
        """Forget everything received so far."""
        self.messages: list[ReceivedMessage] = []
        self.received = 0
        self.connections = 0
        self.current_connections = 0
        self.max_concurrent_connections = 0
        self.transactions = 0
        self.rejections = 0
        self.connection_times: list[float] = []

    @property
    def port(self) -> int:
        return self._port

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _SinkSession(self), self.host, self._port, reuse_address=True
        )
        self._port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop listening and drop every open connection."""
        for session in list(self._sessions):
            session._abort()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    async def __aenter__(self) -> Sink:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def wait_for(self, count: int, timeout: float = 10.0) -> None:
        """Return once ``count`` messages have been received (raise TimeoutError if not)."""
        if self.received >= count:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((count, future))
        await asyncio.wait_for(future, timeout)

    def _connected(self) -> int:
        self.connections += 1
        self.current_connections += 1
        self.max_concurrent_connections = max(
            self.max_concurrent_connections, self.current_connections
        )
        self.connection_times.append(time.monotonic())
        return self.connections

    def _received(self, message: ReceivedMessage) -> None:
        self.received += 1
        if self.store:
            self.messages.append(message)
        for count, future in list(self._waiters):
            if self.received >= count and not future.done():
                future.set_result(None)
                self._waiters.remove((count, future))


class _SinkSession(asyncio.Protocol):
    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.data: bytearray | None = None  # collecting DATA when not None
        self.out: list[bytes] = []
        self.reads = 0
        self.busy = False
        self.tls = False
        self.auth_user = ""
        self.txn = _Txn()
        self.transactions = 0
        self.index = 0
        self.peer = self.local = ""
        self.auth_step: Callable[[str], None] | None = None
        self.closed = False
        self.flights = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.peer = str(transport.get_extra_info("peername")[0])
        self.local = str(transport.get_extra_info("sockname")[0])
        self.index = self.sink._connected()
        self.sink._sessions.add(self)
        if self.index <= self.sink.fail_connections:
            self._send(Reply(421, "4.3.2", "Not now"))
            self._close()
            return
        self._send(self.sink.greeting or Reply(220, "", f"{self.sink.hostname} ESMTP sink"))
        if self.sink.greeting is not None and self.sink.greeting.code != 220:
            self._close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.sink.current_connections -= 1
        self.sink._sessions.discard(self)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.reads += 1
        self.buf += data
        if not self.busy:
            self._process()

    # ----------------------------------------------------------------- input

    def _process(self) -> None:
        while not self.busy and not self.closed:
            if self.data is not None:
                if not self._take_data():
                    break
                continue
            end = self.buf.find(b"\n")
            if end < 0:
                break
            line = bytes(self.buf[:end]).rstrip(b"\r").decode("utf-8", "replace")
            del self.buf[: end + 1]
            if self.auth_step is not None:
                step, self.auth_step = self.auth_step, None
                step(line)
            else:
                self._command(line)
        self._flush()

    def _command(self, line: str) -> None:
        verb, _, arg = line.partition(" ")
        handler = getattr(self, f"do_{verb.upper()}", None)
        if handler is None:
            self._reply(Reply(500, "5.5.2", "Command not recognized"))
        else:
            handler(arg.strip())

    # ----------------------------------------------------------------- output

    def _reply(self, reply: Reply) -> None:
        self.out.append(reply.encode())

    def _send(self, reply: Reply) -> None:
        self._reply(reply)
        self._flush()

    def _flush(self) -> None:
        if not self.out or self.transport is None:
            return
        payload, self.out = b"".join(self.out), []
        if self.sink.reply_delay > 0:
            asyncio.get_running_loop().call_later(self.sink.reply_delay, self._write, payload)
        else:
            self._write(payload)

    def _write(self, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(payload)

    def _close(self) -> None:
        self._flush()
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    # ----------------------------------------------------------------- commands

    def do_EHLO(self, arg: str) -> None:
        lines = [f"{self.sink.hostname} hello {arg}"]
        for ext in sorted(self.sink.advertise):
            lines.append(f"SIZE {self.sink.max_size}" if ext == "SIZE" else ext)
        if self.sink.tls is not None and not self.tls:
            lines.append("STARTTLS")
        if self.sink.auth and (self.tls or self.sink.auth_plaintext):
            lines.append("AUTH PLAIN LOGIN")
        self._reply(Reply(250, "", "\n".join(lines)))

    def do_HELO(self, arg: str) -> None:
        self._reply(Reply(250, "", self.sink.hostname))

    def do_NOOP(self, arg: str) -> None:
        self._reply(Reply(250, "2.0.0", "OK"))

    def do_RSET(self, arg: str) -> None:
        self.txn = _Txn()
        self._reply(Reply(250, "2.0.0", "Reset"))

    def do_QUIT(self, arg: str) -> None:
        self._reply(Reply(221, "2.0.0", "Bye"))
        self._close()

    def do_MAIL(self, arg: str) -> None:
        if self.sink.require_tls and not self.tls:
            self._reply(Reply(530, "5.7.0", "Must issue a STARTTLS command first"))
        elif self.sink.require_auth and not self.auth_user:
            self._reply(Reply(530, "5.7.0", "Authentication required"))
        else:
            address, params = _path(arg)
            self.txn = _Txn(address, params, [], self.reads)
            self._reply(Reply(250, "2.1.0", "OK"))

    def do_RCPT(self, arg: str) -> None:
        address, _ = _path(arg)
        local = address.split("@")[0].lower()
        for prefix, reply in _RCPT_FAULTS:
            if local.startswith(prefix):
                if reply is not None:
                    self.sink.rejections += 1
                    self._reply(reply)
                    return
                break
        self.txn.rcpts.append(address)
        self._reply(Reply(250, "2.1.5", "OK"))

    def do_DATA(self, arg: str) -> None:
        if not self.txn.rcpts:
            self._reply(Reply(554, "5.5.1", "No valid recipients"))
            return
        self.flights = self.reads - self.txn.mail_read + 1
        self.data = bytearray(b"\r\n")
        self._reply(Reply(354, "", "Go ahead"))
        if self._fault("disconnect-in-data-"):
            self._flush()
            self.busy = True  # read a little of the message, then hang up
            asyncio.get_running_loop().call_later(0.05, self._abort)

    def _fault(self, prefix: str) -> bool:
        return any(r.split("@")[0].lower().startswith(prefix) for r in self.txn.rcpts)

    def _take_data(self) -> bool:
        assert self.data is not None
        start = max(len(self.data) - 4, 0)
        self.data += self.buf
        self.buf.clear()
        end = self.data.find(b"\r\n.\r\n", start)
        if end < 0:
            return False
        rest = self.data[end + 5 :]
        content = bytes(self.data[: end + 2]).replace(b"\r\n..", b"\r\n.")[2:]
        self.data = None
        self.buf[:0] = rest
        self._end_of_data(content)
        return True

    def _end_of_data(self, content: bytes) -> None:
        txn, self.txn = self.txn, _Txn()
        if self._fault_in(txn, "reset-after-data-"):
            self._abort()
            return
        reply = self._data_reply(txn, content)
        if self._fault_in(txn, "slow-"):
            self.busy = True
            asyncio.get_running_loop().call_later(self.sink.slow_delay, self._late_reply, reply)
            return
        self._reply(reply)

    def _data_reply(self, txn: _Txn, content: bytes) -> Reply:
        for prefix, reply in _DATA_FAULTS:
            if self._fault_in(txn, prefix):
                self.sink.rejections += 1
                return reply
        if len(content) > self.sink.max_size:
            return Reply(552, "5.3.4", "Message too big")
        self.transactions += 1
        self.sink.transactions += 1
        self.sink._received(
            ReceivedMessage(
                txn.mail_from,
                txn.rcpts,
                content,
                self.peer,
                self.local,
                self.tls,
                self.auth_user,
                self.index,
                self.transactions,
                txn.mail_params,
                self.flights,
                time.monotonic(),
            )
        )
        return Reply(250, "2.0.0", f"Ok: queued as {self.sink.name}-{self.sink.received}")

    @staticmethod
    def _fault_in(txn: _Txn, prefix: str) -> bool:
        return any(r.split("@")[0].lower().startswith(prefix) for r in txn.rcpts)

    def _late_reply(self, reply: Reply) -> None:
        if self.closed:
            return
        self.busy = False
        self._reply(reply)
        self._process()

    def do_STARTTLS(self, arg: str) -> None:
        if self.sink.tls is None or self.tls:
            self._reply(Reply(454, "4.7.0", "TLS not available"))
            return
        self._send(Reply(220, "2.0.0", "Ready to start TLS"))
        self.buf.clear()
        self.busy = True
        asyncio.get_running_loop().create_task(self._start_tls(self.sink.tls))

    async def _start_tls(self, context: ssl.SSLContext) -> None:
        assert self.transport is not None
        try:
            transport = await asyncio.get_running_loop().start_tls(
                self.transport, self, context, server_side=True
            )
        except (OSError, ssl.SSLError) as exc:
            log.info("sink: TLS handshake failed: %s", exc)
            self._abort()
            return
        self.transport = transport
        self.tls, self.busy, self.txn = True, False, _Txn()
        self._process()

    def do_AUTH(self, arg: str) -> None:
        mechanism, _, initial = arg.partition(" ")
        if mechanism.upper() == "PLAIN":
            if initial:
                self._auth_plain(initial)
            else:
                self._challenge("", self._auth_plain)
        elif mechanism.upper() == "LOGIN":
            self._challenge("VXNlcm5hbWU6", self._auth_login_user)
        else:
            self._reply(Reply(504, "5.5.4", "Unrecognized authentication mechanism"))

    def _challenge(self, text: str, step: Callable[[str], None]) -> None:
        self.out.append(f"334 {text}\r\n".encode())
        self.auth_step = step

    def _auth_plain(self, response: str) -> None:
        parts = _unb64(response).split("\0")
        self._auth_check(parts[1] if len(parts) == 3 else "", parts[-1])

    def _auth_login_user(self, response: str) -> None:
        user = _unb64(response)
        self._challenge("UGFzc3dvcmQ6", lambda r: self._auth_check(user, _unb64(r)))

    def _auth_check(self, user: str, password: str) -> None:
        if user and self.sink.auth.get(user) == password:
            self.auth_user = user
            self._reply(Reply(235, "2.7.0", "Authentication successful"))
        else:
            self._reply(Reply(535, "5.7.8", "Authentication credentials invalid"))


def _path(arg: str) -> tuple[str, str]:
    """The address inside ``<...>`` after ``FROM:``/``TO:``, and the parameters after it."""
    start, end = arg.find("<"), arg.find(">")
    if start < 0 or end < start:
        return arg.partition(":")[2].strip(), ""
    return arg[start + 1 : end], arg[end + 1 :].strip()


def _unb64(text: str) -> str:
    try:
        return base64.b64decode(text, validate=True).decode("utf-8", "replace")
    except binascii.Error:
        return ""


async def run_sink(host: str, port: int, *, report_every: float = 1.0, **options: object) -> None:
    """Serve until cancelled, printing a line of counts to stderr every ``report_every``."""
    sink = Sink(host, port, store=False, **options)  # type: ignore[arg-type]
    async with sink:
        print(f"sink listening on {host}:{sink.port}", file=sys.stderr, flush=True)
        last = -1
        while True:
            await asyncio.sleep(report_every)
            if sink.received != last:
                last = sink.received
                print(
                    f"messages={sink.received} connections={sink.connections} "
                    f"rejections={sink.rejections}",
                    file=sys.stderr,
                    flush=True,
                )
