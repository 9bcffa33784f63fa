"""The composition root: builds every part from the settings, starts and stops them in order."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import sys
import time
from typing import TYPE_CHECKING

from epoxi.admin import Admin
from epoxi.api.app import build_app
from epoxi.api.context import ApiContext
from epoxi.api.metrics import Metrics
from epoxi.api.server import HttpServer
from epoxi.bounce.classify import Classifier
from epoxi.config import parse_hostport
from epoxi.delivery.engine import DeliveryEngine
from epoxi.dns.resolver import Resolver
from epoxi.errors import ConfigError
from epoxi.events.log import RecordLog
from epoxi.events.records import Record, RecordType
from epoxi.message import MessageMeta
from epoxi.queue.headers import take_epoxi_headers
from epoxi.queue.model import Job, Message, queue_name, split_by_domain
from epoxi.queue.scheduled import Scheduler, SuspendKind, Suspension
from epoxi.reception.server import SmtpServer
from epoxi.spool import Spool
from epoxi.store import KeyStore, StatusStore, store_path

if TYPE_CHECKING:
    from epoxi.config import Settings

log = logging.getLogger(__name__)


class Epoxi:
    """One Epoxi node: spool, SMTP reception, queues and the delivery engine."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        spool = settings.spool
        self.spool = Spool(
            settings.data_dir / "spool.db",
            max_batch=spool.max_batch,
            max_pending=spool.max_pending,
            min_free_bytes=spool.min_free_space,
            checkpoint_interval=spool.checkpoint_interval,
            journal_size_limit=spool.journal_size_limit,
        )
        self.records = RecordLog(settings.data_dir / "logs")
        nameservers = [parse_hostport(n, 53) for n in settings.dns.nameservers] or None
        self.resolver = Resolver(nameservers=nameservers, timeout=settings.dns.timeout)
        self.scheduler = Scheduler(release=self._release, on_hold=self._held)
        self.engine = DeliveryEngine(
            settings,
            resolver=self.resolver,
            classifier=Classifier.from_files(list(settings.delivery.bounce_rules)),
            records=self.records,
            spool=self.spool,
            scheduler=self.scheduler,
            inject=self.inject,
        )
        self.smtp = SmtpServer(settings, ingest=self)
        self.admin = Admin(self.scheduler, self.engine, self.spool)
        self.status = StatusStore(store_path(settings.data_dir))
        self.records.subscribe(self.status.feed)
        self.keys: KeyStore | None = None  # opened at start, once the data dir exists
        self.http: HttpServer | None = None
        self._stopping = asyncio.Event()
        self._scheduler_task: asyncio.Task[None] | None = None
        self._purge_task: asyncio.Task[None] | None = None
        self._loading: set[str] = set()  # ids spooled while the start-up load runs
        self._loading_done = False
        self.loaded: asyncio.Task[int] | None = None  # the start-up load of the spool

    # ----------------------------------------------------------------- ingest

    def unhealthy_reason(self) -> str | None:
        return self.spool.unhealthy_reason()

    async def accept(self, meta: MessageMeta, body: bytes, *, trusted: bool = True) -> None:
        """Take a message from reception: spool it durably, record it, queue it."""
        body, control = take_epoxi_headers(body)
        if control and trusted:
            meta.tenant = control.get("tenant", meta.tenant)
            meta.campaign = control.get("campaign", meta.campaign)
            meta.size = len(body)
        await self.inject(meta, body)

    async def inject(self, meta: MessageMeta, body: bytes) -> None:
        """Spool and queue a message made here or received (DSNs, the HTTP API)."""
        await self.spool.store(meta, body)
        self._spooled(meta, body)

    async def inject_many(self, items: list[tuple[MessageMeta, bytes]]) -> None:
        """Spool several messages in one transaction (all or none), then queue them."""
        await self.spool.store_many(items)
        for meta, body in items:
            self._spooled(meta, body)

    def _spooled(self, meta: MessageMeta, body: bytes) -> None:
        if not self._loading_done:
            self._loading.add(meta.id)
        self.records.emit(
            Record(
                type=RecordType.RECEPTION,
                message_id=meta.id,
                sender=meta.sender,
                recipients=meta.recipients,
                peer_address=meta.peer,
                size=meta.size,
                reason=meta.origin,
                next_attempt=meta.due,
                tenant=meta.tenant,
                campaign=meta.campaign,
            )
        )
        self.enqueue(meta, body)

    def enqueue(self, meta: MessageMeta, body: bytes | None) -> None:
        """Split a spooled message into one job per recipient domain and schedule them."""
        message = Message(meta, body)
        groups = split_by_domain(meta.recipients)
        message.open_jobs = len(groups)
        if not groups:
            self.spool.remove(meta.id)
        for domain, recipients in groups.items():
            self.scheduler.add(
                Job(
                    message,
                    domain,
                    recipients,
                    queue_name(domain, meta.tenant, meta.campaign),
                    attempts=meta.attempts,
                    due=meta.due,
                )
            )

    def _release(self, job: Job) -> None:
        self.engine.submit(job)

    def _held(self, job: Job, suspension: Suspension) -> None:
        meta = job.message.meta
        for recipient in job.recipients:
            self.records.emit(
                Record(
                    type=RecordType.SUSPENDED,
                    message_id=meta.id,
                    queue=job.queue,
                    sender=meta.sender,
                    recipient=recipient,
                    size=meta.size,
                    reason=f"{suspension.kind} {suspension.value} suspended: {suspension.reason}",
                )
            )

    # ----------------------------------------------------------------- admin (in-process)

    def suspend(
        self, kind: SuspendKind, value: str, reason: str = "", duration: float | None = None
    ) -> None:
        until = time.time() + duration if duration else None
        self.scheduler.suspend(Suspension(kind, value, reason, until))

    def resume(self, kind: SuspendKind, value: str) -> int:
        return self.scheduler.resume(kind, value)

    # ----------------------------------------------------------------- life cycle

    async def start(self) -> None:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.keys = KeyStore(store_path(self.settings.data_dir))
        self._check_http_exposure(self.keys)
        self.spool.open()
        await self.records.start()
        await self.status.start()
        loop = asyncio.get_running_loop()
        self._scheduler_task = loop.create_task(self.scheduler.run())
        self._purge_task = loop.create_task(self._purge_store())
        self.engine.start()
        self._loading = set()  # before the listeners: what they accept is not loaded again
        await self.smtp.start()
        if self.settings.http_listen:
            api = build_app(self._api_context(self.keys))
            self.http = HttpServer(api, self.settings.http_listen)
            await self.http.start()
        self.loaded = loop.create_task(self._load_spool())

    def _check_http_exposure(self, keys: KeyStore) -> None:
        """No API keys means loopback only: refuse to listen anywhere else."""
        exposed = [a for a in self.settings.http_listen if not _is_loopback(a)]
        if exposed and not keys.any_active():
            raise ConfigError(
                f"http_listen {', '.join(exposed)} is not loopback and no API key exists: "
                "create one with `epoxi keys create`, or listen on 127.0.0.1"
            )

    def _api_context(self, keys: KeyStore) -> ApiContext:
        metrics = Metrics(
            self.scheduler,
            self.engine,
            spool_pending=lambda: self.spool.pending,
            smtp_sessions=lambda: self.smtp.sessions,
        )
        self.records.subscribe(metrics.feed)
        return ApiContext(
            settings=self.settings,
            inject_many=self.inject_many,
            status=self.status,
            keys=keys,
            admin=self.admin,
            readiness=self.readiness,
            metrics_text=metrics.text,
        )

    def readiness(self) -> dict[str, str]:
        """Each check of ``/health/ready``: "ok" or what is wrong."""
        spool = self.spool.unhealthy_reason()
        return {
            "spool": spool or "ok",
            "smtp": "ok" if self.smtp.addresses else "not listening",
            "stopping": "shutting down" if self._stopping.is_set() else "ok",
        }

    async def _purge_store(self) -> None:
        api = self.settings.api
        while True:
            await asyncio.sleep(3600)
            try:
                await self.status.purge(api.idempotency_ttl, api.history_ttl)
            except Exception:
                log.exception("purging the store failed")

    async def _load_spool(self) -> int:
        """Queue what the spool held at start, a page at a time, while mail flows in.

        Bodies stay on disk until their attempt. A message spooled since start is queued by
        its own path and skipped here, so nothing is queued twice.
        """
        started = time.monotonic()
        pages = self.spool.iter_meta()
        count = 0
        try:
            while not self._loading_done and (page := await asyncio.to_thread(next, pages, None)):
                for meta in page:
                    if meta.id not in self._loading:
                        _share_strings(meta)
                        self.enqueue(meta, None)
                        count += 1
        finally:
            pages.close()
            self._loading.clear()
            self._loading_done = True
        log.info(
            "spool %s: %d messages queued in %.1fs",
            self.spool.path,
            count,
            time.monotonic() - started,
        )
        return count

    async def stop(self) -> None:
        log.info("shutting down")
        if self.loaded is not None:
            self._loading_done = True  # the load stops after its current page
            await self.loaded
        if self.http is not None:
            await self.http.stop()
        await self.smtp.stop()
        await self.engine.stop()
        for task in (self._scheduler_task, self._purge_task):
            if task is not None:
                task.cancel()
        await self.records.stop()
        await self.status.stop()
        await self.spool.close()
        if self.keys is not None:
            self.keys.close()

    def request_stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Serve until SIGTERM or SIGINT, then shut down cleanly."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        await self.start()
        log.info("Epoxi %s ready", self.settings.hostname)
        await self._stopping.wait()
        await self.stop()


def _is_loopback(address: str) -> bool:
    host, _ = parse_hostport(address, 4000)
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _share_strings(meta: MessageMeta) -> None:
    """Loaded messages repeat the same senders, clients, tenants and replies: one copy each."""
    meta.sender = sys.intern(meta.sender)
    meta.origin = sys.intern(meta.origin)
    meta.peer = sys.intern(meta.peer)
    meta.helo = sys.intern(meta.helo)
    meta.auth_user = sys.intern(meta.auth_user)
    meta.tenant = sys.intern(meta.tenant)
    meta.campaign = sys.intern(meta.campaign)
    meta.last_response = sys.intern(meta.last_response)
