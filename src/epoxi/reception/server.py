"""The SMTP server: one asyncio server per listener, shared limits, timeouts and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass

from epoxi.config import Listener, Settings
from epoxi.reception.auth import Authenticator
from epoxi.reception.ingest import Ingest
from epoxi.reception.policy import AuthThrottle, ConnectionTracker, RelayPolicy
from epoxi.reception.session import SessionContext, SmtpSession
from epoxi.reception.tls import ensure_self_signed, server_context

log = logging.getLogger(__name__)

_SWEEP_INTERVAL = 1.0  # seconds between timeout checks
_LAST_WAIT = 5.0  # after the grace, seconds for pending commits to reply before the abort


@dataclass
class _Listening:
    """One listener: its sessions' context, and the servers that accept for it (none when a
    supervisor accepts and hands each connection over)."""

    listener: Listener
    context: SessionContext
    tls: ssl.SSLContext | None  # implicit TLS
    servers: list[asyncio.Server]
    sockets: list[socket.socket]  # what it listens on


class SmtpServer:
    """Owns every listener; limits are shared across them.

    ``share``: how many worker processes serve the same sockets. Each takes that part of the
    connection limits (rounded up), so the machine holds about the configured figures."""

    def __init__(self, settings: Settings, ingest: Ingest, share: int = 1) -> None:
        self.settings = settings
        self.ingest = ingest
        smtp = settings.smtp
        self.tracker = ConnectionTracker(
            -(-smtp.max_connections // share), -(-smtp.max_connections_per_ip // share)
        )
        self.auth_throttle = AuthThrottle(smtp.auth_max_failures, smtp.auth_failure_window)
        self.authenticator = Authenticator(settings.users)
        self._tls: ssl.SSLContext | None = None
        self._listening: list[_Listening] = []
        self._handoff: socket.socket | None = None
        self._handed: set[asyncio.Task[object]] = set()
        self._sweeper: asyncio.Task[None] | None = None

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Where each listener actually listens (ports resolved when 0 was asked)."""
        out = []
        for listening in self._listening:
            for sock in listening.sockets:
                host, port = sock.getsockname()[:2]
                out.append((str(host), int(port)))
        return out

    @property
    def sessions(self) -> int:
        return sum(len(context.sessions) for context in self._contexts())

    def _contexts(self) -> list[SessionContext]:
        return [listening.context for listening in self._listening]

    def tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            smtp = self.settings.smtp
            if smtp.tls_cert and smtp.tls_key:
                cert, key = smtp.tls_cert, smtp.tls_key
            else:
                cert, key = ensure_self_signed(self.settings.data_dir, self.settings.hostname)
            self._tls = server_context(cert, key)
        return self._tls

    async def start(
        self,
        bound: Mapping[str, list[socket.socket]] | None = None,
        handoff: socket.socket | None = None,
    ) -> None:
        """Listen on every listener's address. A worker gets its listeners' sockets ``bound``
        by its supervisor, which accepts on them and hands each connection over ``handoff``
        (a message of one octet, the listener's index, with the descriptor)."""
        loop = asyncio.get_running_loop()
        for listener in self.settings.smtp.listeners:
            context = self._context_for(listener)
            tls = self.tls_context() if listener.tls == "implicit" else None
            sockets = list((bound or {}).get(listener.address, ()))
            listening = _Listening(listener, context, tls, [], sockets)
            if handoff is None:
                await self._listen(listening)
            self._listening.append(listening)
            log.info("SMTP listening on %s (tls=%s)", listener.address, listener.tls)
        if handoff is not None:
            self._handoff = handoff
            handoff.setblocking(False)
            loop.add_reader(handoff.fileno(), self._take_handed)
        self._sweeper = loop.create_task(self._sweep_timeouts())

    async def _listen(self, listening: _Listening) -> None:
        loop = asyncio.get_running_loop()
        context, tls = listening.context, listening.tls
        if listening.sockets:
            for sock in listening.sockets:
                listening.servers.append(
                    await loop.create_server(
                        lambda ctx=context: SmtpSession(ctx), sock=sock, backlog=1024, ssl=tls
                    )
                )
            return
        host, port = listening.listener.host_port
        server = await loop.create_server(
            lambda ctx=context: SmtpSession(ctx),
            host,
            port,
            reuse_address=True,
            backlog=1024,
            ssl=tls,
        )
        listening.servers.append(server)
        listening.sockets = list(server.sockets)

    def _take_handed(self) -> None:
        """Connections the supervisor accepted for this worker: serve each as if accepted."""
        assert self._handoff is not None
        for _ in range(64):
            try:
                data, fds, _, _ = socket.recv_fds(self._handoff, 16, 1)
            except BlockingIOError:
                return
            except OSError as exc:
                log.error("connections from the supervisor: %s", exc)
                data, fds = b"", []
            if not data:  # the supervisor is gone
                self._stop_handoffs()
                return
            for fd in fds:
                self._serve_handed(data[0], socket.socket(fileno=fd))

    def _serve_handed(self, index: int, sock: socket.socket) -> None:
        listening = self._listening[index]
        if listening.context.draining:
            sock.close()
            return
        loop = asyncio.get_running_loop()
        context = listening.context
        task = loop.create_task(
            loop.connect_accepted_socket(lambda: SmtpSession(context), sock=sock, ssl=listening.tls)
        )
        self._handed.add(task)
        task.add_done_callback(self._handed_done)

    def _handed_done(self, task: asyncio.Task[object]) -> None:
        self._handed.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.info("a connection handed over could not start: %s", task.exception())

    def _stop_handoffs(self) -> None:
        if self._handoff is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self._handoff.fileno())
            self._handoff.close()
            self._handoff = None

    def reload(self, settings: Settings) -> list[str]:
        """Take new users and relay rules, and re-read the TLS certificate, for new sessions;
        returns what was reloaded. Listeners and limits need a restart."""
        self.settings = settings
        self.authenticator = Authenticator(settings.users)
        for listening in self._listening:
            context = listening.context
            context.authenticator = self.authenticator
            context.relay = relay = self._relay_for(listening.listener)
            for session in context.sessions:  # open sessions follow the new networks
                session.peer_trusted = relay.is_trusted(session.peer_ip)
        done = ["users", "relay rules"]
        smtp = settings.smtp
        if self._tls is not None and smtp.tls_cert and smtp.tls_key:
            self._tls.load_cert_chain(smtp.tls_cert, smtp.tls_key)  # the same context, in place
            done.append("TLS certificate")
        return done

    def _relay_for(self, listener: Listener) -> RelayPolicy:
        settings = self.settings
        domains = (
            listener.local_domains if listener.local_domains is not None else settings.local_domains
        )
        bounce = (settings.bounce_domain,) if settings.bounce_domain else ()
        return RelayPolicy.build(
            (*domains, *bounce),
            listener.trusted_networks
            if listener.trusted_networks is not None
            else settings.trusted_networks,
            require_auth=listener.require_auth,
            local_addresses=settings.fbl_addresses,
        )

    def _context_for(self, listener: Listener) -> SessionContext:
        settings = self.settings
        return SessionContext(
            hostname=settings.hostname,
            settings=settings.smtp,
            relay=self._relay_for(listener),
            ingest=self.ingest,
            tracker=self.tracker,
            authenticator=self.authenticator,
            auth_throttle=self.auth_throttle,
            tls_context=self.tls_context() if listener.tls == "starttls" else None,
            offer_auth=listener.auth,
            auth_plaintext=listener.auth_plaintext,
        )

    def _open_sessions(self) -> list[SmtpSession]:
        return [s for context in self._contexts() for s in context.sessions]

    async def _wait_closed(self, timeout: float) -> None:
        waiters = [asyncio.ensure_future(s.closed.wait()) for s in self._open_sessions()]
        if waiters:
            _, pending = await asyncio.wait(waiters, timeout=timeout)
            for waiter in pending:
                waiter.cancel()

    async def _sweep_timeouts(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_INTERVAL)
            now = time.monotonic()
            for session in self._open_sessions():
                session.check_timeout(now)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting; let transactions in progress finish for up to ``grace`` seconds,
        then say 421 4.3.2 to every session left (after its commit, if one is pending)."""
        self._stop_handoffs()
        for listening in self._listening:
            for server in listening.servers:
                server.close()
        for context in self._contexts():
            context.draining = True
            for session in list(context.sessions):
                session.drain()
        await self._wait_closed(grace)
        for session in self._open_sessions():
            session.shut_down()
        await self._wait_closed(_LAST_WAIT)
        for session in self._open_sessions():
            log.warning("[%s] aborted at shutdown: its commit did not finish", session.peer_ip)
            session.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for listening in self._listening:
            for server in listening.servers:
                await server.wait_closed()
        log.info("SMTP server stopped")
