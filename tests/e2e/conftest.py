"""End-to-end fixtures: Epoxi running in the test's event loop on real sockets."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from epoxi.app import Epoxi
from epoxi.config import Settings
from epoxi.reception.auth import hash_password
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
