"""Ready queues and their dispatchers: a few long-lived connections per destination.

A ready queue holds jobs that are due and routed to one site from one egress source. Its
dispatcher opens connections through a :class:`~epoxi.delivery.transport.Transport` up to
``connection_limit`` (and no faster than ``max_connection_rate``), reuses each for up to
``max_deliveries_per_connection`` jobs, paces messages to ``max_message_rate`` and closes a
connection once it has been idle for ``idle_timeout``. With worker processes, each opening
also waits for a machine-wide slot and the message rate is this worker's share of it
(:mod:`epoxi.shaping.slots`). Jobs wait in a :class:`~epoxi.delivery.lines.JobLine`: the
highest priority first, tenants in turn, a tenant over its message rate passed over. Each
attempt's replies go to the outcome disposition; the ready queue never decides what a reply
means.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

from epoxi.delivery.lines import JobLine, TenantLimits
from epoxi.delivery.transport import Connection, Transport
from epoxi.errors import DeliveryError, DnsError, EpoxiError, SpoolError, TlsFailed
from epoxi.outcomes.disposition import Disposition
from epoxi.queue.model import Job
from epoxi.queue.suspensions import Suspension
from epoxi.shaping.policy import Shaping
from epoxi.shaping.slots import ConnectionSlots, LocalSlots
from epoxi.shaping.throttle import LocalThrottle, Rate, Throttle
from epoxi.smtp.replies import Reply

if TYPE_CHECKING:
    from epoxi.config import SourceSettings
    from epoxi.delivery.routing import Destination

log = logging.getLogger(__name__)

# A message rate lets this many seconds' worth of messages go at once (at least one): a rate
# of 100/s or less is paced message by message, a fast one in small groups, not one timer each.
MESSAGE_BURST = 0.01

LoadBody = Callable[[str], Awaitable[bytes]]


class SourceWatch(Protocol):
    """Told how each connection from a ready queue's egress source went (pool health)."""

    def connected(self, ready: ReadyQueue) -> None: ...

    def connect_failed(self, ready: ReadyQueue, exc: BaseException, jobs: list[Job]) -> list[Job]:
        """Count the failure; ``jobs`` are those the queue gives up on: returns the ones
        still to fail here (a failing source's jobs may leave from another one)."""
        ...


TRUSTED_AFTER = 10.0  # seconds of history before a queue's pace is taken as its drain rate
TRUSTED_ATTEMPTS = 50


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


class ReadyQueue:
    """Jobs for one (source, site), and the connections that carry them."""

    def __init__(
        self,
        *,
        key: str,
        source: SourceSettings,
        destination: Destination,
        shaping: Shaping,
        transport: Transport,
        outcomes: Disposition,
        load_body: LoadBody,
        slots: ConnectionSlots | None = None,
        watch: SourceWatch,
        provider: str | None = None,
        tenants: TenantLimits | None = None,
    ) -> None:
        self.key = key
        self.provider = provider  # the shaping files' provider of the site (e.g. "google")
        self.source = source
        self.destination = destination
        self.shaping = shaping
        self.tenants = tenants or TenantLimits()  # the dispatcher's, shared by every queue
        self.jobs = JobLine(self.tenants, provider)  # by priority, then tenants in turn
        self.connections = 0
        self.deliveries = 0
        self.attempts_last_minute = RateMeter(60)  # attempts made, whatever their outcome
        self.created = time.monotonic()
        self.connects = 0
        self._transport = transport
        self._outcomes = outcomes
        self._load_body = load_body
        self._slots = slots or LocalSlots()
        self._watch = watch
        # Connections waiting for a job: given one, or None to look at the line again.
        self._idle: deque[asyncio.Future[Job | None]] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._acquiring: set[asyncio.Task[None]] = set()  # connections waiting for a slot
        self._keep: int | None = None  # open connections to trim down to (``trim``)
        self.rate_override: Rate | None = None  # an adaptive rate instead of the configured one
        self._message_throttle = _throttle(self._my_rate(shaping), MESSAGE_BURST)
        self._connection_throttle = _throttle(shaping.max_connection_rate)
        self._open_later: asyncio.TimerHandle | None = None
        self._closing = False
        self.last_error: str | None = None  # why the last connection attempt failed
        self.last_error_at: float | None = None
        self.suspension: Suspension | None = None

    def __len__(self) -> int:
        return len(self.jobs)

    def drain_time(self) -> float:
        """Seconds the jobs here need to go at the pace of the last minute; 0 while the
        queue has less than ``TRUSTED_AFTER`` seconds or ``TRUSTED_ATTEMPTS`` attempts of
        history (its first connections are still opening: the pace would be guessed low)."""
        attempts = self.attempts_last_minute.count()
        age = time.monotonic() - self.created
        if age < TRUSTED_AFTER or attempts < TRUSTED_ATTEMPTS:
            return 0.0
        span = min(float(self.attempts_last_minute.window), age)
        return len(self) * span / attempts

    def put(self, job: Job) -> None:
        """Queue ``job``: hand it to an idle connection, or open one if allowed."""
        while self._idle and self._idle[0].done():
            self._idle.popleft()  # closed while idle
        if self._idle and self.suspension is None:
            if not self.jobs and self._may_send(job):
                self._idle.popleft().set_result(job)
                return
            self.jobs.put(job, self.tenants.priority(job, self.shaping.priority))
            self._wake()  # a connection waits for a tenant's rate: it looks at the line again
            return
        self.jobs.put(job, self.tenants.priority(job, self.shaping.priority))
        self._maybe_open()

    def _may_send(self, job: Job) -> bool:
        """Whether ``job``'s tenant is under its rates (then it is counted)."""
        if not self.tenants.rated:
            return True
        return self.tenants.wait(job.message.meta.tenant, self.provider) <= 0

    def _wake(self) -> None:
        while self._idle:
            waiter = self._idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def take(self, predicate: Callable[[Job], bool]) -> list[Job]:
        """Remove and return the queued jobs that match (expiry, admin bounce)."""
        return self.jobs.take(predicate)

    def set_suspension(self, suspension: Suspension | None) -> None:
        """Stop sending while suspended (connections finish their current job; jobs stay)."""
        self.suspension = suspension
        if suspension is None:
            self._maybe_open()
            return
        self.close_idle()

    def reshape(self, shaping: Shaping) -> None:
        """Apply new limits now, keeping the queue, its jobs and its connections."""
        self.shaping = shaping
        self._message_throttle = _reshaped(
            self._message_throttle, self._my_rate(shaping), MESSAGE_BURST
        )
        self._connection_throttle = _reshaped(
            self._connection_throttle, shaping.max_connection_rate
        )
        self._maybe_open()

    def close_idle(self, keep: int = 0) -> None:
        """Close the connections that wait for a job now, beyond ``keep`` open ones."""
        extra = self.connections - len(self._acquiring) - keep
        for waiter in self._idle:
            if extra <= 0:
                return
            if not waiter.done():
                waiter.cancel()
                extra -= 1

    def trim(self, keep: int) -> None:
        """Other workers wait for this queue's slots: down to ``keep`` open connections, the
        idle ones now, the busy ones as each finishes its message."""
        self._keep = keep
        self.close_idle(keep)

    def share_changed(self) -> None:
        """This worker's part of the machine's message rate changed: pace to the new one."""
        self._message_throttle = _reshaped(
            self._message_throttle, self._my_rate(self.shaping), MESSAGE_BURST
        )

    def override_rate(self, rate: Rate | None) -> None:
        """Pace to ``rate`` instead of the configured message rate (None: the configured)."""
        if rate != self.rate_override:
            self.rate_override = rate
            self.share_changed()

    def _my_rate(self, shaping: Shaping) -> Rate | None:
        rate = self.rate_override or shaping.max_message_rate
        share = self._slots.rate_share(self.key)
        return rate if rate is None or share >= 1.0 else Rate(rate.count * share, rate.period)

    @property
    def backlog(self) -> int:
        """Jobs waiting here plus connections at work: what this worker wants to send."""
        return len(self.jobs) + self.connections

    # ----------------------------------------------------------------- connections

    def _maybe_open(self) -> None:
        if self._closing or self.suspension is not None or not self.jobs:
            return
        if self.connections >= self.shaping.connection_limit:
            return
        if any(not waiter.done() for waiter in self._idle):
            return  # a connection waits for a tenant's rate: another one would wait too
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
        shaping = self.shaping
        waiting = asyncio.current_task()
        assert waiting is not None
        self._acquiring.add(waiting)
        try:
            await self._slots.acquire(
                self.key, shaping.connection_limit, shaping.max_connection_rate
            )
        except asyncio.CancelledError:
            self.connections -= 1
            raise
        finally:
            self._acquiring.discard(waiting)
        try:
            if self._closing or self.suspension is not None or not self.jobs:
                self.connections -= 1  # the jobs went another way while this waited
                return
            await self._connect_and_serve()
        finally:
            self._slots.release(self.key)

    async def _connect_and_serve(self) -> None:
        try:
            connection = await self._transport.connect(self.destination, self.source)
        except (EpoxiError, DnsError, OSError) as exc:
            self.connections -= 1
            self._on_connect_failure(exc)
            return
        self.last_error = self.last_error_at = None
        self._watch.connected(self)
        try:
            await self._serve(connection)
        finally:
            self.connections -= 1
            if self._keep is not None and self.connections - len(self._acquiring) <= self._keep:
                self._keep = None
            await connection.quit()
            self._maybe_open()

    async def _serve(self, connection: Connection) -> None:
        for _ in range(self.shaping.max_deliveries_per_connection):
            job = await self._next_job()
            if job is None:
                return
            await self._pace()
            self.deliveries += 1
            self.attempts_last_minute.tick()
            if not await self._attempt(connection, job) or not connection.is_usable:
                return
            if self._keep is not None and self._keep < self.connections - len(self._acquiring):
                return  # trimmed: this connection's slot goes to a worker that waits

    async def _next_job(self) -> Job | None:
        while self.suspension is None:
            job, wait = self.jobs.pop()
            if job is not None:
                return job
            if self._closing:
                return None
            # Nothing, or only tenants over their rate: wait for a job or for the rate.
            waiter: asyncio.Future[Job | None] = asyncio.get_running_loop().create_future()
            self._idle.append(waiter)
            await asyncio.wait({waiter}, timeout=wait or self.shaping.idle_timeout)
            if waiter.done() and not waiter.cancelled():
                job = waiter.result()  # a job may arrive in the same tick as the timeout
                if job is not None:
                    return job
                continue
            if waiter.cancelled():
                return None  # closed as idle: trimmed, suspended or shut down
            waiter.cancel()
            if not wait:
                return None  # idle for idle_timeout
        return None

    async def _pace(self) -> None:
        if self._message_throttle is None:
            return
        while (wait := self._message_throttle.acquire()) > 0:
            await asyncio.sleep(wait)

    # ----------------------------------------------------------------- attempts

    async def _attempt(self, connection: Connection, job: Job) -> bool:
        """One attempt of ``job``, in transactions of at most ``max_recipients_per_transaction``;
        False when the connection is no good any more."""
        meta = job.message.meta
        try:
            body = job.message.body or await self._load_body(meta.id)
        except SpoolError as exc:
            self._outcomes.body_unreadable(job, exc)
            return True
        step = self.shaping.max_recipients_per_transaction
        replies: list[tuple[str, Reply]] = []
        usable = True
        for start in range(0, len(job.recipients), step):
            chunk = job.recipients[start : start + step]
            try:
                if not usable:
                    raise DeliveryError("connection lost before this transaction")
                replies += await connection.send(meta, chunk, body)
                usable = connection.is_usable
            except DeliveryError as exc:
                # A lost data-end reply lands here too: transient, so at worst a duplicate.
                replies += self._outcomes.transaction_failed(chunk, exc)
                usable = False
        self._outcomes.handle(
            job,
            replies,
            connection.peer,
            dsn_passed=connection.dsn_passed,
            tls=connection.tls.text,
        )
        return usable

    def _on_connect_failure(self, exc: Exception) -> None:
        """Nothing could connect: if no other connection is alive, give the jobs back."""
        self.last_error, self.last_error_at = str(exc), time.time()
        if self.connections > 0:
            self._watch.connect_failed(self, exc, [])
            return
        jobs = self.jobs.take(_every)
        jobs = self._watch.connect_failed(self, exc, jobs)
        log.warning("[%s] cannot connect (%s); %d jobs failed", self.key, exc, len(jobs))
        if jobs:
            hosts = ",".join(h for h, _ in self.destination.hosts)
            policy = exc.policy if isinstance(exc, TlsFailed) else self.destination.tls.name
            self._outcomes.connection_failed(jobs, exc, hosts, tls=f"policy={policy}")

    async def close(self) -> None:
        """Stop opening connections; let connections finish their current job."""
        self._closing = True
        if self._open_later is not None:
            self._open_later.cancel()
        self.close_idle()
        for task in self._acquiring:  # waiting for a slot another worker holds: give up
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=30)


def _throttle(rate: Rate | None, window: float = 0.0) -> Throttle | None:
    return LocalThrottle(rate, window=window) if rate is not None else None


def _reshaped(throttle: Throttle | None, rate: Rate | None, window: float = 0.0) -> Throttle | None:
    if rate is None or throttle is None:
        return _throttle(rate, window)
    throttle.set_rate(rate)
    return throttle


def _every(job: Job) -> bool:
    return True
