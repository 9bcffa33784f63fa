"""``POST /send``: one message from a stored template, with the Mailsystem seed's shapes.

The tenant must exist and be active (a suspended one is a 403); the template must be the
tenant's. The ``idempotency_key`` in the body works as the ``Idempotency-Key`` header does for
``POST /messages``: the same key again answers the first ``email_id`` with
``idempotency_reused: true``; with a different body it is a 409.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Literal

import msgspec
from litestar import Request, Response, post
from litestar.exceptions import NotFoundException
from litestar.params import JSONBody

from epoxi.api.context import ApiContext
from epoxi.api.problems import problem_responses
from epoxi.api.sending import SENDING, once, sending_fields, spool, tracker_for, valid_pool
from epoxi.api_types import BulkSend, TemplateSend, TemplateSent
from epoxi.compose import ComposeError, Composer, Draft, MessageTooLarge
from epoxi.errors import InvalidField
from epoxi.ids import new_message_id
from epoxi.store.platform import Email, TemplateVersion, Tenant


@post(
    "/send",
    summary="Send one message from a stored template (Mailsystem's /send)",
    **{**SENDING, "responses": problem_responses(400, 401, 403, 404, 409, 413, 415, 422, 429, 503)},
)
async def send_template(
    request: Request[Any, Any, Any], data: JSONBody[TemplateSend]
) -> Response[TemplateSent]:
    async def queue(ctx: ApiContext, tenant_id: str) -> TemplateSent:
        return await send_one(ctx, request, tenant_id, data)

    return await once(request, data, data.tenant_id, data.idempotency_key, queue, TemplateSent)


async def send_one(
    ctx: ApiContext,
    request: Request[Any, Any, Any],
    tenant_id: str,
    data: TemplateSend,
    resent_from: str = "",
) -> TemplateSent:
    """Render the template for the recipient, spool the message and keep its email row."""
    tenant, version, sender, base = await stored_send(ctx, request, tenant_id, data)
    recipient = data.recipient
    values = {"recipient": {"email": recipient.email, "name": recipient.name}, **data.variables}
    draft = stored_draft(version, sender, [to_header(recipient.email, recipient.name)])
    composer = template_composer(ctx, draft)
    ((address, header),) = composer.recipients
    message_id = new_message_id()
    tracker = tracker_for(ctx, tenant, data.tracking)
    tracked = (
        None if tracker is None else partial(tracker.html, message_id=message_id, recipient=address)
    )
    try:
        rendered = composer.render(address, header, values, tracked)
    except MessageTooLarge:
        raise
    except ComposeError as exc:  # the template compiled when stored: the data is wrong
        raise InvalidField("variables", str(exc)) from exc
    base["metadata"] = message_metadata(data.metadata)
    queued, suppressed = await spool(
        ctx, composer.envelope_sender, [rendered], base, ids=[message_id]
    )
    email_id = queued[0].id if queued else suppressed[0].id
    status: Literal["queued", "scheduled", "suppressed"] = (
        "suppressed" if suppressed else "scheduled" if base["due"] else "queued"
    )
    email = Email(
        id=email_id,
        tenant_id=tenant.id,
        recipient=rendered.recipient,
        recipient_name=recipient.name,
        template_id=version.id,
        template_version=version.version,
        metadata=data.metadata or None,
        variables=data.variables or None,
        resent_from=resent_from,
        sender=sender,
        status=status,
        created_at=base["received_at"],
        updated_at=base["received_at"],
    )
    await ctx.platform.add_emails([email])
    return TemplateSent(
        email_id=email_id, status=status, template_id=version.id, template_version=version.version
    )


async def stored_send(
    ctx: ApiContext,
    request: Request[Any, Any, Any],
    tenant_id: str,
    data: TemplateSend | BulkSend,
) -> tuple[Tenant, TemplateVersion, str, dict[str, Any]]:
    """What /send and /send/bulk check first: the tenant (it must exist; a suspended one was
    refused before), its template version and the From. Returns them with the fields every
    message of the send carries."""
    if not tenant_id:
        raise InvalidField("tenant_id", "name the tenant the mail is sent for")
    tenant = await ctx.platform.tenant(tenant_id)
    if tenant is None:
        raise InvalidField("tenant_id", f"no tenant {tenant_id!r}: create it with POST /tenants")
    version = await _tenant_template(ctx, tenant, data.template_id, data.template_version)
    sender = data.from_ or tenant.sender
    if not sender:
        raise InvalidField("from", f"give one, or set tenant {tenant.id!r}'s sender")
    base = sending_fields(request, data.send_at, tenant.id, data.campaign)
    base["pool"] = valid_pool(data.ip_pool, ctx) or tenant.default_pool
    base["template"] = version.id
    return tenant, version, sender, base


async def _tenant_template(
    ctx: ApiContext, tenant: Tenant, template_id: str, version: int | None
) -> TemplateVersion:
    """The template version a send uses: the active one, or the one pinned."""
    found = await ctx.platform.template(template_id, version)
    if found is None or found.tenant_id != tenant.id:
        what = f"version {version} of template" if version is not None else "template"
        raise NotFoundException(f"tenant {tenant.id!r} has no {what} {template_id!r}")
    return found


def stored_draft(version: TemplateVersion, sender: str, to: list[str]) -> Draft:
    """A draft of a stored template version (each recipient's values given when rendered)."""
    return Draft(
        sender=sender,
        to=to,
        subject=version.subject_template,
        text=version.text_template,
        html=version.html_template or None,
        text_from_html=version.text_template is None,
    )


def template_composer(ctx: ApiContext, draft: Draft) -> Composer:
    """The draft checked, with errors named by the fields of /send and /send/bulk."""
    try:
        return Composer(draft, ctx.settings.hostname, ctx.settings.smtp.max_message_size)
    except ComposeError as exc:
        raise InvalidField(_field(exc.field), str(exc)) from exc


def to_header(address: str, name: str) -> str:
    """The To of a recipient given as an address and a display name."""
    if not name:
        return address
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + f'" <{address}>'


def _field(field: str) -> str:
    """A composer's field (``message.from``) as /send names it."""
    return {"message.from": "from", "message.to": "recipient.email"}.get(field, "template_id")


def message_metadata(metadata: dict[str, Any]) -> dict[str, str] | None:
    """Metadata as the message carries it: strings as they are, other values as JSON."""
    if not metadata:
        return None
    return {
        key: value if isinstance(value, str) else msgspec.json.encode(value).decode()
        for key, value in metadata.items()
    }
