"""``/event-webhooks``: applications register endpoints for their events; ``/admin/webhooks``:
operators see each endpoint's backlog and replay or drop it.

A tenant's API key sees and makes only its tenant's endpoints (their events are its own);
an operator's key may name a tenant, or none for every tenant's events.
"""

from __future__ import annotations

import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import msgspec
from litestar import Request, Router, delete, get, post
from litestar.exceptions import NotFoundException
from litestar.params import FromPath, JSONBody

from epoxi.api.auth import acting_tenant, api_key
from epoxi.api.context import context
from epoxi.api.problems import problem_responses
from epoxi.api_types import (
    Webhook,
    WebhookBacklog,
    WebhookBacklogs,
    WebhookEvents,
    WebhookList,
    WebhookRequest,
    WebhookTestFired,
)
from epoxi.errors import InvalidField
from epoxi.events.outbound import EVENT_TYPES
from epoxi.store.keys import Scope
from epoxi.store.webhooks import Endpoint
from epoxi.webhooks.outbox import Webhooks
from epoxi.webhooks.signing import new_secret

_KNOWN = frozenset(EVENT_TYPES.values())


@post(
    "/",
    status_code=201,
    responses=problem_responses(400, 401, 403, 415, 422),
    summary="Register an endpoint for events; the answer holds its signing secret",
)
async def create(request: Request[Any, Any, Any], data: JSONBody[WebhookRequest]) -> Webhook:
    unknown = sorted(set(data.events) - _KNOWN)
    if unknown:
        known = ", ".join(sorted(_KNOWN))
        raise InvalidField("events", f"unknown event types {unknown}; known: {known}")
    endpoint = Endpoint(
        id=f"wh_{uuid.uuid4().hex[:20]}",
        tenant=acting_tenant(request, data.tenant),
        url=_checked_url(data.url),
        events=frozenset(data.events),
        secret=new_secret(),
        created_at=time.time(),
    )
    hooks = _webhooks(request)
    await hooks.store.create(endpoint)
    await hooks.refresh()
    return _shown(endpoint, secret=True)


@get("/", responses=problem_responses(401, 403), summary="The endpoints this key may see")
async def list_all(request: Request[Any, Any, Any]) -> WebhookList:
    return WebhookList(webhooks=[_shown(e) for e in await _visible(request)])


@get("/{webhook_id:str}", responses=problem_responses(401, 403, 404), summary="One endpoint")
async def show(request: Request[Any, Any, Any], webhook_id: FromPath[str]) -> Webhook:
    return _shown(await _one(request, webhook_id))


@delete(
    "/{webhook_id:str}",
    status_code=200,
    responses=problem_responses(401, 403, 404),
    summary="Remove an endpoint and the events waiting for it",
)
async def remove(request: Request[Any, Any, Any], webhook_id: FromPath[str]) -> Webhook:
    endpoint = await _one(request, webhook_id)
    hooks = _webhooks(request)
    await hooks.store.delete(endpoint.id)
    await hooks.refresh()
    return _shown(endpoint)


@post(
    "/{webhook_id:str}/test",
    status_code=202,
    responses=problem_responses(400, 401, 403, 404, 415),
    summary="Send the endpoint a test event (body {})",
)
async def test_fire(request: Request[Any, Any, Any], webhook_id: FromPath[str]) -> WebhookTestFired:
    endpoint = await _one(request, webhook_id)
    event_id = uuid.uuid4().hex
    event = {"id": event_id, "type": "test", "time": time.time(), "webhook": endpoint.id}
    hooks = _webhooks(request)
    hooks.add(endpoint.id, msgspec.json.encode(event))
    await hooks.flush()
    return WebhookTestFired(event_id=event_id)


@post(
    "/{webhook_id:str}/rotate",
    status_code=200,
    responses=problem_responses(400, 401, 403, 404, 415),
    summary="A new signing secret; the old one still signs for webhooks.rotation_grace",
)
async def rotate(request: Request[Any, Any, Any], webhook_id: FromPath[str]) -> Webhook:
    endpoint = await _one(request, webhook_id)
    hooks = _webhooks(request)
    grace = context(request).settings.webhooks.rotation_grace
    rotated = await hooks.store.rotate(endpoint.id, new_secret(), grace)
    if rotated is None:
        raise NotFoundException(f"no webhook {webhook_id!r}")
    await hooks.refresh()
    return _shown(rotated, secret=True)


# --------------------------------------------------------------------- operators


@get("/", responses=problem_responses(401, 403), summary="Each endpoint's backlog and health")
async def backlogs(request: Request[Any, Any, Any]) -> WebhookBacklogs:
    hooks = _webhooks(request)
    by_id = {e.id: e for e in hooks.endpoints}
    found = []
    for item in await hooks.store.backlogs(time.time()):
        endpoint = by_id.get(item.endpoint)
        found.append(
            WebhookBacklog(
                id=item.endpoint,
                url=endpoint.url if endpoint else "",
                tenant=(endpoint.tenant or None) if endpoint else None,
                queued=item.queued,
                due=item.due,
                oldest=item.oldest,
                failures=item.failures,
                last_error=item.last_error or None,
                last_error_at=item.last_error_at or None,
                last_success_at=item.last_success_at or None,
                dropped=item.dropped,
            )
        )
    return WebhookBacklogs(webhooks=found)


@post(
    "/{webhook_id:str}/replay",
    status_code=200,
    responses=problem_responses(400, 401, 403, 404, 415),
    summary="Send an endpoint's waiting events now, without waiting for their retry time",
)
async def replay(request: Request[Any, Any, Any], webhook_id: FromPath[str]) -> WebhookEvents:
    endpoint = await _one(request, webhook_id)
    count = await _webhooks(request).store.replay(endpoint.id, time.time())
    return WebhookEvents(id=endpoint.id, events=count)


@post(
    "/{webhook_id:str}/drop",
    status_code=200,
    responses=problem_responses(400, 401, 403, 404, 415),
    summary="Forget an endpoint's waiting events",
)
async def drop(request: Request[Any, Any, Any], webhook_id: FromPath[str]) -> WebhookEvents:
    endpoint = await _one(request, webhook_id)
    count = await _webhooks(request).store.drop(endpoint.id)
    return WebhookEvents(id=endpoint.id, events=count)


# --------------------------------------------------------------------- helpers


def _checked_url(url: str) -> str:
    """An http(s) URL with a host (and a valid port), or a 422 saying what is wrong."""
    try:
        parts = urlsplit(url)
        host, _ = parts.hostname, parts.port  # .port raises for a port that is not a number
    except ValueError as exc:
        raise InvalidField("url", f"not a valid URL: {exc}") from exc
    if parts.scheme not in ("http", "https") or not host:
        raise InvalidField("url", "an http:// or https:// URL with a host name is needed")
    return url


def _webhooks(request: Request[Any, Any, Any]) -> Webhooks:
    hooks = context(request).webhooks
    if hooks is None:
        raise NotFoundException("webhooks are not served by this node")
    return hooks


async def _visible(request: Request[Any, Any, Any]) -> list[Endpoint]:
    hooks = _webhooks(request)
    await hooks.refresh()
    key = api_key(request)
    if key is None or not key.tenant:
        return hooks.endpoints
    return [e for e in hooks.endpoints if e.tenant == key.tenant]


async def _one(request: Request[Any, Any, Any], webhook_id: str) -> Endpoint:
    """The endpoint, if this key may see it: another tenant's is not found, as if unknown."""
    for endpoint in await _visible(request):
        if endpoint.id == webhook_id:
            return endpoint
    raise NotFoundException(f"no webhook {webhook_id!r}")


def _shown(endpoint: Endpoint, *, secret: bool = False) -> Webhook:
    return Webhook(
        id=endpoint.id,
        url=endpoint.url,
        events=sorted(endpoint.events),
        tenant=endpoint.tenant or None,
        created_at=endpoint.created_at,
        secret=endpoint.secret if secret else None,
        old_secret_until=endpoint.old_secret_until or None,
    )


webhook_router = Router(
    path="/event-webhooks",
    route_handlers=[create, list_all, show, remove, test_fire, rotate],
    opt={"scope": Scope.SEND},
    tags=["webhooks"],
)
admin_webhook_router = Router(
    path="/admin/webhooks",
    route_handlers=[backlogs, replay, drop],
    opt={"scope": Scope.ADMIN},
    tags=["admin"],
)
