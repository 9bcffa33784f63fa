"""``/dead-letters``: a tenant's mail that failed for good, and sending it again.

A recipient that bounced, expired or was bounced by an operator has a dead letter (the
platform's record feed keeps it, with the last error). An email of ``/send`` or ``/send/bulk``
can be re-sent: its template version is rendered again with the variables it was sent with,
as a new email linked to the old (``resent_from``), once.
"""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Request, Response, get, post
from litestar.exceptions import HTTPException, NotFoundException
from litestar.params import FromPath, JSONBody, QueryParameter

from epoxi.api.auth import acting_tenant
from epoxi.api.context import ApiContext, context
from epoxi.api.email_routes import TenantQuery, as_datetime, moment
from epoxi.api.problems import problem_responses
from epoxi.api.send_routes import send_one
from epoxi.api.sending import admit, count_recipients
from epoxi.api_types import (
    DeadLetterList,
    DeadLetterView,
    RecipientIn,
    ResendIn,
    Resent,
    TemplateSend,
)
from epoxi.store.keys import Scope
from epoxi.store.platform import DeadLetter


@get(
    "/dead-letters",
    opt={"scope": Scope.READ},
    responses=problem_responses(400, 401, 403, 422),
    summary="A tenant's mail that failed for good, newest first",
    tags=["messages"],
)
async def dead_letters(
    request: Request[Any, Any, Any],
    tenant_id: TenantQuery = None,
    before: Annotated[
        str | None,
        QueryParameter(
            max_length=40,
            description="failed before this time (ISO 8601), or a page's next_before",
        ),
    ] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
) -> DeadLetterList:
    ctx = context(request)
    tenant = acting_tenant(request, tenant_id, "reads")
    await ctx.activity.flush()
    until = _before(before) if before is not None else None
    found = await ctx.platform.dead_letters(tenant or None, until, limit + 1)
    more = len(found) > limit
    return DeadLetterList(
        dead_letters=[_view(d) for d in found[:limit]],
        next_before=repr(found[limit - 1].failed_at) if more else None,
    )


@get(
    "/dead-letters/{email_id:str}",
    opt={"scope": Scope.READ},
    responses=problem_responses(401, 403, 404, 422),
    summary="A dead letter",
    tags=["messages"],
)
async def dead_letter(
    request: Request[Any, Any, Any], email_id: FromPath[str], tenant_id: TenantQuery = None
) -> DeadLetterView:
    ctx = context(request)
    await ctx.activity.flush()
    return _view(await _tenants(request, ctx, email_id, tenant_id))


@post(
    "/dead-letters/{email_id:str}/resend",
    status_code=202,
    opt={"scope": Scope.SEND},
    responses=problem_responses(400, 401, 403, 404, 409, 413, 415, 422, 429, 503),
    summary="Send a dead letter again, as a new email linked to it",
    tags=["messages"],
)
async def resend(
    request: Request[Any, Any, Any], email_id: FromPath[str], data: JSONBody[ResendIn]
) -> Response[Resent]:
    ctx = context(request)
    await ctx.activity.flush()
    dead = await _tenants(request, ctx, email_id, data.tenant_id)
    if dead.resent_as:
        raise HTTPException(f"{email_id} was re-sent already, as {dead.resent_as}", status_code=409)
    email = await ctx.platform.email(email_id)
    if email is None or not email.template_id:
        raise HTTPException(
            f"{email_id} was not made from a stored template: only mail of /send and /send/bulk"
            " can be re-sent (send it again the way it was sent)",
            status_code=409,
        )
    await count_recipients(ctx, await admit(ctx, email.tenant_id), 1)
    again = TemplateSend(
        tenant_id=email.tenant_id,
        recipient=RecipientIn(email=email.recipient, name=email.recipient_name),
        template_id=email.template_id,
        template_version=email.template_version,
        variables=email.variables or {},
        metadata=email.metadata or {},
        from_=email.sender or None,
    )
    sent = await send_one(ctx, request, email.tenant_id, again, resent_from=email_id)
    if not await ctx.platform.mark_resent(email_id, sent.email_id):
        raise HTTPException(f"{email_id} was re-sent meanwhile", status_code=409)
    return Response(
        Resent(
            email_id=sent.email_id,
            resent_from=email_id,
            status=sent.status,
            template_id=sent.template_id,
            template_version=sent.template_version,
        ),
        status_code=202,
    )


async def _tenants(
    request: Request[Any, Any, Any], ctx: ApiContext, email_id: str, tenant_id: str | None
) -> DeadLetter:
    """The dead letter, if it is the acting tenant's (another's is a 404, as if unknown)."""
    tenant = acting_tenant(request, tenant_id, "reads")
    found = await ctx.platform.dead_letter(email_id)
    if found is None or (tenant and found.tenant_id != tenant):
        raise NotFoundException(f"no dead letter {email_id!r}")
    return found


def _before(value: str) -> float:
    """A page's cursor (the unix time it gave, exact) or an ISO 8601 time."""
    try:
        return float(value)
    except ValueError:
        return moment("before", value).timestamp()


def _view(dead: DeadLetter) -> DeadLetterView:
    return DeadLetterView(
        email_id=dead.email_id,
        recipient=dead.recipient,
        tenant_id=dead.tenant_id,
        template_id=dead.template_id or None,
        reason=dead.reason,
        last_error=dead.last_error,
        failed_at=as_datetime(dead.failed_at),
        resent_as=dead.resent_as or None,
    )
