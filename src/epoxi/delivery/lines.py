"""The line of jobs in a ready queue: by priority, and within a priority in turn by tenant.

A ready queue sends its jobs in this order: the highest priority first (``priority`` of the
message, else of its tenant, else of the destination's shaping; -100..100, 0 by default);
within one priority, the tenants take turns one job at a time, so a tenant with 100,000 jobs
queued and one with 5 alternate and the small one is not stuck behind the big one's backlog.

:class:`TenantLimits` holds the tenants' priorities and message rates (over all destinations,
and per shaping provider); the dispatcher owns one and every ready queue shares it. A tenant
over its rate is passed over: the line gives the next tenant in turn that may send, and when
none may, the shortest wait. With worker processes each worker enforces its share
(rate / worker count) on its own, as it does for destination rates without a machine-wide slot.

The common case, one tenant at one priority, costs a dict lookup and a deque append per job.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

from epoxi.queue.model import Job
from epoxi.shaping.throttle import LocalThrottle, Rate

if TYPE_CHECKING:
    from epoxi.config import DeliverySettings

Clock = Callable[[], float]


class TenantLimits:
    """Tenants' default priorities and their message rate throttles (one per worker)."""

    def __init__(self, *, workers: int = 1, clock: Clock = time.monotonic) -> None:
        self.priorities: dict[str, int] = {}
        self.rated = False  # any tenant rate at all: lets the line skip the lookups
        self._workers = max(1, workers)
        self._clock = clock
        self._rates: dict[tuple[str, str | None], Rate] = {}  # (tenant, provider or None)
        self._throttles: dict[tuple[str, str | None], LocalThrottle] = {}

    @classmethod
    def from_settings(cls, delivery: DeliverySettings, workers: int = 1) -> TenantLimits:
        limits = cls(workers=workers)
        limits.configure(delivery)
        return limits

    def configure(self, delivery: DeliverySettings) -> None:
        """New priorities and rates (start, reload); throttles that stay keep their state."""
        self.priorities = dict(delivery.tenant_priorities)
        rates: dict[tuple[str, str | None], Rate] = {}
        for tenant, settings in delivery.tenant_rates.items():
            if settings.max_message_rate is not None:
                rates[(tenant, None)] = self._share(Rate.parse(settings.max_message_rate))
            for provider, text in settings.providers.items():
                rates[(tenant, provider)] = self._share(Rate.parse(text))
        self.set_rates(rates)

    def set_rates(self, rates: Mapping[tuple[str, str | None], Rate]) -> None:
        self._rates = dict(rates)
        self.rated = bool(rates)
        for key in list(self._throttles):
            if key not in rates:
                del self._throttles[key]
        for key, rate in rates.items():
            throttle = self._throttles.get(key)
            if throttle is None:
                self._throttles[key] = LocalThrottle(rate, clock=self._clock)
            else:
                throttle.set_rate(rate)

    def _share(self, rate: Rate) -> Rate:
        return rate if self._workers == 1 else Rate(rate.count / self._workers, rate.period)

    def priority(self, job: Job, default: int) -> int:
        """The job's priority: its message's, else its tenant's, else ``default`` (the
        destination's)."""
        meta = job.message.meta
        if meta.priority is not None:
            return meta.priority
        return self.priorities.get(meta.tenant, default) if self.priorities else default

    def wait(self, tenant: str, provider: str | None) -> float:
        """Seconds until ``tenant`` may send one more message to ``provider``; 0 means now,
        and the message is counted."""
        overall = self._throttles.get((tenant, None))
        by_provider = self._throttles.get((tenant, provider)) if provider is not None else None
        wait = max(
            overall.delay() if overall is not None else 0.0,
            by_provider.delay() if by_provider is not None else 0.0,
        )
        if wait > 0:
            return wait
        for throttle in (overall, by_provider):
            if throttle is not None:
                throttle.acquire()
        return 0.0


class _Level:
    """The jobs of one priority: a deque per tenant, and the tenants in turn."""

    __slots__ = ("priority", "tenants", "turn")

    def __init__(self, priority: int) -> None:
        self.priority = priority
        self.tenants: dict[str, deque[Job]] = {}
        self.turn: deque[str] = deque()  # tenants with jobs here, the next one first


class JobLine:
    """Jobs waiting in one ready queue, in the order they are to be sent."""

    __slots__ = ("_len", "_levels", "_limits", "_order", "_provider")

    def __init__(self, limits: TenantLimits | None = None, provider: str | None = None) -> None:
        self._levels: dict[int, _Level] = {}
        self._order: list[_Level] = []  # highest priority first
        self._len = 0
        self._limits = limits
        self._provider = provider

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Job]:
        """In priority order; a level's tenants one after another (not interleaved)."""
        for level in self._order:
            for tenant in level.turn:
                yield from level.tenants[tenant]

    def put(self, job: Job, priority: int = 0) -> None:
        level = self._levels.get(priority) or self._add_level(priority)
        tenant = job.message.meta.tenant
        jobs = level.tenants.get(tenant)
        if not jobs:  # none yet, or none left: the tenant joins the turn
            if jobs is None:
                jobs = level.tenants[tenant] = deque()
            level.turn.append(tenant)
        jobs.append(job)
        self._len += 1

    def _add_level(self, priority: int) -> _Level:
        level = self._levels[priority] = _Level(priority)
        self._order.append(level)
        self._order.sort(key=lambda lv: -lv.priority)
        return level

    def pop(self) -> tuple[Job | None, float]:
        """The next job whose tenant may send now (its rate counts it), or None and the
        seconds until one may (0 when the line is empty)."""
        if not self._len:
            return None, 0.0
        limits = self._limits
        if limits is None or not limits.rated:
            for level in self._order:
                if level.turn:
                    return self._take_from(level, level.turn[0]), 0.0
        assert limits is not None
        shortest = 0.0
        for level in self._order:
            turn = level.turn
            for _ in range(len(turn)):
                tenant = turn[0]
                wait = limits.wait(tenant, self._provider)
                if wait <= 0:
                    return self._take_from(level, tenant), 0.0
                shortest = wait if shortest <= 0 else min(shortest, wait)
                turn.rotate(-1)
        return None, shortest

    def _take_from(self, level: _Level, tenant: str) -> Job:
        """The first job of ``tenant`` (first in its level's turn); it goes to the back."""
        jobs = level.tenants[tenant]
        job = jobs.popleft()
        self._len -= 1
        if not self._len and len(self._order) > 1:
            self._empty()
            return job
        turn = level.turn
        if jobs:
            if len(turn) > 1:
                turn.rotate(-1)
        else:
            turn.popleft()
            if len(level.tenants) > 1:
                del level.tenants[tenant]  # a lone tenant keeps its deque: no allocation per job
        return job

    def take(self, predicate: Callable[[Job], bool]) -> list[Job]:
        """Remove and return the jobs that match (expiry, admin bounce, moves)."""
        taken: list[Job] = []
        for level in self._order:
            for tenant in list(level.turn):
                jobs = level.tenants[tenant]
                found = [job for job in jobs if predicate(job)]
                if not found:
                    continue
                taken += found
                kept = deque(job for job in jobs if not predicate(job))
                if kept:
                    level.tenants[tenant] = kept
                else:
                    del level.tenants[tenant]
                    level.turn.remove(tenant)
        self._len -= len(taken)
        if not self._len and len(self._order) > 1:
            self._empty()
        return taken

    def _empty(self) -> None:
        """Nothing waits: drop the levels (one level, the common case, is kept: no allocation
        per job for a queue that keeps up)."""
        self._levels.clear()
        self._order.clear()
