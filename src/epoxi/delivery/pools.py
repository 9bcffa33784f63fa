"""Egress pools: which source a job leaves from.

A pool is a weighted set of egress sources (``[[delivery.pools]]``). A job's pool is its
message's (the API's ``ip_pool``, an ``X-Epoxi-Pool`` header), else its tenant's
(``delivery.tenant_pools``), else ``delivery.default_pool``. Inside the pool the source is
picked by weighted rendezvous hashing of the message id over the sources that are neither
suspended nor failing: a message leaves from the same source for all its recipient domains and
all its retries (a greylisting receiver sees the same IP come back), each source gets its
weight's share of messages on average, and when a source drops out only its own messages
move. When no source of a pool is usable
its ``fallback`` pool takes over (and that one's fallback, and so on), and the pick says why,
for the job's Rerouted record. With no usable source anywhere on the chain, the job stays in
its own pool: a suspended source holds it, a failing one is tried again.

Each source's health is counted here, per worker: deliveries, deferrals and bounces from the
records, connections from the ready queues, over the last ten minutes.
"""

from __future__ import annotations

import errno
import hashlib
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from epoxi.api_types import PoolInfo, SourceInfo
from epoxi.config import DeliverySettings, PoolSettings, SourceSettings
from epoxi.errors import SourceUnusable
from epoxi.events.records import Record, RecordType
from epoxi.message import MessageMeta
from epoxi.queue.suspensions import Suspensions

WINDOW_MINUTES = 10  # how far back the health counts go
# A connection that failed for one of these never left the machine: the source's own fault.
LOCAL_ERRNOS = frozenset({errno.EADDRNOTAVAIL, errno.EADDRINUSE, errno.EAFNOSUPPORT})


@dataclass(slots=True)
class Pick:
    """The source a job leaves from, the pool it came from, and why, when not its own."""

    source: SourceSettings
    pool: str
    why: str = ""


_COUNTED = {
    RecordType.DELIVERY: 1,
    RecordType.TRANSIENT_FAILURE: 2,
    RecordType.BOUNCE: 3,
}
_CONNECTED, _CONNECT_FAILED = 4, 5


class SourceHealth:
    """One source's recent outcomes, and whether it is failing.

    Failing means: its last ``failures_needed`` connections all failed and reached more than
    one site (one site down is that site's problem, not the source's), or one failed on our
    side (its address cannot be bound). A failing source is left alone for ``retry_after``;
    then the next connection tries it again, and one success ends it.
    """

    def __init__(
        self,
        failures_needed: int,
        retry_after: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.failures_needed = failures_needed
        self.retry_after = retry_after
        self._clock = clock
        self._minutes: deque[list[int]] = deque()  # [minute, delivered, deferred, bounced, ...]
        self._streak = 0
        self._streak_sites: set[str] = set()
        self.failing_until = 0.0
        self.last_error = ""
        self.last_error_at = 0.0

    def _bucket(self) -> list[int]:
        minute = int(self._clock() // 60)
        if not self._minutes or self._minutes[-1][0] != minute:
            self._minutes.append([minute, 0, 0, 0, 0, 0])
            while self._minutes[0][0] <= minute - WINDOW_MINUTES:
                self._minutes.popleft()
        return self._minutes[-1]

    def outcome(self, kind: RecordType) -> None:
        index = _COUNTED.get(kind)
        if index is not None:
            self._bucket()[index] += 1

    def connected(self) -> None:
        self._bucket()[_CONNECTED] += 1
        self._streak = 0
        self._streak_sites.clear()
        self.failing_until = 0.0

    def connect_failed(self, site: str, error: str, *, local: bool = False) -> bool:
        """Count a failed connection; True when it makes the source failing."""
        now = self._clock()
        self._bucket()[_CONNECT_FAILED] += 1
        self.last_error, self.last_error_at = error, now
        self._streak += 1
        self._streak_sites.add(site)
        was_failing = self.failing(now)
        if local or (self._streak >= self.failures_needed and len(self._streak_sites) > 1):
            self.failing_until = now + self.retry_after
        return not was_failing and self.failing(now)

    def failing(self, now: float | None = None) -> bool:
        return self.failing_until > (self._clock() if now is None else now)

    def counts(self) -> tuple[int, int, int, int, int]:
        """Delivered, deferred, bounced, connections made and failed, in the window."""
        self._bucket()
        totals = [0] * 5
        for bucket in self._minutes:
            for index in range(5):
                totals[index] += bucket[index + 1]
        return totals[0], totals[1], totals[2], totals[3], totals[4]


def rendezvous(key: str, weights: Mapping[str, int]) -> str:
    """The name ``key`` goes to: weighted highest-random-weight hashing. Each name scores
    ``-weight / ln(u)`` with ``u`` a uniform hash of (key, name) in (0, 1); the highest wins,
    which gives each name its weight's share, the same answer for the same key on every
    worker and after a restart, and moves only the keys of a name that leaves."""
    best, best_score = "", -1.0
    for name, weight in weights.items():
        digest = hashlib.blake2b(f"{key}\0{name}".encode(), digest_size=8).digest()
        unit = (int.from_bytes(digest, "big") + 0.5) / _TWO_64
        score = -weight / math.log(unit)
        if score > best_score:
            best, best_score = name, score
    return best


_TWO_64 = float(1 << 64)


class Pools:
    """The pools and sources of one worker: picks sources, keeps their health."""

    def __init__(
        self,
        delivery: DeliverySettings,
        suspensions: Suspensions,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._suspensions = suspensions
        self._clock = clock
        self.health: dict[str, SourceHealth] = {}
        self._suspended: set[str] = set()
        self._failing_until = 0.0  # the latest time any source is failing until
        # While degraded: wanted pool -> (pool used, its usable weights, why), until a change
        self._routes: dict[str, tuple[str, dict[str, int], str]] = {}
        self._routes_until = math.inf
        self.configure(delivery)
        suspensions.subscribe(self._suspensions_changed)

    def configure(self, delivery: DeliverySettings) -> None:
        """Take the pools and sources of (new) settings; health carries over by name."""
        self.sources = {source.name: source for source in delivery.sources}
        self.pools: dict[str, PoolSettings] = delivery.pool_table()
        self.default_pool = delivery.default_pool
        self.tenant_pools = dict(delivery.tenant_pools)
        self._only = {  # a pool of one source always picks it: one Pick made once
            name: Pick(self.sources[next(iter(pool.sources))], name)
            for name, pool in self.pools.items()
            if len(pool.sources) == 1
        }
        self.health = {
            name: self.health.get(name)
            or SourceHealth(delivery.source_failures, delivery.source_retry_after, self._clock)
            for name in self.sources
        }
        for health in self.health.values():
            health.failures_needed = delivery.source_failures
            health.retry_after = delivery.source_retry_after
        self._suspensions_changed()  # on a reload, a re-added source may be suspended

    def known(self, pool: str) -> bool:
        return pool in self.pools

    # ----------------------------------------------------------------- picking

    def pool_of(self, meta: MessageMeta) -> tuple[str, str]:
        """The pool a message asks for, and why it gets another one ("" when it does not)."""
        if meta.pool:
            if meta.pool in self.pools:
                return meta.pool, ""
            fallback = self.tenant_pools.get(meta.tenant, self.default_pool)
            return fallback, f"pool {meta.pool} is not configured any more; using {fallback}"
        return self.tenant_pools.get(meta.tenant, self.default_pool), ""

    def pick(self, meta: MessageMeta) -> Pick:
        """The source for a job of ``meta``: see the module's description."""
        if meta.pool:
            wanted, why = self.pool_of(meta)
        else:  # the common case, inlined: this runs for every job
            wanted, why = self.tenant_pools.get(meta.tenant, self.default_pool), ""
        pool = self.pools[wanted]
        if not self._suspended and not self._any_failing():
            only = self._only.get(wanted)
            if only is not None and not why:
                return only
            return Pick(self._next(meta.id, pool.sources), wanted, why)
        name, weights, fallback = self._degraded_route(wanted)
        if fallback:
            why = f"{why}; {fallback}" if why else fallback
        return Pick(self._next(meta.id, weights), name, why)

    def pick_in(self, pool: str, meta: MessageMeta) -> SourceSettings | None:
        """A usable source of the named pool for ``meta`` (a warm-up's spill), or None."""
        usable = {s: w for s, w in self.pools[pool].sources.items() if self.usable(s)}
        return self._next(meta.id, usable) if usable else None

    def _degraded_route(self, wanted: str) -> tuple[str, dict[str, int], str]:
        """While a source is suspended or failing: the pool whose usable sources take
        ``wanted``'s mail, those sources, and why when it is a fallback. Worked out once
        per change of state (a suspension, a source failing or recovering), not per job."""
        if self._routes and self._clock() >= self._routes_until:
            self._routes.clear()  # a failing source is due to be tried again
        found = self._routes.get(wanted)
        if found is None:
            if not self._routes:
                now = self._clock()
                ends = [h.failing_until for h in self.health.values() if h.failing_until > now]
                self._routes_until = min(ends, default=math.inf)
            found = self._routes[wanted] = self._route_of(wanted)
        return found

    def _route_of(self, wanted: str) -> tuple[str, dict[str, int], str]:
        pool, name, tried = self.pools[wanted], wanted, list[tuple[str, str]]()
        while True:
            usable = {s: w for s, w in pool.sources.items() if self.usable(s)}
            if usable:
                return name, usable, _fallback_reason(tried, name) if tried else ""
            tried.append((name, self._unusable_reason(pool)))
            if pool.fallback is None:
                return wanted, dict(self.pools[wanted].sources), ""  # stay: nowhere better
            name, pool = pool.fallback, self.pools[pool.fallback]

    def _next(self, message_id: str, weights: dict[str, int]) -> SourceSettings:
        if len(weights) == 1:
            return self.sources[next(iter(weights))]
        return self.sources[rendezvous(message_id, weights)]

    def degraded(self) -> bool:
        """Whether any source is suspended or failing (else every source is usable)."""
        return bool(self._suspended) or self._any_failing()

    def usable(self, source: str) -> bool:
        """Neither suspended nor failing (nor gone from the configuration)."""
        health = self.health.get(source)
        return health is not None and source not in self._suspended and not health.failing()

    def _any_failing(self) -> bool:
        """Cheap when nothing failed lately: one clock read, no walk over the sources."""
        if self._failing_until <= 0.0:
            return False
        now = self._clock()
        if self._failing_until > now:
            return True
        self._failing_until = 0.0  # every failing source is due to be tried again
        return False

    def _unusable_reason(self, pool: PoolSettings) -> str:
        return ", ".join(
            f"{s} {'suspended' if s in self._suspended else 'failing'}" for s in pool.sources
        )

    def _suspensions_changed(self) -> None:
        self._routes.clear()
        active = self._suspensions.active()
        whole = {s.value for s in active if s.kind == "source" and not s.site}  # not one path
        self._suspended = whole & set(self.sources)

    # ----------------------------------------------------------------- health

    def observe(self, record: Record) -> None:
        """A record subscriber: outcomes count towards their source's health."""
        if record.source and record.type in _COUNTED:
            health = self.health.get(record.source)
            if health is not None:
                health.outcome(record.type)

    def connected(self, source: str) -> None:
        health = self.health.get(source)
        if health is not None:
            if health.failing_until:
                self._routes.clear()  # it may have been left out: it is back
            health.connected()

    def connect_failed(self, source: str, site: str, exc: BaseException) -> bool:
        """Count a failed connection; True when the source has just become failing."""
        health = self.health.get(source)
        if health is None:
            return False
        became = health.connect_failed(site, str(exc), local=_is_local(exc))
        self._failing_until = max(self._failing_until, health.failing_until)
        if became:
            self._routes.clear()
        return became

    def snapshot(self) -> list[PoolInfo]:
        """Every pool with its sources, their state and counts, for /admin/pools."""
        now = self._clock()
        return [
            PoolInfo(
                name=pool.name,
                fallback=pool.fallback,
                default=pool.name == self.default_pool,
                tenants=sorted(t for t, p in self.tenant_pools.items() if p == pool.name),
                sources=[
                    self._source_info(name, weight, now) for name, weight in pool.sources.items()
                ],
            )
            for pool in self.pools.values()
        ]

    def _source_info(self, name: str, weight: int, now: float) -> SourceInfo:
        source, health = self.sources[name], self.health[name]
        delivered, deferred, bounced, connects, failures = health.counts()
        state: Literal["ok", "suspended", "failing"] = (
            "suspended" if name in self._suspended else "failing" if health.failing(now) else "ok"
        )
        return SourceInfo(
            name=name,
            weight=weight,
            bind=source.bind,
            ehlo=source.ehlo,
            hop=source.hop,
            state=state,
            delivered=delivered,
            deferred=deferred,
            bounced=bounced,
            connections=connects,
            connection_failures=failures,
            last_error=health.last_error or None,
            last_error_at=health.last_error_at or None,
        )


def _is_local(exc: BaseException) -> bool:
    """Whether a connection failed on this machine (the source address) or at the source's
    own hop (its SOCKS5 proxy or HAProxy), not on the way."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, SourceUnusable):
            return True
        if isinstance(cause, OSError) and cause.errno in LOCAL_ERRNOS:
            return True
        cause = cause.__cause__
    return False


def _fallback_reason(tried: list[tuple[str, str]], used: str) -> str:
    steps = "; ".join(f"pool {name} has no usable source ({state})" for name, state in tried)
    return f"{steps}: sent through pool {used}"
