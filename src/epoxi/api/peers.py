"""The other workers of this machine: one API call answered for all of them.

With ``--workers N`` a request reaches one worker (they share the listening socket), but the
queues, suspensions and messages it asks about are spread over all of them. The worker that
got it answers for itself, forwards the same request to each peer over the peer's unix
socket, marked :data:`SCOPE_HEADER` ``: worker`` so the peer answers for itself alone, and
merges the answers (the functions below). The caller's ``Authorization`` goes along: a
peer checks the key as the first worker did (the key store is shared).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

import httpx
import msgspec
from litestar import Request

from epoxi.api_types import (
    Health,
    PipelineHealth,
    Pipelines,
    PoolList,
    ProviderAllowance,
    ReadyQueueInfo,
    ScheduledQueueInfo,
    SinkInfo,
    SinkList,
    SourceInfo,
    SuspensionInfo,
    Totals,
    WarmupInfo,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

SCOPE_HEADER: Final = "x-epoxi-scope"
WORKER_ONLY: Final = "worker"
_PASSED_ON: Final = ("authorization", "content-type")


class Peers:
    """Clients of the other workers' APIs (none for a single process)."""

    def __init__(self, sockets: Iterable[Path] = (), timeout: float = 60.0) -> None:
        self._clients = [
            httpx.AsyncClient(
                transport=httpx.AsyncHTTPTransport(uds=str(path)),
                base_url="http://worker",
                timeout=timeout,
            )
            for path in sockets
        ]

    async def close(self) -> None:
        await asyncio.gather(*(client.aclose() for client in self._clients))

    @staticmethod
    def is_forwarded(request: Request[Any, Any, Any]) -> bool:
        """True when another worker sent this request: answer for this worker alone."""
        return request.headers.get(SCOPE_HEADER) == WORKER_ONLY

    async def ask(self, request: Request[Any, Any, Any], answer: type[T]) -> list[T]:
        """Each peer's 2xx answer to this same request, decoded; [] when it was forwarded
        itself. A peer that is restarting, or answers 4xx (not there), adds nothing."""
        return [msgspec.json.decode(body, type=answer) for body in await self.ask_raw(request)]

    async def ask_raw(self, request: Request[Any, Any, Any]) -> list[bytes]:
        if not self._clients or self.is_forwarded(request):
            return []
        body = await request.body()
        headers = {name: request.headers[name] for name in _PASSED_ON if name in request.headers}
        headers[SCOPE_HEADER] = WORKER_ONLY
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return await self._everyone(request.method, path, body, headers)

    async def get(self, path: str, answer: type[T], timeout: float) -> list[T]:
        """Each peer's own answer to ``GET path``, as the machine asking itself (no key)."""
        headers = {SCOPE_HEADER: WORKER_ONLY}
        replies = await self._everyone("GET", path, b"", headers, timeout)
        return [msgspec.json.decode(body, type=answer) for body in replies]

    async def _everyone(
        self,
        method: str,
        path: str,
        body: bytes,
        headers: dict[str, str],
        timeout: float | None = None,
    ) -> list[bytes]:
        replies = await asyncio.gather(
            *(self._one(c, method, path, body, headers, timeout) for c in self._clients)
        )
        return [reply for reply in replies if reply is not None]

    async def _one(
        self,
        client: httpx.AsyncClient,
        method: str,
        path: str,
        body: bytes,
        headers: dict[str, str],
        timeout: float | None,
    ) -> bytes | None:
        try:
            reply = await client.request(
                method,
                path,
                content=body,
                headers=headers,
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )
        except httpx.HTTPError as exc:  # starting or restarting: it holds nothing yet
            log.debug("a worker did not answer %s %s: %s", method, path, exc)
            return None
        if reply.status_code >= 500:
            log.error("a worker answered %s %s with %d", method, path, reply.status_code)
        return reply.content if reply.is_success else None


# --------------------------------------------------------------------- merging answers


def merge_pipelines(parts: list[Pipelines]) -> Pipelines:
    """The queues of all workers: a queue several have is one line with their sums."""
    scheduled: dict[str, ScheduledQueueInfo] = {}
    for part in parts:
        for queue in part.scheduled:
            seen = scheduled.get(queue.name)
            scheduled[queue.name] = queue if seen is None else _add_scheduled(seen, queue)
    ready: dict[str, ReadyQueueInfo] = {}
    for part in parts:
        for rq in part.ready:
            known = ready.get(rq.name)
            ready[rq.name] = rq if known is None else _add_ready(known, rq)
    suspensions: dict[tuple[str, str, str | None], SuspensionInfo] = {}
    for part in parts:
        for suspension in part.suspensions:
            key = (suspension.target, suspension.value, suspension.site)
            suspensions.setdefault(key, suspension)
    return Pipelines(
        totals=Totals(
            scheduled=sum(p.totals.scheduled for p in parts),
            held=sum(p.totals.held for p in parts),
            ready=sum(p.totals.ready for p in parts),
            connections=sum(p.totals.connections for p in parts),
        ),
        scheduled=sorted(scheduled.values(), key=lambda q: q.name),
        ready=list(ready.values()),
        suspensions=list(suspensions.values()),
    )


def _add_scheduled(a: ScheduledQueueInfo, b: ScheduledQueueInfo) -> ScheduledQueueInfo:
    dues = [d for d in (a.next_due, b.next_due) if d is not None]
    return msgspec.structs.replace(
        a,
        scheduled=a.scheduled + b.scheduled,
        held=a.held + b.held,
        next_due=min(dues) if dues else None,
        suspended=a.suspended or b.suspended,
    )


def _add_ready(a: ReadyQueueInfo, b: ReadyQueueInfo) -> ReadyQueueInfo:
    latest = max((a, b), key=lambda q: q.last_error_at or 0.0)
    return msgspec.structs.replace(
        a,
        queued=a.queued + b.queued,
        connections=a.connections + b.connections,
        connects=a.connects + b.connects,
        deliveries=a.deliveries + b.deliveries,
        attempts_last_minute=a.attempts_last_minute + b.attempts_last_minute,
        suspended=a.suspended or b.suspended,
        suspended_until=a.suspended_until or b.suspended_until,
        last_error=latest.last_error,
        last_error_at=latest.last_error_at,
    )


def merge_health(parts: list[Health]) -> Health:
    """A queue fails only when it fails everywhere it exists (no worker has a connection)."""
    merged: dict[str, list[PipelineHealth]] = {}
    for part in parts:
        for pipeline in part.pipelines:
            merged.setdefault(pipeline.name, []).append(pipeline)
    pipelines = [_one_health(name, same) for name, same in merged.items()]
    failing = any(p.status == "failing" for p in pipelines)
    return Health(status="degraded" if failing else "ok", pipelines=pipelines)


def _one_health(name: str, same: list[PipelineHealth]) -> PipelineHealth:
    connections = sum(p.connections for p in same)
    suspended = [p for p in same if p.status == "suspended"]
    failing = [p for p in same if p.status == "failing"]
    status: Literal["ok", "suspended", "failing"]
    if suspended:
        status, detail = "suspended", suspended[0].detail
    elif failing and connections == 0:
        status, detail = "failing", failing[0].detail
    else:
        status, detail = "ok", None
    return PipelineHealth(
        name=name,
        status=status,
        queued=sum(p.queued for p in same),
        connections=connections,
        detail=detail,
    )


def merge_pools(parts: list[PoolList]) -> PoolList:
    """Every worker has the same pools: a source's counts are summed; it is suspended or
    failing when any worker says so (each judges its own connections)."""
    if not parts:
        return PoolList(pools=[])
    sources: dict[tuple[str, str], list[SourceInfo]] = {}
    for part in parts:
        for pool in part.pools:
            for source in pool.sources:
                sources.setdefault((pool.name, source.name), []).append(source)
    return PoolList(
        pools=[
            msgspec.structs.replace(
                pool, sources=[_add_sources(sources[pool.name, s.name]) for s in pool.sources]
            )
            for pool in parts[0].pools
        ]
    )


def _add_sources(same: list[SourceInfo]) -> SourceInfo:
    latest = max(same, key=lambda s: s.last_error_at or 0.0)
    states = {s.state for s in same}
    state: Literal["ok", "suspended", "failing"] = (
        "suspended" if "suspended" in states else "failing" if "failing" in states else "ok"
    )
    delivered = sum(s.delivered for s in same)
    deferred = sum(s.deferred for s in same)
    bounced = sum(s.bounced for s in same)
    warmups = [s.warmup for s in same if s.warmup is not None]
    return msgspec.structs.replace(
        same[0],
        state=state,
        delivered=delivered,
        deferred=deferred,
        bounced=bounced,
        connections=sum(s.connections for s in same),
        connection_failures=sum(s.connection_failures for s in same),
        last_error=latest.last_error,
        last_error_at=latest.last_error_at,
        warmup=_add_warmups(warmups, (delivered, deferred, bounced)) if warmups else None,
    )


def _add_warmups(same: list[WarmupInfo], counts: tuple[int, int, int]) -> WarmupInfo:
    """Each worker has its share of the allowances: counts and allowances add up; the rates
    are of the summed ten-minute counts; paused when any worker is."""
    attempts = max(1, sum(counts))
    paused = [w for w in same if w.paused]
    providers: dict[str, list[ProviderAllowance]] = {}
    for warmup in same:
        for provider in warmup.providers:
            providers.setdefault(provider.name, []).append(provider)
    return msgspec.structs.replace(
        same[0],
        sent_today=sum(w.sent_today for w in same),
        allowed_today=_add_allowed([w.allowed_today for w in same]),
        providers=[
            ProviderAllowance(
                name=name,
                sent=sum(p.sent for p in found),
                allowed=_add_allowed([p.allowed for p in found]),
            )
            for name, found in sorted(providers.items())
        ],
        deferral_rate=counts[1] / attempts,
        bounce_rate=counts[2] / attempts,
        paused=bool(paused),
        paused_reason=paused[0].paused_reason if paused else None,
    )


def _add_allowed(allowed: list[int | None]) -> int | None:
    return None if any(a is None for a in allowed) else sum(a for a in allowed if a is not None)


def merge_sinks(parts: list[SinkList]) -> SinkList:
    """Every worker runs every sink, each with its own backlog and connection: the counts add
    up (workers, connected, backlog, dropped, published); the last error is the latest."""
    same: dict[str, list[SinkInfo]] = {}
    for part in parts:
        for sink in part.sinks:
            same.setdefault(sink.name, []).append(sink)
    return SinkList(sinks=[_add_sinks(found) for found in same.values()])


def _add_sinks(same: list[SinkInfo]) -> SinkInfo:
    latest = max(same, key=lambda s: s.last_error_at or 0.0)
    return msgspec.structs.replace(
        same[0],
        workers=sum(s.workers for s in same),
        connected=sum(s.connected for s in same),
        backlog=sum(s.backlog for s in same),
        dropped=sum(s.dropped for s in same),
        published=sum(s.published for s in same),
        last_error=latest.last_error,
        last_error_at=latest.last_error_at,
    )
