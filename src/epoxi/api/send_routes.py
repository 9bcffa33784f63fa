"""``POST /send``: one message from a stored template, with the Mailsystem seed's shapes.

The tenant must exist and be active (a suspended one is a 403); the template must be the
tenant's. The ``idempotency_key`` in the body works as the ``Idempotency-Key`` header does for
``POST /messages``: the same key again answers the first ``email_id`` with
``idempotency_reused: true``; with a different body it is a 409.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response, post
from litestar.exceptions import NotFoundException
from litestar.params import JSONBody

from epoxi.api.context import ApiContext
from epoxi.api.problems import problem_responses
from epoxi.api.sending import SENDING, once, render_all, sending_fields, spool, valid_pool
from epoxi.api_types import TemplateSend, TemplateSent
from epoxi.compose import ComposeError, Composer, Draft, MessageTooLarge
from epoxi.errors import InvalidField
from epoxi.store.platform import TemplateVersion, Tenant


@post(
    "/send",
    summary="Send one message from a stored template (Mailsystem's /send)",
    **{**SENDING, "responses": problem_responses(400, 401, 403, 404, 409, 413, 415, 422, 503)},
)
async def send_template(
    request: Request[Any, Any, Any], data: JSONBody[TemplateSend]
) -> Response[TemplateSent]:
    async def queue(ctx: ApiContext, tenant_id: str) -> TemplateSent:
        if not tenant_id:
            raise InvalidField("tenant_id", "name the tenant the mail is sent for")
        tenant = await active_tenant(ctx, tenant_id)
        version = await tenant_template(ctx, tenant, data.template_id, data.template_version)
        sender = data.from_ or tenant.sender
        if not sender:
            raise InvalidField("from", f"give one, or set tenant {tenant.id!r}'s sender")
        composer = _composer(ctx, version, sender, data)
        try:
            (rendered,) = await render_all(composer)
        except MessageTooLarge:
            raise
        except ComposeError as exc:  # the template compiled when stored: the data is wrong
            raise InvalidField("variables", str(exc)) from exc
        base = sending_fields(request, data.send_at, tenant.id, data.campaign)
        base["metadata"] = _metadata(data.metadata)
        base["pool"] = valid_pool(data.ip_pool, ctx) or tenant.default_pool
        queued, suppressed = await spool(ctx, composer.envelope_sender, [rendered], base)
        email_id = queued[0].id if queued else suppressed[0].id
        return TemplateSent(
            email_id=email_id,
            status="suppressed" if suppressed else "scheduled" if base["due"] else "queued",
            template_id=version.id,
            template_version=version.version,
        )

    return await once(request, data, data.tenant_id, data.idempotency_key, queue, TemplateSent)


async def active_tenant(ctx: ApiContext, tenant_id: str) -> Tenant:
    """The tenant a send is for: it must exist (``once`` has refused a suspended one)."""
    tenant = await ctx.platform.tenant(tenant_id)
    if tenant is None:
        raise InvalidField("tenant_id", f"no tenant {tenant_id!r}: create it with POST /tenants")
    return tenant


async def tenant_template(
    ctx: ApiContext, tenant: Tenant, template_id: str, version: int | None
) -> TemplateVersion:
    """The template version a send uses: the active one, or the one pinned."""
    found = await ctx.platform.template(template_id, version)
    if found is None or found.tenant_id != tenant.id:
        what = f"version {version} of template" if version is not None else "template"
        raise NotFoundException(f"tenant {tenant.id!r} has no {what} {template_id!r}")
    return found


def _composer(
    ctx: ApiContext, version: TemplateVersion, sender: str, data: TemplateSend
) -> Composer:
    recipient = data.recipient
    to = f"{_quoted(recipient.name)} <{recipient.email}>" if recipient.name else recipient.email
    draft = Draft(
        sender=sender,
        to=[to],
        subject=version.subject_template,
        text=version.text_template,
        html=version.html_template or None,
        data={
            recipient.email: {
                "recipient": {"email": recipient.email, "name": recipient.name},
                **data.variables,
            }
        },
        text_from_html=version.text_template is None,
    )
    try:
        return Composer(draft, ctx.settings.hostname, ctx.settings.smtp.max_message_size)
    except ComposeError as exc:
        raise InvalidField(_field(exc.field), str(exc)) from exc


def _quoted(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _field(field: str) -> str:
    """A composer's field (``message.from``) as /send names it."""
    return {"message.from": "from", "message.to": "recipient.email"}.get(field, "template_id")


def _metadata(metadata: dict[str, Any]) -> dict[str, str] | None:
    """Metadata as the message carries it: strings as they are, other values as JSON."""
    if not metadata:
        return None
    return {
        key: value if isinstance(value, str) else msgspec.json.encode(value).decode()
        for key, value in metadata.items()
    }
