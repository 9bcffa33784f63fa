"""``POST /send/bulk`` and ``GET /bulk/{id}``: one stored template to up to 100,000 recipients.

The recipients are rendered and spooled in groups of ``api.spool_batch``, one spool
transaction (fsync) each, and the job's progress is saved after each group, so only one group
of messages is ever held rendered. The 202 comes once every recipient is handled: spooled,
suppressed, or failed with its reason (a bad address, a variable the template needs and the
request lacks); one recipient's error never stops the others.

``idempotency_key``: the same key (per tenant) with the same body answers the job; with
another body, a 409. A job cut short by a crash is picked up where it stopped by the same
request again (the last group before the crash may be sent twice: at least once, never lost).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, get, post
from litestar.exceptions import HTTPException, NotFoundException
from litestar.params import FromPath, JSONBody, QueryParameter

from epoxi.api.auth import acting_tenant, api_key
from epoxi.api.context import ApiContext, context
from epoxi.api.email_routes import as_datetime
from epoxi.api.problems import problem_responses
from epoxi.api.send_routes import (
    message_metadata,
    stored_draft,
    stored_send,
    template_composer,
    to_header,
)
from epoxi.api.sending import (
    RENDER_CHUNK,
    SENDING,
    admit,
    count_recipients,
    tracker_for,
)
from epoxi.api_types import BulkAccepted, BulkProgress, BulkRecipient, BulkSend
from epoxi.compose import ComposeError, Composer, checked_address
from epoxi.compose.tracking import Tracker
from epoxi.ids import new_message_id
from epoxi.message import MessageMeta
from epoxi.store.keys import Scope
from epoxi.store.platform import BulkError, BulkJob, BulkState, Email, TemplateVersion

STALE_JOB = 30.0  # seconds without progress after which a running job is taken as cut short


@post(
    "/send/bulk",
    summary="Send a stored template to many recipients (Mailsystem's /send/bulk)",
    **{**SENDING, "responses": problem_responses(400, 401, 403, 404, 409, 413, 415, 422, 429, 503)},
)
async def send_bulk(
    request: Request[Any, Any, Any], data: JSONBody[BulkSend]
) -> Response[BulkAccepted]:
    ctx = context(request)
    tenant_id = acting_tenant(request, data.tenant_id, "sends for")
    platform_tenant = await admit(ctx, tenant_id)
    tenant, version, sender, base = await stored_send(ctx, request, tenant_id, data)
    # each copy's To is its recipient's; the draft's only shapes the headers
    composer = template_composer(ctx, stored_draft(version, sender, [sender]))
    tracker = tracker_for(ctx, tenant, data.tracking)
    job, reused = await _job(ctx, tenant.id, version, data)
    if job.state is not BulkState.DONE:
        await count_recipients(ctx, platform_tenant, job.total - job.processed)
        if not reused:
            await ctx.platform.create_bulk(job)  # AlreadyExists: a 409 (the same key, a race)
        slot = (tenant.id, f"bulk:{job.id}")
        ctx.idempotency_in_flight.add(slot)
        try:
            job = await _Run(ctx, job, data, composer, base, version, tracker).all()
        finally:
            ctx.idempotency_in_flight.discard(slot)
    return Response(_accepted(job, reused), status_code=202)


@get(
    "/bulk/{bulk_job_id:str}",
    opt={"scope": Scope.READ},
    responses=problem_responses(401, 403, 404, 422),
    summary="A bulk send's progress and its recipients' errors",
    tags=["messages"],
)
async def bulk_progress(
    request: Request[Any, Any, Any],
    bulk_job_id: FromPath[str],
    errors_after: Annotated[
        int, QueryParameter(ge=-1, le=10**9, description="list errors of recipients after it")
    ] = -1,
    errors_limit: Annotated[int, QueryParameter(ge=1, le=10_000)] = 100,
) -> BulkProgress:
    ctx = context(request)
    job = await ctx.platform.bulk(bulk_job_id)
    key = api_key(request)
    if job is None or (key is not None and key.tenant and job.tenant_id != key.tenant):
        raise NotFoundException(f"no bulk job {bulk_job_id!r}")
    errors = await ctx.platform.bulk_errors(job.id, errors_after, errors_limit + 1)
    more = len(errors) > errors_limit
    return BulkProgress(
        bulk_job_id=job.id,
        tenant_id=job.tenant_id,
        template_id=job.template_id,
        template_version=job.template_version,
        status=job.state,
        accepted=job.total,
        processed=job.processed,
        rendered=job.rendered,
        queued=job.queued,
        suppressed=job.suppressed,
        failed=job.failed,
        created_at=as_datetime(job.created_at),
        updated_at=as_datetime(job.updated_at),
        finished_at=None if job.finished_at is None else as_datetime(job.finished_at),
        errors=errors[:errors_limit],
        errors_next=errors[errors_limit - 1].index if more else None,
    )


# --------------------------------------------------------------------- the job


async def _job(
    ctx: ApiContext, tenant_id: str, version: TemplateVersion, data: BulkSend
) -> tuple[BulkJob, bool]:
    """The job to run: a new one (not stored yet), or the one of the same idempotency key
    (reused: True)."""
    fingerprint = hashlib.sha256(msgspec.json.encode(data)).hexdigest()
    key = data.idempotency_key or ""
    if key:
        found = await ctx.platform.bulk_by_key(tenant_id, key)
        if found is not None:
            return _resumable(ctx, found, fingerprint), True
    now = time.time()
    job = BulkJob(
        id=f"bulk_{uuid.uuid4().hex}",
        tenant_id=tenant_id,
        template_id=version.id,
        template_version=version.version,
        idempotency_key=key,
        fingerprint=fingerprint,
        total=len(data.recipients),
        created_at=now,
        updated_at=now,
    )
    return job, False


def _resumable(ctx: ApiContext, job: BulkJob, fingerprint: str) -> BulkJob:
    if job.fingerprint != fingerprint:
        raise HTTPException(
            "this idempotency_key was used with a different request", status_code=409
        )
    running = job.state is BulkState.RUNNING
    here = (job.tenant_id, f"bulk:{job.id}") in ctx.idempotency_in_flight
    if running and (here or time.time() - job.updated_at < STALE_JOB):
        raise HTTPException(
            f"bulk job {job.id} is still being processed: GET /bulk/{job.id} shows its progress",
            status_code=409,
        )
    return job  # done: answered as it was; cut short: picked up where it stopped


@dataclass
class _Group:
    """One group of recipients, rendered, on its way to the spool."""

    end: int  # the index after its last recipient
    items: list[tuple[MessageMeta, bytes]] = field(default_factory=list)
    emails: list[Email] = field(default_factory=list)
    errors: list[BulkError] = field(default_factory=list)


class _Run:
    """Renders, spools and counts the job's recipients, a group at a time: a group is
    rendered while the one before it is committed (two at most are held)."""

    def __init__(
        self,
        ctx: ApiContext,
        job: BulkJob,
        data: BulkSend,
        composer: Composer,
        base: dict[str, Any],
        version: TemplateVersion,
        tracker: Tracker | None,
    ) -> None:
        self.ctx, self.job, self.data, self.composer = ctx, job, data, composer
        self.base, self.version, self.tracker = base, version, tracker

    async def all(self) -> BulkJob:
        batch = self.ctx.settings.api.spool_batch
        committing: asyncio.Task[None] | None = None
        try:
            for start in range(self.job.processed, self.job.total, batch):
                group = await self._render(start, self.data.recipients[start : start + batch])
                if committing is not None:
                    await committing
                committing = asyncio.create_task(self._commit(group))
        finally:
            if committing is not None:
                await committing  # a group being committed is finished, whatever happened
        if self.job.state is not BulkState.DONE:  # nothing was left to send
            await self._commit(_Group(end=self.job.total))
        return self.job

    async def _render(self, start: int, recipients: list[BulkRecipient]) -> _Group:
        group = _Group(end=start + len(recipients))
        for index, recipient in enumerate(recipients, start):
            try:
                meta, body = self._message(index, recipient)
            except ComposeError as exc:
                error = f"{exc.field}: {exc}"
                group.errors.append(BulkError(index=index, email=recipient.email, error=error))
                continue
            group.items.append((meta, body))
            group.emails.append(self._email(meta, recipient))
            if len(group.items) % RENDER_CHUNK == 0:
                await asyncio.sleep(0)  # let SMTP sessions and other requests run
        return group

    async def _commit(self, group: _Group) -> None:
        """Spool the group (one transaction), then save the job's progress and its emails."""
        suppressed = await self.ctx.inject_many(group.items) if group.items else []
        job, now = self.job, time.time()
        done = group.end >= job.total
        self.job = msgspec.structs.replace(
            job,
            processed=group.end,
            rendered=job.rendered + len(group.items),
            queued=job.queued + len(group.items) - len({r.message_id for r in suppressed}),
            suppressed=job.suppressed + len(suppressed),
            failed=job.failed + len(group.errors),
            state=BulkState.DONE if done else BulkState.RUNNING,
            updated_at=now,
            finished_at=now if done else None,
        )
        await self.ctx.platform.save_progress(self.job, group.errors, group.emails)

    def _message(self, index: int, recipient: BulkRecipient) -> tuple[MessageMeta, bytes]:
        address = checked_address(f"recipients[{index}].email", recipient.email)
        message_id = new_message_id()
        tracker = self.tracker
        tracked = (
            None
            if tracker is None
            else partial(tracker.html, message_id=message_id, recipient=address)
        )
        rendered = self.composer.render(
            address, to_header(address, recipient.name), self._values(address, recipient), tracked
        )
        body = rendered.body
        if tracker is not None:  # bulk mail: one-click unsubscribe (RFC 8058)
            body = tracker.unsubscribe_headers(message_id, address) + body
        meta = MessageMeta(
            id=message_id,
            sender=self.composer.envelope_sender,
            recipients=[address],
            size=len(body),
            smtputf8=rendered.smtputf8,
            body_8bit=not body.isascii(),
            metadata=message_metadata(_over(self.data.metadata, recipient.metadata)),
            **self.base,
        )
        return meta, body

    def _values(self, address: str, recipient: BulkRecipient) -> Mapping[str, Any]:
        recipient_values = {"recipient": {"email": address, "name": recipient.name}}
        return {**self.data.shared_variables, **recipient_values, **recipient.variables}

    def _email(self, meta: MessageMeta, recipient: BulkRecipient) -> Email:
        return Email(
            id=meta.id,
            tenant_id=self.job.tenant_id,
            recipient=meta.recipients[0],
            recipient_name=recipient.name,
            template_id=self.version.id,
            template_version=self.version.version,
            bulk_job_id=self.job.id,
            metadata=_over(self.data.metadata, recipient.metadata) or None,
            variables=_over(self.data.shared_variables, recipient.variables) or None,
            sender=self.composer.draft.sender,
            status="scheduled" if self.base["due"] else "queued",
            created_at=meta.received_at,
            updated_at=meta.received_at,
        )


def _over(shared: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """A recipient's own values over the request's (the request's dict itself when none)."""
    return {**shared, **own} if own else shared


def _accepted(job: BulkJob, reused: bool) -> BulkAccepted:
    return BulkAccepted(
        bulk_job_id=job.id,
        status=job.state,
        total=job.total,
        queued=job.queued,
        suppressed=job.suppressed,
        failed=job.failed,
        template_id=job.template_id,
        template_version=job.template_version,
        idempotency_reused=reused,
    )
