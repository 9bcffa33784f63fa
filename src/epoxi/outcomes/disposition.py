"""Outcome disposition: each recipient's reply becomes a record and the job's next step.

Every recipient ends as Delivered, TransientFailure (rescheduled with backoff) or Bounce; a job
older than ``max_age`` expires. A bounce or an expiry sends a DSN to the sender (never for the
null sender, never for a DSN) before the original leaves the spool. Nothing here does I/O of
its own: the spool, the scheduler, the record sink and the DSN injection are handed in, so the
decisions are unit-tested on fakes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from epoxi.bounce.classify import Classifier
from epoxi.bounce.dsn import (
    DsnKind,
    RecipientFailure,
    build_dsn,
    notify_wants,
    should_send_dsn,
    success_action,
)
from epoxi.errors import DeliveryError
from epoxi.events.records import Record, RecordType, Response
from epoxi.events.sink import EventSink
from epoxi.ids import new_message_id
from epoxi.message import MessageMeta
from epoxi.outcomes.synthetic import (
    Synthetic,
    connect_failure,
    routing_failure,
    transaction_failure,
)
from epoxi.queue.model import HeldBodies, Job, Message
from epoxi.queue.retry import RetryPolicy
from epoxi.queue.suspensions import Suspension
from epoxi.smtp.replies import Reply
from epoxi.spool.port import SpoolPort

log = logging.getLogger(__name__)

Inject = Callable[[MessageMeta, bytes], Awaitable[None]]
# Why a DSN is sent: the RFC 3464 actions, and "expired" (a failure; kept apart in metadata).
Why = Literal["failed", "expired", "delayed", "relayed", "delivered"]
Replies = Iterable[tuple[str, Reply]]


@dataclass
class Failure:
    """One recipient that did not get its message (yet)."""

    recipient: str
    reply: Reply | None  # None: no remote reply (expiry); ``reason`` says why
    category: str = ""
    permanent: bool = False
    peer: str = ""  # the server that answered
    reason: str = ""
    tls: str = ""  # the TLS of the attempt (TlsInfo.text)


class Disposition:
    """Turns replies into records, retries, bounces, expiries and DSNs."""

    def __init__(
        self,
        *,
        classifier: Classifier,
        records: EventSink,
        spool: SpoolPort,
        reschedule: Callable[[Job], None],
        retry: RetryPolicy,
        inject: Inject,
        hostname: str,
        dsn_wanted: Callable[[Job], bool] = lambda job: True,
        retry_for: Callable[[Job, RetryPolicy], RetryPolicy] | None = None,
        clock: Callable[[], float] = time.time,
        bodies: HeldBodies | None = None,
    ) -> None:
        # The retries of a job's destination (its shaping), given the configured ones
        self.retry_for = retry_for or (lambda job, configured: configured)
        self.classifier = classifier
        self.records = records
        self.spool = spool
        self.reschedule = reschedule
        self.retry = retry
        self.inject = inject
        self.hostname = hostname
        self.dsn_wanted = dsn_wanted
        self._clock = clock
        self.bodies = bodies  # the ingest's: a body is dropped once tried (None: no limit kept)
        self._tasks: set[asyncio.Task[None]] = set()

    async def stop(self) -> None:
        """Wait (a bounded time) for the DSNs being written."""
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=10)

    def expired(self, job: Job) -> bool:
        return self._retry(job).expired(job.message.meta.age_origin, self._clock())

    def _retry(self, job: Job) -> RetryPolicy:
        return self.retry_for(job, self.retry)

    # ----------------------------------------------------------------- failures without replies

    def routing_failed(self, jobs: list[Job], domain: str, exc: Exception) -> None:
        self._fail(jobs, routing_failure(domain, exc), "")

    def connection_failed(
        self, jobs: list[Job], exc: Exception, peer: str, *, tls: str = ""
    ) -> None:
        self._fail(jobs, connect_failure(exc), peer, tls=tls)

    def body_unreadable(self, job: Job, exc: Exception) -> None:
        log.error("[%s] body unreadable: %s", job.id, exc)
        self._fail([job], Synthetic.BODY_UNREADABLE.reply(), "")

    def transaction_failed(self, recipients: list[str], exc: DeliveryError) -> Replies:
        reply = transaction_failure(exc)
        return [(r, reply) for r in recipients]

    def _fail(self, jobs: list[Job], reply: Reply, peer: str, *, tls: str = "") -> None:
        for job in jobs:
            self.handle(job, [(r, reply) for r in job.recipients], peer, tls=tls)

    # ----------------------------------------------------------------- replies

    def handle(
        self,
        job: Job,
        replies: Replies,
        peer: str,
        *,
        dsn_passed: bool = False,
        tls: str = "",
    ) -> None:
        """Record each recipient's outcome; reschedule, bounce or finish the job.

        DSNs follow RFC 3461's NOTIFY: failures unless NEVER; a delay once, at the first
        deferral, when DELAY was asked; a success ("relayed") when SUCCESS was asked and the
        next hop did not take the request on (``dsn_passed``). ``tls`` says what TLS the
        attempt had (``TlsInfo.text``); it goes into each record."""
        attempt = job.attempts + 1
        delivered: list[str] = []
        bounced: list[Failure] = []
        deferred: list[Failure] = []
        for recipient, reply in replies:
            if reply.is_positive:
                delivered.append(recipient)
                self._record(RecordType.DELIVERY, job, recipient, reply, peer, attempt, tls=tls)
                continue
            verdict = self.classifier.classify(reply)
            failure = Failure(recipient, reply, verdict.category.value, verdict.permanent, peer)
            failure.tls = tls
            (bounced if verdict.permanent else deferred).append(failure)
        for failure in bounced:
            self._record_failure(RecordType.BOUNCE, job, failure, attempt)
        self._report_successes(job, delivered, peer, dsn_passed)
        _remove_recipients(job.message.meta, delivered)
        if deferred:
            self._defer(job, deferred, attempt)
        if bounced:
            self._spawn(self._bounce(job, bounced, "failed", finish=not deferred))
        elif not deferred:
            self._job_done(job)

    def _defer(self, job: Job, deferred: list[Failure], attempt: int) -> None:
        meta = job.message.meta
        now = self._clock()
        job.recipients = [f.recipient for f in deferred]
        job.attempts = attempt
        retry = self._retry(job)
        if retry.expired(meta.age_origin, now):
            self.expire(job, deferred[0].reply)
            return
        job.due = now + retry.delay(attempt)
        for failure in deferred:
            self._record_failure(RecordType.TRANSIENT_FAILURE, job, failure, attempt, job.due)
        if attempt == 1:
            delayed = [f for f in deferred if _asked_for_delays(job, f.recipient)]
            self._report(job, delayed, "delayed")
        meta.attempts, meta.due, meta.last_response = attempt, job.due, str(deferred[0].reply)
        self._release_body(job.message)
        job.message.body = None  # re-read from the spool at the next attempt
        self.spool.update(meta)
        self.reschedule(job)

    def expire(self, job: Job, last: Reply | None = None) -> None:
        """Give up on ``job``: an Expiration record per recipient, a DSN, then done."""
        max_age = self._retry(job).max_age
        reason = f"message expired after {max_age / 86400:g} days in the queue"
        if last is not None:
            reason += f"; last reply: {last}"
        reply = Synthetic.EXPIRED.reply(reason)  # for the record only: no server said this
        failures = [Failure(r, None, "Expired", True, reason=reason) for r in job.recipients]
        for failure in failures:
            self._record(
                RecordType.EXPIRATION,
                job,
                failure.recipient,
                reply,
                "",
                job.attempts,
                reason=reason,
            )
        self._spawn(self._bounce(job, failures, "expired", finish=True))

    def admin_bounce(
        self, jobs: list[Job], reason: str, kind: RecordType = RecordType.ADMIN_BOUNCE
    ) -> int:
        """Drop ``jobs`` with a record of ``kind`` per recipient (AdminBounce, or Cancelled by
        the sender), and no DSN, like ``postsuper -d``; returns the recipients dropped."""
        bounced = 0
        for job in jobs:
            for recipient in job.recipients:
                self._record(kind, job, recipient, None, "", job.attempts, reason=reason)
            bounced += len(job.recipients)
            _remove_recipients(job.message.meta, job.recipients)
            self._job_done(job)
        return bounced

    def held(self, job: Job, suspension: Suspension) -> None:
        """A due job waits for a suspension to end: one Suspended record per recipient."""
        meta = job.message.meta
        reason = f"{suspension.kind} {suspension.value} suspended: {suspension.reason}"
        for recipient in job.recipients:
            self.records.emit(
                Record(
                    type=RecordType.SUSPENDED,
                    message_id=meta.id,
                    queue=job.queue,
                    sender=meta.sender,
                    recipient=recipient,
                    size=meta.size,
                    reason=reason,
                    tenant=meta.tenant,
                    campaign=meta.campaign,
                    template=meta.template,
                )
            )

    def rerouted(self, job: Job, reason: str) -> None:
        """A job leaves from another pool or source than its own: one Rerouted record."""
        meta = job.message.meta
        self.records.emit(
            Record(
                type=RecordType.REROUTED,
                message_id=meta.id,
                queue=job.queue,
                source=job.source,
                pool=job.pool,
                sender=meta.sender,
                recipients=job.recipients,
                attempt=job.attempts,
                reason=reason,
                tenant=meta.tenant,
                campaign=meta.campaign,
                template=meta.template,
            )
        )

    # ----------------------------------------------------------------- DSNs

    async def _bounce(self, job: Job, failures: list[Failure], kind: Why, *, finish: bool) -> None:
        """Send the DSN for ``failures`` (durably), then drop those recipients."""
        meta = job.message.meta
        try:
            await self._send_dsn(job, failures, kind)
        except Exception:
            log.exception("[%s] could not create a DSN", meta.id)
        _remove_recipients(meta, [f.recipient for f in failures])
        if finish:
            self._job_done(job)
        else:
            self.spool.update(meta)

    def _report_successes(self, job: Job, delivered: list[str], peer: str, passed: bool) -> None:
        if not job.message.meta.dsn_notify:
            return  # no NOTIFY: successes are never reported (the common case, costs nothing)
        action = success_action(dsn_passed=passed)
        if action is None:
            return  # the next hop took the request on: it reports
        asked = [r for r in delivered if _asked(job, r, "success")]
        if asked:
            reply = Reply(250, "2.0.0", "accepted by the next hop")
            self._report(job, [Failure(r, reply, peer=peer) for r in asked], action)

    def _report(self, job: Job, recipients: list[Failure], kind: DsnKind) -> None:
        """A DSN that changes nothing in the queue (a delay, a success)."""
        if recipients:
            self._spawn(self._report_safely(job, recipients, kind))

    async def _report_safely(self, job: Job, recipients: list[Failure], kind: DsnKind) -> None:
        try:
            await self._send_dsn(job, recipients, kind)
        except Exception:
            log.exception("[%s] could not create a %s DSN", job.id, kind)

    async def _send_dsn(self, job: Job, failures: list[Failure], kind: Why) -> None:
        meta = job.message.meta
        if kind in ("failed", "expired"):
            failures = [f for f in failures if _asked(job, f.recipient, "failure")]
        if not failures or not meta.sender or not self.dsn_wanted(job):
            return
        body = job.message.body or await self.spool.load_body(meta.id)
        headers = body.split(b"\r\n\r\n", 1)[0] + b"\r\n"
        if not should_send_dsn(meta, headers):
            return
        dsn_id = new_message_id()
        dsn = build_dsn(
            reporting_mta=self.hostname,
            original=meta,
            original_headers=headers,
            original_message=body,
            kind="failed" if kind == "expired" else kind,
            failures=[
                RecipientFailure(
                    recipient=f.recipient, reply=f.reply, remote_mta=f.peer, reason=f.reason
                )
                for f in failures
            ],
            dsn_id=dsn_id,
            now=self._clock(),
            retry_until=meta.age_origin + self._retry(job).max_age,
        )
        await self.inject(_dsn_meta(dsn_id, meta, len(dsn), kind, self._clock()), dsn)
        log.info(
            "[%s] DSN %s sent to <%s> for %d recipients",
            meta.id,
            dsn_id,
            meta.sender,
            len(failures),
        )

    # ----------------------------------------------------------------- bookkeeping

    def _release_body(self, message: Message) -> None:
        if self.bodies is not None:
            self.bodies.release(message)

    def _job_done(self, job: Job) -> None:
        message = job.message
        message.open_jobs -= 1
        if message.open_jobs <= 0 or not message.meta.recipients:
            self._release_body(message)  # a DSN being written may still read it
            self.spool.remove(message.meta.id)
        else:
            self.spool.update(message.meta)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _record_failure(
        self, kind: RecordType, job: Job, failure: Failure, attempt: int, next_attempt: float = 0.0
    ) -> None:
        self._record(
            kind,
            job,
            failure.recipient,
            failure.reply,
            failure.peer,
            attempt,
            classification=failure.category,
            next_attempt=next_attempt,
            tls=failure.tls,
        )

    def _record(
        self,
        kind: RecordType,
        job: Job,
        recipient: str,
        reply: Reply | None,
        peer: str,
        attempt: int,
        *,
        classification: str = "",
        reason: str = "",
        next_attempt: float = 0.0,
        tls: str = "",
    ) -> None:
        meta = job.message.meta
        self.records.emit(
            Record(
                type=kind,
                message_id=meta.id,
                queue=job.queue,
                site=job.site,
                source=job.source,
                pool=job.pool,
                sender=meta.sender,
                recipient=recipient,
                response=Response.of(reply) if reply else None,
                peer_address=peer,
                attempt=attempt,
                size=meta.size,
                classification=classification,
                reason=reason,
                next_attempt=next_attempt,
                tls=tls,
                tenant=meta.tenant,  # a sink's or webhook's tenant, a hard bounce's list
                campaign=meta.campaign,
                template=meta.template,
            )
        )


def _asked(job: Job, recipient: str, event: Literal["success", "failure", "delay"]) -> bool:
    return notify_wants(job.message.meta, recipient, event)


def _asked_for_delays(job: Job, recipient: str) -> bool:
    """Delay DSNs only when NOTIFY names DELAY: without NOTIFY they are ours to send, and we
    do not (as Postfix, whose delay_warning_time is off by default)."""
    notify = job.message.meta.dsn_notify
    return bool(notify and recipient in notify) and _asked(job, recipient, "delay")


def _remove_recipients(meta: MessageMeta, finished: list[str]) -> None:
    if finished:
        gone = set(finished)
        meta.recipients = [r for r in meta.recipients if r not in gone]


def _dsn_meta(dsn_id: str, original: MessageMeta, size: int, kind: Why, now: float) -> MessageMeta:
    return MessageMeta(
        id=dsn_id,
        sender="",
        recipients=[original.sender],
        received_at=now,
        size=size,
        smtputf8=not original.sender.isascii(),
        origin="dsn",
        metadata={"dsn_for": original.id, "dsn_kind": kind},
    )
