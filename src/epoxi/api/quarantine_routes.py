"""``/admin/quarantine``: the reports the feedback mailbox kept (``data_dir/bounces``).

The directory is one for all workers, so whichever answers has them all. A node without a
bounce domain keeps none: an empty list, and every name is unknown."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from litestar import Request, Router, delete, get
from litestar.exceptions import NotFoundException
from litestar.params import FromPath, QueryParameter

from epoxi.api.context import context
from epoxi.api.problems import problem_responses
from epoxi.api_types import QuarantinedReport, QuarantineList
from epoxi.ingest.feedback import Kept, Quarantine
from epoxi.store.keys import Scope

RFC822 = "message/rfc822"


@get(
    "/",
    responses=problem_responses(400, 401, 403, 422),
    summary="The reports kept, newest first: name, kind, queue id, size, time kept",
)
async def reports(
    request: Request[Any, Any, Any],
    limit: Annotated[int, QueryParameter(ge=1, le=100_000)] = 50,
) -> QuarantineList:
    quarantine = context(request).quarantine
    if quarantine is None:
        return QuarantineList(reports=[], total=0)
    found, total = await asyncio.to_thread(quarantine.newest, limit)
    return QuarantineList(reports=[_shown(kept) for kept in found], total=total)


@get(
    "/{name:str}",
    media_type=RFC822,
    responses=problem_responses(401, 403, 404),
    summary="One report as received (message/rfc822)",
)
async def report(request: Request[Any, Any, Any], name: FromPath[str]) -> bytes:
    data = await asyncio.to_thread(_quarantine(request, name).read, name)
    if data is None:
        raise _unknown(name)
    return data


@delete(
    "/{name:str}",
    status_code=200,
    responses=problem_responses(401, 403, 404),
    summary="Delete a report",
)
async def remove(request: Request[Any, Any, Any], name: FromPath[str]) -> QuarantinedReport:
    kept = await asyncio.to_thread(_quarantine(request, name).remove, name)
    if kept is None:
        raise _unknown(name)
    return _shown(kept)


def _quarantine(request: Request[Any, Any, Any], name: str) -> Quarantine:
    quarantine = context(request).quarantine
    if quarantine is None:
        raise _unknown(name)
    return quarantine


def _unknown(name: str) -> NotFoundException:
    return NotFoundException(f"no report {name!r} in the quarantine")


def _shown(kept: Kept) -> QuarantinedReport:
    return QuarantinedReport(
        name=kept.name,
        kind=kept.kind,
        queue_id=kept.queue_id,
        size=kept.size,
        kept_at=kept.kept_at,
    )


admin_quarantine_router = Router(
    path="/admin/quarantine",
    route_handlers=[reports, report, remove],
    opt={"scope": Scope.ADMIN},
    tags=["admin"],
)
