"""``/admin/sinks``: each broker sink of the node, its connection, backlog and last error.

Every worker runs every sink with a backlog and a connection of its own: the answer adds
them up (:func:`epoxi.api.peers.merge_sinks`)."""

from __future__ import annotations

from typing import Any

from litestar import Request, Router, get

from epoxi.api.context import context
from epoxi.api.peers import merge_sinks
from epoxi.api.problems import problem_responses
from epoxi.api_types import SinkInfo, SinkList
from epoxi.sinks.sink import BrokerSink
from epoxi.store.keys import Scope


@get(
    "/",
    responses=problem_responses(401, 403),
    summary="Each broker sink: connected workers, backlog, dropped, published, last error",
)
async def sinks(request: Request[Any, Any, Any]) -> SinkList:
    ctx = context(request)
    here = SinkList(sinks=[_shown(sink) for sink in ctx.sinks])
    return merge_sinks([here, *await ctx.peers.ask(request, SinkList)])


def _shown(sink: BrokerSink) -> SinkInfo:
    settings = sink.settings
    return SinkInfo(
        name=sink.name,
        kind=settings.kind,
        url=settings.shown_url,
        types=list(settings.types),
        tenants=list(settings.tenants),
        workers=1,
        connected=1 if sink.connected else 0,
        backlog=sink.waiting,
        backlog_limit=sink.backlog.limit,
        dropped=sink.dropped,
        published=sink.published,
        last_error=sink.last_error,
        last_error_at=sink.last_error_at,
    )


admin_sink_router = Router(
    path="/admin/sinks",
    route_handlers=[sinks],
    opt={"scope": Scope.ADMIN},
    tags=["admin"],
)
