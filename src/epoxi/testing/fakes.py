"""Fakes of the ports, so the engine's decisions get unit tests that run in milliseconds.

- :class:`MemorySpool`: the spool port in memory (what is stored, updated and removed);
- :class:`FakeTransport`: answers each recipient from a script, like the sink does by address
  (``tempfail-...@`` 451, ``reject-...@`` 550, anything else 250), and counts connections;
- :class:`ManualClock`: time that moves only when told;
- :class:`Recorder`: an event sink that keeps the records;
- :class:`GatedSlots`: connection slots granted by hand, as a busy supervisor would.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from epoxi.delivery.client import TlsInfo
from epoxi.errors import ConnectionFailed, DeliveryError, SpoolError
from epoxi.events.records import Record, RecordType
from epoxi.message import MessageMeta
from epoxi.shaping.throttle import Rate
from epoxi.smtp.replies import Reply

if TYPE_CHECKING:
    from epoxi.config import SourceSettings
    from epoxi.delivery.routing import Destination
    from epoxi.delivery.transport import Connection


class ManualClock:
    """``clock()`` returns ``now``; ``advance`` moves it."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Recorder:
    """An event sink that keeps every record; ``wait`` until the ones a test expects came."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self._arrived: asyncio.Event | None = None

    def emit(self, record: Record) -> None:
        self.records.append(record)
        if self._arrived is not None:
            self._arrived.set()

    async def wait(
        self, predicate: Callable[[Record], bool], count: int = 1, timeout: float = 10.0
    ) -> list[Record]:
        """The first ``count`` records that match, once they exist (TimeoutError if not)."""
        async with asyncio.timeout(timeout):
            while len(found := [r for r in self.records if predicate(r)]) < count:
                self._arrived = asyncio.Event()
                await self._arrived.wait()
        return found[:count]

    async def outcome(self, recipient: str) -> RecordType:
        """The type of the first outcome record (not Reception) of ``recipient``."""
        [record] = await self.wait(lambda r: r.recipient == recipient and r.type in OUTCOMES)
        return record.type

    def of(self, kind: RecordType) -> list[Record]:
        return [r for r in self.records if r.type is kind]


OUTCOMES = frozenset(
    {
        RecordType.DELIVERY,
        RecordType.TRANSIENT_FAILURE,
        RecordType.BOUNCE,
        RecordType.EXPIRATION,
        RecordType.ADMIN_BOUNCE,
    }
)


class MemorySpool:
    """The spool port in memory. ``unhealthy`` is what ``unhealthy_reason`` answers."""

    def __init__(self) -> None:
        self.messages: dict[str, tuple[MessageMeta, bytes]] = {}
        self.updates = 0
        self.unhealthy: str | None = None

    def unhealthy_reason(self) -> str | None:
        return self.unhealthy

    async def store(self, meta: MessageMeta, body: bytes) -> None:
        self.messages[meta.id] = (meta, body)

    async def store_many(self, items: list[tuple[MessageMeta, bytes]]) -> None:
        for meta, body in items:
            self.messages[meta.id] = (meta, body)

    def update(self, meta: MessageMeta) -> asyncio.Future[None]:
        if meta.id in self.messages:
            self.messages[meta.id] = (meta, self.messages[meta.id][1])
            self.updates += 1
        return _done()

    def remove(self, message_id: str) -> asyncio.Future[None]:
        self.messages.pop(message_id, None)
        return _done()

    async def load_body(self, message_id: str) -> bytes:
        try:
            return self.messages[message_id][1]
        except KeyError:
            raise SpoolError(f"{message_id}: not in the spool") from None

    async def load_meta(self, message_id: str) -> MessageMeta | None:
        found = self.messages.get(message_id)
        return found[0] if found else None


def scripted_reply(recipient: str) -> Reply:
    """The sink's convention: the local part says what the server answers."""
    local = recipient.partition("@")[0]
    if local.startswith("tempfail"):
        return Reply(451, "4.2.0", "try again later")
    if local.startswith("reject"):
        return Reply(550, "5.1.1", "no such user")
    return Reply(250, "2.0.0", "ok")


@dataclass
class Sent:
    """One transaction a :class:`FakeTransport` carried."""

    meta: MessageMeta
    recipients: list[str]
    body: bytes
    site: str
    source: str = ""


@dataclass
class FakeTransport:
    """A transport whose connections answer from ``reply_for``; ``connect_error`` fails every
    connection attempt (``unbindable`` those from the sources named, as when their address is
    not on the machine); ``drop_after`` makes each connection unusable after that many
    sends."""

    reply_for: Callable[[str], Reply] = scripted_reply
    connect_error: Exception | None = None
    drop_after: int | None = None
    sent: list[Sent] = field(default_factory=list)
    connects: int = 0
    tls_modes: list[str] = field(default_factory=list)  # the TLS mode of each connection
    unbindable: set[str] = field(default_factory=set)

    async def connect(self, destination: Destination, source: SourceSettings) -> Connection:
        self.connects += 1
        self.tls_modes.append(destination.tls.mode)
        if self.connect_error is not None:
            raise self.connect_error
        if source.name in self.unbindable:
            unbound = OSError(errno.EADDRNOTAVAIL, "cannot assign requested address")
            raise ConnectionFailed(f"cannot bind {source.bind}") from unbound
        return _FakeConnection(self, destination.site, source.name)


class _FakeConnection:
    def __init__(self, transport: FakeTransport, site: str, source: str) -> None:
        self._transport = transport
        self._site = site
        self._source = source
        self._sends = 0
        self.closed = False

    @property
    def peer(self) -> str:
        return "192.0.2.1"

    @property
    def dsn_passed(self) -> bool:
        return False  # a fake next hop that does not offer DSN

    @property
    def tls(self) -> TlsInfo:
        return _PLAIN

    @property
    def is_usable(self) -> bool:
        limit = self._transport.drop_after
        return not self.closed and (limit is None or self._sends < limit)

    async def send(
        self, meta: MessageMeta, recipients: list[str], body: bytes
    ) -> list[tuple[str, Reply]]:
        if not self.is_usable:
            raise DeliveryError("connection closed")
        self._sends += 1
        self._transport.sent.append(Sent(meta, list(recipients), body, self._site, self._source))
        return [(r, self._transport.reply_for(r)) for r in recipients]

    async def quit(self) -> None:
        self.closed = True


_PLAIN = TlsInfo()  # the fake next hop talks plain text


def _done() -> asyncio.Future[None]:
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    future.set_result(None)
    return future


class GatedSlots:
    """:class:`~epoxi.shaping.slots.ConnectionSlots` whose slots wait for ``grant()``;
    ``share`` is the rate share of every queue."""

    def __init__(self, share: float = 1.0) -> None:
        self.share = share
        self.waiting: list[asyncio.Future[None]] = []
        self.released = 0

    async def acquire(self, key: str, limit: int, connection_rate: Rate | None) -> None:
        granted = asyncio.get_running_loop().create_future()
        self.waiting.append(granted)
        await granted

    def grant(self) -> None:
        """Let the longest-waiting opening go ahead."""
        self.waiting.pop(0).set_result(None)

    def release(self, key: str) -> None:
        self.released += 1

    def rate_share(self, key: str) -> float:
        return self.share
