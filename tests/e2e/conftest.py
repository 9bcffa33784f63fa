"""End-to-end fixtures: Epoxi running in the test's event loop on real sockets."""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
import smtplib
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from epoxi.app import Epoxi
from epoxi.config import Settings
from epoxi.events.records import Record, RecordType
from epoxi.reception.auth import hash_password
from epoxi.testing.dnsserver import DnsServer, Zone
from epoxi.testing.sink import Sink
from tests.conftest import free_port

PASSWORD = "s3cret"
PASSWORD_HASH = hash_password(PASSWORD, ln=4)


@dataclass
class Ports:
    open: int  # STARTTLS offered, trusted loopback may relay
    untrusted: int  # no trusted networks: relay only with AUTH
    submission: int  # AUTH required
    implicit: int  # implicit TLS, AUTH required


@dataclass
class Running:
    app: Epoxi
    ports: Ports
    data_dir: Path
    records: list[Any] = field(default_factory=list)

    def client_tls(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.data_dir / "tls-cert.pem"))
        context.check_hostname = False
        return context

    async def spooled(self) -> list[Any]:
        return [
            m
            for batch in await asyncio.to_thread(lambda: list(self.app.spool.iter_meta()))
            for m in batch
        ]


MakeServer = Callable[..., Any]


@pytest.fixture
async def make_server(tmp_path: Path) -> AsyncIterator[MakeServer]:
    started: list[Epoxi] = []

    async def make(**overrides: Any) -> Running:
        ports = Ports(free_port(), free_port(), free_port(), free_port())
        smtp = {
            "listeners": [
                {"address": f"127.0.0.1:{ports.open}"},
                {"address": f"127.0.0.1:{ports.untrusted}", "trusted_networks": []},
                {"address": f"127.0.0.1:{ports.submission}", "require_auth": True},
                {"address": f"127.0.0.1:{ports.implicit}", "tls": "implicit", "require_auth": True},
            ],
            **overrides.pop("smtp", {}),
        }
        # Outbound mail goes to a port where nothing listens: it stays in the spool.
        settings = Settings.model_validate(
            {
                "hostname": "mx.test",
                "data_dir": tmp_path / "data",
                "local_domains": ["local.test"],
                "users": {"alice": PASSWORD_HASH},
                "smtp": smtp,
                "relay": {"host": "127.0.0.1", "port": free_port()},
                "http_listen": [],
                **overrides,
            }
        )
        app = Epoxi(settings)
        running = Running(app, ports, settings.data_dir)
        app.records.subscribe(running.records.append)
        await app.start()
        started.append(app)
        return running

    yield make
    for app in started:
        await app.stop()


# --------------------------------------------------------------------- delivery world

SINK_HOSTS = ("127.0.0.2", "127.0.0.3")


def zone_for_tests() -> Zone:
    zone = Zone()
    zone.add("a.test", "MX", "10 mx1.a.test.")
    zone.add("a.test", "MX", "20 mx2.a.test.")
    zone.add("mx1.a.test", "A", "127.0.0.2")
    zone.add("mx2.a.test", "A", "127.0.0.3")
    zone.add("fallback.test", "MX", "10 dead.fallback.test.")
    zone.add("fallback.test", "MX", "20 mx2.a.test.")
    zone.add("dead.fallback.test", "A", "127.0.0.9")
    zone.add("plain.test", "A", "127.0.0.2")
    zone.add("nullmx.test", "MX", "0 .")
    zone.add("shared.test", "MX", "5 mx2.a.test.")
    zone.add("shared.test", "MX", "1 mx1.a.test.")
    zone.add("later.test", "MX", "10 mx.later.test.")
    zone.add("mx.later.test", "A", "127.0.0.6")
    zone.add("sender.test", "MX", "10 mx1.a.test.")
    return zone


@dataclass
class World:
    app: Epoxi
    port: int  # Epoxi's SMTP port
    sinks: dict[str, Sink]
    sink_port: int
    records: list[Record] = field(default_factory=list)

    def send(
        self,
        rcpts: list[str],
        sender: str = "s@sender.test",
        body: bytes | None = None,
        count: int = 1,
    ) -> list[str]:
        body = body or b"Subject: hello\r\nFrom: s@sender.test\r\n\r\nHi.\r\n"
        ids = []
        with smtplib.SMTP("127.0.0.1", self.port, timeout=20) as smtp:
            smtp.ehlo("client.test")
            for _ in range(count):
                smtp.mail(sender)
                for rcpt in rcpts:
                    smtp.rcpt(rcpt)
                code, text = smtp.data(body)
                assert code == 250, text
                ids.append(text.split()[-1].decode())
        return ids

    async def restart(self) -> None:
        """Stop this node and start a new one on the same settings and data dir."""
        await self.app.stop()
        self.app = Epoxi(self.app.settings)
        self.app.records.subscribe(self.records.append)
        await self.app.start()

    async def wait_records(
        self,
        kind: RecordType,
        count: int,
        timeout: float = 15.0,
        where: Callable[[Record], bool] = lambda r: True,
    ) -> list[Record]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [r for r in self.records if r.type is kind and where(r)]
            if len(found) >= count:
                return found
            await asyncio.sleep(0.02)
        raise AssertionError(
            f"expected {count} {kind.value} records, have: "
            f"{[(r.type.value, r.recipient, r.response) for r in self.records]}"
        )


MakeWorld = Callable[..., Any]


@pytest.fixture
async def make_world(tmp_path: Path) -> AsyncIterator[MakeWorld]:
    running: list[Any] = []

    async def make(sink_options: dict[str, Any] | None = None, **overrides: Any) -> World:
        zone = overrides.pop("zone", None) or zone_for_tests()
        dns = DnsServer(zone, host="127.0.0.1", port=0)
        await dns.start()
        running.append(dns)
        sink_port = free_port(SINK_HOSTS[0])
        sinks = {}
        for host in SINK_HOSTS:
            sink = Sink(host, sink_port, **(sink_options or {}))
            await sink.start()
            running.append(sink)
            sinks[host] = sink
        port = free_port()
        delivery = {
            "retry_interval": 0.5,
            "max_retry_interval": 1,
            "mx_port": sink_port,
            "expiry_sweep_interval": 0.2,
            "defaults": {"idle_timeout": 0.5, "connection_limit": 4},
            "timeouts": {"connect": 2, "banner": 5, "data_end": 5},
            **overrides.pop("delivery", {}),
        }
        settings = Settings.model_validate(
            {
                "hostname": "mx.test",
                "data_dir": tmp_path / "data",
                "local_domains": ["local.test"],
                "smtp": {"listeners": [{"address": f"127.0.0.1:{port}"}]},
                "dns": {"nameservers": [f"127.0.0.1:{dns.port}"], "timeout": 2},
                "delivery": delivery,
                "http_listen": [],
                "shaping_default": False,  # the shipped provider limits: tests of their own
                **overrides,
            }
        )
        app = Epoxi(settings)
        world = World(app, port, sinks, sink_port)
        app.records.subscribe(world.records.append)
        await app.start()
        running.append(world)
        return world

    yield make
    for item in reversed(running):
        await (item.app.stop() if isinstance(item, World) else item.stop())


async def send(world: World, *args: Any, **kwargs: Any) -> list[str]:
    return await asyncio.to_thread(world.send, *args, **kwargs)


# --------------------------------------------------------------------- the HTTP API

Api = Callable[..., Any]


@pytest.fixture
async def api(make_world: MakeWorld) -> AsyncIterator[Api]:
    """``await api(**world_overrides)`` -> (world, httpx client on the node's HTTP API)."""
    clients: list[httpx.AsyncClient] = []

    async def make(**overrides: Any) -> tuple[World, httpx.AsyncClient]:
        overrides.setdefault("http_listen", ["127.0.0.1:0"])
        world: World = await make_world(**overrides)
        assert world.app.http is not None
        host, port = world.app.http.addresses[0]
        client = httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=30)
        clients.append(client)
        return world, client

    yield make
    for client in clients:
        await client.aclose()


async def run_cli(client: httpx.AsyncClient, *args: str) -> subprocess.CompletedProcess[bytes]:
    """``epoxi ARGS --url`` the client's node, in a subprocess, wide enough that a table's
    rows stay on one line each."""
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "epoxi", *args, "--url", str(client.base_url)],
        capture_output=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "250"},
    )


def message_request(**message: Any) -> dict[str, Any]:
    """A valid POST /messages body; keyword arguments replace or add message fields."""
    return {
        "message": {
            "from": "Sender <s@sender.test>",
            "to": ["x@a.test"],
            "subject": "Hello",
            "text": "Hi.",
            **message,
        }
    }


def parse(data: bytes) -> EmailMessage:
    """A received message, parsed as a modern ``EmailMessage``."""
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


async def wait_left_spool(world: World, message_id: str, timeout: float = 15.0) -> None:
    """Return once ``message_id`` is no longer in the spool: the engine is done with it (its
    removal is its last step, after any DSN was spooled and recorded)."""
    deadline = time.monotonic() + timeout
    while await world.app.spool.load_meta(message_id) is not None:
        assert time.monotonic() < deadline, f"{message_id} still in the spool after {timeout}s"
        await asyncio.sleep(0.02)


# --------------------------------------------------------------------- the sending platform

# The tests' PostgreSQL: the machine's (scripts/services starts it when it is down)
DATABASE_URL = os.environ.get(
    "EPOXI_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
)

SEED_TEMPLATE = {
    "tenant_id": "tenant-1",
    "name": "welcome",
    "subject_template": "Welcome {{name}}",
    "html_template": "<h1>Hello {{name}}</h1><p>Your code: {{ code }}</p>",
    "text_template": None,
}


@pytest.fixture(params=["sqlite", "postgres"])
async def platform_database(request: pytest.FixtureRequest) -> AsyncIterator[dict[str, Any]]:
    """The ``[database]`` settings of a platform test: none (SQLite), or the machine's
    PostgreSQL with a schema of its own, dropped once the test's nodes have stopped."""
    if request.param == "sqlite":
        yield {}
        return
    schema = f"t_{uuid.uuid4().hex[:12]}"
    yield {"url": DATABASE_URL, "schema": schema}
    conn = await asyncpg.connect(DATABASE_URL)
    await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    await conn.close()


@pytest.fixture
def platform_api(platform_database: dict[str, Any], api: Api) -> Api:
    """``api``, with the platform store on SQLite or on PostgreSQL."""

    async def make(**overrides: Any) -> tuple[World, httpx.AsyncClient]:
        return await api(**overrides, database=platform_database)

    return make


@pytest.fixture
async def platform_node(platform_api: Api) -> tuple[World, httpx.AsyncClient]:
    """A node whose platform store is SQLite or PostgreSQL, and an HTTP client on it."""
    return await platform_api()


SEND = {
    "tenant_id": "tenant-1",
    "recipient": {"email": "alice@a.test", "name": "Alice"},
    "template_id": "",
    "variables": {"name": "Alice", "code": "X7"},
    "metadata": {"source": "api", "order": 42},
    "idempotency_key": "mail-001",
}


async def seeded(client: httpx.AsyncClient) -> str:
    """The seed's tenant (with a sender) and template; the template's id."""
    tenant = {"id": "tenant-1", "name": "Tenant 1", "sender": "Shop <shop@sender.test>"}
    assert (await client.post("/tenants", json=tenant)).status_code == 201
    made = await client.post("/templates", json=SEED_TEMPLATE)
    template_id: str = made.json()["id"]
    return template_id
