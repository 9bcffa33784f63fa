"""The dispatcher: due jobs are routed and handed to the ready queue of their egress path.

A job's way here: routing (static, or MX looked up once for all jobs of a domain waiting on
it), then the ready queue of (source, site), made on first use with the limits the shaping
policy resolves, and kept in step with the suspension registry. The outcome of every attempt
is the disposition's business, never the dispatcher's.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace

from epoxi.config import SourceSettings, TlsMode
from epoxi.delivery.ready import LoadBody, ReadyQueue
from epoxi.delivery.routing import Destination, Router
from epoxi.delivery.transport import Transport
from epoxi.errors import DnsError
from epoxi.outcomes.disposition import Disposition
from epoxi.queue.model import Job
from epoxi.queue.suspensions import Suspensions
from epoxi.shaping.policy import Shaping, ShapingPolicy
from epoxi.shaping.slots import ConnectionSlots

log = logging.getLogger(__name__)


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
        source: SourceSettings,
        ready_queue_limit: int = 10_000,
        slots: ConnectionSlots | None = None,
    ) -> None:
        self.router = router
        self.policy = policy
        self.transport = transport
        self.outcomes = outcomes
        self.suspensions = suspensions
        self.source = source
        self.ready: dict[str, ReadyQueue] = {}
        self._load_body = load_body
        self._hold_back = hold_back
        self._ready_queue_limit = ready_queue_limit
        self._slots = slots
        self._lookups: dict[str, list[Job]] = {}
        # (domain, site, MTA-STS policy id) -> its ready queue
        self._paths: dict[tuple[str, str, str], ReadyQueue] = {}
        self._shaped_for: dict[str, str] = {}  # ready queue key -> the domain its limits are of
        self._tasks: set[asyncio.Task[None]] = set()
        suspensions.subscribe(self._apply_suspensions)

    async def close(self) -> None:
        await asyncio.gather(*(rq.close() for rq in self.ready.values()))
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=10)

    # ----------------------------------------------------------------- routing

    def submit(self, job: Job) -> None:
        """A job is due (the scheduler's release): route it to its ready queue."""
        job.source = self.source.name
        if self.outcomes.expired(job):
            self.outcomes.expire(job)
            return
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
        ready = self._ready_queue(job.domain, destination)
        job.site = destination.site
        if len(ready) >= self._ready_queue_limit:
            job.due = time.time() + random.uniform(1.0, 3.0)  # full: hold back, no attempt
            self._hold_back(job)
            return
        ready.put(job)

    def _ready_queue(self, domain: str, routed: Destination) -> ReadyQueue:
        """The ready queue of a domain routed to a site; found once, then one dict lookup
        (again when the domain's MTA-STS policy changes)."""
        path = (domain, routed.site, routed.mta_sts.id if routed.mta_sts is not None else "")
        ready = self._paths.get(path)
        if ready is None:
            ready = self._paths[path] = self._find_or_make(domain, routed)
        return ready

    def _find_or_make(self, domain: str, routed: Destination) -> ReadyQueue:
        site, source = routed.site, self.source.name
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
                source=self.source,
                destination=destination,
                shaping=shaping,
                transport=self.transport,
                outcomes=self.outcomes,
                load_body=self._load_body,
                slots=self._slots,
            )
            ready.set_suspension(self.suspensions.for_path(self.source.name, destination.site))
            self._shaped_for[key] = domain
        return ready

    # ----------------------------------------------------------------- policy and suspensions

    def reshape(self, policy: ShapingPolicy) -> None:
        """Use a new shaping policy: live ready queues take their new limits at once."""
        self.policy = policy
        self._paths.clear()  # a domain's TLS may now want a ready queue of its own
        for key, ready in self.ready.items():
            domain = self._shaped_for[key]  # the same layers the queue was made with
            ready.reshape(policy.resolve(domain, ready.destination.site, self.source.name))

    def _apply_suspensions(self) -> None:
        for ready in self.ready.values():
            ready.set_suspension(
                self.suspensions.for_path(self.source.name, ready.destination.site)
            )

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
