"""Sending (``POST /messages``, ``POST /messages/raw``) and status (``GET /messages/{id}``)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, delete, get, post
from litestar.exceptions import (
    ClientException,
    HTTPException,
    NotFoundException,
)
from litestar.params import FromPath, HeaderParameter, JSONBody

from epoxi.api.auth import acting_tenant, api_key
from epoxi.api.context import ApiContext, context
from epoxi.api.problems import problem_responses
from epoxi.api_types import (
    CancelResponse,
    Queued,
    RawRequest,
    SendRequest,
    SendResponse,
    Suppressed,
)
from epoxi.compose import Attachment, Composer, Draft, Rendered
from epoxi.errors import InvalidField
from epoxi.events.records import Record
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
_SENDING: dict[str, Any] = {  # what both sending routes declare
    "status_code": 202,
    "opt": {"scope": Scope.SEND},
    "responses": problem_responses(400, 401, 403, 409, 413, 415, 422, 503),
    "tags": ["messages"],
}
RENDER_CHUNK = 200  # messages rendered between yields to the event loop


@post("/messages", summary="Send a message to each recipient", **_SENDING)
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
        rendered = await _render_all(composer)
        base = _meta_fields(request, data.send_at, tenant, data.campaign)
        base["metadata"] = _metadata(data.metadata, data.tags) or None
        base["pool"] = _pool(data.ip_pool, ctx)
        base["priority"] = data.priority
        queued, suppressed = await _spool(ctx, composer.envelope_sender, rendered, base)
        return SendResponse(count=len(queued), messages=queued, suppressed=suppressed)

    return await _once(request, data, data.tenant, idempotency_key, queue)


@post("/messages/raw", summary="Send an RFC 5322 message with an explicit envelope", **_SENDING)
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
            **_meta_fields(request, data.send_at, tenant, data.campaign),
            metadata=dict(data.metadata) or None,
            pool=_pool(data.ip_pool, ctx),
            priority=data.priority,
        )
        suppressed = await ctx.inject_many([(meta, body)])
        return SendResponse(
            count=len(meta.recipients),
            messages=[Queued(meta.id, r) for r in meta.recipients],
            suppressed=_suppressed(suppressed),
        )

    return await _once(request, data, data.tenant, idempotency_key, queue)


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


async def _once(
    request: Request[Any, Any, Any],
    data: msgspec.Struct,
    asked_tenant: str | None,
    idempotency_key: str | None,
    queue: Callable[[ApiContext, str], Awaitable[SendResponse]],
) -> Response[SendResponse]:
    """Queue the request, unless its Idempotency-Key was seen: then answer as the first time."""
    ctx = context(request)
    tenant = acting_tenant(request, asked_tenant, "sends for")
    fingerprint = hashlib.sha256(msgspec.json.encode(data)).hexdigest()
    async with _idempotent(ctx, tenant, idempotency_key, fingerprint) as remembered:
        if remembered.response is None:
            remembered.response = await queue(ctx, tenant)
        return Response(remembered.response, status_code=202)


class _Remembered:
    def __init__(self) -> None:
        self.response: SendResponse | None = None


class _idempotent:
    """Returns the first response for a repeated key; saves the response of a new one."""

    def __init__(self, ctx: ApiContext, tenant: str, key: str | None, fingerprint: str) -> None:
        self.ctx, self.tenant, self.key, self.fingerprint = ctx, tenant, key, fingerprint
        self.remembered = _Remembered()

    async def __aenter__(self) -> _Remembered:
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
            first = msgspec.json.decode(raw, type=SendResponse)
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


async def _render_all(composer: Composer) -> list[Rendered]:
    """Every recipient's message, before anything is spooled (an error queues nothing)."""
    rendered = []
    for index, (address, to_header) in enumerate(composer.recipients, 1):
        rendered.append(composer.render(address, to_header))
        if index % RENDER_CHUNK == 0:
            await asyncio.sleep(0)  # let SMTP sessions and other requests run
    return rendered


async def _spool(
    ctx: ApiContext, sender: str, rendered: list[Rendered], base: dict[str, Any]
) -> tuple[list[Queued], list[Suppressed]]:
    """Commit the messages to the spool in groups; returns once all are durable, with the
    recipients that were suppressed (their messages are not spooled)."""
    queued: list[Queued] = []
    suppressed: list[Suppressed] = []
    batch = ctx.settings.api.spool_batch
    for start in range(0, len(rendered), batch):
        items = []
        for message in rendered[start : start + batch]:
            meta = MessageMeta(
                id=new_message_id(),
                sender=sender,
                recipients=[message.recipient],
                size=len(message.body),
                smtputf8=message.smtputf8,
                body_8bit=not message.body.isascii(),
                **base,
            )
            items.append((meta, message.body))
        suppressed += _suppressed(await ctx.inject_many(items))
        queued += [Queued(meta.id, meta.recipients[0]) for meta, _ in items if meta.recipients]
    return queued, suppressed


def _suppressed(records: list[Record]) -> list[Suppressed]:
    return [Suppressed(r.message_id, r.recipient, r.reason) for r in records]


def _meta_fields(
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


def _metadata(metadata: dict[str, str], tags: list[str]) -> dict[str, str]:
    result = dict(metadata)
    if tags:
        result["tags"] = ",".join(tags)
    return result


def _pool(ip_pool: str | None, ctx: ApiContext) -> str:
    """The egress pool asked for ("" for the tenant's or the default); an unknown one is a
    422, never a silent fallback."""
    if not ip_pool:
        return ""
    if not ctx.admin.known_pool(ip_pool):
        known = ", ".join(p.name for p in ctx.admin.pool_list().pools)
        raise InvalidField("ip_pool", f"no egress pool {ip_pool!r}; the pools are: {known}")
    return ip_pool


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
