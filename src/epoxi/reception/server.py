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
class _Bound:
    listener: Listener
    context: SessionContext
    server: asyncio.Server


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
        self._bound: list[_Bound] = []
        self._sweeper: asyncio.Task[None] | None = None

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Where each listener actually listens (ports resolved when 0 was asked)."""
        out = []
        for bound in self._bound:
            for sock in bound.server.sockets:
                host, port = sock.getsockname()[:2]
                out.append((str(host), int(port)))
        return out

    @property
    def sessions(self) -> int:
        return sum(len(context.sessions) for context in self._contexts())

    def _contexts(self) -> list[SessionContext]:
        """One per listener (a listener may serve several sockets)."""
        return list({id(b.context): b.context for b in self._bound}.values())

    def tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            smtp = self.settings.smtp
            if smtp.tls_cert and smtp.tls_key:
                cert, key = smtp.tls_cert, smtp.tls_key
            else:
                cert, key = ensure_self_signed(self.settings.data_dir, self.settings.hostname)
            self._tls = server_context(cert, key)
        return self._tls

    async def start(self, bound: Mapping[str, list[socket.socket]] | None = None) -> None:
        """Listen on every listener's address, or serve the sockets ``bound`` for it (by a
        supervisor, shared with the other workers)."""
        loop = asyncio.get_running_loop()
        for listener in self.settings.smtp.listeners:
            context = self._context_for(listener)
            tls = self.tls_context() if listener.tls == "implicit" else None
            sockets = (bound or {}).get(listener.address)
            if sockets:
                for sock in sockets:
                    server = await loop.create_server(
                        lambda ctx=context: SmtpSession(ctx), sock=sock, backlog=1024, ssl=tls
                    )
                    self._bound.append(_Bound(listener, context, server))
            else:
                host, port = listener.host_port
                server = await loop.create_server(
                    lambda ctx=context: SmtpSession(ctx),
                    host,
                    port,
                    reuse_address=True,
                    backlog=1024,
                    ssl=tls,
                )
                self._bound.append(_Bound(listener, context, server))
            log.info("SMTP listening on %s (tls=%s)", listener.address, listener.tls)
        self._sweeper = loop.create_task(self._sweep_timeouts())

    def reload(self, settings: Settings) -> list[str]:
        """Take new users and relay rules, and re-read the TLS certificate, for new sessions;
        returns what was reloaded. Listeners and limits need a restart."""
        self.settings = settings
        self.authenticator = Authenticator(settings.users)
        for bound in self._bound:
            bound.context.authenticator = self.authenticator
            bound.context.relay = relay = self._relay_for(bound.listener)
            for session in bound.context.sessions:  # open sessions follow the new networks
                session.peer_trusted = relay.is_trusted(session.peer_ip)
        done = ["users", "relay rules"]
        smtp = settings.smtp
        if self._tls is not None and smtp.tls_cert and smtp.tls_key:
            self._tls.load_cert_chain(smtp.tls_cert, smtp.tls_key)  # the same context, in place
            done.append("TLS certificate")
        return done

    def _relay_for(self, listener: Listener) -> RelayPolicy:
        settings = self.settings
        return RelayPolicy.build(
            listener.local_domains
            if listener.local_domains is not None
            else settings.local_domains,
            listener.trusted_networks
            if listener.trusted_networks is not None
            else settings.trusted_networks,
            require_auth=listener.require_auth,
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
        for bound in self._bound:
            bound.server.close()
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
        for bound in self._bound:
            await bound.server.wait_closed()
        log.info("SMTP server stopped")
