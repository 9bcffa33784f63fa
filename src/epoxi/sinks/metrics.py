"""The broker sinks' metrics, one series per sink (label ``sink``): a few, named in the
configuration, so the label is bounded."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from epoxi.sinks.sink import BrokerSink


@dataclass(eq=False)  # the registry keeps collectors in a set
class SinkMetrics(Collector):
    sinks: Sequence[BrokerSink]

    def collect(self) -> Iterator[Metric]:
        backlog = GaugeMetricFamily(
            "epoxi_sink_backlog_events",
            "Events in a broker sink's backlog, not yet acknowledged by its broker",
            labels=["sink"],
        )
        connected = GaugeMetricFamily(
            "epoxi_sink_connected",
            "Whether a broker sink is connected to its broker (with workers: how many are)",
            labels=["sink"],
        )
        dropped = CounterMetricFamily(
            "epoxi_sink_dropped_events",
            "Events a broker sink dropped, the oldest first, because its backlog was full",
            labels=["sink"],
        )
        published = CounterMetricFamily(
            "epoxi_sink_published_events",
            "Events a broker sink's broker acknowledged",
            labels=["sink"],
        )
        for sink in self.sinks:
            backlog.add_metric([sink.name], sink.waiting)
            connected.add_metric([sink.name], 1.0 if sink.connected else 0.0)
            dropped.add_metric([sink.name], sink.dropped)
            published.add_metric([sink.name], sink.published)
        yield from (backlog, connected, dropped, published)

    def describe(self) -> Iterator[Metric]:
        return iter(())
