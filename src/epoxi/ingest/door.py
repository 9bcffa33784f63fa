"""The one door: every message Epoxi takes in goes through :class:`Ingest`.

SMTP (``accept``), the HTTP API (``inject_many``) and the DSNs Epoxi writes itself
(``inject``) all pass the same stages, in this order:

1. hooks: each :class:`IngestHook` may change the message or refuse it (DKIM signing and
   policy hooks plug in here);
2. control headers: ``X-Epoxi-*`` are removed, and honoured only from trusted clients; a pool
   they (or the API) name must be configured;
3. the loop check: more ``Received:`` headers than ``max_hops`` refuses it (``554 5.4.6``);
4. suppression: a recipient on its tenant's suppression list (or the global one) is taken off
   the message, with a Suppression record; a message left with none is not spooled at all
   (the client still gets its yes: the records, and the API's answer, say what happened);
5. DKIM signing, off the event loop, when keys are configured: what is spooled is what is sent;
6. the spool commit (group fsync): only then is the client told yes;
7. the Reception record;
8. scheduling: one job per recipient domain, into the scheduled queues.

Before all of them, SMTP recipients in the bounce domain or at an FBL address go to the
feedback mailbox (``ingest/feedback.py``): read into OOB and Feedback records, quarantined,
never queued.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from epoxi.config import SpoolSettings
from epoxi.dkim import Signer
from epoxi.errors import MessageRefused
from epoxi.events.records import Record, RecordType
from epoxi.events.sink import EventSink
from epoxi.ingest.control import checked_controls, parse_priority, take_control_headers
from epoxi.ingest.feedback import FeedbackMailbox
from epoxi.message import MessageMeta
from epoxi.outcomes.synthetic import Synthetic
from epoxi.queue.model import HeldBodies, Job, queue_name, split_by_domain
from epoxi.spool.port import SpoolPort
from epoxi.store.suppressions import SuppressionList

log = logging.getLogger(__name__)


class IngestHook(Protocol):
    """A stage before the spool commit. Returns the body to keep (the same one if unchanged),
    or raises MessageRefused with the reply the sender is to get."""

    async def __call__(self, meta: MessageMeta, body: bytes) -> bytes: ...


class Ingest:
    """Takes messages in: hooks, control headers, loop check, spool, record, schedule."""

    def __init__(
        self,
        *,
        spool: SpoolPort,
        records: EventSink,
        schedule: Callable[[Job], None],
        hooks: Sequence[IngestHook] = (),
        max_hops: int = 50,
        signer: Signer | None = None,
        sign_threads: int = 2,
        known_pool: Callable[[str], bool] = lambda pool: True,
        feedback: FeedbackMailbox | None = None,
        suppressions: SuppressionList | None = None,
        bodies: HeldBodies | None = None,
    ) -> None:
        self.spool = spool
        # bodies kept for first attempts (a limit shared with the outcomes, which drop them)
        self.bodies = HeldBodies(SpoolSettings().held_bodies) if bodies is None else bodies
        self.feedback = feedback  # bounce domain and FBL addresses: read, never queued
        self.signer = signer  # None: no DKIM keys; a reload may set or clear it
        self.sign_threads = sign_threads
        self._signing: ThreadPoolExecutor | None = None
        self.records = records
        self.schedule = schedule
        self.hooks = list(hooks)
        self.max_hops = max_hops
        self.known_pool = known_pool
        self.suppressions = SuppressionList() if suppressions is None else suppressions
        self.arrived: set[str] | None = None  # ids spooled while the start-up load runs

    def unhealthy_reason(self) -> str | None:
        return self.spool.unhealthy_reason()

    async def accept(self, meta: MessageMeta, body: bytes, *, trusted: bool) -> None:
        """A message from SMTP. ``trusted``: the client may set control headers."""
        if self.feedback is not None:
            meta.recipients = await self.feedback.take(meta, body)
            if not meta.recipients:
                return  # a report for the feedback mailbox only: read and quarantined
        if self.hooks:
            body = await self._run_hooks(meta, body)
        body = self._prepare(meta, body, trusted=trusted)
        suppressed = self._suppress(meta)
        if suppressed and not meta.recipients:
            self._emit(suppressed)
            return  # every recipient suppressed: nothing to send, nothing to spool
        if self.signer is not None:
            body = await self._sign(meta, body)
        if self.arrived is not None:  # before the commit: the load reads rows in a thread
            self.arrived.add(meta.id)
        await self.spool.store(meta, body)
        self._spooled(meta, body)
        self._emit(suppressed)  # after the Reception: the message exists for the status

    async def inject(self, meta: MessageMeta, body: bytes) -> None:
        """A message Epoxi made itself (a DSN): signed if its domain has keys, spooled and
        queued."""
        if self.signer is not None:
            body = await self._sign(meta, body)
        if self.arrived is not None:
            self.arrived.add(meta.id)
        await self.spool.store(meta, body)
        self._spooled(meta, body)

    async def inject_many(self, items: list[tuple[MessageMeta, bytes]]) -> list[Record]:
        """Messages from the HTTP API (the envelope is the API's: control headers are only
        removed): spooled in one transaction, all or none, then queued. Returns the
        Suppression records of the recipients taken off (a message left with none is not
        spooled)."""
        if self.hooks:
            items = [(meta, await self._run_hooks(meta, body)) for meta, body in items]
        prepared = [(meta, self._prepare(meta, body, trusted=False)) for meta, body in items]
        suppressed = [record for meta, _ in prepared for record in self._suppress(meta)]
        if suppressed:
            prepared = [(meta, body) for meta, body in prepared if meta.recipients]
        if self.signer is not None:
            prepared = [(meta, await self._sign(meta, body)) for meta, body in prepared]
        if self.arrived is not None:
            self.arrived.update(meta.id for meta, _ in prepared)
        if prepared:
            await self.spool.store_many(prepared)
        for meta, body in prepared:
            self._spooled(meta, body)
        self._emit(suppressed)
        return suppressed

    def _suppress(self, meta: MessageMeta) -> list[Record]:
        """Take the suppressed recipients off the message; returns a Suppression record for
        each, to emit once the message is spooled (or at once if none is left)."""
        found = self.suppressions.find(meta.tenant, meta.recipients)
        if not found:
            return []  # the common case, and at once while every list is empty
        taken = {address for address, _ in found}
        meta.recipients = [r for r in meta.recipients if r not in taken]
        log.debug("%s: %d recipients suppressed", meta.id, len(found))
        return [self._suppressed(meta, address, reason) for address, reason in found]

    def _emit(self, records: list[Record]) -> None:
        for record in records:
            self.records.emit(record)

    @staticmethod
    def _suppressed(meta: MessageMeta, address: str, reason: str) -> Record:
        return Record(
            type=RecordType.SUPPRESSION,
            message_id=meta.id,
            sender=meta.sender,
            recipient=address,
            reason=reason,
            tenant=meta.tenant,
            campaign=meta.campaign,
            template=meta.template,
            origin=meta.origin,
            size=meta.size,
        )

    async def _run_hooks(self, meta: MessageMeta, body: bytes) -> bytes:
        for hook in self.hooks:
            body = await hook(meta, body)
        return body

    def _prepare(self, meta: MessageMeta, body: bytes, *, trusted: bool) -> bytes:
        """The loop check and the control headers, from one lower-cased copy of the header
        block (removing control headers never changes the count of Received: fields)."""
        end = body.find(b"\r\n\r\n")
        head = b"\r\n" + (body[:end] if end >= 0 else body).lower()
        self._check_hops(head.count(b"\r\nreceived:"))
        if b"\r\nx-epoxi-" in head:
            body, controls = take_control_headers(body)
            meta.size = len(body)
            if controls and trusted:
                _apply_controls(meta, checked_controls(controls))
        if meta.pool and not self.known_pool(meta.pool):
            raise MessageRefused(
                f"unknown pool {meta.pool}", Synthetic.UNKNOWN_POOL.reply(repr(meta.pool))
            )
        return body

    async def _sign(self, meta: MessageMeta, body: bytes) -> bytes:
        """Add the DKIM signatures (in a thread: RSA is CPU work) and note them on the meta."""
        assert self.signer is not None
        if self._signing is None:
            self._signing = ThreadPoolExecutor(self.sign_threads, thread_name_prefix="epoxi-dkim")
        loop = asyncio.get_running_loop()
        signed = await loop.run_in_executor(self._signing, self.signer.sign, body, meta.tenant)
        meta.dkim = "; ".join(signed.signatures) or f"unsigned: {signed.unsigned_reason}"
        meta.size = len(signed.body)
        return signed.body

    def close(self) -> None:
        if self._signing is not None:
            self._signing.shutdown(wait=True)

    def _check_hops(self, hops: int) -> None:
        if hops > self.max_hops:
            raise MessageRefused(
                f"{hops} Received: headers",
                Synthetic.TOO_MANY_HOPS.reply(f"{hops} Received: headers, a mail loop?"),
            )

    def _spooled(self, meta: MessageMeta, body: bytes) -> None:
        self.records.emit(
            Record(
                type=RecordType.RECEPTION,
                message_id=meta.id,
                sender=meta.sender,
                recipients=meta.recipients,
                peer_address=meta.peer,
                size=meta.size,
                origin=meta.origin,
                next_attempt=meta.due,
                tenant=meta.tenant,
                campaign=meta.campaign,
                template=meta.template,
                pool=meta.pool,
                dkim=meta.dkim,
            )
        )
        self.enqueue(meta, body)

    def enqueue(self, meta: MessageMeta, body: bytes | None) -> None:
        """Split a spooled message into one job per recipient domain and schedule them."""
        message = self.bodies.message(meta, body)
        groups = split_by_domain(meta.recipients)
        message.open_jobs = len(groups)
        if not groups:
            self.spool.remove(meta.id)
        for domain, recipients in groups.items():
            self.schedule(
                Job(
                    message,
                    domain,
                    recipients,
                    queue_name(domain, meta.tenant, meta.campaign),
                    attempts=meta.attempts,
                    due=meta.due,
                )
            )


def _apply_controls(meta: MessageMeta, controls: dict[str, str]) -> None:
    meta.tenant = controls.get("tenant", meta.tenant)
    meta.campaign = controls.get("campaign", meta.campaign)
    meta.pool = controls.get("pool", meta.pool)
    if "priority" in controls:
        meta.priority = parse_priority(controls["priority"])
