"""The delivery engine: routes due jobs to ready queues and turns replies into outcomes.

Every recipient ends as Delivered, TransientFailure (rescheduled with backoff) or Bounce;
a message older than ``max_age`` expires wherever it sits. Each state change is one record.
A bounce or an expiry sends a DSN to the sender (never for the null sender) before the
original leaves the spool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass

from epoxi.bounce.classify import Classifier
from epoxi.bounce.dsn import RecipientFailure, build_dsn, should_send_dsn
from epoxi.config import DEFAULT_SHAPING, Settings, ShapingSettings
from epoxi.delivery.client import ClientTimeouts, SmtpClient
from epoxi.delivery.ready import ReadyQueue, Shaping
from epoxi.delivery.routing import Destination, Router
from epoxi.dns.resolver import Resolver
from epoxi.errors import DeliveryError, DnsPermanent, DnsTransient, SpoolError
from epoxi.events.log import RecordLog
from epoxi.events.records import Record, RecordType, Response
from epoxi.message import MessageMeta
from epoxi.queue.model import Job
from epoxi.queue.retry import RetryPolicy
from epoxi.queue.scheduled import Scheduler
from epoxi.shaping.throttle import Rate
from epoxi.smtp.replies import Reply
from epoxi.spool import Spool
from epoxi.spool.ids import new_message_id

log = logging.getLogger(__name__)

Inject = Callable[[MessageMeta, bytes], Awaitable[None]]


@dataclass
class _Outcome:
    recipient: str
    reply: Reply | None  # None: no remote reply (expiry); ``reason`` says why
    category: str = ""
    permanent: bool = False
    peer: str = ""  # the server that answered
    reason: str = ""


class DeliveryEngine:
    """Owns routing, the ready queues and the outcome of every attempt."""

    def __init__(
        self,
        settings: Settings,
        *,
        resolver: Resolver,
        classifier: Classifier,
        records: RecordLog,
        spool: Spool,
        scheduler: Scheduler,
        inject: Inject,
    ) -> None:
        self.settings = settings
        delivery = settings.delivery
        self.router = Router(settings, resolver)
        self.resolver = resolver
        self.classifier = classifier
        self.records = records
        self.spool = spool
        self.scheduler = scheduler
        self.inject = inject
        self.retry = RetryPolicy(
            delivery.retry_interval, delivery.max_retry_interval, delivery.max_age
        )
        self.timeouts = ClientTimeouts(**delivery.timeouts.model_dump())
        self.source = delivery.sources[0]
        self.ready: dict[str, ReadyQueue] = {}
        self._lookups: dict[str, list[Job]] = {}
        self.site_suspensions: dict[str, tuple[str, float | None]] = {}  # reason, until
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None

    # ----------------------------------------------------------------- life cycle

    def start(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_expired())

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        await asyncio.gather(*(rq.close() for rq in self.ready.values()))
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=10)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ----------------------------------------------------------------- routing

    def submit(self, job: Job) -> None:
        """A job is due: route it to its ready queue (the scheduler's release callback)."""
        if self.retry.expired(job.message.meta.received_at, time.time()):
            self.expire(job)
            return
        destination = self.router.cached(job.domain)
        if destination is not None:
            self._to_ready(job, destination)
            return
        waiting = self._lookups.get(job.domain)
        if waiting is not None:
            waiting.append(job)
            return
        self._lookups[job.domain] = [job]
        self._spawn(self._lookup(job.domain))

    async def _lookup(self, domain: str) -> None:
        try:
            destination = await self.router.route(domain)
        except DnsPermanent as exc:
            self._fail_jobs(self._lookups.pop(domain, []), Reply(550, "5.1.2", str(exc)))
        except (DnsTransient, Exception) as exc:
            if not isinstance(exc, DnsTransient):
                log.exception("routing %s failed", domain)
            self._fail_jobs(
                self._lookups.pop(domain, []),
                Reply(451, "4.4.3", f"DNS lookup for {domain} failed: {exc}"),
            )
        else:
            for job in self._lookups.pop(domain, []):
                self._to_ready(job, destination)

    def _fail_jobs(self, jobs: list[Job], reply: Reply, peer: str = "") -> None:
        for job in jobs:
            self.handle_outcomes(job, [(r, reply) for r in job.recipients], peer)

    def _to_ready(self, job: Job, destination: Destination) -> None:
        key = f"{self.source.name}->{destination.site}"
        ready = self.ready.get(key)
        if ready is None:
            ready = self.ready[key] = self._new_ready_queue(job.domain, destination)
        job.site = destination.site
        if len(ready) >= self.settings.delivery.ready_queue_limit:
            job.due = time.time() + random.uniform(1.0, 3.0)  # full: hold back, no attempt
            self.scheduler.add(job)
            return
        ready.put(job)

    def _new_ready_queue(self, domain: str, destination: Destination) -> ReadyQueue:
        ready = ReadyQueue(
            source=self.source,
            destination=destination,
            shaping=self.shaping_for(domain, destination.site),
            hostname=self.settings.hostname,
            resolver=self.resolver,
            timeouts=self.timeouts,
            deliver=self._deliver,
            connect_failed=self._connect_failed,
        )
        suspended = self.site_suspensions.get(destination.site)
        if suspended is not None:
            reason, until = suspended
            if until is None or until > time.time():
                ready.suspend(reason, until - time.time() if until else None)
        return ready

    def shaping_for(self, domain: str, site: str) -> Shaping:
        """Built-in defaults < ``delivery.defaults`` < the entry for the site < the domain's."""
        merged = DEFAULT_SHAPING.model_dump()
        delivery = self.settings.delivery
        for override in (
            delivery.defaults,
            delivery.shaping.get(site),
            delivery.shaping.get(domain),
        ):
            if override is not None:
                merged.update(override.model_dump(exclude_none=True))
        values = ShapingSettings(**merged)
        assert values.connection_limit and values.max_deliveries_per_connection
        assert values.max_recipients_per_transaction and values.idle_timeout is not None
        return Shaping(
            connection_limit=values.connection_limit,
            max_deliveries_per_connection=values.max_deliveries_per_connection,
            idle_timeout=values.idle_timeout,
            max_recipients_per_transaction=values.max_recipients_per_transaction,
            max_message_rate=Rate.parse(values.max_message_rate)
            if values.max_message_rate
            else None,
            max_connection_rate=(
                Rate.parse(values.max_connection_rate) if values.max_connection_rate else None
            ),
        )

    # ----------------------------------------------------------------- attempts

    async def _deliver(self, client: SmtpClient, job: Job) -> bool:
        """One attempt of ``job`` over ``client``; False when the connection is no good."""
        meta = job.message.meta
        try:
            body = job.message.body or await self.spool.load_body(meta.id)
        except SpoolError as exc:
            log.error("[%s] body unreadable: %s", meta.id, exc)
            self.handle_outcomes(
                job, [(r, Reply(451, "4.3.0", "body unreadable")) for r in job.recipients], ""
            )
            return True
        ready = self.ready[f"{self.source.name}->{job.site}"]
        step = ready.shaping.max_recipients_per_transaction
        outcomes: list[tuple[str, Reply]] = []
        usable = True
        for start in range(0, len(job.recipients), step):
            chunk = job.recipients[start : start + step]
            if not usable:
                outcomes += [(r, Reply(451, "4.4.2", "connection lost")) for r in chunk]
                continue
            usable = await self._transaction(client, meta, chunk, body, outcomes)
        self.handle_outcomes(job, outcomes, client.peer[0])
        return usable

    async def _transaction(
        self,
        client: SmtpClient,
        meta: MessageMeta,
        recipients: list[str],
        body: bytes,
        outcomes: list[tuple[str, Reply]],
    ) -> bool:
        try:
            result = await client.send(
                meta.sender, recipients, body, smtputf8=meta.smtputf8, body_8bit=meta.body_8bit
            )
        except DeliveryError as exc:
            # A lost data-end reply lands here too: transient, so at worst a duplicate.
            reply = getattr(exc, "reply", None) or Reply(451, "4.4.2", f"connection lost: {exc}")
            outcomes += [(r, reply) for r in recipients]
            return False
        outcomes += result.outcomes()
        return client.is_usable

    def _connect_failed(
        self, jobs: list[Job], reply: Reply, peer: str, permanent: bool = False
    ) -> None:
        if reply.is_permanent and not permanent:  # a 5xx banner: the site's fault, retry later
            reply = Reply(451, "4.4.1", str(reply))
        self._fail_jobs(jobs, reply, peer)

    # ----------------------------------------------------------------- outcomes

    def handle_outcomes(self, job: Job, replies: Iterable[tuple[str, Reply]], peer: str) -> None:
        """Record each recipient's outcome; reschedule, bounce or finish the job."""
        meta = job.message.meta
        attempt = job.attempts + 1
        delivered: list[str] = []
        bounced: list[_Outcome] = []
        deferred: list[_Outcome] = []
        for recipient, reply in replies:
            if reply.is_positive:
                delivered.append(recipient)
                self._record(RecordType.DELIVERY, job, recipient, reply, peer, attempt)
                continue
            classification = self.classifier.classify(reply)
            outcome = _Outcome(
                recipient, reply, classification.category.value, classification.permanent, peer
            )
            (bounced if classification.permanent else deferred).append(outcome)
        for outcome in bounced:
            self._record(
                RecordType.BOUNCE,
                job,
                outcome.recipient,
                outcome.reply,
                peer,
                attempt,
                classification=outcome.category,
            )
        self._remove_recipients(meta, delivered)
        if deferred:
            self._defer(job, deferred, peer, attempt)
        if bounced:
            self._spawn(self._bounce(job, bounced, "failed", finish=not deferred))
        elif not deferred:
            self._job_done(job)

    def _defer(self, job: Job, deferred: list[_Outcome], peer: str, attempt: int) -> None:
        meta = job.message.meta
        now = time.time()
        job.recipients = [o.recipient for o in deferred]
        job.attempts = attempt
        if self.retry.expired(meta.received_at, now):
            self.expire(job, deferred[0].reply)
            return
        job.due = now + self.retry.delay(attempt)
        for outcome in deferred:
            self._record(
                RecordType.TRANSIENT_FAILURE,
                job,
                outcome.recipient,
                outcome.reply,
                peer,
                attempt,
                classification=outcome.category,
                next_attempt=job.due,
            )
        meta.attempts, meta.due, meta.last_response = attempt, job.due, str(deferred[0].reply)
        job.message.body = None  # re-read from the spool at the next attempt
        self.spool.update(meta)
        self.scheduler.add(job)

    def expire(self, job: Job, last: Reply | None = None) -> None:
        """Give up on ``job``: an Expiration record per recipient, a DSN, then done."""
        reason = f"message expired after {self.retry.max_age / 86400:g} days in the queue"
        if last is not None:
            reason += f"; last reply: {last}"
        reply = Reply(451, "4.4.7", reason)  # for the record only: no server said this
        outcomes = [_Outcome(r, None, "Expired", True, reason=reason) for r in job.recipients]
        for outcome in outcomes:
            self._record(
                RecordType.EXPIRATION,
                job,
                outcome.recipient,
                reply,
                "",
                job.attempts,
                reason=reason,
            )
        self._spawn(self._bounce(job, outcomes, "expired", finish=True))

    async def _bounce(self, job: Job, failures: list[_Outcome], kind: str, *, finish: bool) -> None:
        """Send the DSN for ``failures`` (durably), then drop those recipients."""
        meta = job.message.meta
        try:
            await self._send_dsn(job, failures, kind)
        except Exception:
            log.exception("[%s] could not create a DSN", meta.id)
        self._remove_recipients(meta, [f.recipient for f in failures])
        if finish:
            self._job_done(job)
        else:
            self.spool.update(meta)

    async def _send_dsn(self, job: Job, failures: list[_Outcome], kind: str) -> None:
        meta = job.message.meta
        if not meta.sender or not self._dsn_wanted(job):
            return
        body = job.message.body or await self.spool.load_body(meta.id)
        headers = body.split(b"\r\n\r\n", 1)[0] + b"\r\n"
        if not should_send_dsn(meta, headers):
            return
        dsn_id = new_message_id()
        dsn = build_dsn(
            reporting_mta=self.settings.hostname,
            original=meta,
            original_headers=headers,
            failures=[
                RecipientFailure(
                    recipient=f.recipient, reply=f.reply, remote_mta=f.peer, reason=f.reason
                )
                for f in failures
            ],
            dsn_id=dsn_id,
        )
        dsn_meta = MessageMeta(
            id=dsn_id,
            sender="",
            recipients=[meta.sender],
            received_at=time.time(),
            size=len(dsn),
            smtputf8=not meta.sender.isascii(),
            origin="dsn",
            metadata={"dsn_for": meta.id, "dsn_kind": kind},
        )
        await self.inject(dsn_meta, dsn)
        log.info(
            "[%s] DSN %s sent to <%s> for %d recipients",
            meta.id,
            dsn_id,
            meta.sender,
            len(failures),
        )

    def _dsn_wanted(self, job: Job) -> bool:
        delivery = self.settings.delivery
        if not delivery.dsn or job.message.meta.tenant in delivery.dsn_disabled_tenants:
            return False
        route = self.router.static(job.domain)
        return route is None or route.dsn

    def _remove_recipients(self, meta: MessageMeta, finished: list[str]) -> None:
        if finished:
            gone = set(finished)
            meta.recipients = [r for r in meta.recipients if r not in gone]

    def _job_done(self, job: Job) -> None:
        message = job.message
        message.open_jobs -= 1
        if message.open_jobs <= 0 or not message.meta.recipients:
            self.spool.remove(message.meta.id)
        else:
            self.spool.update(message.meta)

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
    ) -> None:
        meta = job.message.meta
        self.records.emit(
            Record(
                type=kind,
                message_id=meta.id,
                queue=job.queue,
                site=job.site,
                source=self.source.name,
                sender=meta.sender,
                recipient=recipient,
                response=Response.of(reply) if reply else None,
                peer_address=peer,
                attempt=attempt,
                size=meta.size,
                classification=classification,
                reason=reason,
                next_attempt=next_attempt,
            )
        )

    # ----------------------------------------------------------------- admin

    def suspend_site(self, site: str, reason: str, duration: float | None) -> int:
        """Stop sending to ``site`` (now and for ready queues made later); returns queues hit."""
        until = time.time() + duration if duration else None
        self.site_suspensions[site] = (reason, until)
        hit = [rq for rq in self.ready.values() if rq.destination.site == site]
        for ready in hit:
            ready.suspend(reason, duration)
        return len(hit)

    def resume_site(self, site: str) -> int:
        self.site_suspensions.pop(site, None)
        hit = [rq for rq in self.ready.values() if rq.destination.site == site]
        for ready in hit:
            ready.resume()
        return len(hit)

    def routing(self) -> Iterator[Job]:
        """Jobs waiting for their domain's DNS answer."""
        for jobs in self._lookups.values():
            yield from jobs

    def take_waiting(self, predicate: Callable[[Job], bool]) -> list[Job]:
        """Remove matching jobs wherever they wait: scheduled, held, routing or ready."""
        taken = self.scheduler.take(predicate)
        for domain, jobs in list(self._lookups.items()):
            keep = [job for job in jobs if not predicate(job)]
            taken += [job for job in jobs if predicate(job)]
            self._lookups[domain] = keep
        for ready in self.ready.values():
            taken += ready.take(predicate)
        return taken

    def admin_bounce(self, predicate: Callable[[Job], bool], reason: str) -> int:
        """Remove matching jobs with an AdminBounce record per recipient (no DSN, like
        ``postsuper -d``); returns the number of recipients bounced."""
        jobs = self.take_waiting(predicate)
        bounced = 0
        for job in jobs:
            for recipient in job.recipients:
                self._record(
                    RecordType.ADMIN_BOUNCE, job, recipient, None, "", job.attempts, reason=reason
                )
            bounced += len(job.recipients)
            self._remove_recipients(job.message.meta, job.recipients)
            self._job_done(job)
        return bounced

    # ----------------------------------------------------------------- expiry sweep

    async def _sweep_expired(self) -> None:
        while True:
            await asyncio.sleep(self.settings.delivery.expiry_sweep_interval)
            self.expire_stuck()

    def expire_stuck(self) -> int:
        """Expire jobs too old to go on, in ready queues and held by suspensions."""
        now = time.time()

        def too_old(job: Job) -> bool:
            return self.retry.expired(job.message.meta.received_at, now)

        expired = self.take_waiting(too_old)
        for job in expired:
            self.expire(job)
        return len(expired)
