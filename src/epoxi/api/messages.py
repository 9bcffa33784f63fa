"""Sending (``POST /messages``, ``POST /messages/raw``) and status (``GET /messages/{id}``)."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any

from litestar import Request, Response, delete, get, post
from litestar.exceptions import (
    ClientException,
    NotFoundException,
)
from litestar.params import FromPath, HeaderParameter, JSONBody

from epoxi.api.auth import api_key
from epoxi.api.context import ApiContext, context
from epoxi.api.problems import problem_responses
from epoxi.api.sending import (
    SENDING,
    once,
    render_all,
    sending_fields,
    spool,
    suppressed_of,
    valid_pool,
)
from epoxi.api_types import (
    CancelResponse,
    Queued,
    RawRequest,
    SendRequest,
    SendResponse,
)
from epoxi.compose import Attachment, Composer, Draft
from epoxi.errors import InvalidField
from epoxi.ids import new_message_id
from epoxi.message import MessageMeta
from epoxi.smtp.parser import CommandError, parse_mailbox
from epoxi.store.keys import Scope
from epoxi.store.status import MessageStatus

IdempotencyKey = HeaderParameter(
    name="Idempotency-Key",
    required=False,
    max_length=255,
    description="the same key (per tenant, for 24 h) returns the first response, queues nothing",
)


@post("/messages", summary="Send a message to each recipient", **SENDING)
async def send(
    request: Request[Any, Any, Any],
    data: JSONBody[SendRequest],
    idempotency_key: Annotated[str | None, IdempotencyKey] = None,
) -> Response[SendResponse]:
    async def queue(ctx: ApiContext, tenant: str) -> SendResponse:
        limit = ctx.settings.api.max_recipients
        message = data.message
        if len(message.to) + len(message.cc) + len(message.bcc) > limit:
            raise InvalidField("message.to", f"at most {limit} recipients per request")
        composer = Composer(_draft(data), ctx.settings.hostname, ctx.settings.smtp.max_message_size)
        rendered = await render_all(composer)
        base = sending_fields(request, data.send_at, tenant, data.campaign)
        base["metadata"] = _metadata(data.metadata, data.tags) or None
        base["pool"] = valid_pool(data.ip_pool, ctx)
        base["priority"] = data.priority
        queued, suppressed = await spool(ctx, composer.envelope_sender, rendered, base)
        return SendResponse(count=len(queued), messages=queued, suppressed=suppressed)

    message = data.message
    count = len(message.to) + len(message.cc) + len(message.bcc)
    return await once(request, data, data.tenant, idempotency_key, queue, SendResponse, count)


@post("/messages/raw", summary="Send an RFC 5322 message with an explicit envelope", **SENDING)
async def send_raw(
    request: Request[Any, Any, Any],
    data: JSONBody[RawRequest],
    idempotency_key: Annotated[str | None, IdempotencyKey] = None,
) -> Response[SendResponse]:
    async def queue(ctx: ApiContext, tenant: str) -> SendResponse:
        sender = _envelope_address("from", data.from_) if data.from_ else ""
        recipients = [_envelope_address(f"to[{i}]", r) for i, r in enumerate(data.to)]
        body = _crlf(data.content)  # ingest removes control headers
        limit = ctx.settings.smtp.max_message_size
        if len(body) > limit:
            raise ClientException(
                f"message is {len(body)} octets; the limit is {limit}", status_code=413
            )
        if b"\r\n\r\n" not in body and b":" not in body.split(b"\r\n", 1)[0]:
            raise InvalidField("content", "expected an RFC 5322 message: header fields first")
        meta = MessageMeta(
            id=new_message_id(),
            sender=sender,
            recipients=recipients,
            size=len(body),
            smtputf8=not (sender.isascii() and all(r.isascii() for r in recipients)),
            body_8bit=not body.isascii(),
            **sending_fields(request, data.send_at, tenant, data.campaign),
            metadata=dict(data.metadata) or None,
            pool=valid_pool(data.ip_pool, ctx),
            priority=data.priority,
        )
        suppressed = await ctx.inject_many([(meta, body)])
        return SendResponse(
            count=len(meta.recipients),
            messages=[Queued(meta.id, r) for r in meta.recipients],
            suppressed=suppressed_of(suppressed),
        )

    return await once(
        request, data, data.tenant, idempotency_key, queue, SendResponse, len(data.to)
    )


@get(
    "/messages/{message_id:str}",
    opt={"scope": Scope.READ},
    responses=problem_responses(401, 403, 404),
    summary="A message's state and history",
    tags=["messages"],
)
async def status(request: Request[Any, Any, Any], message_id: FromPath[str]) -> MessageStatus:
    found = await _status(request, message_id)
    if found is None:  # not yet written by the worker that took it: that one flushes first
        found = next(iter(await context(request).peers.ask(request, MessageStatus)), None)
    if found is None:
        raise NotFoundException(f"no message {message_id!r}")
    return found


@delete(
    "/messages/{message_id:str}",
    opt={"scope": Scope.SEND},
    status_code=200,
    responses=problem_responses(401, 403, 404, 409),
    summary="Cancel a message that has not been sent yet (scheduled or deferred)",
    tags=["messages"],
)
async def cancel(request: Request[Any, Any, Any], message_id: FromPath[str]) -> CancelResponse:
    ctx = context(request)
    known = await _status(request, message_id) is not None
    cancelled = ctx.admin.cancel(message_id) if known else 0
    if ctx.peers.is_forwarded(request):
        if not known:
            raise NotFoundException(f"no message {message_id!r}")
        return CancelResponse(id=message_id, cancelled=cancelled)  # 0: not waiting here
    if not cancelled:
        answers = await ctx.peers.ask(request, CancelResponse)  # the worker that holds it
        known = known or bool(answers)
        cancelled = sum(answer.cancelled for answer in answers)
    if not known:
        raise NotFoundException(f"no message {message_id!r}")
    if not cancelled:
        raise ClientException(
            f"message {message_id!r} is not waiting to be sent: it was sent, bounced or is on "
            "a connection now; GET /messages/{id} tells which",
            status_code=409,
        )
    return CancelResponse(id=message_id, cancelled=cancelled)


# --------------------------------------------------------------------- helpers


async def _status(request: Request[Any, Any, Any], message_id: str) -> MessageStatus | None:
    """The message, if it exists for this key: another tenant's is None, as if unknown."""
    found = await context(request).status.message(message_id)
    key = api_key(request)
    if found is None or (key is not None and key.tenant and found.tenant != key.tenant):
        return None
    return found


def _draft(data: SendRequest) -> Draft:
    message = data.message
    attachments = []
    for index, item in enumerate(message.attachments):
        try:
            content = base64.b64decode(item.content, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidField(f"message.attachments[{index}].content", "not valid base64") from exc
        attachments.append(Attachment(item.filename, item.content_type, content))
    return Draft(
        sender=message.from_,
        to=message.to,
        cc=message.cc,
        bcc=message.bcc,
        reply_to=message.reply_to,
        subject=message.subject,
        text=message.text,
        html=message.html,
        headers=message.headers,
        attachments=attachments,
        data=message.data,
    )


def _metadata(metadata: dict[str, str], tags: list[str]) -> dict[str, str]:
    result = dict(metadata)
    if tags:
        result["tags"] = ",".join(tags)
    return result


def _envelope_address(where: str, address: str) -> str:
    if any(c in address for c in "\r\n\x00<> ") or not address.isprintable():
        raise InvalidField(where, f"not a valid envelope address: {address!r}")
    try:
        parse_mailbox(address)
    except CommandError as exc:
        raise InvalidField(where, f"not a valid envelope address: {address!r}") from exc
    return address


def _crlf(text: str) -> bytes:
    """The content with every line ending as CRLF, ending in one."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return ("\r\n".join(lines) + "\r\n").encode()
