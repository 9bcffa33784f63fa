"""Broker sinks without a broker: the backlog (bounded, oldest dropped and counted, kept
across a reopen), the filters, the sink's loop against a fake broker that fails on demand,
and the settings (kinds, urls, passwords never shown)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from epoxi.config import Settings, SinkSettings, load_settings
from epoxi.errors import BrokerUnavailable, ConfigError
from epoxi.events.outbound import event_of
from epoxi.events.records import Record, RecordType
from epoxi.metrics import Metrics
from epoxi.sinks.backlog import Backlog, Event
from epoxi.sinks.metrics import SinkMetrics
from epoxi.sinks.sink import BrokerSink, build_sinks
from tests.conftest import eventually


def events(count: int, start: int = 0) -> list[Event]:
    return [Event(f"id{i}", "delivery", b'{"n":%d}' % i) for i in range(start, start + count)]


def test_backlog_is_bounded_drops_the_oldest_and_survives_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "sinks" / "s-0.db"
    backlog = Backlog(path, limit=5)
    assert backlog.open() == 0
    assert backlog.append(events(3)) == (3, 0)
    assert backlog.append(events(4, start=3)) == (5, 2)  # 7 in, the 2 oldest out
    last, oldest = backlog.oldest(2)
    assert [e.id for e in oldest] == ["id2", "id3"]
    assert backlog.remove_through(last) == 3
    backlog.close()
    again = Backlog(path, limit=5)
    assert again.open() == 3
    assert [e.id for e in again.oldest(10)[1]] == ["id4", "id5", "id6"]
    assert again.oldest(10)[1][0].body == b'{"n":4}'
    again.close()


class FakeBroker:
    def __init__(self) -> None:
        self.up = True
        self.received: list[Event] = []
        self.connects = 0

    async def connect(self) -> None:
        self.connects += 1
        if not self.up:
            raise BrokerUnavailable("sink fake: cannot connect to fake://")

    async def publish(self, events: Sequence[Event]) -> None:
        if not self.up:
            raise BrokerUnavailable("sink fake: cannot publish to fake://")
        self.received.extend(events)

    async def close(self) -> None:
        pass


def sink_settings(**overrides: Any) -> SinkSettings:
    return SinkSettings.model_validate(
        {"name": "fake", "kind": "redis", "url": "redis://127.0.0.1:1/0", **overrides}
    )


def record(kind: RecordType = RecordType.DELIVERY, tenant: str = "", n: int = 0) -> Record:
    return Record(type=kind, message_id=f"m{n}", recipient=f"r{n}@a.test", tenant=tenant)


async def test_the_sink_publishes_the_events_of_the_records_it_wants(tmp_path: Path) -> None:
    broker = FakeBroker()
    settings = sink_settings(types=["delivery", "bounce"], tenants=["acme"])
    sink = BrokerSink(settings, tmp_path / "s.db", broker=broker, interval=0.01)
    await sink.start()
    wanted = [record(RecordType.DELIVERY, "acme", 1), record(RecordType.BOUNCE, "acme", 2)]
    for r in [*wanted, record(RecordType.DELIVERY, "other"), record(RecordType.RECEPTION, "acme")]:
        sink.feed(r)
    await eventually(lambda: len(broker.received) == 2, what="two events published")
    assert [e.id for e in broker.received] == [event_of(r)["id"] for r in wanted]
    assert [e.type for e in broker.received] == ["delivery", "bounce"]
    await eventually(lambda: sink.waiting == 0, what="an empty backlog")
    assert (sink.published, sink.dropped, sink.connected) == (2, 0, True)
    await sink.stop()


async def test_a_broker_away_fills_the_backlog_then_the_oldest_are_dropped_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker = FakeBroker()
    broker.up = False
    settings = sink_settings(backlog=10, retry_max=0.05)
    sink = BrokerSink(settings, tmp_path / "s.db", broker=broker, interval=0.01)
    await sink.start()
    with caplog.at_level(logging.WARNING):
        fed = [record(n=n) for n in range(25)]
        for r in fed:
            sink.feed(r)
        await eventually(lambda: sink.dropped == 15, what="15 events dropped")
    assert sink.waiting == 10 and not sink.connected
    assert sink.last_error == "sink fake: cannot connect to fake://"
    assert sink.last_error_at is not None and abs(sink.last_error_at - time.time()) < 60
    assert any("dropped the 15 oldest" in m for m in caplog.messages), caplog.messages
    metrics = Metrics([], [SinkMetrics([sink])]).text().decode()
    assert 'epoxi_sink_dropped_events_total{sink="fake"} 15.0' in metrics
    assert 'epoxi_sink_backlog_events{sink="fake"} 10.0' in metrics
    assert 'epoxi_sink_connected{sink="fake"} 0.0' in metrics
    broker.up = True  # the broker is back: the 10 newest arrive, oldest first
    await eventually(lambda: len(broker.received) == 10, what="the backlog drained")
    assert [e.id for e in broker.received] == [event_of(r)["id"] for r in fed[15:]]
    await sink.stop()


async def test_events_not_published_at_stop_wait_for_the_next_start(tmp_path: Path) -> None:
    broker = FakeBroker()
    broker.up = False
    sink = BrokerSink(sink_settings(), tmp_path / "s.db", broker=broker, interval=3600)
    await sink.start()
    for n in range(3):
        sink.feed(record(n=n))
    await sink.stop()  # the loop never turned: stop itself keeps them
    broker.up = True
    again = BrokerSink(sink_settings(), tmp_path / "s.db", broker=broker, interval=0.01)
    await again.start()
    assert again.waiting == 3
    await eventually(lambda: len(broker.received) == 3, what="the kept events published")
    await again.stop()


async def test_a_slow_backlog_never_makes_feed_wait(tmp_path: Path) -> None:
    """feed is an append: 100,000 records take well under a second on the loop."""
    sink = BrokerSink(sink_settings(), tmp_path / "s.db", broker=FakeBroker(), interval=3600)
    one = record()
    loop = asyncio.get_running_loop()
    began = loop.time()
    for _ in range(100_000):
        sink.feed(one)
    assert loop.time() - began < 1.0


def test_settings_check_kind_url_and_keys_and_hide_passwords(tmp_path: Path) -> None:
    ok = sink_settings(kind="rabbitmq", url="amqp://guest:guest@127.0.0.1/", exchange="x")
    assert ok.shown_url == "amqp://guest:<hidden>@127.0.0.1/"
    assert "guest@" not in repr(ok)
    config = tmp_path / "epoxi.toml"
    config.write_text(
        '[[events.sinks]]\nname = "q"\nkind = "nats"\nurl = "amqp://u:topsecret@h/"\n'
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(config, env={})
    assert "nats://" in str(caught.value) and "topsecret" not in str(caught.value)
    with pytest.raises(ValueError, match="exchange: not a setting of a redis sink"):
        sink_settings(exchange="x")
    with pytest.raises(ValueError, match="two sinks are named a"):
        Settings.model_validate({"events": {"sinks": [{**BASE, "name": "a"}] * 2}})


BASE = {"name": "s", "kind": "redis", "url": "redis://127.0.0.1:6379/0"}


def test_unknown_event_types_are_refused_naming_the_key(tmp_path: Path) -> None:
    settings = Settings.model_validate(
        {"data_dir": tmp_path, "events": {"sinks": [{**BASE, "types": ["delivery", "sent"]}]}}
    )
    with pytest.raises(ConfigError, match=r"events\.sinks\.0\.types: unknown event type sent"):
        build_sinks(settings, 0)
    settings = Settings.model_validate(
        {"data_dir": tmp_path, "events": {"sinks": [{**BASE, "types": "delivery, bounce"}]}}
    )
    (sink,) = build_sinks(settings, 3)
    assert sink.backlog.path == tmp_path / "sinks" / "s-3.db"


async def test_a_backlog_that_cannot_be_written_keeps_the_events_in_memory_within_the_bound(
    tmp_path: Path,
) -> None:
    broker = FakeBroker()
    sink = BrokerSink(sink_settings(backlog=5), tmp_path / "s.db", broker=broker, interval=3600)
    await sink.start()
    fail = True
    append = sink.backlog.append

    def failing(events: list[Event]) -> tuple[int, int]:
        if fail:
            raise OSError("disk full")
        return append(events)

    sink.backlog.append = failing  # type: ignore[method-assign]
    fed = [record(n=n) for n in range(8)]
    for r in fed:
        sink.feed(r)
    with pytest.raises(OSError):
        await sink.turn()
    assert sink.dropped == 3  # 8 kept in memory past a bound of 5: the 3 oldest go
    fail = False
    await sink.turn()
    assert [e.id for e in broker.received] == [event_of(r)["id"] for r in fed[3:]]
    await sink.stop()


def test_config_check_names_an_unknown_event_type_and_hides_the_password(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from epoxi.cli import app

    config = tmp_path / "epoxi.toml"
    config.write_text(
        '[[events.sinks]]\nname = "bus"\nkind = "redis"\nurl = "redis://:pw1@127.0.0.1/0"\n'
        'types = ["delivery", "sent"]\n'
    )
    result = CliRunner().invoke(app, ["config", "check", "-c", str(config)])
    assert result.exit_code == 2
    assert "events.sinks.0.types: unknown event type sent" in result.output
    assert "pw1" not in result.output


async def test_an_unexpected_broker_error_makes_the_sink_reconnect_and_hides_the_password(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class Odd(FakeBroker):
        fail = True

        async def publish(self, events: Sequence[Event]) -> None:
            if self.fail:
                self.fail = False
                raise RuntimeError("channel gone (amqp://u:pw9@h/)")
            await super().publish(events)

    broker = Odd()
    settings = sink_settings(kind="rabbitmq", url="amqp://u:pw9@h/")
    sink = BrokerSink(settings, tmp_path / "s.db", broker=broker, interval=0.01)
    await sink.start()
    sink.feed(record())
    await eventually(lambda: len(broker.received) == 1, what="published after a reconnect")
    assert broker.connects == 2
    assert "RuntimeError: channel gone" in caplog.text and "pw9" not in caplog.text
    await sink.stop()
