"""Ready queues and their dispatchers: a few long-lived connections per destination.

A ready queue holds jobs that are due and routed to one site from one egress source. Its
dispatcher opens connections up to ``connection_limit`` (and no faster than
``max_connection_rate``), reuses each for up to ``max_deliveries_per_connection`` jobs, paces
messages to ``max_message_rate`` and closes a connection once it has been idle for
``idle_timeout``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from epoxi.delivery.client import ClientTimeouts, SmtpClient
from epoxi.errors import ConnectionFailed, DnsError, DnsPermanent, EpoxiError
from epoxi.queue.model import Job
from epoxi.shaping.throttle import Rate, Throttle
from epoxi.smtp.replies import Reply

if TYPE_CHECKING:
    from epoxi.config import SourceSettings
    from epoxi.delivery.routing import Destination
    from epoxi.dns.resolver import Resolver

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shaping:
    """Concrete limits of one ready queue (config defaults merged with overrides)."""

    connection_limit: int
    max_deliveries_per_connection: int
    idle_timeout: float
    max_recipients_per_transaction: int
    max_message_rate: Rate | None = None
    max_connection_rate: Rate | None = None


class RateMeter:
    """Events in the last ``window`` seconds, counted in one-second buckets."""

    def __init__(self, window: int = 60, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self._clock = clock
        self._buckets: deque[list[int]] = deque()  # [second, count]

    def tick(self) -> None:
        second = int(self._clock())
        if self._buckets and self._buckets[-1][0] == second:
            self._buckets[-1][1] += 1
        else:
            self._buckets.append([second, 1])
            self._trim(second)

    def count(self) -> int:
        self._trim(int(self._clock()))
        return sum(n for _, n in self._buckets)

    def _trim(self, now: int) -> None:
        while self._buckets and self._buckets[0][0] <= now - self.window:
            self._buckets.popleft()


Deliver = Callable[[SmtpClient, Job], Awaitable[bool]]  # False: the connection is spent
ConnectFailed = Callable[[list[Job], Reply, str, bool], None]  # jobs, reply, hosts, permanent


class ReadyQueue:
    """Jobs for one (source, site), and the connections that carry them."""

    def __init__(
        self,
        *,
        source: SourceSettings,
        destination: Destination,
        shaping: Shaping,
        hostname: str,
        resolver: Resolver,
        timeouts: ClientTimeouts,
        deliver: Deliver,
        connect_failed: ConnectFailed,
    ) -> None:
        self.source = source
        self.destination = destination
        self.shaping = shaping
        self.key = f"{source.name}->{destination.site}"
        self.jobs: deque[Job] = deque()
        self.connections = 0
        self.deliveries = 0
        self.delivered_last_minute = RateMeter(60)  # attempts made, whatever their outcome
        self.connects = 0
        self._hostname = hostname
        self._resolver = resolver
        self._timeouts = timeouts
        self._deliver = deliver
        self._connect_failed = connect_failed
        self._idle: deque[asyncio.Future[Job]] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._message_throttle = _throttle(shaping.max_message_rate)
        self._connection_throttle = _throttle(shaping.max_connection_rate)
        self._open_later: asyncio.TimerHandle | None = None
        self._closing = False
        self.last_error: str | None = None  # why the last connection attempt failed
        self.last_error_at: float | None = None
        self.suspension: str | None = None  # the reason, while suspended
        self.suspended_until: float | None = None  # unix time; None: until resumed
        self._resume_later: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self.jobs)

    def put(self, job: Job) -> None:
        """Queue ``job``: hand it to an idle connection, or open one if allowed."""
        while self._idle and self.suspension is None:
            waiter = self._idle.popleft()
            if not waiter.done():
                waiter.set_result(job)
                return
        self.jobs.append(job)
        self._maybe_open()

    def take(self, predicate: Callable[[Job], bool]) -> list[Job]:
        """Remove and return the queued jobs that match (expiry, admin bounce)."""
        taken = [job for job in self.jobs if predicate(job)]
        if taken:
            keep = [job for job in self.jobs if not predicate(job)]
            self.jobs = deque(keep)
        return taken

    def suspend(self, reason: str, duration: float | None = None) -> None:
        """Stop sending (connections finish their current job); jobs stay queued."""
        self.suspension = reason or "suspended"
        if self._resume_later is not None:
            self._resume_later.cancel()
            self._resume_later = None
        self.suspended_until = None
        if duration:
            loop = asyncio.get_running_loop()
            self.suspended_until = time.time() + duration
            self._resume_later = loop.call_later(duration, self.resume)
        for waiter in self._idle:
            if not waiter.done():
                waiter.cancel()

    def resume(self) -> None:
        if self._resume_later is not None:
            self._resume_later.cancel()
            self._resume_later = None
        self.suspension = None
        self.suspended_until = None
        self._maybe_open()

    def _maybe_open(self) -> None:
        if self._closing or self.suspension is not None or not self.jobs:
            return
        if self.connections >= self.shaping.connection_limit:
            return
        if self._connection_throttle is not None:
            wait = self._connection_throttle.acquire()
            if wait > 0:
                if self._open_later is None:
                    loop = asyncio.get_running_loop()
                    self._open_later = loop.call_later(wait, self._open_after_wait)
                return
        self.connections += 1
        self.connects += 1
        task = asyncio.get_running_loop().create_task(self._connection())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _open_after_wait(self) -> None:
        self._open_later = None
        self._maybe_open()

    async def _connection(self) -> None:
        try:
            client = await self._connect()
        except (ConnectionFailed, DnsError, EpoxiError, OSError) as exc:
            self.connections -= 1
            self._on_connect_failure(exc)
            return
        self.last_error = self.last_error_at = None
        try:
            await self._serve(client)
        finally:
            self.connections -= 1
            await client.quit()
            self._maybe_open()

    async def _serve(self, client: SmtpClient) -> None:
        for _ in range(self.shaping.max_deliveries_per_connection):
            job = await self._next_job()
            if job is None:
                return
            await self._pace()
            self.deliveries += 1
            self.delivered_last_minute.tick()
            if not await self._deliver(client, job) or not client.is_usable:
                return

    async def _next_job(self) -> Job | None:
        if self.suspension is not None:
            return None
        if self.jobs:
            return self.jobs.popleft()
        if self._closing:
            return None
        waiter: asyncio.Future[Job] = asyncio.get_running_loop().create_future()
        self._idle.append(waiter)
        await asyncio.wait({waiter}, timeout=self.shaping.idle_timeout)
        if waiter.done() and not waiter.cancelled():
            return waiter.result()  # a job may arrive in the same tick as the timeout
        waiter.cancel()
        return None

    async def _pace(self) -> None:
        if self._message_throttle is None:
            return
        while (wait := self._message_throttle.acquire()) > 0:
            await asyncio.sleep(wait)

    async def _connect(self) -> SmtpClient:
        """Try each host (and each of its addresses) in order; raise the last failure."""
        last: Exception = ConnectionFailed(f"no hosts for {self.destination.site}")
        hosts_without_address = 0
        order = self.destination.attempt_order()
        for host, port in order:
            try:
                addresses = await self._resolver.addresses(host)
            except DnsError as exc:
                last = exc
                hosts_without_address += isinstance(exc, DnsPermanent)
                continue
            for address in addresses:
                try:
                    return await self._open(host, address, port)
                except (ConnectionFailed, EpoxiError) as exc:
                    log.info("[%s] %s:%d (%s): %s", self.key, host, port, address, exc)
                    last = exc
        if order and hosts_without_address == len(order):  # as Postfix: no host can exist
            raise DnsPermanent(f"no address for any mail host of {self.destination.site}")
        raise last

    async def _open(self, host: str, address: str, port: int) -> SmtpClient:
        tls = self.destination.tls
        return await SmtpClient.connect(
            address,
            port,
            server_name=tls.server_name or host,
            ehlo_name=self.source.ehlo or self._hostname,
            source_address=self.source.bind,
            tls=tls,
            auth=self.destination.auth,
            timeouts=self._timeouts,
        )

    def _on_connect_failure(self, exc: Exception) -> None:
        """Nothing could connect: if no other connection is alive, give the jobs back."""
        self.last_error, self.last_error_at = str(exc), time.time()
        if self.connections > 0:
            return
        permanent = isinstance(exc, DnsPermanent)  # no MX host exists: bounce, as Postfix does
        if permanent:
            reply = Reply(550, "5.4.4", str(exc))
        else:
            reply = getattr(exc, "reply", None) or Reply(451, "4.4.1", f"connection failed: {exc}")
        jobs, self.jobs = list(self.jobs), deque()
        log.warning("[%s] cannot connect (%s); %d jobs failed", self.key, exc, len(jobs))
        if jobs:
            hosts = ",".join(h for h, _ in self.destination.hosts)
            self._connect_failed(jobs, reply, hosts, permanent)

    async def close(self) -> None:
        """Stop opening connections; let connections finish their current job."""
        self._closing = True
        for handle in (self._open_later, self._resume_later):
            if handle is not None:
                handle.cancel()
        for waiter in self._idle:
            if not waiter.done():
                waiter.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=30)


def _throttle(rate: Rate | None) -> Throttle | None:
    return Throttle(rate) if rate is not None else None
