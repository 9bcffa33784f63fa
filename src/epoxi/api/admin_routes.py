"""``/admin``: the queues of this node, and what operators do to them.

With worker processes every answer covers all of them (:mod:`epoxi.api.peers`)."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Request, Router, delete, get, post
from litestar.exceptions import NotFoundException
from litestar.params import FromPath, JSONBody, QueryParameter

from epoxi.admin import Selector
from epoxi.api.context import context
from epoxi.api.peers import merge_health, merge_pipelines, merge_pools
from epoxi.api.problems import problem_responses
from epoxi.api_types import (
    BounceResponse,
    Health,
    MessageDetails,
    Pipelines,
    PoolList,
    ResumeResponse,
    RetryResponse,
    SelectorIn,
    ShapingReloaded,
    ShapingResolution,
    ShapingState,
    SuspendRequest,
    SuspendResponse,
    WarmupPauseRequest,
    WarmupStateResponse,
)
from epoxi.errors import ConfigError, DnsError, InvalidField
from epoxi.shaping.automation import Automated
from epoxi.store.keys import Scope

_ERRORS = problem_responses(401, 403)
_ONE_TARGET = "name exactly one of domain, site, tenant, campaign, queue, source"


@get("/pipelines", responses=_ERRORS, summary="Every scheduled and ready queue")
async def pipelines(request: Request[Any, Any, Any]) -> Pipelines:
    ctx = context(request)
    return merge_pipelines([ctx.admin.pipelines(), *await ctx.peers.ask(request, Pipelines)])


@get("/pipelines/health", responses=_ERRORS, summary="Each ready queue: ok, suspended or failing")
async def pipelines_health(request: Request[Any, Any, Any]) -> Health:
    ctx = context(request)
    return merge_health([ctx.admin.health(), *await ctx.peers.ask(request, Health)])


@get(
    "/pipelines/{routing_key:str}",
    responses=problem_responses(401, 403, 404),
    summary="The queues of one domain, site or ready queue",
)
async def pipeline(request: Request[Any, Any, Any], routing_key: FromPath[str]) -> Pipelines:
    ctx = context(request)
    here = ctx.admin.pipelines(routing_key)
    found = merge_pipelines([here, *await ctx.peers.ask(request, Pipelines)])
    if not found.scheduled and not found.ready:
        raise NotFoundException(f"no queue for {routing_key!r}")
    return found


@get("/pools", responses=_ERRORS, summary="Egress pools: sources, weights, state and health")
async def pools(request: Request[Any, Any, Any]) -> PoolList:
    ctx = context(request)
    return merge_pools([ctx.admin.pool_list(), *await ctx.peers.ask(request, PoolList)])


async def _warmup(
    request: Request[Any, Any, Any], source: str, reason: str, *, pause: bool
) -> WarmupStateResponse:
    ctx = context(request)
    here = ctx.admin.warmup_pause(source, reason, pause=pause)
    peers = await ctx.peers.ask(request, WarmupStateResponse)
    found = here or next(iter(peers), None)
    if found is None:
        raise NotFoundException(f"source {source!r} has no warm-up")
    return found


@post(
    "/warmup/{source:str}/pause",
    status_code=200,
    responses=problem_responses(400, 401, 403, 404, 415, 422),
    summary="Pause a source's IP warm-up: its mail waits (or spills) until resumed",
)
async def warmup_pause(
    request: Request[Any, Any, Any],
    source: FromPath[str],
    data: JSONBody[WarmupPauseRequest],
) -> WarmupStateResponse:
    return await _warmup(request, source, data.reason, pause=True)


@post(
    "/warmup/{source:str}/resume",
    status_code=200,
    responses=problem_responses(400, 401, 403, 404, 415),
    summary="Resume a source's IP warm-up (paused by itself or an operator); body {}",
)
async def warmup_resume(
    request: Request[Any, Any, Any], source: FromPath[str]
) -> WarmupStateResponse:
    return await _warmup(request, source, "", pause=False)


@post(
    "/suspend",
    status_code=200,
    responses=problem_responses(400, 401, 403, 415, 422),
    summary="Hold mail for a domain, site, tenant, campaign or queue",
)
async def suspend(
    request: Request[Any, Any, Any], data: JSONBody[SuspendRequest]
) -> SuspendResponse:
    target = data.target()
    if target is None:
        raise InvalidField("body", _ONE_TARGET)
    kind, value = target
    ctx = context(request)
    hit = ctx.admin.suspend(kind, value, data.reason, data.duration)
    hit += sum(peer.ready_queues for peer in await ctx.peers.ask(request, SuspendResponse))
    active = [s for s in ctx.admin.suspension_list() if (s.target, s.value) == target]
    until = active[-1].until if active else None
    reason = active[-1].reason if active else data.reason
    return SuspendResponse(target=kind, value=value, reason=reason, until=until, ready_queues=hit)


@delete(
    "/suspend",
    status_code=200,
    responses=problem_responses(400, 401, 403, 422),
    summary="Resume: lift a suspension (the same target as it was made with)",
)
async def resume(
    request: Request[Any, Any, Any],
    domain: Annotated[str | None, QueryParameter(required=False, max_length=200)] = None,
    site: Annotated[str | None, QueryParameter(required=False, max_length=4000)] = None,
    tenant: Annotated[str | None, QueryParameter(required=False, max_length=200)] = None,
    campaign: Annotated[str | None, QueryParameter(required=False, max_length=200)] = None,
    queue: Annotated[str | None, QueryParameter(required=False, max_length=200)] = None,
    source: Annotated[str | None, QueryParameter(required=False, max_length=200)] = None,
) -> ResumeResponse:
    target = SuspendRequest(
        domain=domain, site=site, tenant=tenant, campaign=campaign, queue=queue, source=source
    ).target()
    if target is None:
        raise InvalidField("query", _ONE_TARGET)
    kind, value = target
    ctx = context(request)
    released = ctx.admin.resume(kind, value)
    released += sum(peer.released for peer in await ctx.peers.ask(request, ResumeResponse))
    return ResumeResponse(target=kind, value=value, released=released)


@post(
    "/bounce",
    status_code=200,
    responses=problem_responses(400, 401, 403, 415, 422),
    summary="Remove matching queued messages, each with an AdminBounce record",
)
async def bounce(request: Request[Any, Any, Any], data: JSONBody[SelectorIn]) -> BounceResponse:
    selector = _selector(data)
    if selector.is_empty():
        raise InvalidField("body", "name at least one of domain, site, tenant, campaign, queue, id")
    ctx = context(request)
    bounced = ctx.admin.bounce(selector, data.reason)
    bounced += sum(peer.bounced for peer in await ctx.peers.ask(request, BounceResponse))
    return BounceResponse(bounced=bounced)


@post(
    "/retry",
    status_code=200,
    responses=problem_responses(400, 401, 403, 415, 422),
    summary="Make matching deferred messages due now (an empty selector {}: all of them)",
)
async def retry(request: Request[Any, Any, Any], data: JSONBody[SelectorIn]) -> RetryResponse:
    ctx = context(request)
    retried = ctx.admin.retry(_selector(data))
    retried += sum(peer.retried for peer in await ctx.peers.ask(request, RetryResponse))
    return RetryResponse(retried=retried)


@get(
    "/messages/{message_id:str}",
    responses=problem_responses(401, 403, 404),
    summary="A queued message: envelope, headers, where its jobs wait, attempts",
)
async def message(request: Request[Any, Any, Any], message_id: FromPath[str]) -> MessageDetails:
    ctx = context(request)
    found = await ctx.admin.message(message_id)
    if found is None:
        found = next(iter(await ctx.peers.ask(request, MessageDetails)), None)
    if found is None:
        raise NotFoundException(f"message {message_id!r} is not in the spool")
    return found


@get(
    "/shaping", responses=_ERRORS, summary="Shaping files in use, active automation, adaptive rates"
)
async def shaping(request: Request[Any, Any, Any]) -> ShapingState:
    ctx = context(request)
    here = await ctx.admin.shaping()
    for peer in await ctx.peers.ask(request, ShapingState):  # each worker's adaptive rates
        here.adaptive += peer.adaptive
    return here


@get(
    "/shaping/resolve",
    responses=problem_responses(401, 403, 422),
    summary="The effective shaping of a domain (from a source), each value with its layer",
)
async def shaping_resolve(
    request: Request[Any, Any, Any],
    domain: Annotated[str, QueryParameter(min_length=1, max_length=253)],
    source: Annotated[str | None, QueryParameter(required=False, max_length=200)] = None,
) -> ShapingResolution:
    try:
        return await context(request).admin.resolve(domain, source)
    except DnsError as exc:
        raise InvalidField("domain", f"cannot route {domain}: {exc}") from exc


@post(
    "/shaping/reload",
    status_code=200,
    responses=problem_responses(400, 401, 403, 415, 422),
    summary="Read the shaping files again and apply them to the live queues",
)
async def shaping_reload(request: Request[Any, Any, Any]) -> ShapingReloaded:
    ctx = context(request)
    try:
        files = ctx.admin.reload_shaping()
    except ConfigError as exc:
        message = f"not applied, the running files are kept: {exc}"
        raise InvalidField("shaping_files", message) from exc
    peers = await ctx.peers.ask(request, ShapingReloaded)
    return ShapingReloaded(files=files, workers=1 + len(peers))


@delete(
    "/shaping/automation/{action_id:str}",
    status_code=200,
    responses=problem_responses(401, 403, 404),
    summary="Lift an active automation action now",
)
async def shaping_lift(request: Request[Any, Any, Any], action_id: FromPath[str]) -> Automated:
    lifted = await context(request).admin.lift(action_id)
    if lifted is None:
        raise NotFoundException(f"no active automation action {action_id!r}")
    return lifted


def _selector(data: JSONBody[SelectorIn]) -> Selector:
    return Selector(
        domain=data.domain,
        site=data.site,
        tenant=data.tenant,
        campaign=data.campaign,
        queue=data.queue,
        id=data.id,
    )


admin_router = Router(
    path="/admin",
    route_handlers=[
        pipelines,
        pipelines_health,
        pipeline,
        pools,
        warmup_pause,
        warmup_resume,
        suspend,
        resume,
        bounce,
        retry,
        message,
        shaping,
        shaping_resolve,
        shaping_reload,
        shaping_lift,
    ],
    opt={"scope": Scope.ADMIN},
    tags=["admin"],
)
