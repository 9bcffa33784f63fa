"""``GET /metrics``: Prometheus text, every metric described, every label bounded.

Counters follow the records (a record-log subscriber: one dict lookup and an increment);
gauges are read from the queues when scraped. No label carries a message, a domain or a
site: those are unbounded, and ``/admin/pipelines`` is where per-queue figures live.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from epoxi.delivery.engine import DeliveryEngine
from epoxi.events.records import Record, RecordType
from epoxi.queue.scheduled import Scheduler

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(
        self,
        scheduler: Scheduler,
        engine: DeliveryEngine,
        spool_pending: Callable[[], int],
        smtp_sessions: Callable[[], int],
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        records = Counter(
            "epoxi_records",
            "State changes of messages, by record type (Reception, Delivery, Bounce ...)",
            ["type"],
            registry=self.registry,
        )
        self._by_type = {kind: records.labels(kind.value) for kind in RecordType}
        self._failures = Counter(
            "epoxi_failures",
            "Failed delivery attempts by bounce category and whether they were permanent",
            ["classification", "permanent"],
            registry=self.registry,
        )
        self.registry.register(_QueueGauges(scheduler, engine, spool_pending, smtp_sessions))

    def feed(self, record: Record) -> None:
        self._by_type[record.type].inc()
        if record.classification and record.type in (
            RecordType.BOUNCE,
            RecordType.TRANSIENT_FAILURE,
        ):
            permanent = "true" if record.type is RecordType.BOUNCE else "false"
            self._failures.labels(record.classification, permanent).inc()

    def text(self) -> bytes:
        return generate_latest(self.registry)


@dataclass(eq=False)  # the registry keeps collectors in a set
class _QueueGauges(Collector):
    scheduler: Scheduler
    engine: DeliveryEngine
    spool_pending: Callable[[], int]
    smtp_sessions: Callable[[], int]

    def collect(self) -> Iterator[Metric]:
        queues = list(self.scheduler.queues.values())
        ready = list(self.engine.ready.values())
        scheduled = [q.scheduled for q in queues]
        held = [len(q.held) for q in queues]
        connections = [r.connections for r in ready]
        figures = {
            "scheduled_messages": ("Jobs waiting for their due time", sum(scheduled)),
            "held_messages": ("Jobs due but held by a suspension", sum(held)),
            "ready_messages": ("Jobs in ready queues, waiting to be sent", sum(map(len, ready))),
            "scheduled_queues": (
                "Scheduled queues that hold jobs",
                sum(1 for q in queues if q.scheduled or q.held),
            ),
            "ready_queues": ("Ready queues (egress source, site)", len(ready)),
            "outbound_connections": ("Open delivery connections", sum(connections)),
            "suspended_ready_queues": (
                "Ready queues suspended by an operator",
                sum(1 for r in ready if r.suspension),
            ),
            "spool_pending_writes": ("Spool writes waiting for their commit", self.spool_pending()),
            "smtp_sessions": ("Open inbound SMTP sessions", self.smtp_sessions()),
        }
        for name, (description, value) in figures.items():
            yield GaugeMetricFamily(f"epoxi_{name}", description, value=value)

    def describe(self) -> Iterator[Metric]:
        return iter(())
