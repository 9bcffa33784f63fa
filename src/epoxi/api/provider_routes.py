"""``POST /webhooks/{provider}``: events an upstream provider reports (delivered, bounced,
complained, ...). The call is authenticated by its signature, not an API key: a provider
cannot hold one (epoxi.webhooks.provider has the scheme)."""

from __future__ import annotations

from typing import Any

from litestar import Request, post
from litestar.exceptions import NotFoundException
from litestar.params import FromPath

from epoxi.api.context import context
from epoxi.api.problems import problem_responses
from epoxi.api_types import ProviderReceipt
from epoxi.webhooks.provider import HEADERS


@post(
    "/webhooks/{provider:str}",
    status_code=200,
    responses=problem_responses(400, 401, 404, 415, 422),
    summary="Take a provider's signed events (Webhook-Signature: t=...,v1=...)",
    description=(
        "Each event becomes a record of the message it names (email_id): delivered, opened,"
        " clicked, bounced, deferred, complained, unsubscribed. An event id applied before is"
        " a duplicate and changes nothing; a call not signed with the provider's secret"
        " (WEBHOOK_SECRET_<PROVIDER>) is a 401 and changes nothing."
    ),
    tags=["webhooks"],
    opt={"signed": True},
)
async def provider_events(
    request: Request[Any, Any, Any], provider: FromPath[str]
) -> ProviderReceipt:
    service = context(request).provider_events
    if service is None:
        raise NotFoundException("provider webhooks are not served by this node")
    signature = next((v for h in HEADERS if (v := request.headers.get(h))), None)
    return await service.receive(provider, signature, await request.body())
