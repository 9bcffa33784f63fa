"""Protocol tests: bytes into a session over a fake transport, replies out. No sockets."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from epoxi.config import SmtpSettings
from epoxi.errors import SpoolUnavailable
from epoxi.message import MessageMeta
from epoxi.reception.auth import Authenticator, hash_password
from epoxi.reception.policy import AuthThrottle, ConnectionTracker, RelayPolicy
from epoxi.reception.session import SessionContext, SmtpSession

PASSWORD_HASH = hash_password("s3cret", ln=4)


class FakeTransport(asyncio.Transport):
    def __init__(self, peer: str = "192.0.2.7") -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False
        self.paused = False
        self._peer = peer

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "write after close"
        self.written += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": (self._peer, 40000)}.get(name, default)


class MemoryIngest:
    """Accepts everything into a list; ``unhealthy`` makes it refuse."""

    def __init__(self) -> None:
        self.messages: list[tuple[MessageMeta, bytes]] = []
        self.unhealthy: str | None = None
        self.fail_store = False

    def unhealthy_reason(self) -> str | None:
        return self.unhealthy

    async def accept(self, meta: MessageMeta, body: bytes, *, trusted: bool = True) -> None:
        await asyncio.sleep(0)
        if self.fail_store:
            raise SpoolUnavailable("disk full")
        self.messages.append((meta, body))


class Client:
    """Drives one session: ``send`` bytes, then read what the session wrote."""

    def __init__(self, session: SmtpSession, transport: FakeTransport) -> None:
        self.session = session
        self.transport = transport
        self._read = 0

    async def send(self, data: bytes | str) -> str:
        if isinstance(data, str):
            data = data.encode()
        self.session.data_received(data)
        await self.session.wait_idle()  # commits, password checks and handshakes are done
        return self.replies()

    def replies(self) -> str:
        out = self.transport.written[self._read :].decode()
        self._read = len(self.transport.written)
        return out

    async def ehlo(self) -> str:
        return await self.send("EHLO client.example\r\n")


@pytest.fixture
def ingest() -> MemoryIngest:
    return MemoryIngest()


MakeClient = Callable[..., Client]


@pytest.fixture
def make_client(ingest: MemoryIngest) -> MakeClient:
    tracker = ConnectionTracker(1000, 10)
    throttle = AuthThrottle(3, 300)

    def make(
        peer: str = "192.0.2.7",
        trusted: tuple[str, ...] = ("127.0.0.0/8",),
        auth_plaintext: bool = True,
        **smtp: Any,
    ) -> Client:
        # Most tests pipeline freely to reach the rule they test in one send; the pipelining
        # rule itself is tested with its default on (test_pipelining.py).
        defaults = {
            "max_message_size": 10_000,
            "max_recipients": 5,
            "forbid_unauth_pipelining": False,
        }
        settings = SmtpSettings(**{**defaults, **smtp})
        ctx = SessionContext(
            hostname="mx.test",
            settings=settings,
            relay=RelayPolicy.build(["local.test"], trusted),
            ingest=ingest,
            tracker=tracker,
            authenticator=Authenticator({"alice": PASSWORD_HASH}),
            auth_throttle=throttle,
            auth_plaintext=auth_plaintext,
        )
        transport = FakeTransport(peer)
        session = SmtpSession(ctx)
        session.connection_made(transport)
        client = Client(session, transport)
        client.replies()
        return client

    return make
