"""Prometheus metrics (served at ``GET /metrics``): every metric described, every label bounded.

Counters follow the records (a record-sink subscriber: one dict lookup and an increment).
Gauges are declared beside what they measure (``Scheduler.gauges``, ``Dispatcher.gauges``,
...) and read when scraped. No label carries a message, a domain or a site: those are
unbounded, and ``/admin/pipelines`` is where per-queue figures live.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from epoxi.events.records import Record, RecordType

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Gauges = Callable[[], Mapping[str, tuple[str, float]]]  # name -> (description, value)


class Metrics:
    def __init__(self, gauges: Sequence[Gauges], collectors: Sequence[Collector] = ()) -> None:
        """``collectors``: metrics with labels of their own (the broker sinks')."""
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
        self.registry.register(_Gauges(tuple(gauges)))
        for collector in collectors:
            self.registry.register(collector)

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
class _Gauges(Collector):
    providers: tuple[Gauges, ...]

    def collect(self) -> Iterator[Metric]:
        for provider in self.providers:
            for name, (description, value) in provider().items():
                yield GaugeMetricFamily(f"epoxi_{name}", description, value=value)

    def describe(self) -> Iterator[Metric]:
        return iter(())


def sum_metrics(texts: list[bytes]) -> bytes:
    """Several processes' exposition texts as one: each series' values added up.

    Every metric here is a count (records, jobs, connections), so the machine's figure is
    the sum of its workers' (a counter's ``_created`` time is the earliest). Comment lines
    and the order of series come from the first text.
    """
    if len(texts) == 1:
        return texts[0]
    totals: dict[bytes, float] = {}
    lines: list[bytes] = []
    for text in texts:
        for line in text.splitlines():
            if line.startswith(b"#"):
                if line not in lines:
                    lines.append(line)
                continue
            series, _, text_value = line.rpartition(b" ")
            value = float(text_value)
            if series not in totals:
                lines.append(series)
            elif series.partition(b"{")[0].endswith(b"_created"):  # a time: the earliest
                value = min(value, totals[series]) - totals[series]
            totals[series] = totals.get(series, 0.0) + value
    out = [line if line.startswith(b"#") else b"%s %r" % (line, totals[line]) for line in lines]
    return b"\n".join(out) + b"\n"
