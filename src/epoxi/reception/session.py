"""One SMTP server connection: a state machine fed with bytes, answering with replies.

The session is an :class:`asyncio.Protocol`. It reads commands from a buffer, so pipelined
commands (RFC 2920) are handled in order and their replies leave in one write. Message data
is scanned in blocks, not lines: only ``CRLF.CRLF`` ends a message, and bare CR or LF in the
data rejects it (the SMTP smuggling defence). Anything that needs to wait (the spool commit,
a password check, the TLS handshake) sets the session busy; input is buffered until it is done.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import ssl
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from epoxi.errors import MessageRefused, SpoolUnavailable
from epoxi.ids import new_message_id
from epoxi.message import MessageMeta
from epoxi.reception import auth
from epoxi.reception.ingest import received_header
from epoxi.smtp import replies
from epoxi.smtp.data import has_bare_cr_or_lf, has_long_line, unstuff
from epoxi.smtp.parser import (
    CommandError,
    Mailbox,
    is_ascii_number,
    parse_command,
    parse_dsn_envid,
    parse_dsn_ret,
    parse_mail,
    parse_rcpt,
    parse_rcpt_dsn,
    parse_size_param,
)
from epoxi.smtp.replies import Reply

if TYPE_CHECKING:
    from collections.abc import Callable

    from epoxi.config import SmtpSettings
    from epoxi.reception.ingest import Ingest
    from epoxi.reception.policy import AuthThrottle, ConnectionTracker, RelayPolicy

log = logging.getLogger(__name__)

_PAUSE_ABOVE = 1 << 20  # buffered octets while busy before reading is paused
_BDAT_PROGRESS = 512  # octets in one read of a BDAT chunk that restart the data timeout
_BODY_VALUES = frozenset({"7BIT", "8BITMIME"})
# RFC 2920 §3.1: these end a group; nothing may follow them before their reply has been read.
# STARTTLS is not here: what follows it is discarded (RFC 3207 §4.2), as before.
_LAST_IN_GROUP = frozenset({"EHLO", "HELO", "DATA", "VRFY", "EXPN", "TURN", "NOOP", "QUIT", "HELP"})


class State(enum.Enum):
    COMMAND = "command"
    DATA = "data"
    BDAT = "bdat"
    AUTH = "auth"  # waiting for a SASL response line
    TLS = "tls"  # handshake in progress
    CLOSED = "closed"


@dataclass
class SessionContext:
    """What every session of one listener shares; built once by the server."""

    hostname: str
    settings: SmtpSettings
    relay: RelayPolicy
    ingest: Ingest
    tracker: ConnectionTracker
    authenticator: auth.Authenticator
    auth_throttle: AuthThrottle
    tls_context: ssl.SSLContext | None = None  # STARTTLS offered when set
    offer_auth: bool = True
    auth_plaintext: bool = False
    sessions: set[SmtpSession] = field(default_factory=set)
    draining: bool = False


@dataclass
class Transaction:
    """The envelope and the data of the message being received."""

    sender: Mailbox | None = None
    has_sender: bool = False
    recipients: list[str] = field(default_factory=list)
    smtputf8: bool = False
    body_8bit: bool = False
    parts: list[bytes] = field(default_factory=list)
    size: int = 0
    used_data: bool = False
    used_bdat: bool = False
    too_big: bool = False
    long_line: bool = False
    bad_endings: bool = False
    has_nul: bool = False
    at_line_start: bool = True
    line_run: int = 0  # BDAT: octets of the line in progress, which may span chunks
    # RFC 3461, as given (decoded); left empty or None when absent, as MessageMeta has them
    dsn_ret: str = ""
    dsn_envid: str = ""
    dsn_notify: dict[str, str] | None = None
    dsn_orcpt: dict[str, str] | None = None


class SmtpSession(asyncio.Protocol):
    """The server side of one SMTP connection."""

    _commands: ClassVar[dict[str, Callable[[SmtpSession, str], None]]] = {}

    def __init__(self, ctx: SessionContext, clock: Callable[[], float] = time.monotonic) -> None:
        self.ctx = ctx
        self._clock = clock
        self.state = State.COMMAND
        self.transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.peer_ip = ""
        self.peer_trusted = False
        self.helo = ""
        self.esmtp = False
        self.tls_active = False
        self.auth_user = ""
        self.last_activity = clock()
        self.errors = 0
        self.txn = Transaction()
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._busy = False
        self._paused = False
        self._counted = False
        self._discarding_line = False
        self._bdat_remaining = 0
        self._bdat_last = False
        self._bdat_error: Reply | None = None
        self._auth_step: Callable[[str], None] | None = None
        self._login_user = ""
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._close_when_idle = False  # shutdown: say 421 once the pending wait is over
        self.closed = asyncio.Event()

    # ----------------------------------------------------------------- connection events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        self.peer_ip = str(peer[0]) if peer else "unknown"
        self.peer_trusted = self.ctx.relay.is_trusted(self.peer_ip)  # once, not per message
        self.tls_active = transport.get_extra_info("sslcontext") is not None
        refusal = self.ctx.tracker.admit(self.peer_ip)
        if refusal is not None:
            log.info("[%s] refused: %s", self.peer_ip, refusal)
            self._reply(refusal)
            self._close()
            return
        self._counted = True
        self.ctx.sessions.add(self)
        greeting = Reply(220, "", f"{self.ctx.hostname} {self.ctx.settings.banner}")
        self._out.append(greeting.encode())
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._counted:
            self.ctx.tracker.release(self.peer_ip)
            self._counted = False
        self.ctx.sessions.discard(self)
        self.state = State.CLOSED
        self.closed.set()
        self._wake_idle()

    def data_received(self, data: bytes) -> None:
        if self.state in (State.CLOSED, State.TLS):
            return
        if self.state is State.BDAT and len(data) >= _BDAT_PROGRESS:
            self.last_activity = self._clock()  # chunks have no lines: a real read is progress
        self._buf += data
        if self._busy:
            self._pause_if_full()
            return
        self._process()

    def eof_received(self) -> bool | None:
        return None  # close the transport

    # ----------------------------------------------------------------- the input loop

    def _process(self) -> None:
        while not self._busy and self.state is not State.CLOSED:
            if self.state is State.DATA:
                if not self._consume_data():
                    break
            elif self.state is State.BDAT:
                if not self._consume_bdat():
                    break
            elif not self._consume_line():
                break
        self._flush()
        if self._paused and not self._busy and len(self._buf) < _PAUSE_ABOVE:
            self._paused = False
            if self.transport is not None and self.state is not State.CLOSED:
                self.transport.resume_reading()

    def _consume_line(self) -> bool:
        """Handle one command line from the buffer; False when no full line is there."""
        buf = self._buf
        end = buf.find(b"\n")
        limit = self.ctx.settings.max_line_length
        if end < 0:
            if len(buf) > limit:
                buf.clear()
                if not self._discarding_line:
                    self._discarding_line = True
                    self._line_too_long()
            return False
        line = bytes(buf[:end])
        del buf[: end + 1]
        self.last_activity = self._clock()  # timeouts run per whole line, not per byte
        if self._discarding_line:
            self._discarding_line = False
            return True
        if len(line) + 1 > limit:  # the line and its LF, CR included, within the limit
            self._line_too_long()
            return True
        if line.endswith(b"\r"):
            line = line[:-1]
        if self.state is State.AUTH and self._auth_step is not None:
            self._auth_step(line.decode("utf-8", "replace"))
        else:
            self._dispatch(line)
        return True

    def _line_too_long(self) -> None:
        if self.state is State.AUTH:  # a SASL response too long ends the exchange
            self._auth_step = None
            self.state = State.COMMAND
        self._error(replies.LINE_TOO_LONG)

    def _dispatch(self, line: bytes) -> None:
        try:
            command = parse_command(line)
        except CommandError as exc:
            self._error(exc.reply)
            return
        try:
            handler = self._commands.get(command.verb)
            if handler is None:
                self._error(replies.UNKNOWN_COMMAND)
            elif self.ctx.draining and command.verb not in ("QUIT", "RSET", "NOOP"):
                self._reply(replies.SHUTTING_DOWN)
                self._close()
            else:
                handler(self, command.arg)
        except CommandError as exc:
            self._error(exc.reply)
        if self._buf and self._pipelining_forbidden(command.verb):
            self._lost_sync(command.verb)

    def _pipelining_forbidden(self, verb: str) -> bool:
        """Whether input already waiting after ``verb`` breaks RFC 2920 (as Postfix's
        ``smtpd_forbid_unauth_pipelining`` judges it): before EHLO no command may be
        pipelined, after EHLO none may follow a command that ends a group. Authenticated
        clients are trusted to know what they do. A command sent before the greeting is
        only caught when more follows it: telling it apart needs a delayed greeting."""
        if self.state is not State.COMMAND and self.state is not State.DATA:
            return False  # closed, a BDAT chunk follows, or STARTTLS/AUTH took the input
        if not self.ctx.settings.forbid_unauth_pipelining or self.auth_user:
            return False
        return not self.esmtp or verb in _LAST_IN_GROUP

    def _lost_sync(self, after: str) -> None:
        """Refuse a client that talks ahead of its replies; whatever it sent is dropped."""
        log.info("[%s] improper pipelining after %s", self.peer_ip, after)
        self.txn = Transaction()
        self._reply(replies.PIPELINING_FORBIDDEN)
        self._close()

    # ----------------------------------------------------------------- output

    def _reply(self, reply: Reply) -> None:
        self._out.append(replies.wire(reply))

    def _error(self, reply: Reply) -> None:
        """Reply with an error, and close the session once it has made too many."""
        self._reply(reply)
        self.errors += 1
        if self.errors >= self.ctx.settings.max_errors and self.state is not State.CLOSED:
            self._reply(replies.TOO_MANY_ERRORS)
            self._close()

    def _flush(self) -> None:
        if self._out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self._out))
        self._out.clear()

    def _close(self) -> None:
        self._flush()
        self.state = State.CLOSED
        self._buf.clear()
        if self.transport is not None:
            self.transport.close()

    def _pause_if_full(self) -> None:
        if not self._paused and len(self._buf) > _PAUSE_ABOVE and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    # ----------------------------------------------------------------- called by the server

    def check_timeout(self, now: float) -> None:
        """Close the session if it has waited for the client too long."""
        if self._busy or self.state in (State.CLOSED, State.TLS):
            return
        in_data = self.state in (State.DATA, State.BDAT)
        limit = self.ctx.settings.data_timeout if in_data else self.ctx.settings.idle_timeout
        if now - self.last_activity > limit:
            log.info("[%s] %s timeout", self.peer_ip, "data" if in_data else "idle")
            self._reply(replies.DATA_TIMEOUT if in_data else replies.IDLE_TIMEOUT)
            self._close()

    def drain(self) -> None:
        """Shutdown: close now if idle, else after the transaction in progress."""
        if self.state is State.COMMAND and not self._busy and not self.txn.has_sender:
            self._reply(replies.SHUTTING_DOWN)
            self._close()

    def shut_down(self) -> None:
        """Shutdown, once the grace is over: 421 4.3.2 and close, in the middle of DATA or
        BDAT too (the client keeps its message and retries: nothing was acknowledged). A
        session waiting for its commit gets the commit's reply first, then 421, so a 250 is
        never lost and never sent for a message that is not on disk."""
        if self.state is State.CLOSED:
            return
        if self._busy:
            self._close_when_idle = True
            return
        if self.state in (State.DATA, State.BDAT):
            log.info("[%s] shutting down in the middle of message data", self.peer_ip)
            self.txn = Transaction()
        self._reply(replies.SHUTTING_DOWN)
        self._close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    async def wait_idle(self) -> None:
        """Return once the session has nothing left to do with the input it has: no spool
        commit, password check or handshake pending. Tests read replies after this; a future
        per wait keeps the common path free of events."""
        while self._busy and self.state is not State.CLOSED:
            waiter = asyncio.get_running_loop().create_future()
            self._idle_waiters.append(waiter)
            await waiter

    def _wake_idle(self) -> None:
        waiters, self._idle_waiters = self._idle_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # ----------------------------------------------------------------- commands

    def smtp_EHLO(self, arg: str) -> None:
        self._greet(arg, esmtp=True)

    def smtp_HELO(self, arg: str) -> None:
        self._greet(arg, esmtp=False)

    def _greet(self, arg: str, *, esmtp: bool) -> None:
        name = arg.strip()
        if not name or " " in name or not name.isprintable():  # it is echoed in the reply
            raise CommandError(replies.SYNTAX_ERROR)
        self.helo, self.esmtp = name, esmtp
        self.txn = Transaction()
        if not esmtp:
            self._reply(Reply(250, "", f"{self.ctx.hostname}"))
            return
        lines = [f"{self.ctx.hostname} greets {name}", *self._extensions()]
        self._out.append(Reply(250, "", "\n".join(lines)).encode())

    def _extensions(self) -> list[str]:
        exts = [
            "PIPELINING",
            f"SIZE {self.ctx.settings.max_message_size}",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "CHUNKING",
            "DSN",
        ]
        if self.ctx.tls_context is not None and not self.tls_active:
            exts.append("STARTTLS")
        if self._auth_offered():
            exts.append("AUTH PLAIN LOGIN")
        exts.append("HELP")
        return exts

    def _auth_offered(self) -> bool:
        usable = self.tls_active or self.ctx.auth_plaintext
        return (
            self.ctx.offer_auth and self.ctx.authenticator.enabled and usable and not self.auth_user
        )

    def smtp_MAIL(self, arg: str) -> None:
        if not self.helo:
            raise CommandError(replies.NEED_EHLO)
        if self.txn.has_sender:
            raise CommandError(replies.NESTED_MAIL)
        if self.ctx.relay.require_auth and not self.auth_user:
            raise CommandError(replies.AUTH_REQUIRED)
        if self.ctx.ingest.unhealthy_reason() is not None:
            self._reply(replies.SPOOL_UNAVAILABLE)
            return
        args = parse_mail(arg)
        txn = Transaction(sender=args.sender, has_sender=True)
        self._apply_mail_params(txn, args.params)
        if args.sender is not None and not args.sender.is_ascii and not txn.smtputf8:
            raise CommandError(replies.NEEDS_SMTPUTF8)
        self.txn = txn
        self._reply(replies.SENDER_OK)

    def _apply_mail_params(self, txn: Transaction, params: dict[str, str | None]) -> None:
        for key, value in params.items():
            if key == "SIZE":
                if parse_size_param(value) > self.ctx.settings.max_message_size:
                    raise CommandError(replies.MESSAGE_TOO_BIG)
            elif key == "BODY":
                if value is None or value.upper() not in _BODY_VALUES:
                    raise CommandError(replies.SYNTAX_ERROR)
                txn.body_8bit = value.upper() == "8BITMIME"
            elif key == "SMTPUTF8" and value is None:
                txn.smtputf8 = True
            elif key == "RET":
                txn.dsn_ret = parse_dsn_ret(value)
            elif key == "ENVID":
                txn.dsn_envid = parse_dsn_envid(value)
            elif key != "AUTH":  # RFC 4954 AUTH= is accepted and ignored
                raise CommandError(replies.PARAM_NOT_RECOGNIZED)

    def smtp_RCPT(self, arg: str) -> None:
        if not self.txn.has_sender:
            raise CommandError(replies.NEED_MAIL)
        args = parse_rcpt(arg)
        notify, orcpt = parse_rcpt_dsn(args.params) if args.params else (None, None)
        mailbox = args.recipient
        if not mailbox.is_ascii and not self.txn.smtputf8:
            raise CommandError(replies.NEEDS_SMTPUTF8)
        if len(self.txn.recipients) >= self.ctx.settings.max_recipients:
            self._reply(replies.TOO_MANY_RECIPIENTS)
            return
        trusted = self.peer_trusted
        denial = self.ctx.relay.check_recipient(
            mailbox, trusted=trusted, authenticated=bool(self.auth_user)
        )
        if denial is not None:
            log.info("[%s] relay denied to %s", self.peer_ip, mailbox)
            raise CommandError(denial)
        recipient = str(mailbox) if mailbox.domain else "postmaster"
        self.txn.recipients.append(recipient)
        if notify is not None or orcpt is not None:
            self._keep_rcpt_dsn(recipient, notify, orcpt)
        self._reply(replies.RECIPIENT_OK)

    def _keep_rcpt_dsn(self, recipient: str, notify: str | None, orcpt: str | None) -> None:
        txn = self.txn
        if notify is not None:
            txn.dsn_notify = txn.dsn_notify or {}
            txn.dsn_notify[recipient] = notify
        if orcpt is not None:
            txn.dsn_orcpt = txn.dsn_orcpt or {}
            txn.dsn_orcpt[recipient] = orcpt

    def smtp_DATA(self, arg: str) -> None:
        if arg:
            raise CommandError(replies.SYNTAX_ERROR)
        self._check_ready_for_data()
        if self.txn.used_bdat:
            raise CommandError(replies.MIXED_DATA_BDAT)
        if self.ctx.ingest.unhealthy_reason() is not None:
            self._reply(replies.SPOOL_UNAVAILABLE)
            return
        self.txn.used_data = True
        self.state = State.DATA
        self._reply(replies.START_DATA)

    def _check_ready_for_data(self) -> None:
        if not self.txn.has_sender:
            raise CommandError(replies.NEED_MAIL)
        if not self.txn.recipients:
            raise CommandError(replies.NO_VALID_RECIPIENTS)

    def smtp_BDAT(self, arg: str) -> None:
        size_text, _, marker = arg.partition(" ")
        if not is_ascii_number(size_text):
            # RFC 3030 §2: the size is the chunk's only framing. Without it the octets that
            # follow cannot be told from commands, so nothing after this line can be trusted.
            self._reply(replies.BDAT_BAD_SIZE)
            self._close_unframed()
            return
        size = int(size_text)
        if size > self.ctx.settings.max_message_size:
            # Never accepted, and too many octets to read and throw away: answer now rather
            # than after the client has sent them (or after the data timeout), then close.
            self.txn = Transaction()
            self._reply(replies.MESSAGE_TOO_BIG)
            self._close_unframed()
            return
        marker = marker.strip().upper()
        self._bdat_remaining, self._bdat_last = size, marker == "LAST"
        self._bdat_error = replies.SYNTAX_ERROR if marker not in ("", "LAST") else None
        self._bdat_error = self._bdat_error or self._bdat_refusal()
        if self._bdat_error is None:
            self.txn.used_bdat = True
        self.state = State.BDAT

    def _close_unframed(self) -> None:
        """Close after a BDAT whose chunk will not be read: its octets would be commands."""
        self._reply(replies.CHUNK_NOT_READ)
        self._close()

    def _bdat_refusal(self) -> Reply | None:
        try:
            self._check_ready_for_data()
        except CommandError as exc:
            return exc.reply
        if self.txn.used_data:
            return replies.MIXED_DATA_BDAT
        if self.ctx.ingest.unhealthy_reason() is not None:
            return replies.SPOOL_UNAVAILABLE
        return None

    def smtp_RSET(self, arg: str) -> None:
        if arg:
            raise CommandError(replies.SYNTAX_ERROR)
        self.txn = Transaction()
        self._reply(replies.RESET_OK)

    def smtp_NOOP(self, arg: str) -> None:
        self._reply(replies.NOOP_OK)

    def smtp_QUIT(self, arg: str) -> None:
        self._reply(replies.CLOSING)
        self._close()

    def smtp_VRFY(self, arg: str) -> None:
        if not arg:
            raise CommandError(replies.SYNTAX_ERROR)
        self._reply(replies.VRFY_CANNOT)

    def smtp_HELP(self, arg: str) -> None:
        text = "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS AUTH"
        self._reply(Reply(214, "2.0.0", f"{text}\nSee RFC 5321"))

    def smtp_STARTTLS(self, arg: str) -> None:
        if arg:
            raise CommandError(replies.SYNTAX_ERROR)
        if self.tls_active:
            raise CommandError(replies.ALREADY_TLS)
        if self.ctx.tls_context is None:
            self._reply(replies.TLS_NOT_AVAILABLE)
            return
        self._reply(replies.READY_FOR_TLS)
        self._flush()
        # RFC 3207 §4.2 (and the STARTTLS injection class of bugs): whatever the client sent
        # after STARTTLS in the clear is discarded, never read as commands inside TLS.
        self._buf.clear()
        self.state = State.TLS
        self._busy = True
        asyncio.get_running_loop().create_task(self._start_tls(self.ctx.tls_context))

    async def _start_tls(self, context: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        assert self.transport is not None
        try:
            transport = await loop.start_tls(self.transport, self, context, server_side=True)
        except (OSError, ssl.SSLError, ConnectionError) as exc:
            log.info("[%s] TLS handshake failed: %s", self.peer_ip, exc)
            self.abort()
            self.state = State.CLOSED
            self._wake_idle()
            return
        if transport is None:
            self.state = State.CLOSED
            self._wake_idle()
            return
        self.transport = transport
        self.tls_active = True
        # RFC 3207 §4.2: forget everything learnt before TLS, the authentication included
        self.helo, self.esmtp, self.txn, self.auth_user = "", False, Transaction(), ""
        self.state = State.COMMAND
        self._resume()

    def smtp_AUTH(self, arg: str) -> None:
        if not (self.ctx.offer_auth and self.ctx.authenticator.enabled):
            raise CommandError(replies.NOT_IMPLEMENTED)
        if not self.helo:
            raise CommandError(replies.NEED_EHLO)
        if self.auth_user:
            raise CommandError(replies.ALREADY_AUTH)
        if self.txn.has_sender:
            raise CommandError(replies.BAD_SEQUENCE)
        if not (self.tls_active or self.ctx.auth_plaintext):
            raise CommandError(replies.AUTH_NEEDS_TLS)
        if self.ctx.auth_throttle.is_blocked(self.peer_ip):
            self._reply(replies.AUTH_THROTTLED)
            self._close()
            return
        mechanism, _, initial = arg.partition(" ")
        self._start_sasl(mechanism.upper(), initial.strip())

    def _start_sasl(self, mechanism: str, initial: str) -> None:
        if mechanism == "PLAIN":
            if initial:
                self._sasl_plain(initial)
            else:
                self._sasl_continue(self._sasl_plain, "")
        elif mechanism == "LOGIN":
            if initial:
                self._sasl_login_user(initial)
            else:
                self._sasl_continue(self._sasl_login_user, "VXNlcm5hbWU6")
        else:
            raise CommandError(replies.AUTH_MECH_UNKNOWN)

    def _sasl_continue(self, step: Callable[[str], None], challenge: str) -> None:
        self.state = State.AUTH
        self._auth_step = step
        self._out.append(f"334 {challenge}\r\n".encode("ascii"))

    def _sasl_cancelled(self, response: str) -> bool:
        self.state, self._auth_step = State.COMMAND, None
        if response.strip() == "*":
            self._error(replies.AUTH_CANCELLED)
            return True
        return False

    def _sasl_plain(self, response: str) -> None:
        if self._sasl_cancelled(response):
            return
        try:
            credentials = auth.parse_plain(response)
        except auth.SaslError:
            self._error(replies.SYNTAX_ERROR)
            return
        if credentials.acts_as_other and not self.ctx.settings.auth_ignore_authzid:
            # Refused before the password is checked: nothing is learnt about it.
            log.info("[%s] AUTH PLAIN as another identity refused", self.peer_ip)
            self._error(replies.AUTHZID_REFUSED)
            return
        self._check_credentials(credentials)

    def _sasl_login_user(self, response: str) -> None:
        if self._sasl_cancelled(response):
            return
        try:
            self._login_user = auth.decode_login_field(response)
        except auth.SaslError:
            self._error(replies.SYNTAX_ERROR)
            return
        self._sasl_continue(self._sasl_login_password, "UGFzc3dvcmQ6")

    def _sasl_login_password(self, response: str) -> None:
        if self._sasl_cancelled(response):
            return
        try:
            password = auth.decode_login_field(response)
        except auth.SaslError:
            self._error(replies.SYNTAX_ERROR)
            return
        self._check_credentials(auth.Credentials(self._login_user, password))

    def _check_credentials(self, credentials: auth.Credentials) -> None:
        if self.ctx.auth_throttle.is_blocked(f"user:{credentials.username}"):
            self._error(replies.AUTH_FAILED)
            return
        self._busy = True
        asyncio.get_running_loop().create_task(self._verify(credentials))

    async def _verify(self, credentials: auth.Credentials) -> None:
        try:
            ok = await self.ctx.authenticator.check(credentials)
        except Exception:
            log.exception("[%s] credential check failed", self.peer_ip)
            ok = False
        if ok:
            self.auth_user = credentials.username
            log.info("[%s] authenticated as %s", self.peer_ip, credentials.username)
            self._reply(replies.AUTH_OK)
        else:
            self.ctx.auth_throttle.record_failure(self.peer_ip)
            self.ctx.auth_throttle.record_failure(f"user:{credentials.username}")
            log.info("[%s] authentication failed for %s", self.peer_ip, credentials.username)
            self._error(replies.AUTH_FAILED)
        self._resume()

    def _resume(self) -> None:
        """Continue with buffered input after an asynchronous step."""
        self._busy = False
        if self.state is not State.CLOSED:
            self._process()
        if self._close_when_idle and not self._busy:
            self.shut_down()
        if self._idle_waiters and not self._busy:
            self._wake_idle()

    # ----------------------------------------------------------------- message data

    def _consume_data(self) -> bool:
        """Take complete lines of DATA from the buffer; True once the message has ended."""
        buf, txn = self._buf, self.txn
        if txn.at_line_start and buf[:3] == b".\r\n":
            del buf[:3]
            self._end_of_data()
            return True
        end = buf.find(b"\r\n.\r\n")
        if end >= 0:
            self._take_data(end + 2)
            del buf[:3]
            self._end_of_data()
            return True
        cut = buf.rfind(b"\r\n")
        if cut >= 0:
            self._take_data(cut + 2)
        elif len(buf) > self.ctx.settings.max_line_length:
            txn.long_line, txn.at_line_start = True, False
            self._count_size(len(buf) - 1)
            del buf[:-1]  # keep a possible CR of the next CRLF
        return False

    def _take_data(self, length: int) -> None:
        """Move ``length`` octets (ending in CRLF) from the buffer into the message."""
        chunk = bytes(self._buf[:length])
        del self._buf[:length]
        self.last_activity = self._clock()
        txn = self.txn
        txn.at_line_start = True
        settings = self.ctx.settings
        crlf_only = settings.reject_bare_cr_lf
        if crlf_only and not txn.bad_endings:
            txn.bad_endings = has_bare_cr_or_lf(chunk)
        if settings.reject_nul and not txn.has_nul:
            txn.has_nul = b"\x00" in chunk  # one C scan per chunk, as for CR and LF
        limit = settings.max_line_length
        if not txn.long_line and length > limit:
            if not crlf_only:
                txn.long_line = max(map(len, chunk.split(b"\r\n"))) + 2 > limit
            elif not txn.bad_endings:  # else refused for that, whatever the line lengths
                txn.long_line = has_long_line(chunk, limit)
        if self._count_size(length):
            # A chunk starts at a line start and ends with CRLF: undo dot-stuffing here, so
            # the message is joined once at the end (a 50 MB message is not copied 4 times).
            # The lone "." ending the data never reaches a chunk.
            txn.parts.append(unstuff(chunk))

    def _count_size(self, length: int) -> bool:
        """Add to the message size; False (and the data dropped) once it is too big."""
        txn = self.txn
        txn.size += length
        if txn.size > self.ctx.settings.max_message_size:
            txn.too_big = True
            txn.parts.clear()
        return not txn.too_big

    def _end_of_data(self) -> None:
        self.state = State.COMMAND
        self.last_activity = self._clock()
        if self._buf and self._pipelining_after_data():
            # Commands riding behind the end of data are the shape of SMTP smuggling: the
            # message is not committed (it was never acknowledged), the client is cut off.
            self._lost_sync("end of data")
            return
        txn = self.txn
        refusal = self._data_refusal(txn)
        if refusal is not None:
            self.txn = Transaction()
            self._reply(refusal)
            return
        self._commit(txn.parts)

    def _pipelining_after_data(self) -> bool:
        """Input waiting behind the end of data. A lone QUIT is let through: Exim and others
        send it with the final dot, and it cannot carry a second message."""
        if not self.ctx.settings.forbid_unauth_pipelining or self.auth_user:
            return False
        return len(self._buf) != 6 or bytes(self._buf).upper() != b"QUIT\r\n"

    def _data_refusal(self, txn: Transaction) -> Reply | None:
        if txn.too_big:
            return replies.MESSAGE_TOO_BIG
        if txn.bad_endings:
            return replies.BAD_LINE_ENDINGS
        if txn.has_nul:
            return replies.NUL_IN_DATA
        if txn.long_line:
            return replies.LINE_TOO_LONG
        return None

    def _consume_bdat(self) -> bool:
        """Take the current BDAT chunk from the buffer; True once all of it has arrived."""
        take = min(len(self._buf), self._bdat_remaining)
        if take:
            if self._bdat_error is None and self._count_size(take):
                piece = bytes(self._buf[:take])
                self._scan_chunk(piece)
                self.txn.parts.append(piece)
            del self._buf[:take]
            self._bdat_remaining -= take
        if self._bdat_remaining:
            return False
        self.state = State.COMMAND
        self.last_activity = self._clock()
        self._end_of_chunk()
        return True

    def _end_of_chunk(self) -> None:
        txn = self.txn
        if self._bdat_error is not None:
            self._error(self._bdat_error)
        elif txn.too_big:
            self.txn = Transaction()
            self._reply(replies.MESSAGE_TOO_BIG)
        elif txn.long_line:
            self.txn = Transaction()
            self._reply(replies.LINE_TOO_LONG)
        elif not self._bdat_last:
            self._reply(Reply(250, "2.0.0", f"{txn.size} octets received"))
        elif self.ctx.settings.reject_bare_cr_lf and _bare_cr_or_lf(txn.parts):
            self.txn = Transaction()
            self._reply(replies.BAD_LINE_ENDINGS)
        elif txn.has_nul:
            self.txn = Transaction()
            self._reply(replies.NUL_IN_DATA)
        else:
            self._commit(txn.parts)

    def _scan_chunk(self, piece: bytes) -> None:
        """Find a line over the limit in chunk data, as DATA does. Chunks and reads cut lines
        anywhere, so the length of the unfinished line is carried to the next piece; the
        searches run in C, and pieces shorter than the limit are never split."""
        txn = self.txn
        if self.ctx.settings.reject_nul and not txn.has_nul:
            txn.has_nul = b"\x00" in piece  # one C scan per piece, as DATA does per chunk
        if txn.long_line:
            return
        limit = self.ctx.settings.max_line_length
        first = piece.find(b"\n")
        if first < 0:
            txn.line_run += len(piece)
        else:
            if txn.line_run + first + 1 > limit or (
                len(piece) > limit and max(map(len, piece.split(b"\n"))) + 1 > limit
            ):
                txn.long_line = True
            txn.line_run = len(piece) - piece.rfind(b"\n") - 1
        if txn.line_run >= limit:  # with its LF still to come, this line is already too long
            txn.long_line = True

    # ----------------------------------------------------------------- the commit

    def _commit(self, parts: list[bytes]) -> None:
        txn = self.txn
        self.txn = Transaction()
        queue_id = new_message_id()
        single = txn.recipients[0] if len(txn.recipients) == 1 else None
        header = received_header(
            helo=self.helo,
            peer_ip=self.peer_ip,
            hostname=self.ctx.hostname,
            protocol=self._protocol_name(txn),
            queue_id=queue_id,
            recipient=single,
        )
        body = b"".join((header, *parts))
        parts.clear()
        meta = MessageMeta(
            id=queue_id,
            sender=str(txn.sender) if txn.sender else "",
            recipients=txn.recipients,
            received_at=time.time(),
            size=len(body),
            peer=self.peer_ip,
            helo=self.helo,
            auth_user=self.auth_user,
            smtputf8=txn.smtputf8,
            body_8bit=txn.body_8bit,
            dsn_ret=txn.dsn_ret,
            dsn_envid=txn.dsn_envid,
            dsn_notify=txn.dsn_notify,
            dsn_orcpt=txn.dsn_orcpt,
        )
        self._busy = True
        self._event_loop().create_task(self._store(meta, body))

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        """The session's loop, looked up once: on Python 3.11 every ``get_running_loop`` is
        a ``getpid`` system call."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def _protocol_name(self, txn: Transaction) -> str:
        """WITH protocol type of the Received header (RFC 3848, RFC 6531 §3.7.4.2)."""
        if not self.esmtp:
            return "SMTP"
        suffix = ("S" if self.tls_active else "") + ("A" if self.auth_user else "")
        return ("UTF8SMTP" if txn.smtputf8 else "ESMTP") + suffix

    def _may_set_controls(self) -> bool:
        """Whether this client may steer Epoxi with ``X-Epoxi-*`` headers."""
        return bool(self.auth_user) or self.peer_trusted

    async def _store(self, meta: MessageMeta, body: bytes) -> None:
        try:
            await self.ctx.ingest.accept(meta, body, trusted=self._may_set_controls())
        except MessageRefused as exc:
            log.info("[%s] %s refused: %s", self.peer_ip, meta.id, exc)
            self._reply(exc.reply)
        except SpoolUnavailable as exc:
            log.warning("[%s] spool unavailable: %s", self.peer_ip, exc)
            self._reply(replies.SPOOL_UNAVAILABLE)
        except Exception:
            log.exception("[%s] could not store message %s", self.peer_ip, meta.id)
            self._reply(replies.SPOOL_FAILED)
        else:
            log.debug(
                "[%s] %s accepted from <%s> for %d recipients",
                self.peer_ip,
                meta.id,
                meta.sender,
                len(meta.recipients),
            )
            self._out.append(_queued_reply(meta.id))
        if self.ctx.draining and self.state is State.COMMAND:
            self._reply(replies.SHUTTING_DOWN)
            self._close()
        self._resume()


def _queued_reply(queue_id: str) -> bytes:
    return f"250 2.0.0 Ok: queued as {queue_id}\r\n".encode("ascii")


def _register_commands() -> None:
    for name in dir(SmtpSession):
        if name.startswith("smtp_"):
            SmtpSession._commands[name[5:]] = getattr(SmtpSession, name)


_register_commands()

__all__ = ["SessionContext", "SmtpSession", "State", "Transaction"]


def _bare_cr_or_lf(parts: list[bytes]) -> bool:
    """True if the chunks hold a CR or LF outside CRLF (a CRLF may span two chunks)."""
    cr = lf = crlf = 0
    previous = b""
    for part in (p for p in parts if p):
        cr, lf, crlf = cr + part.count(b"\r"), lf + part.count(b"\n"), crlf + part.count(b"\r\n")
        crlf += previous.endswith(b"\r") and part.startswith(b"\n")
        previous = part
    return cr != crlf or lf != crlf
