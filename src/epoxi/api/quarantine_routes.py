"""``/admin/quarantine``: the reports the feedback mailbox kept (``data_dir/bounces``).

The directory is one for all workers, so whichever answers has them all. A node without a
bounce domain keeps none: an empty list, and every name is unknown."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import msgspec
from litestar import Request, Router, delete, get
from litestar.exceptions import NotFoundException
from litestar.params import FromPath, QueryParameter

from epoxi.api.context import context
from epoxi.api.problems import problem_responses
from epoxi.api_types import QuarantinedReport, QuarantineList
from epoxi.ingest.feedback import Kept, Quarantine
from epoxi.store.keys import Scope

T = TypeVar("T")

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
    return await _named(request, name, Quarantine.read)


@delete(
    "/{name:str}",
    status_code=200,
    responses=problem_responses(401, 403, 404),
    summary="Delete a report",
)
async def remove(request: Request[Any, Any, Any], name: FromPath[str]) -> QuarantinedReport:
    return _shown(await _named(request, name, Quarantine.remove))


async def _named(
    request: Request[Any, Any, Any], name: str, work: Callable[[Quarantine, str], T | None]
) -> T:
    """``work`` done on the named report in a thread; 404 when there is no such report."""
    quarantine = context(request).quarantine
    done = None if quarantine is None else await asyncio.to_thread(work, quarantine, name)
    if done is None:
        raise NotFoundException(f"no report {name!r} in the quarantine")
    return done


def _shown(kept: Kept) -> QuarantinedReport:
    return msgspec.convert(kept, QuarantinedReport, from_attributes=True)


admin_quarantine_router = Router(
    path="/admin/quarantine",
    route_handlers=[reports, report, remove],
    opt={"scope": Scope.ADMIN},
    tags=["admin"],
)
