"""What the sending routes share: idempotency, rendering, committing to the spool in groups.

``POST /messages``, ``POST /messages/raw`` and ``POST /send`` answer 202 only once every message
is committed (fsynced) to the spool; a repeated idempotency key answers the first response.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Generic, Protocol, TypeVar

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, PermissionDeniedException

from epoxi.api.auth import acting_tenant
from epoxi.api.context import ApiContext, context
from epoxi.api.problems import problem_responses
from epoxi.api_types import Queued, Suppressed
from epoxi.compose import Composer, Rendered
from epoxi.compose.tracking import Tracker
from epoxi.errors import InvalidField
from epoxi.events.records import Record
from epoxi.ids import new_message_id
from epoxi.message import MessageMeta
from epoxi.store.keys import Scope
from epoxi.store.platform import Tenant, TenantStatus

TENANT_STATE_TTL = 1.0  # seconds a tenant's status is taken as read


class Answer(Protocol):
    idempotency_reused: bool


A = TypeVar("A", bound=Answer)

SENDING: dict[str, Any] = {  # what both sending routes declare
    "status_code": 202,
    "opt": {"scope": Scope.SEND},
    "responses": problem_responses(400, 401, 403, 409, 413, 415, 422, 429, 503),
    "tags": ["messages"],
}


RENDER_CHUNK = 200  # messages rendered between yields to the event loop


async def once(
    request: Request[Any, Any, Any],
    data: msgspec.Struct,
    asked_tenant: str | None,
    idempotency_key: str | None,
    queue: Callable[[ApiContext, str], Awaitable[A]],
    answer: type[A],
    recipients: int = 1,
) -> Response[A]:
    """Queue the request, unless its idempotency key was seen: then answer as the first time.
    ``recipients`` count against the tenant's daily limit when it is queued."""
    ctx = context(request)
    tenant = acting_tenant(request, asked_tenant, "sends for")
    platform_tenant = await admit(ctx, tenant)
    fingerprint = hashlib.sha256(msgspec.json.encode(data)).hexdigest()
    async with _idempotent(ctx, tenant, idempotency_key, fingerprint, answer) as remembered:
        if remembered.response is None:
            await count_recipients(ctx, platform_tenant, recipients)
            remembered.response = await queue(ctx, tenant)
        return Response(remembered.response, status_code=202)


async def admit(ctx: ApiContext, tenant_id: str) -> Tenant | None:
    """The platform tenant a send is for (None: a label only, no limits), once it is let in:
    a suspended one is a 403, one over its request rate a 429. Tenants are read at most once
    a second (a send a moment after a suspension is held, not lost)."""
    if not tenant_id:
        return None
    now = time.monotonic()
    cached = ctx.tenant_states.get(tenant_id)
    if cached is None or now - cached[0] > TENANT_STATE_TTL:
        cached = ctx.tenant_states[tenant_id] = (now, await ctx.platform.tenant(tenant_id))
    tenant = cached[1]
    if tenant is None:
        return None
    if tenant.status is TenantStatus.SUSPENDED:
        raise PermissionDeniedException(
            f"tenant {tenant_id!r} is suspended: its sends are refused until it is active again"
            f' (PATCH /tenants/{tenant_id} {{"status": "active"}})'
        )
    ctx.limits.check_request(tenant)
    return tenant


def tracker_for(ctx: ApiContext, tenant: Tenant, asked: bool | None) -> Tracker | None:
    """The tracker when the send is tracked (``asked``, else the tenant's setting)."""
    if not (tenant.tracking if asked is None else asked):
        return None
    if ctx.tracker is None:
        raise InvalidField(
            "tracking", "this node does not track: set [tracking] base_url to its public address"
        )
    return ctx.tracker


async def count_recipients(ctx: ApiContext, tenant: Tenant | None, count: int) -> None:
    """Count a send's recipients against its tenant's daily limit (a 429 over it)."""
    if tenant is not None:
        await ctx.limits.check_recipients(tenant, count)


class _Remembered(Generic[A]):
    def __init__(self) -> None:
        self.response: A | None = None


class _idempotent(Generic[A]):
    """Returns the first response for a repeated key; saves the response of a new one."""

    def __init__(
        self, ctx: ApiContext, tenant: str, key: str | None, fingerprint: str, answer: type[A]
    ) -> None:
        self.ctx, self.tenant, self.key, self.fingerprint = ctx, tenant, key, fingerprint
        self.answer = answer
        self.remembered: _Remembered[A] = _Remembered()

    async def __aenter__(self) -> _Remembered[A]:
        if self.key is None:
            return self.remembered
        slot = (self.tenant, self.key)
        if slot in self.ctx.idempotency_in_flight:
            raise HTTPException(
                "a request with this Idempotency-Key is still being processed", status_code=409
            )
        ttl = self.ctx.settings.api.idempotency_ttl
        saved = await self.ctx.status.idempotent_response(self.tenant, self.key, ttl)
        if saved is not None:
            fingerprint, raw = saved
            if fingerprint != self.fingerprint:
                raise HTTPException(
                    "this Idempotency-Key was used with a different request", status_code=409
                )
            first = msgspec.json.decode(raw, type=self.answer)
            first.idempotency_reused = True
            self.remembered.response = first
            self.key = None  # nothing to save on the way out
            return self.remembered
        self.ctx.idempotency_in_flight.add(slot)
        return self.remembered

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if self.key is None:
            return
        slot = (self.tenant, self.key)
        try:
            if exc_type is None and self.remembered.response is not None:
                await self.ctx.status.save_idempotent_response(
                    self.tenant,
                    self.key,
                    self.fingerprint,
                    msgspec.json.encode(self.remembered.response),
                )
        finally:
            self.ctx.idempotency_in_flight.discard(slot)


async def render_all(composer: Composer) -> list[Rendered]:
    """Every recipient's message, before anything is spooled (an error queues nothing)."""
    rendered = []
    for index, (address, to_header) in enumerate(composer.recipients, 1):
        rendered.append(composer.render(address, to_header))
        if index % RENDER_CHUNK == 0:
            await asyncio.sleep(0)  # let SMTP sessions and other requests run
    return rendered


async def spool(
    ctx: ApiContext,
    sender: str,
    rendered: list[Rendered],
    base: dict[str, Any],
    ids: list[str] | None = None,
) -> tuple[list[Queued], list[Suppressed]]:
    """Commit the messages to the spool in groups (with ``ids``, else new ones); returns once
    all are durable, with the recipients that were suppressed (their messages are not
    spooled)."""
    queued: list[Queued] = []
    suppressed: list[Suppressed] = []
    batch = ctx.settings.api.spool_batch
    for start in range(0, len(rendered), batch):
        items = []
        for index, message in enumerate(rendered[start : start + batch], start):
            meta = MessageMeta(
                id=ids[index] if ids is not None else new_message_id(),
                sender=sender,
                recipients=[message.recipient],
                size=len(message.body),
                smtputf8=message.smtputf8,
                body_8bit=not message.body.isascii(),
                **base,
            )
            items.append((meta, message.body))
        suppressed += suppressed_of(await ctx.inject_many(items))
        queued += [Queued(meta.id, meta.recipients[0]) for meta, _ in items if meta.recipients]
    return queued, suppressed


def suppressed_of(records: list[Record]) -> list[Suppressed]:
    return [Suppressed(r.message_id, r.recipient, r.reason) for r in records]


def sending_fields(
    request: Request[Any, Any, Any], send_at: datetime | None, tenant: str, campaign: str | None
) -> dict[str, Any]:
    now = time.time()
    due = _due(send_at, now)
    return {
        "received_at": now,
        "origin": "http",
        "peer": request.client.host if request.client else "",
        "tenant": tenant,
        "campaign": campaign or "",
        "due": due,
        "not_before": due,  # max_age counts from send_at
    }


def _due(send_at: datetime | None, now: float) -> float:
    if send_at is None:
        return 0.0
    if send_at.tzinfo is None:
        send_at = send_at.replace(tzinfo=UTC)  # a time without a zone is UTC
    due = send_at.timestamp()
    return due if due > now else 0.0


def valid_pool(ip_pool: str | None, ctx: ApiContext) -> str:
    """The egress pool asked for ("" for the tenant's or the default); an unknown one is a
    422, never a silent fallback."""
    if not ip_pool:
        return ""
    if not ctx.admin.known_pool(ip_pool):
        known = ", ".join(p.name for p in ctx.admin.pool_list().pools)
        raise InvalidField("ip_pool", f"no egress pool {ip_pool!r}; the pools are: {known}")
    return ip_pool
