"""Operator actions on a running node: inspect the queues, suspend, resume, bounce, retry.

The HTTP API and the CLI sit on top of this; it knows nothing of HTTP. Snapshots are plain
msgspec structs, so they serialise as they are.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import fields
from typing import Literal

import msgspec

from epoxi.api_types import (
    AdaptiveInfo,
    Health,
    JobInfo,
    MessageDetails,
    PipelineHealth,
    Pipelines,
    PoolList,
    ReadyQueueInfo,
    RuleInfo,
    ScheduledQueueInfo,
    SettingInfo,
    ShapingResolution,
    ShapingState,
    SuspensionInfo,
    Totals,
    WarmupStateResponse,
)
from epoxi.delivery.automation import Automation, is_automated
from epoxi.delivery.dispatcher import Dispatcher
from epoxi.delivery.ready import ReadyQueue
from epoxi.errors import InvalidField
from epoxi.events.records import RecordType
from epoxi.outcomes.disposition import Disposition
from epoxi.queue.model import Job
from epoxi.queue.scheduled import Scheduler
from epoxi.queue.suspensions import SuspendKind, Suspension, Suspensions
from epoxi.shaping.automation import Automated
from epoxi.spool.port import SpoolPort


class Selector(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Which messages an action applies to: every field given must match."""

    domain: str | None = None
    site: str | None = None
    tenant: str | None = None
    campaign: str | None = None
    queue: str | None = None
    id: str | None = None

    def is_empty(self) -> bool:
        return all(v is None for v in msgspec.structs.astuple(self))

    def matches(self, job: Job) -> bool:
        meta = job.message.meta
        return (
            (self.domain is None or job.domain == self.domain.lower().rstrip("."))
            and (self.site is None or job.site == self.site)
            and (self.tenant is None or meta.tenant == self.tenant)
            and (self.campaign is None or meta.campaign == self.campaign)
            and (self.queue is None or job.queue == self.queue)
            and (self.id is None or meta.id == self.id)
        )


class Admin:
    """Reads and steers the queues of one node: scheduler, dispatcher, suspensions."""

    def __init__(
        self,
        *,
        scheduler: Scheduler,
        dispatcher: Dispatcher,
        outcomes: Disposition,
        suspensions: Suspensions,
        spool: SpoolPort,
        automation: Automation | None = None,
        reload_shaping: Callable[[], list[str]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.automation = automation
        self._reload_shaping = reload_shaping
        self.scheduler = scheduler
        self.dispatcher = dispatcher
        self.outcomes = outcomes
        self.suspensions = suspensions
        self.spool = spool
        self._clock = clock

    # ----------------------------------------------------------------- inspection

    def pipelines(self, routing_key: str | None = None) -> Pipelines:
        """Every queue, or those of one domain, site or ready queue name."""
        scheduled = self._scheduled_queues()
        ready = [_ready_info(rq) for rq in self.dispatcher.ready.values()]
        if routing_key is not None:
            scheduled, ready = self._of(routing_key, scheduled, ready)
        return Pipelines(
            totals=Totals(
                scheduled=sum(q.scheduled for q in scheduled),
                held=sum(q.held for q in scheduled),
                ready=sum(q.queued for q in ready),
                connections=sum(q.connections for q in ready),
            ),
            scheduled=scheduled,
            ready=ready,
            suspensions=self.suspension_list(),
        )

    def _of(
        self, routing_key: str, scheduled: list[ScheduledQueueInfo], ready: list[ReadyQueueInfo]
    ) -> tuple[list[ScheduledQueueInfo], list[ReadyQueueInfo]]:
        """The queues of one domain, site or ready queue. A domain's ready queue is found
        through its route only when mail for that domain has been queued here."""
        key = routing_key.lower().rstrip(".")
        sites = {key, routing_key}
        if any(queue_domain(name) == key for name in self.scheduler.queues):
            site = self.dispatcher.site_of(key)
            sites |= {site} if site else set()
        scheduled = [q for q in scheduled if key in (q.domain, q.name)]
        ready = [q for q in ready if q.site in sites or q.name == routing_key]
        return scheduled, ready

    def _scheduled_queues(self) -> list[ScheduledQueueInfo]:
        next_due = self.scheduler.next_due()
        whole_queue = {s.value: s.reason for s in self.suspensions.active() if s.kind == "queue"}
        return [
            ScheduledQueueInfo(
                name=queue.name,
                domain=queue_domain(queue.name),
                scheduled=queue.scheduled,
                held=len(queue.held),
                next_due=next_due.get(queue.name),
                suspended=whole_queue.get(queue.name),
            )
            for queue in sorted(self.scheduler.queues.values(), key=lambda q: q.name)
            if queue.scheduled or queue.held
        ]

    def health(self) -> Health:
        pipelines = [_ready_health(rq) for rq in self.dispatcher.ready.values()]
        failing = any(p.status == "failing" for p in pipelines)
        return Health(status="degraded" if failing else "ok", pipelines=pipelines)

    def pool_list(self) -> PoolList:
        """Every egress pool, its sources, their state and health (this worker's)."""
        pools = self.dispatcher.pools.snapshot()
        warmup = self.dispatcher.warmup
        if warmup is not None and warmup.active:
            for pool in pools:
                for source in pool.sources:
                    source.warmup = warmup.info(source.name)
        return PoolList(pools=pools)

    def warmup_pause(self, source: str, reason: str, *, pause: bool) -> WarmupStateResponse | None:
        """Pause or resume a source's warm-up; None when it has none."""
        warmup = self.dispatcher.warmup
        if warmup is None or not warmup.known(source):
            return None
        if pause:
            warmup.pause(source, reason or "paused by an operator")
        else:
            warmup.resume(source)
        return WarmupStateResponse(
            source=source,
            paused=warmup.paused(source),
            paused_reason=warmup.pause_reason(source) or None,
        )

    def known_pool(self, name: str) -> bool:
        return self.dispatcher.pools.known(name)

    def suspension_list(self) -> list[SuspensionInfo]:
        return [
            SuspensionInfo(
                target=s.kind, value=s.value, reason=s.reason, until=s.until, site=s.site or None
            )
            for s in self.suspensions.active()
        ]

    # ----------------------------------------------------------------- shaping

    async def shaping(self) -> ShapingState:
        """The shaping files in use, active automation, and this worker's adaptive rates."""
        files = self.dispatcher.policy.files
        return ShapingState(
            files=list(files.origins) if files is not None else [],
            active=await self.automation.active() if self.automation else [],
            adaptive=self._adaptive(),
        )

    def _adaptive(self) -> list[AdaptiveInfo]:
        if self.automation is None:
            return []
        found = []
        for source, site, aimd in self.automation.adaptive():
            configured = [
                str(rate)
                for rq in self.dispatcher.ready.values()
                if rq.source.name == source and rq.destination.site == site
                if (rate := rq.shaping.max_message_rate) is not None
            ]
            found.append(
                AdaptiveInfo(
                    source=source,
                    site=site,
                    configured=configured[0] if configured else None,
                    current=str(aimd.rate),
                    floor=aimd.config.floor,
                    ceiling=aimd.config.ceiling,
                )
            )
        return found

    async def resolve(self, domain: str, source: str | None) -> ShapingResolution:
        """The effective shaping of ``domain`` (routed now, as mail to it would be) from
        ``source``, each setting with the layer it came from."""
        domain = domain.lower().rstrip(".")
        if source is not None and source not in self.dispatcher.pools.sources:
            raise InvalidField("source", f"no egress source {source!r} is configured")
        site = (await self.dispatcher.router.route(domain)).site
        policy = self.dispatcher.policy
        explained = policy.explain(domain, site, source or "")
        shaping = {f.name: getattr(explained.shaping, f.name) for f in fields(explained.shaping)}
        files = policy.files
        adaptive = files.adaptive(domain, site) if files is not None else None
        active = await self.automation.active() if self.automation else []
        return ShapingResolution(
            domain=domain,
            site=site,
            source=source,
            provider=policy.provider_of(domain, site),
            settings=[
                SettingInfo(name=name, value=_plain(value), origin=explained.origins[name])
                for name, value in shaping.items()
            ],
            rules=[
                RuleInfo(
                    rule=label,
                    regex=rule.regex,
                    action=rule.action
                    + (f" {rule.name}={rule.value}" if rule.action == "set_config" else ""),
                    trigger=str(rule.trigger),
                    duration=rule.duration,
                )
                for label, rule in (files.rules(domain, site) if files is not None else [])
            ],
            adaptive_rate=adaptive.model_dump() if adaptive is not None else None,
            active=[a for a in active if a.site == site],
        )

    async def lift(self, action_id: str) -> Automated | None:
        """End an automation action now (the other workers follow within a second)."""
        return await self.automation.lift(action_id) if self.automation else None

    def reload_shaping(self) -> list[str]:
        """Read the shaping files again and apply them; ConfigError if one is invalid."""
        if self._reload_shaping is None:
            return []
        return self._reload_shaping()

    async def message(self, message_id: str) -> MessageDetails | None:
        meta = await self.spool.load_meta(message_id)
        if meta is None:
            return None
        body = await self.spool.load_body(message_id)
        return MessageDetails(meta=meta, headers=header_fields(body), jobs=self._jobs_of(meta.id))

    def _jobs_of(self, message_id: str) -> list[JobInfo]:
        found = []
        held = {id(job) for queue in self.scheduler.queues.values() for job in queue.held}
        for job in self.scheduler.jobs():
            if job.id == message_id:
                found.append(_job_info(job, "held" if id(job) in held else "scheduled"))
        found += [_job_info(j, "routing") for j in self.dispatcher.routing() if j.id == message_id]
        for ready in self.dispatcher.ready.values():
            found += [_job_info(job, "ready") for job in ready.jobs if job.id == message_id]
        return found

    # ----------------------------------------------------------------- actions

    def suspend(
        self, target: SuspendKind, value: str, reason: str = "", duration: float | None = None
    ) -> int:
        """Suspend; returns how many ready queues it stopped at once (site and source)."""
        value = value.lower().rstrip(".") if target == "domain" else value
        until = self._clock() + duration if duration else None
        suspension = Suspension(target, value, reason or "suspended by an operator", until)
        self.suspensions.suspend(suspension)
        return sum(1 for rq in self.dispatcher.ready.values() if rq.suspension is suspension)

    def hold_tenant(self, tenant: str, *, held: bool) -> None:
        """A suspended tenant's mail waits on this worker; an active one's goes again."""
        if held:
            self.suspend(
                "tenant", tenant, f"tenant {tenant} is suspended (PATCH /tenants/{tenant})"
            )
        else:
            self.resume("tenant", tenant)

    def adopt(self, suspensions: list[SuspensionInfo]) -> None:
        """Take on suspensions another worker of this machine holds (a restarted worker)."""
        for item in suspensions:
            suspension = Suspension(
                item.target, item.value, item.reason, item.until, site=item.site or ""
            )
            if not is_automated(suspension):  # those come from the store, fresher than a peer
                self.suspensions.suspend(suspension)

    def resume(self, target: SuspendKind, value: str) -> int:
        """Lift a suspension; returns the held jobs released (ready queues, for a site or
        a source)."""
        value = value.lower().rstrip(".") if target == "domain" else value
        held, stopped = self.scheduler.held_count(), self._stopped()
        self.suspensions.resume(target, value)
        if target in ("site", "source"):
            return stopped - self._stopped()
        return held - self.scheduler.held_count()

    def _stopped(self) -> int:
        return sum(1 for rq in self.dispatcher.ready.values() if rq.suspension is not None)

    def take_waiting(self, predicate: Callable[[Job], bool]) -> list[Job]:
        """Remove matching jobs wherever they wait: scheduled, held, routing or ready."""
        return self.scheduler.take(predicate) + self.dispatcher.take(predicate)

    def bounce(self, selector: Selector, reason: str) -> int:
        """Remove every waiting message that matches; returns recipients bounced."""
        jobs = self.take_waiting(selector.matches)
        return self.outcomes.admin_bounce(jobs, reason or "bounced by an operator")

    def cancel(self, message_id: str) -> int:
        """Take back a message that waits (scheduled, deferred, held or ready); returns the
        recipients cancelled: 0 when none of it waits any more (sent, or on a connection)."""
        jobs = self.take_waiting(lambda job: job.id == message_id)
        return self.outcomes.admin_bounce(jobs, "cancelled by the sender", RecordType.CANCELLED)

    def retry(self, selector: Selector) -> int:
        """Make matching deferred messages due now; returns how many jobs were moved.

        Messages waiting for their ``send_at`` are not deferred: they keep their time."""
        jobs = self.scheduler.retry_now(selector.matches)
        for message in {id(job.message): job.message for job in jobs}.values():
            message.meta.due = 0.0  # due now after a restart too
            self.spool.update(message.meta)
        return len(jobs)

    def expire_stuck(self) -> int:
        """Expire jobs too old to go on, in ready queues and held by suspensions."""
        expired = self.take_waiting(self.outcomes.expired)
        for job in expired:
            self.outcomes.expire(job)
        return len(expired)


def _plain(value: object) -> str | int | float | bool | None:
    """A shaping value as JSON shows it (rates as their text)."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def queue_domain(name: str) -> str:
    """The domain part of ``campaign:tenant@domain``."""
    if "@" in name:
        return name.rpartition("@")[2]
    return name.rpartition(":")[2]


def header_fields(body: bytes) -> list[tuple[str, str]]:
    """The header section as (name, unfolded value) pairs, in order."""
    head = body.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    fields: list[tuple[str, str]] = []
    for line in head.split("\r\n"):
        if line[:1] in (" ", "\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, f"{value} {line.strip()}")
        elif ":" in line:
            name, _, value = line.partition(":")
            fields.append((name, value.strip()))
    return fields


def _ready_info(ready: ReadyQueue) -> ReadyQueueInfo:
    rate = ready.shaping.max_message_rate
    suspension = ready.suspension
    return ReadyQueueInfo(
        name=ready.key,
        site=ready.destination.site,
        source=ready.source.name,
        hosts=[f"{host}:{port}" for host, port in ready.destination.hosts],
        queued=len(ready),
        connections=ready.connections,
        connection_limit=ready.shaping.connection_limit,
        connects=ready.connects,
        deliveries=ready.deliveries,
        attempts_last_minute=ready.attempts_last_minute.count(),
        max_message_rate=str(rate) if rate else None,
        adaptive_message_rate=str(ready.rate_override) if ready.rate_override else None,
        suspended=suspension.reason if suspension else None,
        suspended_until=suspension.until if suspension else None,
        last_error=ready.last_error,
        last_error_at=ready.last_error_at,
    )


def _ready_health(ready: ReadyQueue) -> PipelineHealth:
    status: Literal["ok", "suspended", "failing"] = "ok"
    detail = None
    if ready.suspension is not None:
        status, detail = "suspended", ready.suspension.reason
    elif ready.last_error is not None and ready.connections == 0:
        status, detail = "failing", ready.last_error
    return PipelineHealth(
        name=ready.key,
        status=status,
        queued=len(ready),
        connections=ready.connections,
        detail=detail,
    )


def _job_info(job: Job, where: Literal["scheduled", "held", "routing", "ready"]) -> JobInfo:
    return JobInfo(
        domain=job.domain,
        queue=job.queue,
        site=job.site,
        where=where,
        recipients=list(job.recipients),
        attempts=job.attempts,
        due=job.due,
    )
