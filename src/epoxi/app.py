"""The composition root: builds every part from the settings, starts and stops them in order.

Wiring and life cycle only. A message's way through the parts is drawn in
docs/architecture.md: reception/ and api/ -> ingest/ -> spool/ and queue/ -> delivery/
(dispatcher, ready queues, transport) -> outcomes/ -> events/ -> store/.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from epoxi.admin import Admin
from epoxi.api.app import build_app
from epoxi.api.context import ApiContext
from epoxi.api.limits import SendLimits
from epoxi.api.peers import Peers
from epoxi.api.server import HttpServer
from epoxi.api_types import Pipelines
from epoxi.bounce.classify import Classifier
from epoxi.bounce.verp import Verp
from epoxi.bounce.verp import load_key as load_verp_key
from epoxi.compose.tracking import Tracker
from epoxi.config import DeliverySettings, DkimSettings, parse_hostport
from epoxi.delivery.automation import Automation
from epoxi.delivery.dispatcher import Dispatcher
from epoxi.delivery.hosttls import HostTls
from epoxi.delivery.lines import TenantLimits
from epoxi.delivery.pools import Pools
from epoxi.delivery.routing import Router
from epoxi.delivery.transport import SmtpTransport, own_sender
from epoxi.delivery.warmup import Warmup
from epoxi.dkim import Signer, load_key
from epoxi.dns.resolver import Resolver
from epoxi.errors import ConfigError
from epoxi.events.log import RecordLog
from epoxi.ingest import Ingest
from epoxi.ingest.feedback import FeedbackMailbox, Quarantine
from epoxi.ingest.loader import SpoolLoader
from epoxi.metrics import Metrics
from epoxi.outcomes import Disposition
from epoxi.queue.model import HeldBodies, Job
from epoxi.queue.retry import RetryPolicy
from epoxi.queue.scheduled import Scheduler
from epoxi.queue.suspensions import SuspensionRegistry
from epoxi.reception.server import SmtpServer
from epoxi.shaping.files import ShapingFiles, shipped_file
from epoxi.shaping.policy import ShapingPolicy
from epoxi.sinks.metrics import SinkMetrics
from epoxi.sinks.sink import build_sinks
from epoxi.spool import Spool
from epoxi.spool.shards import adopt_orphans, shard_path
from epoxi.store import KeyStore, StatusStore, check_http_exposure, store_path
from epoxi.store.automation import AutomationStore
from epoxi.store.platform import ActivityFeed, TenantStatus, open_platform_store
from epoxi.store.provider_events import ProviderEventStore
from epoxi.store.suppressions import CHANGES_KEPT, Suppressions, SuppressionStore
from epoxi.store.warmup import WarmupStore
from epoxi.store.webhooks import WebhookStore
from epoxi.webhooks.outbox import Webhooks
from epoxi.webhooks.provider import ProviderEvents
from epoxi.workers import Placement
from epoxi.workers.link import SupervisorLink

if TYPE_CHECKING:
    from epoxi.config import Settings

log = logging.getLogger(__name__)

WARMUP_SYNC = 1.0  # seconds between writes of the warm-up counts to the store
SUPPRESSION_POLL = 1.0  # seconds between looks for other workers' suppression list changes


class Epoxi:
    """One Epoxi node: spool, SMTP reception, ingest, queues, delivery, outcomes, records.

    Alone (``--workers 1``) it binds its own sockets. As worker ``placement.index`` of a
    supervisor it serves the sockets passed down, keeps its own spool shard and record log,
    shares the store with its peers, and takes connection slots and rate shares from the
    supervisor.
    """

    def __init__(self, settings: Settings, placement: Placement | None = None) -> None:
        self.settings = settings
        self.placement = placement = placement or Placement()
        delivery = settings.delivery
        self.spool = _spool(settings, placement.index)
        self.records = RecordLog(settings.data_dir / "logs", name=_records_name(placement.index))
        self.link = (
            SupervisorLink(placement.control, count=placement.count)
            if placement.control is not None
            else None
        )
        nameservers = [parse_hostport(n, 53) for n in settings.dns.nameservers] or None
        self.resolver = Resolver(nameservers=nameservers, timeout=settings.dns.timeout)
        self.suspensions = SuspensionRegistry()
        self.pools = Pools(delivery, self.suspensions)
        self.warmup = Warmup(
            delivery,
            self.pools,
            worker=placement.index,
            workers=placement.count,  # each worker has its share of every allowance
            store=WarmupStore(store_path(settings.data_dir), placement.index),
        )
        self.scheduler = Scheduler(release=self._release, suspensions=self.suspensions)
        classifier = Classifier.from_files(list(delivery.bounce_rules))
        self.verp = (
            Verp(settings.bounce_domain, load_verp_key(settings.bounce_secret, settings.data_dir))
            if settings.bounce_domain
            else None
        )
        self.suppressions = Suppressions(SuppressionStore(store_path(settings.data_dir)))
        self.ingest = Ingest(
            feedback=self._feedback_mailbox(classifier),
            spool=self.spool,
            records=self.records,
            schedule=self.scheduler.add,
            max_hops=settings.max_hops,
            signer=dkim_signer(settings.dkim),
            sign_threads=settings.dkim.threads,
            known_pool=self.pools.known,
            suppressions=self.suppressions.list,
            bodies=HeldBodies(settings.spool.held_bodies),
        )
        self.router = Router(settings, self.resolver)
        self.outcomes = Disposition(
            classifier=classifier,
            records=self.records,
            spool=self.spool,
            reschedule=self.scheduler.add,
            retry=retry_policy(delivery),
            inject=self.ingest.inject,
            hostname=settings.hostname,
            dsn_wanted=self._dsn_wanted,
            retry_for=self._retry_for,
            bodies=self.ingest.bodies,
        )
        self.scheduler.on_hold = self.outcomes.held
        self.dispatcher = Dispatcher(
            router=self.router,
            policy=shaping_policy(delivery, shaping_files(settings)),
            transport=SmtpTransport(
                self.resolver,
                settings.hostname,
                delivery.timeouts,
                tls=HostTls.from_settings(self.resolver, delivery),
                sender=self.verp.sender_for if self.verp is not None else own_sender,
            ),
            outcomes=self.outcomes,
            suspensions=self.suspensions,
            load_body=self.spool.load_body,
            hold_back=self.scheduler.add,
            pools=self.pools,
            ready_queue_limit=delivery.ready_queue_limit,
            slots=self.link,
            tenants=TenantLimits.from_settings(delivery, workers=placement.count),
            warmup=self.warmup,
        )
        self.automation = Automation(
            store=AutomationStore(store_path(settings.data_dir)),
            dispatcher=self.dispatcher,
            suspensions=self.suspensions,
            records=self.records,
            take=self._take_waiting,
            bounce=self.outcomes.admin_bounce,
        )
        self._shaping_seen = _file_stamps(settings.shaping_files)
        self.smtp = SmtpServer(settings, ingest=self.ingest, share=placement.count)
        self.admin = Admin(
            scheduler=self.scheduler,
            dispatcher=self.dispatcher,
            outcomes=self.outcomes,
            suspensions=self.suspensions,
            spool=self.spool,
            automation=self.automation,
            reload_shaping=self.reload_shaping,
        )
        self.status = StatusStore(store_path(settings.data_dir))
        self.webhooks = Webhooks(
            WebhookStore(store_path(settings.data_dir)),
            settings.webhooks,
            sender=placement.index == 0,  # one queue for all workers: one sends it
        )
        self.provider_events = ProviderEvents(  # POST /webhooks/{provider}
            store=ProviderEventStore(store_path(settings.data_dir)),
            status=self.status,
            suppressions=self.suppressions,
            records=self.records,
            classifier=classifier,
            secrets=settings.provider_webhooks.secrets,
            tolerance=settings.provider_webhooks.tolerance,
        )
        self.platform = open_platform_store(settings.data_dir, settings.database)
        self.activity = ActivityFeed(self.platform)  # emails' statuses and analytics
        self.records.subscribe(self.status.feed)
        self.records.subscribe(self.activity.feed)
        self.records.subscribe(self.webhooks.observe)
        self.records.subscribe(self.pools.observe)
        self.records.subscribe(self.automation.observe)
        self.records.subscribe(self.warmup.observe)  # after the pools: it reads their health
        self.sinks = build_sinks(settings, placement.index)  # broker sinks: docs/events.md
        for sink in self.sinks:
            self.records.subscribe(sink.feed)
        self.records.subscribe(self.suppressions.observe)
        self.peers = Peers(placement.peer_sockets())  # for the API's answers over all workers
        self.keys: KeyStore | None = None  # opened at start, once the data dir exists
        self.http: HttpServer | None = None
        self.loader: SpoolLoader | None = None
        self.loaded: asyncio.Task[int] | None = None  # the start-up load of the spool
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def _take_waiting(self, predicate: Callable[[Job], bool]) -> list[Job]:
        return self.admin.take_waiting(predicate)  # bound late: the admin is made last

    def _release(self, job: Job) -> None:
        self.dispatcher.submit(job)  # bound late: the dispatcher is made after the scheduler

    def _feedback_mailbox(self, classifier: Classifier) -> FeedbackMailbox | None:
        """Mail to the bounce domain and the FBL addresses: read into records, quarantined."""
        settings = self.settings
        if self.verp is None:
            return None
        return FeedbackMailbox(
            verp=self.verp,
            classifier=classifier,
            records=self.records,
            quarantine=Quarantine(settings.data_dir / "bounces", settings.bounce_quarantine_size),
            fbl_addresses=frozenset(settings.fbl_addresses),
            owner=self._owner,
        )

    async def _owner(self, message_id: str) -> tuple[str, str] | None:
        return await self.status.owner(message_id)

    def _retry_for(self, job: Job, configured: RetryPolicy) -> RetryPolicy:
        return destination_retry(self.dispatcher.policy, job, configured)

    def _dsn_wanted(self, job: Job) -> bool:
        delivery = self.settings.delivery
        if not delivery.dsn or job.message.meta.tenant in delivery.dsn_disabled_tenants:
            return False
        route = self.router.static(job.domain)
        return route is None or route.dsn

    # ----------------------------------------------------------------- life cycle

    async def start(self) -> None:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.keys = KeyStore(store_path(self.settings.data_dir))
        check_http_exposure(self.settings.http_listen, self.keys)
        if not self.placement.supervised:  # a supervisor does this before its workers start
            adopt_orphans(self.settings.data_dir, workers=1)
        self.spool.open()
        await self.records.start()
        for sink in self.sinks:
            await sink.start()
        await self.status.start()
        await self.provider_events.store.start()
        await self.platform.start()
        self.activity.start()
        await self._hold_suspended_tenants()  # before any mail is loaded or comes in
        await self.webhooks.start()
        await self.automation.store.start()
        await self.automation.start()  # actions in force before any mail moves
        await self.warmup.start()  # today's counts, before any job is let through
        await self.suppressions.start()  # the lists, before any mail comes in
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self.scheduler.run()),
            loop.create_task(self.automation.run()),
            loop.create_task(self._every(WARMUP_SYNC, self.warmup.sync)),
            loop.create_task(self._every(SUPPRESSION_POLL, self.suppressions.refresh)),
            loop.create_task(
                self._every(self.settings.delivery.expiry_sweep_interval, self._sweep_expired)
            ),
        ]
        if self.placement.index == 0:  # the store is one for all workers: purged by one
            self._tasks.append(loop.create_task(self._every(3600, self._purge_store)))
        if self.settings.shaping_watch_interval:
            watch = self.settings.shaping_watch_interval
            self._tasks.append(loop.create_task(self._every(watch, self._watch_shaping)))
        self.loader = SpoolLoader(self.spool, self.ingest)  # before the listeners open
        if self.link is not None:
            await self._start_link(self.link)
            await self._adopt_suspensions()
        await self.smtp.start(self.placement.smtp_sockets, self.placement.handoff)
        if self.settings.http_listen:
            api = build_app(self._api_context(self.keys))
            place = self.placement
            self.http = HttpServer(
                api,
                self.settings.http_listen,
                bound=place.http_sockets,
                unix=place.api_socket(place.index),
            )
            await self.http.start()
        self.loaded = loop.create_task(self.loader.run())
        if self.link is not None:
            self.link.ready()

    async def _hold_suspended_tenants(self) -> None:
        """Suspended tenants' mail waits from the start (their status is in the platform store)."""
        for tenant in await self.platform.tenants():
            if tenant.status is TenantStatus.SUSPENDED:
                self.admin.hold_tenant(tenant.id, held=True)

    async def _adopt_suspensions(self) -> None:
        """A worker restarted while others run: hold what they hold before loading mail."""
        for peer in await self.peers.get("/admin/pipelines", Pipelines, timeout=5.0):
            self.admin.adopt(peer.suspensions)

    async def _start_link(self, link: SupervisorLink) -> None:
        link.backlogs = self.dispatcher.rate_backlogs
        link.on_shares = self.dispatcher.shares_changed
        link.on_wanted = self.dispatcher.slots_wanted
        link.on_lost = self.request_stop
        await link.start()

    def _api_context(self, keys: KeyStore) -> ApiContext:
        metrics = Metrics(
            [self.scheduler.gauges, self.dispatcher.gauges, self._node_gauges, self.warmup.gauges]
            + ([self.ingest.feedback.gauges] if self.ingest.feedback is not None else []),
            [SinkMetrics(self.sinks)] if self.sinks else [],
        )
        self.records.subscribe(metrics.feed)
        return ApiContext(
            peers=self.peers,
            settings=self.settings,
            inject_many=self.ingest.inject_many,
            status=self.status,
            keys=keys,
            admin=self.admin,
            webhooks=self.webhooks,
            provider_events=self.provider_events,
            platform=self.platform,
            activity=self.activity,
            limits=SendLimits(self.placement.count, self._accepted_today),
            records=self.records,
            tracker=self._tracker(),
            readiness=self.readiness,
            metrics_text=metrics.text,
            suppressions=self.suppressions,
            sinks=self.sinks,
            quarantine=self.ingest.feedback.quarantine if self.ingest.feedback else None,
        )

    def _tracker(self) -> Tracker | None:
        tracking = self.settings.tracking
        if not tracking.base_url:
            return None
        return Tracker.load(tracking.base_url, tracking.secret, self.settings.data_dir)

    async def _accepted_today(self, tenant_id: str, start: float, end: float) -> int:
        """Recipients of the tenant the platform counted from ``start`` (its daily limit)."""
        await self.activity.flush()  # this worker's latest sends are in the count
        hours = await self.platform.hourly_counts(tenant_id, start, end, None)
        return sum(hour.counts["accepted"] for hour in hours)

    def _node_gauges(self) -> dict[str, tuple[str, float]]:
        return {
            "spool_pending_writes": ("Spool writes waiting for their commit", self.spool.pending),
            # Group commit at work: committed writes over commits is the mean group size.
            "spool_commits": ("Spool transactions committed since start", self.spool.commits),
            "spool_committed_writes": (
                "Spool writes (stores, updates, removes) in those transactions",
                self.spool.committed,
            ),
            "spool_failed_commits": ("Spool transactions that failed", self.spool.failed_commits),
            "smtp_sessions": ("Open inbound SMTP sessions", self.smtp.sessions),
        }

    def readiness(self) -> dict[str, str]:
        """Each check of ``/health/ready``: "ok" or what is wrong."""
        spool = self.spool.unhealthy_reason()
        return {
            "spool": spool or "ok",
            "smtp": "ok" if self.smtp.addresses else "not listening",
            "stopping": "shutting down" if self._stopping.is_set() else "ok",
        }

    async def _every(self, seconds: float, job: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await job()
            except Exception:
                log.exception("periodic job %s failed", job.__name__)

    async def _purge_store(self) -> None:
        api = self.settings.api
        await self.status.purge(api.idempotency_ttl, api.history_ttl)
        await self.automation.store.purge(time.time() - 86400)
        await self.suppressions.store.purge(time.time() - CHANGES_KEPT)
        await self.provider_events.purge(self.settings.provider_webhooks.keep)

    async def _watch_shaping(self) -> None:
        """A shaping file changed on disk: apply it now, or keep the running one if it is
        invalid (logged once per edit)."""
        stamps = _file_stamps(self.settings.shaping_files)
        if stamps == self._shaping_seen:
            return
        self._shaping_seen = stamps
        try:
            self.reload_shaping()
        except ConfigError as exc:
            log.error("shaping files changed but not applied, the running ones are kept: %s", exc)

    def reload_shaping(self) -> list[str]:
        """Read the shaping files again and apply them to the live ready queues; returns the
        files in use. ConfigError (and nothing changed) if one is invalid."""
        files = shaping_files(self.settings)
        self._reshape(files)
        self._shaping_seen = _file_stamps(self.settings.shaping_files)
        log.info("shaping files applied: %s", ", ".join(files.origins) or "none")
        return list(files.origins)

    def _reshape(self, files: ShapingFiles, delivery: DeliverySettings | None = None) -> None:
        """A new shaping policy for the live queues; automation's overrides stay."""
        policy = shaping_policy(delivery or self.settings.delivery, files)
        self.dispatcher.reshape(policy.with_overrides(self.dispatcher.policy.overrides))

    async def _sweep_expired(self) -> None:
        self.admin.expire_stuck()

    async def stop(self) -> None:
        log.info("shutting down")
        if self.loader is not None and self.loaded is not None:
            self.loader.stop()
            await self.loaded
        if self.http is not None:
            await self.http.stop()
        await self.peers.close()
        await self.smtp.stop()
        await self.dispatcher.close()
        await self.outcomes.stop()
        await self.automation.stop()
        await self.webhooks.stop()  # after the last records: their events are queued
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.records.stop()
        for sink in self.sinks:
            await sink.stop()  # publishes what it can in a moment; the rest waits on disk
        await self.warmup.stop()
        await self.status.stop()
        await self.provider_events.store.stop()
        await self.activity.stop()
        await self.platform.stop()
        await self.automation.store.stop()
        await self.suppressions.stop()
        await self.spool.close()
        self.ingest.close()
        if self.link is not None:
            await self.link.stop()
        if self.keys is not None:
            self.keys.close()

    def request_stop(self) -> None:
        self._stopping.set()

    def reload(self, new: Settings) -> None:
        """Apply what can change while running (SIGHUP); log what was done and what needs a
        restart."""
        old = self.settings
        signer = dkim_signer(new.dkim)  # reads the key files: fails before anything changes
        files = shaping_files(new)  # likewise: a shaping file that does not validate
        self.router.reload(new)
        self._reshape(files, new.delivery)
        self.dispatcher.reconfigure(new.delivery)
        self.warmup.configure(new.delivery)
        self.outcomes.retry = retry_policy(new.delivery)
        self.ingest.max_hops = new.max_hops
        self.ingest.signer = signer
        done = [
            "shaping",
            "routes",
            "sources and pools",
            "warm-ups",
            "retries",
            "max_hops",
            "DKIM keys",
            *self.smtp.reload(new),
            "API keys (read per request)",
        ]
        self.settings = new
        log.info("configuration reloaded: %s", ", ".join(done))
        frozen = [name for name in _RESTART_ONLY if _setting(old, name) != _setting(new, name)]
        if frozen:
            log.warning("changed, but only applied by a restart: %s", ", ".join(frozen))

    def _on_hangup(self, load: Callable[[], Settings] | None) -> None:
        if load is None:
            log.warning("SIGHUP: no configuration to reload from; ignored")
            return
        try:
            self.reload(load())
        except ConfigError as exc:
            log.error("SIGHUP: configuration not reloaded, the running one is kept: %s", exc)

    async def run(self, reload: Callable[[], Settings] | None = None) -> None:
        """Serve until SIGTERM or SIGINT, then shut down cleanly; SIGHUP calls ``reload`` for
        new settings and applies what it can."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self._on_hangup, reload)
        await self.start()
        log.info("Epoxi %s ready", self.settings.hostname)
        await self._stopping.wait()
        await self.stop()


_RESTART_ONLY = (
    "hostname",
    "data_dir",
    "http_listen",
    "smtp.listeners",
    "smtp.max_connections",
    "spool",
    "dns",
    "delivery.tls_ca_file",
    "delivery.mta_sts_port",
    "delivery.dane",
    "workers",
    "events.sinks",
)


def _setting(settings: Settings, dotted: str) -> object:
    value: object = settings
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def retry_policy(delivery: DeliverySettings) -> RetryPolicy:
    return RetryPolicy(delivery.retry_interval, delivery.max_retry_interval, delivery.max_age)


def destination_retry(policy: ShapingPolicy, job: Job, configured: RetryPolicy) -> RetryPolicy:
    """The retries of a job's destination: the shaping files may set them per provider, site
    or domain (before its first routing the site is not known: domain and default blocks
    only; the dispatcher judges such a job's age once it is routed)."""
    if not policy.sets_retries:
        return configured  # the common case: no lookup per job
    shaping = policy.resolve(job.domain, job.site or job.domain, job.source)
    given = (shaping.retry_interval, shaping.max_retry_interval, shaping.max_age)
    if given == (None, None, None):
        return configured
    return _retry_policy(
        shaping.retry_interval or configured.retry_interval,
        shaping.max_retry_interval or configured.max_retry_interval,
        shaping.max_age or configured.max_age,
    )


@functools.lru_cache(maxsize=1024)
def _retry_policy(interval: float, max_interval: float, max_age: float) -> RetryPolicy:
    return RetryPolicy(interval, max(interval, max_interval), max_age)


def shaping_policy(delivery: DeliverySettings, files: ShapingFiles | None = None) -> ShapingPolicy:
    """The shaping policy of the shaping files and the ``[delivery]`` settings."""
    return ShapingPolicy(
        defaults=delivery.defaults.model_dump(exclude_none=True),
        named={k: v.model_dump(exclude_none=True) for k, v in delivery.shaping.items()},
        sources={k: v.model_dump(exclude_none=True) for k, v in delivery.source_shaping.items()},
        files=files,
    )


def shaping_files(settings: Settings) -> ShapingFiles:
    """The shipped shaping file (unless turned off) and the configured ones, read now; a file
    that cannot be used raises ConfigError naming it and the key."""
    shipped = [shipped_file()] if settings.shaping_default else []
    return ShapingFiles.load(list(settings.shaping_files), mx_only=shipped)


def _file_stamps(paths: tuple[Path, ...]) -> list[tuple[int, int] | None]:
    """What tells an edited file: its modification time and size (None: unreadable)."""
    stamps: list[tuple[int, int] | None] = []
    for path in paths:
        try:
            stat = path.stat()
        except OSError:
            stamps.append(None)
        else:
            stamps.append((stat.st_mtime_ns, stat.st_size))
    return stamps


def _spool(settings: Settings, shard: int) -> Spool:
    spool = settings.spool
    return Spool(
        shard_path(settings.data_dir, shard),
        max_batch=spool.max_batch,
        max_pending=spool.max_pending,
        min_free_bytes=spool.min_free_space,
        checkpoint_interval=spool.checkpoint_interval,
        journal_size_limit=spool.journal_size_limit,
    )


def dkim_signer(dkim: DkimSettings) -> Signer | None:
    """The signer of the configured keys (each file read now), or None without keys. A key
    that cannot be used raises ConfigError naming its file."""
    if not dkim.keys:
        return None
    keys = [load_key(k.domain, k.selector, k.key_file) for k in dkim.keys]
    return Signer(keys, dkim.tenants, dkim.expire)


def _records_name(worker: int) -> str:
    return "records.jsonl" if worker == 0 else f"records-{worker}.jsonl"
