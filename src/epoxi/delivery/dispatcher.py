"""The dispatcher: due jobs are routed and handed to the ready queue of their egress path.

A job's way here: its egress source, picked from its pool (:mod:`epoxi.delivery.pools`);
routing (static, or MX looked up once for all jobs of a domain waiting on it); then the ready
queue of (source, site), made on first use with the limits the shaping policy resolves, and
kept in step with the suspension registry. Jobs leave a source that is suspended or failing
for another of their pool when there is one. The outcome of every attempt is the
disposition's business, never the dispatcher's.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from typing import Protocol

from epoxi.config import DeliverySettings, SourceSettings, TlsMode
from epoxi.delivery.lines import TenantLimits
from epoxi.delivery.pools import Pools
from epoxi.delivery.ready import LoadBody, ReadyQueue
from epoxi.delivery.routing import Destination, Router
from epoxi.delivery.transport import Transport
from epoxi.delivery.warmup import Warmup
from epoxi.errors import DnsError, MailLoop, TlsFailed
from epoxi.outcomes.disposition import Disposition
from epoxi.queue.model import Job
from epoxi.queue.suspensions import Suspension, Suspensions
from epoxi.shaping.policy import Shaping, ShapingPolicy
from epoxi.shaping.slots import ConnectionSlots
from epoxi.shaping.throttle import Rate

log = logging.getLogger(__name__)


class Steering(Protocol):
    """What traffic shaping automation tells the dispatcher (:mod:`epoxi.delivery.automation`)."""

    def bounce_reason(self, job: Job) -> str | None:
        """Why a routed job is to be bounced rather than sent, or None."""
        ...

    def rate_override(self, source: str, site: str) -> Rate | None:
        """The message rate a path runs at instead of its configured one (adaptive)."""
        ...


class NoSteering:
    def bounce_reason(self, job: Job) -> str | None:
        return None

    def rate_override(self, source: str, site: str) -> Rate | None:
        return None


MAX_PATHS = 100_000  # (domain, site, source, policy) -> ready queue entries kept, ~17 MB


class Dispatcher:
    """Routes due jobs to ready queues; owns the ready-queue registry."""

    def __init__(
        self,
        *,
        router: Router,
        policy: ShapingPolicy,
        transport: Transport,
        outcomes: Disposition,
        suspensions: Suspensions,
        load_body: LoadBody,
        hold_back: Callable[[Job], None],
        pools: Pools,
        ready_queue_limit: int = 10_000,
        slots: ConnectionSlots | None = None,
        tenants: TenantLimits | None = None,
        warmup: Warmup | None = None,
    ) -> None:
        self.router = router
        self.policy = policy
        self.transport = transport
        self.outcomes = outcomes
        self.suspensions = suspensions
        self.pools = pools
        self.tenants = tenants or TenantLimits()  # tenant priorities and rates, every queue's
        self.warmup = warmup
        self.ready: dict[str, ReadyQueue] = {}
        self._load_body = load_body
        self._hold_back = hold_back
        self._ready_queue_limit = ready_queue_limit
        self._slots = slots
        self._lookups: dict[str, list[Job]] = {}
        # (domain, site, source, MTA-STS policy id) -> its ready queue
        self._paths: dict[tuple[str, str, str, str], ReadyQueue] = {}
        self._shaped_for: dict[str, str] = {}  # ready queue key -> the domain its limits are of
        self._tasks: set[asyncio.Task[None]] = set()
        self.steering: Steering = NoSteering()
        suspensions.subscribe(self._apply_suspensions)

    async def close(self) -> None:
        await asyncio.gather(*(rq.close() for rq in self.ready.values()))
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=10)

    # ----------------------------------------------------------------- routing

    def submit(self, job: Job) -> None:
        """A job is due (the scheduler's release): pick its source, route it to its ready
        queue."""
        # Its age is judged here unless its destination's shaping may set its own max_age and
        # its site (provider) is not known yet: then once routed (in _to_ready).
        if (job.site or not self.policy.sets_retries) and self.outcomes.expired(job):
            self.outcomes.expire(job)
            return
        pick = self.pools.pick(job.message.meta)
        job.source, job.pool = pick.source.name, pick.pool
        if pick.why:
            self.outcomes.rerouted(job, pick.why)
        self._route(job)

    def _route(self, job: Job) -> None:
        destination = self.router.cached(job.domain)
        if destination is not None:
            self._to_ready(job, destination)
            return
        waiting = self._lookups.get(job.domain)
        if waiting is not None:
            waiting.append(job)
            return
        self._lookups[job.domain] = [job]
        task = asyncio.get_running_loop().create_task(self._lookup(job.domain))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _lookup(self, domain: str) -> None:
        try:
            destination = await self.router.route(domain)
        except Exception as exc:
            if not isinstance(exc, DnsError):
                log.exception("routing %s failed", domain)
            self.outcomes.routing_failed(self._lookups.pop(domain, []), domain, exc)
        else:
            for job in self._lookups.pop(domain, []):
                self._to_ready(job, destination)

    def _to_ready(self, job: Job, destination: Destination) -> None:
        if job.source not in self.pools.sources or (  # removed by a reload while it waited,
            self.pools.degraded() and not self.pools.usable(job.source)  # or suspended, failing
        ):
            pick = self.pools.pick(job.message.meta)
            job.source, job.pool = pick.source.name, pick.pool
        ready = self._ready_queue(job.domain, destination, job.source)
        routed_now, job.site = not job.site, destination.site
        if routed_now and self.policy.sets_retries and self.outcomes.expired(job):
            self.outcomes.expire(job)  # (see submit: its provider may give it longer)
            return
        if self.suspensions.for_job(job) is not None:  # its tenant or campaign, on this site
            self._hold_back(job)  # the scheduler holds it, with a Suspended record
            return
        bounce = self.steering.bounce_reason(job)
        if bounce is not None:
            self.outcomes.admin_bounce([job], bounce)
            return
        if len(ready) >= self._ready_queue_limit:
            job.due = time.time() + _back_off(ready)  # full: hold back, no attempt
            self._hold_back(job)
            return
        warmup = self.warmup
        if warmup is not None and warmup.active and not warmup.allow(job.source, ready.provider):
            self._over_allowance(job, destination, ready.provider, warmup)
            return
        ready.put(job)

    def _over_allowance(
        self, job: Job, destination: Destination, provider: str | None, warmup: Warmup
    ) -> None:
        """A job its source's warm-up does not let through today: it leaves through the
        pool's fallback (``over_limit = "spill"``), else waits; it never bounces for it."""
        source, pool = job.source, job.pool
        fallback = self.pools.pools[pool].fallback if pool in self.pools.pools else None
        while warmup.spills(source) and fallback is not None:
            picked = self.pools.pick_in(fallback, job.message.meta)
            if picked is not None and warmup.allow(picked.name, provider):
                why = f"{warmup.why_over(job.source)}: sent through pool {fallback}"
                job.source, job.pool = picked.name, fallback
                self.outcomes.rerouted(job, why)
                self._ready_queue(job.domain, destination, job.source).put(job)
                return
            source = picked.name if picked is not None else source
            fallback = self.pools.pools[fallback].fallback
        job.due = warmup.wait_until(job.source)
        self._hold_back(job)

    def _ready_queue(self, domain: str, routed: Destination, source: str) -> ReadyQueue:
        """The ready queue of a domain routed to a site from a source; found once, then one
        dict lookup (again when the domain's MTA-STS policy changes)."""
        sts = routed.mta_sts.id if routed.mta_sts is not None else ""
        path = (domain, routed.site, source, sts)
        ready = self._paths.get(path)
        if ready is None:
            if len(self._paths) >= MAX_PATHS:  # a cache: domains x sources can grow large
                self._paths.clear()
            ready = self._paths[path] = self._find_or_make(
                domain, routed, self.pools.sources[source]
            )
        return ready

    def _find_or_make(self, domain: str, routed: Destination, egress: SourceSettings) -> ReadyQueue:
        site, source = routed.site, egress.name
        shaping = self.policy.resolve(domain, site, source)
        destination = with_tls(routed, shaping)
        key = f"{source}->{site}"
        if destination.tls != with_tls(routed, self.policy.resolve(site, site, source)).tls:
            key += f" tls={destination.tls.name}"  # a domain stricter than its site: its own queue
        if routed.mta_sts is not None:
            key += f" mta-sts={routed.mta_sts.summary}"  # as are domains with MTA-STS
        ready = self.ready.get(key)
        if ready is None:
            ready = self.ready[key] = ReadyQueue(
                key=key,
                source=egress,
                destination=destination,
                shaping=shaping,
                transport=self.transport,
                outcomes=self.outcomes,
                load_body=self._load_body,
                slots=self._slots,
                watch=self,
                provider=self.policy.provider_of(domain, site),
                tenants=self.tenants,
            )
            ready.set_suspension(self.suspensions.for_path(source, destination.site))
            ready.override_rate(self.steering.rate_override(source, destination.site))
            self._shaped_for[key] = domain
        return ready

    # ----------------------------------------------------------------- sources and pools

    def connected(self, ready: ReadyQueue) -> None:
        self.pools.connected(ready.source.name)

    def connect_failed(self, ready: ReadyQueue, exc: BaseException, jobs: list[Job]) -> list[Job]:
        """A failing source's jobs leave from another source of their pool, if one is usable."""
        source = ready.source.name
        if not isinstance(exc, TlsFailed | DnsError | MailLoop):  # the site's or its policy's
            self.pools.connect_failed(source, ready.destination.site, exc)
        if not jobs or self.pools.usable(source):
            return jobs
        return self._move(jobs, f"source {source} is failing ({exc})")

    def _move(self, jobs: list[Job], reason: str, *, gone: bool = False) -> list[Job]:
        """Pick again for jobs leaving their source; returns those with nowhere else to go
        (no usable source in their pool or its fallbacks: moving them to another suspended
        one would only move them back). Jobs of a source that is ``gone`` always move: a
        suspended source of their pool holds them rather than the removed one sending."""
        stuck = []
        for job in jobs:
            pick = self.pools.pick(job.message.meta)
            if not gone and (
                pick.source.name == job.source or not self.pools.usable(pick.source.name)
            ):
                stuck.append(job)
                continue
            job.source, job.pool = pick.source.name, pick.pool
            why = f"{reason}: moved to source {job.source} of pool {job.pool}"
            self.outcomes.rerouted(job, f"{why}; {pick.why}" if pick.why else why)
            self._route(job)
        return stuck

    def reconfigure(self, delivery: DeliverySettings) -> None:
        """New sources and pools (a reload). A source that stays takes its new address and
        EHLO name from its next connection; the jobs of one that is gone move to a source
        of their pool now."""
        self.pools.configure(delivery)
        self.tenants.configure(delivery)
        for ready in list(self.ready.values()):
            source = self.pools.sources.get(ready.source.name)
            if source is not None:
                ready.source = source
            elif ready.jobs:
                reason = f"source {ready.source.name} was removed from the configuration"
                self._move(ready.take(_every), reason, gone=True)

    # ----------------------------------------------------------------- policy and suspensions

    def reshape(self, policy: ShapingPolicy) -> None:
        """Use a new shaping policy: live ready queues take their new limits at once."""
        self.policy = policy
        self._paths.clear()  # a domain's TLS may now want a ready queue of its own
        for key, ready in self.ready.items():
            domain = self._shaped_for[key]  # the same layers the queue was made with
            ready.reshape(policy.resolve(domain, ready.destination.site, ready.source.name))

    def rate_changed(self, source: str, site: str) -> None:
        """The adaptive rate of (source, site) changed: its ready queues pace to it."""
        rate = self.steering.rate_override(source, site)
        for ready in self.ready.values():
            if ready.source.name == source and ready.destination.site == site:
                ready.override_rate(rate)

    def _apply_suspensions(self) -> None:
        for ready in list(self.ready.values()):  # moving jobs may make new ready queues
            source = ready.source.name
            suspension = self.suspensions.for_path(source, ready.destination.site)
            ready.set_suspension(suspension)
            if suspension is not None and _whole_source(suspension) and ready.jobs:
                reason = f"source {source} suspended: {suspension.reason}"
                for job in self._move(ready.take(_every), reason):
                    ready.put(job)
            for job in ready.take(self._held_on_site):
                self._hold_back(job)

    def _held_on_site(self, job: Job) -> bool:
        """A queued job whose tenant or campaign is now suspended on its site."""
        suspension = self.suspensions.for_job(job)
        return suspension is not None and bool(suspension.site)

    def rate_backlogs(self) -> dict[str, tuple[str, int]]:
        """Ready queues with a message rate -> (the rate, their backlog), for rate shares."""
        return {
            key: (str(rate), ready.backlog)
            for key, ready in self.ready.items()
            if (rate := ready.shaping.max_message_rate) is not None
        }

    def slots_wanted(self, key: str, keep: int) -> None:
        """Other workers wait for ``key``'s connection slots: keep at most ``keep``."""
        ready = self.ready.get(key)
        if ready is not None:
            ready.trim(keep)

    def shares_changed(self, keys: Iterable[str]) -> None:
        """This worker's rate shares of ``keys`` changed: their queues pace anew."""
        for key in keys:
            ready = self.ready.get(key)
            if ready is not None:
                ready.share_changed()

    # ----------------------------------------------------------------- inspection and admin

    def routing(self) -> Iterator[Job]:
        """Jobs waiting for their domain's DNS answer."""
        for jobs in self._lookups.values():
            yield from jobs

    def take(self, predicate: Callable[[Job], bool]) -> list[Job]:
        """Remove matching jobs waiting for routing or in ready queues."""
        taken: list[Job] = []
        for domain, jobs in list(self._lookups.items()):
            taken += [job for job in jobs if predicate(job)]
            self._lookups[domain] = [job for job in jobs if not predicate(job)]
        for ready in self.ready.values():
            taken += ready.take(predicate)
        return taken

    def gauges(self) -> dict[str, tuple[str, float]]:
        """Figures for the metrics: name -> (description, value)."""
        ready = list(self.ready.values())
        return {
            "ready_messages": ("Jobs in ready queues, waiting to be sent", sum(map(len, ready))),
            "ready_queues": ("Ready queues (egress source, site)", len(ready)),
            "outbound_connections": (
                "Open delivery connections",
                sum(r.connections for r in ready),
            ),
            "suspended_ready_queues": (
                "Ready queues stopped by a site or source suspension",
                sum(1 for r in ready if r.suspension),
            ),
        }

    def site_of(self, domain: str) -> str | None:
        """The site a domain is routed to, when known without a lookup."""
        destination = self.router.cached(domain)
        return destination.site if destination is not None else None


def _every(job: Job) -> bool:
    return True


MAX_BACK_OFF = 300.0  # seconds a job held back from a full ready queue waits at most


def _back_off(ready: ReadyQueue) -> float:
    """How long a job waits before it tries a full ready queue again: a few seconds and about
    half the time the queue needs to empty at its recent pace (a backlog of 100,000 for a site
    that takes 100 a second comes back now and then, not every few seconds: each return costs
    a routing); while the queue is suspended, until the suspension ends. At most 5 minutes."""
    jitter = random.uniform(1.0, 3.0)
    suspension = ready.suspension
    if suspension is None:
        return jitter + min(ready.drain_time() / 2 * random.uniform(0.5, 1.5), MAX_BACK_OFF)
    left = (suspension.until or float("inf")) - time.time()
    return min(max(left, 0.0), MAX_BACK_OFF) + jitter


def _whole_source(suspension: Suspension) -> bool:
    """A source suspended everywhere (its jobs leave for another source); one path
    (source x site) suspended keeps its jobs, like a suspended site."""
    return suspension.kind == "source" and not suspension.site


def with_tls(destination: Destination, shaping: Shaping) -> Destination:
    """The destination with the TLS policy its shaping asks for.

    MX routes take the shaping's TLS settings as they are. A static route or the smarthost has
    its own ``tls``; the shaping can only make it stricter (``required``, ``tls_verify``), so a
    security setting written for a domain is never dropped.
    """
    tls = destination.tls
    verified = shaping.tls == "required-verified"
    mode: TlsMode = "required" if shaping.tls == "required-verified" else shaping.tls
    if destination.via_mx:
        wanted = replace(tls, mode=mode, verify=shaping.tls_verify or verified)
        return replace(destination, tls=wanted) if wanted != tls else destination
    upgrade = mode == "required" and tls.mode in ("opportunistic", "disabled")
    verify = (shaping.tls_verify or verified) and not tls.verify
    if not (upgrade or verify):
        return destination
    stricter = replace(tls, mode="required" if upgrade else tls.mode, verify=tls.verify or verify)
    return replace(destination, tls=stricter)
