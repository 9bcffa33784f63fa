"""Broker sinks against the machine's real RabbitMQ, NATS (JetStream) and Redis: mail sent
through Epoxi comes out as events on each broker, filtered by type and tenant; a broker cut
off mid-run (a proxy the test owns, in front of it) slows no mail, its events wait in the
backlog and reach the broker once it is back.

No broker, no pass: these tests fail when a broker is not running (.ci/run starts them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Protocol

import aio_pika
import aio_pika.abc
import httpx
import nats
import nats.errors
import nats.js
import pytest
import redis.asyncio
from nats.js.api import ConsumerConfig

from epoxi.events.outbound import event_of
from epoxi.events.records import RecordType
from tests.conftest import EpoxiProcess, eventually, free_port
from tests.e2e.conftest import Api, MakeWorld, World, run_cli, send
from tests.e2e.test_webhooks import until
from tests.e2e.test_workers import api as worker_api
from tests.e2e.test_workers import send_to_every_worker

RABBITMQ = "amqp://guest:guest@127.0.0.1:5672/"
NATS = "nats://127.0.0.1:4222"
REDIS = "redis://127.0.0.1:6379/0"
KINDS = ["rabbitmq", "nats", "redis"]
WANTED = (RecordType.RECEPTION, RecordType.DELIVERY)


def body(tenant: str) -> bytes:
    return f"X-Epoxi-Tenant: {tenant}\r\nSubject: hi\r\nFrom: s@sender.test\r\n\r\nHi.\r\n".encode()


class Consumer(Protocol):
    sink: dict[str, Any]  # the sink's settings that point at what this consumer reads

    async def start(self) -> None: ...
    async def events(self) -> list[dict[str, Any]]: ...
    async def close(self) -> None: ...


class RabbitConsumer:
    """An exclusive queue bound with '#' to the sink's topic exchange."""

    def __init__(self, name: str) -> None:
        self.exchange = f"epoxi.test.{name}"
        self.sink = {"kind": "rabbitmq", "url": RABBITMQ, "exchange": self.exchange}
        self.received: list[dict[str, Any]] = []

    async def start(self) -> None:
        self.connection = await aio_pika.connect(RABBITMQ)
        channel = await self.connection.channel()
        exchange = await channel.declare_exchange(
            self.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(exchange, "#")
        await queue.consume(self._take, no_ack=True)
        self.channel = channel

    async def _take(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        event = json.loads(message.body)
        assert (message.message_id, message.routing_key) == (event["id"], event["type"])
        self.received.append(event)

    async def events(self) -> list[dict[str, Any]]:
        return self.received

    async def close(self) -> None:
        await self.channel.exchange_delete(self.exchange)
        await self.connection.close()


class NatsConsumer:
    """A pull consumer on the sink's JetStream stream."""

    def __init__(self, name: str) -> None:
        self.stream = f"EPOXI_TEST_{name}"
        self.prefix = f"epoxi.test.{name}"
        self.sink = {
            "kind": "nats",
            "url": NATS,
            "stream": self.stream,
            "subject": self.prefix + ".{type}",
        }
        self.received: list[dict[str, Any]] = []

    async def start(self) -> None:
        self.client = await nats.connect(NATS)
        self.js = self.client.jetstream()
        await self.js.add_stream(name=self.stream, subjects=[f"{self.prefix}.*"])
        # A message in flight when a fetch times out comes again after ack_wait: make that
        # short, and count each stream sequence number once.
        self.pull = await self.js.pull_subscribe(
            f"{self.prefix}.>", stream=self.stream, config=ConsumerConfig(ack_wait=1)
        )
        self.seen: set[int] = set()

    async def events(self) -> list[dict[str, Any]]:
        with contextlib.suppress(nats.errors.TimeoutError):
            for message in await self.pull.fetch(1000, timeout=0.2):
                await message.ack()
                if message.metadata.sequence.stream in self.seen:
                    continue
                self.seen.add(message.metadata.sequence.stream)
                event = json.loads(message.data)
                assert message.subject == f"{self.prefix}.{event['type']}"
                assert message.headers and message.headers["Nats-Msg-Id"] == event["id"]
                self.received.append(event)
        return self.received

    async def close(self) -> None:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self.js.delete_stream(self.stream)
        await self.client.close()


class RedisConsumer:
    """XREAD on the sink's stream key."""

    def __init__(self, name: str) -> None:
        self.key = f"epoxi:test:{name}"
        self.sink = {"kind": "redis", "url": REDIS, "stream": self.key}
        self.received: list[dict[str, Any]] = []
        self.last = "0"

    async def start(self) -> None:
        self.client = redis.asyncio.Redis.from_url(REDIS)
        await self.client.ping()

    async def events(self) -> list[dict[str, Any]]:
        for _, entries in await self.client.xread({self.key: self.last}, count=10_000):
            for entry_id, fields in entries:
                event = json.loads(fields[b"event"])
                assert (fields[b"id"], fields[b"type"]) == (
                    event["id"].encode(),
                    event["type"].encode(),
                )
                self.received.append(event)
                self.last = entry_id
        return self.received

    async def close(self) -> None:
        await self.client.delete(self.key)
        await self.client.aclose()


CONSUMERS: dict[str, Callable[[str], Consumer]] = {
    "rabbitmq": RabbitConsumer,
    "nats": NatsConsumer,
    "redis": RedisConsumer,
}


@pytest.fixture
async def consumer(request: pytest.FixtureRequest) -> AsyncIterator[Consumer]:
    """The test's own exchange, stream or key on the real broker (parametrized by kind).
    Requested before the world, so it is removed after Epoxi has stopped."""
    made = CONSUMERS[request.param](uuid.uuid4().hex[:12])
    await made.start()  # fails loudly when the broker is not running
    yield made
    await made.close()


async def received(consumer: Consumer, count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = await consumer.events()
        if len(events) >= count:
            await asyncio.sleep(0.3)  # nothing more should come: give a stray event its chance
            return await consumer.events()
        await asyncio.sleep(0.05)
    raise AssertionError(f"expected {count} events, have {len(await consumer.events())}")


def expected(world: World, ids: list[str]) -> set[str]:
    """The event ids of the records of these messages the sink wants."""
    return {event_of(r)["id"] for r in world.records if r.type in WANTED and r.message_id in ids}


def sink(consumer: Consumer, **overrides: Any) -> dict[str, Any]:
    return {
        "name": "bus",
        **consumer.sink,
        "types": ["reception", "delivery"],
        "tenants": ["acme"],
        **overrides,
    }


@pytest.mark.parametrize("consumer", KINDS, indirect=True)
async def test_events_of_the_wanted_types_and_tenants_reach_the_broker(
    consumer: Consumer, make_world: MakeWorld
) -> None:
    world = await make_world(events={"sinks": [sink(consumer)]})
    acme = await send(world, ["x@a.test", "y@a.test"], body=body("acme"), count=3)
    other = await send(world, ["x@a.test"], body=body("other"), count=2)
    await world.wait_records(RecordType.DELIVERY, 8)
    events = await received(consumer, 3 + 6)  # 3 receptions, 6 deliveries
    assert {e["id"] for e in events} == expected(world, acme) and len(events) == 9
    assert {e["message_id"] for e in events} == set(acme) and not set(other) & set(acme)
    assert sorted(e["type"] for e in events) == ["delivery"] * 6 + ["reception"] * 3
    assert {e["tenant"] for e in events} == {"acme"}
    delivery = next(e for e in events if e["type"] == "delivery")
    assert delivery["response"]["code"] == 250 and delivery["recipient"] in ("x@a.test", "y@a.test")
    assert isinstance(delivery["time"], float)


class Proxy:
    """A loopback TCP proxy in front of a broker, that the test can cut and restore."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = free_port()
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_writer}
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()
            self.writers.discard(writer)

    async def cut(self) -> None:
        """Refuse new connections and break the open ones."""
        if self.server is not None:
            self.server.close()
            self.server = None
        for writer in list(self.writers):
            writer.transport.abort()
        self.writers.clear()

    async def restore(self) -> None:
        await self.start()


UPSTREAM = {
    "rabbitmq": ("127.0.0.1", 5672),
    "nats": ("127.0.0.1", 4222),
    "redis": ("127.0.0.1", 6379),
}
PROXIED = {
    "rabbitmq": "amqp://guest:guest@127.0.0.1:{port}/",
    "nats": "nats://127.0.0.1:{port}",
    "redis": "redis://127.0.0.1:{port}/0",
}


def gauge(metrics: str, name: str) -> float:
    line = next(line for line in metrics.splitlines() if line.startswith(f'{name}{{sink="bus"}}'))
    return float(line.rpartition(" ")[2])


@pytest.mark.parametrize("consumer", KINDS, indirect=True)
async def test_a_broker_cut_off_mid_run_slows_no_mail_and_gets_its_events_later(
    consumer: Consumer, api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    kind = consumer.sink["kind"]
    proxy = Proxy(UPSTREAM[kind])
    await proxy.start()
    url = PROXIED[kind].format(port=proxy.port)
    settings = sink(consumer, url=url, tenants=[], timeout=1, retry_max=0.5)
    world, client = await api(events={"sinks": [settings]})
    try:
        count = 100
        began = time.monotonic()
        before = await send(world, ["x@a.test"], body=body("acme"), count=count)
        await world.wait_records(RecordType.DELIVERY, count)
        connected = time.monotonic() - began
        await received(consumer, 2 * count)

        await proxy.cut()
        began = time.monotonic()
        during = await send(world, ["x@a.test"], body=body("acme"), count=count)
        await world.wait_records(RecordType.DELIVERY, 2 * count, timeout=30)
        cut = time.monotonic() - began
        assert cut < 3 * connected + 2.0, (cut, connected)  # mail does not wait on the broker
        (bus,) = world.app.sinks
        await eventually(
            lambda: bus.waiting == 2 * count and not bus.connected, what="events waiting"
        )
        metrics = (await client.get("/metrics")).text
        assert gauge(metrics, "epoxi_sink_backlog_events") == 2 * count
        assert gauge(metrics, "epoxi_sink_connected") == 0

        await proxy.restore()
        events = await received(consumer, 4 * count, timeout=30)
        assert {e["id"] for e in events} == expected(world, before + during)
        await eventually(lambda: bus.waiting == 0 and bus.connected, what="the backlog drained")
        metrics = (await client.get("/metrics")).text
        assert gauge(metrics, "epoxi_sink_backlog_events") == 0
        assert gauge(metrics, "epoxi_sink_published_events_total") >= 4 * count
        shown = PROXIED[kind].format(port=proxy.port).replace("guest:guest@", "guest:<hidden>@")
        assert any(line.startswith("sink bus: ") and shown in line for line in caplog.messages)
        assert "guest:guest" not in caplog.text  # the password never reaches a log
    finally:
        await proxy.cut()


# --------------------------------------------------------------------- GET /admin/sinks


async def sinks_of(client: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    reply = await client.get("/admin/sinks")
    assert reply.status_code == 200, reply.text
    return {s["name"]: s for s in reply.json()["sinks"]}


@pytest.mark.parametrize("consumer", ["redis"], indirect=True)
async def test_admin_sinks_shows_a_working_sink_and_one_whose_broker_is_away(
    consumer: RedisConsumer, api: Api
) -> None:
    away_port = free_port()  # nothing listens there
    away = {
        "name": "away",
        "kind": "redis",
        "url": f"redis://user:secret@127.0.0.1:{away_port}/0",
        "types": ["reception"],
        "backlog": 5,
        "retry_max": 0.5,
    }
    world, client = await api(events={"sinks": [sink(consumer, tenants=[]), away]})
    await send(world, ["x@a.test"], count=3)
    await world.wait_records(RecordType.DELIVERY, 3)
    await received(consumer, 6)

    async def settled() -> bool:
        found = await sinks_of(client)
        return found["bus"]["published"] >= 6 and found["away"]["last_error"] is not None

    await until(settled, what="a published count and an error")
    found = await sinks_of(client)
    bus = found["bus"]
    assert (bus["kind"], bus["url"], bus["types"], bus["tenants"]) == (
        "redis",
        REDIS,
        ["reception", "delivery"],
        [],
    )
    assert (bus["workers"], bus["connected"], bus["backlog"], bus["dropped"]) == (1, 1, 0, 0)
    assert bus["last_error"] is None and bus["backlog_limit"] == 100_000
    gone = found["away"]
    assert gone["url"] == f"redis://user:<hidden>@127.0.0.1:{away_port}/0"
    assert (gone["connected"], gone["backlog"], gone["published"]) == (0, 3, 0)
    assert f"redis://user:<hidden>@127.0.0.1:{away_port}" in gone["last_error"]
    assert gone["last_error_at"] > time.time() - 60 and "secret" not in str(found)

    await send(world, ["x@a.test"], count=4)  # the backlog grows to its limit, then drops
    await eventually(
        lambda: world.app.sinks[1].waiting == 5 and world.app.sinks[1].dropped == 2,
        what="a full backlog",
    )
    gone = (await sinks_of(client))["away"]
    assert (gone["backlog"], gone["backlog_limit"], gone["dropped"]) == (5, 5, 2)

    shown = await run_cli(client, "sinks", "ls")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.decode().splitlines()
    away_line = next(line for line in lines if "│ away" in line)
    assert "0/1" in away_line and "5/5" in away_line and "cannot connect to redis" in away_line
    bus_line = next(line for line in lines if "│ bus" in line)
    assert "1/1" in bus_line and "0/100000" in bus_line and "reception, delivery" in bus_line
    as_json = await run_cli(client, "sinks", "ls", "--json")
    listed = json.loads(as_json.stdout)["sinks"]  # the API's answer
    assert [(s["name"], s["connected"], s["backlog"]) for s in listed] == [
        ("bus", 1, 0),
        ("away", 0, 5),
    ]


async def test_admin_sinks_without_sinks_is_an_empty_list(api: Api) -> None:
    _, client = await api()
    assert await sinks_of(client) == {}
    shown = await run_cli(client, "sinks", "ls")
    assert shown.returncode == 0 and b"no sinks" in shown.stdout


# --------------------------------------------------------------------- epoxi serve


def sink_config(tmp_path: Path, url: str, key: str) -> Path:
    config = tmp_path / f"epoxi-{free_port()}.toml"
    config.write_text(
        f'[[events.sinks]]\nname = "bus"\nkind = "redis"\nurl = "{url}"\nstream = "{key}"\n'
        'types = ["reception"]\ntimeout = "1s"\nretry_max = "1s"\n'
    )
    return config


async def redis_receptions(key: str) -> set[str]:
    client = redis.asyncio.Redis.from_url(REDIS)
    try:
        entries = await client.xrange(key)
    finally:
        await client.aclose()
    return {json.loads(fields[b"event"])["message_id"] for _, fields in entries}


@pytest.mark.parametrize("consumer", ["redis"], indirect=True)
async def test_each_worker_has_its_backlog_and_events_kept_at_stop_go_out_after_a_restart(
    consumer: RedisConsumer, tmp_path: Path
) -> None:
    process = EpoxiProcess(tmp_path / "data", env={"EPOXI_WORKERS": "2"})
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens: the broker is away
    process.start(sink_config(tmp_path, dead, consumer.key))
    try:
        ids = await send_to_every_worker(process, 2, 10)
        files = [process.data_dir / "sinks" / f"bus-{i}.db" for i in (0, 1)]
        await eventually(lambda: backlog_count(files) == len(ids), 15, "receptions in backlogs")

        async def both_shown() -> bool:
            reply = await asyncio.to_thread(worker_api, process, "GET", "/admin/sinks")
            (bus,) = reply.json()["sinks"]
            counts = (bus["workers"], bus["connected"], bus["backlog"])
            error = bus["last_error"] or ""
            return counts == (2, 0, len(ids)) and "cannot connect to redis://127.0.0.1:" in error

        await until(both_shown, what="/admin/sinks adding up both workers")
        for _ in range(4):  # whichever worker answers, it answers for both
            assert await both_shown()
        assert process.stop() == 0
        assert backlog_count(files) == len(ids)  # kept at stop, for the next start

        process.start(sink_config(tmp_path, REDIS, consumer.key))
        deadline = time.monotonic() + 20
        while await redis_receptions(consumer.key) != set(ids):
            assert time.monotonic() < deadline, "the kept events never reached Redis"
            await asyncio.sleep(0.05)
        await eventually(lambda: backlog_count(files) == 0, 10, "the backlogs emptied")
        assert "sink bus: cannot connect to redis://127.0.0.1:" in process.log()
    finally:
        if process.proc is not None:
            process.stop()


def backlog_count(files: list[Path]) -> int:
    total = 0
    for path in files:
        if path.exists():
            with contextlib.closing(sqlite3.connect(path)) as db:
                total += db.execute("SELECT count(*) FROM events").fetchone()[0]
    return total
