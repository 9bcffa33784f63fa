"""A broker sink: records in, events out to a broker, through a durable bounded backlog.

On the event loop, :meth:`BrokerSink.feed` (a record-log subscriber) only filters and appends
to a list. A task takes that list every ``interval`` and makes the events on the sink's thread.
While the broker is connected and nothing older waits, they are published at once. Otherwise
(or for what a publish fails to deliver) they are written to the backlog in one transaction,
which is published in batches, each deleted once the broker has acknowledged it. A broker that
is away leaves the events in the backlog (oldest dropped past its limit, counted and logged)
and is tried again with backoff; mail never waits on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import msgspec

from epoxi.config import hidden_url
from epoxi.errors import BrokerUnavailable, ConfigError
from epoxi.events.outbound import EVENT_TYPES, RECORD_TYPES, event_of
from epoxi.events.records import Record
from epoxi.sinks.backlog import Backlog, Event
from epoxi.sinks.brokers import Broker, broker_for

if TYPE_CHECKING:
    from collections.abc import Callable

    from epoxi.config import Settings, SinkSettings

log = logging.getLogger(__name__)

T = TypeVar("T")

INTERVAL = 0.1  # seconds between two turns of a sink's loop
RETRY_MIN = 0.2  # the first reconnect waits this long; each failure doubles it
STOP_GRACE = 2.0  # what stop spends publishing; what is left waits in the backlog

_encode = msgspec.json.Encoder().encode


class BrokerSink:
    def __init__(
        self,
        settings: SinkSettings,
        path: Path,
        broker: Broker | None = None,
        interval: float = INTERVAL,
    ) -> None:
        self.settings = settings
        self.name = settings.name
        self.interval = interval
        self.broker = broker or broker_for(settings)
        self.backlog = Backlog(path, settings.backlog)
        self._types = frozenset(RECORD_TYPES[name] for name in settings.types)
        self._tenants = frozenset(settings.tenants)
        self._pending: list[Record] = []
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"epoxi-sink-{self.name}")
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._retry_at = 0.0
        self._retry_delay = RETRY_MIN
        self.connected = False
        self.waiting = 0  # events in the backlog
        self.dropped = 0  # events dropped from a full backlog since start
        self.published = 0  # events the broker acknowledged since start
        self.last_error: str | None = None  # the latest failure, without any password
        self.last_error_at: float | None = None  # and when (wall clock)

    # ------------------------------------------------------------ the hot path

    def feed(self, record: Record) -> None:
        """A record-log subscriber: keep the record if the sink wants it. No I/O."""
        if self._types and record.type not in self._types:
            return
        if self._tenants and record.tenant not in self._tenants:
            return
        self._pending.append(record)

    # ------------------------------------------------------------ life cycle

    async def start(self) -> None:
        self.waiting = await self._call(self.backlog.open)
        if self.waiting:
            log.info("sink %s: %d events waiting from before", self.name, self.waiting)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Keep what is pending, publish what can be within STOP_GRACE, close."""
        self._stopping.set()
        if self._task is not None:  # the turn under way ends (cut short past the grace)
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._task, STOP_GRACE)
            self._task = None
        try:
            await self._store()
            if self.connected and self.waiting:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(STOP_GRACE):
                        await self._drain()
        finally:
            await self.broker.close()
            await self._call(self.backlog.close)
            self._thread.shutdown(wait=True)
        if self.waiting:
            log.info("sink %s: %d events kept for the next start", self.name, self.waiting)

    async def _run(self) -> None:
        failing = False
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.interval)
                return
            try:
                await self.turn()
            except Exception as exc:  # a full disk, a bug: must not end the sink; logged once
                if not failing:
                    log.exception("sink %s: turn failed; trying again", self.name)
                self._note(f"sink {self.name}: turn failed: {hidden_url(str(exc))}")
                failing = True
            else:
                failing = False

    async def turn(self) -> None:
        """One turn: publish what came in straight away while the broker is there and
        nothing older waits; else store it, (re)connect when due, publish the backlog."""
        if self.connected and not self.waiting and self._pending:
            await self._publish_pending()
            return
        await self._store()
        if not self.waiting:
            return
        if not self.connected and time.monotonic() >= self._retry_at:
            await self._connect()
        if self.connected:
            await self._drain()

    # ------------------------------------------------------------ steps

    async def _store(self) -> None:
        if not self._pending:
            return
        records, self._pending = self._pending, []
        try:
            self.waiting, dropped = await self._call(lambda: self._append(records))
        except BaseException:  # the backlog cannot take them (a full disk): they wait here,
            self._pending[:0] = records  # within the same bound
            over = max(0, len(self._pending) - self.backlog.limit)
            del self._pending[:over]
            self._dropped(over)
            raise
        self._dropped(dropped)

    async def _publish_pending(self) -> None:
        """The fast path: the new events to the broker without the backlog's writes. What
        the broker does not take goes to the backlog, oldest first, as before."""
        records, self._pending = self._pending, []
        events = await self._call(lambda: list(events_of(records)))
        batch = self.settings.batch
        for start in range(0, len(events), batch):
            chunk = events[start : start + batch]
            try:
                await self.broker.publish(chunk)
            except Exception as exc:
                self.connected = False
                await self.broker.close()
                self._failed(_unavailable(self.settings, exc))
                append = functools.partial(self.backlog.append, events[start:])
                self.waiting, dropped = await self._call(append)
                self._dropped(dropped)
                return
            self.published += len(chunk)

    def _dropped(self, dropped: int) -> None:
        if dropped:
            self.dropped += dropped
            log.warning(
                "sink %s: backlog full (%d events): dropped the %d oldest",
                self.name,
                self.backlog.limit,
                dropped,
            )

    def _append(self, records: list[Record]) -> tuple[int, int]:
        return self.backlog.append(list(events_of(records)))

    async def _connect(self) -> None:
        try:
            await self.broker.connect()
        except Exception as exc:
            await self.broker.close()
            self._failed(_unavailable(self.settings, exc))
            return
        self.connected = True
        self._retry_delay = RETRY_MIN
        log.info("sink %s: connected to %s", self.name, self.settings.shown_url)

    async def _drain(self) -> None:
        """Publish batches until the backlog is empty or the broker fails."""
        while self.waiting:
            last, events = await self._call(lambda: self.backlog.oldest(self.settings.batch))
            if not events:
                self.waiting = 0
                return
            try:
                await self.broker.publish(events)
            except Exception as exc:  # any failure: reconnect rather than publish in vain
                self.connected = False
                await self.broker.close()
                self._failed(_unavailable(self.settings, exc))
                return
            self.published += len(events)
            self.waiting = await self._call(functools.partial(self.backlog.remove_through, last))
            await self._store()  # what came in meanwhile, so the oldest still go first

    def _failed(self, exc: BrokerUnavailable) -> None:
        log.warning("%s; %d events wait, next try in %.1fs", exc, self.waiting, self._retry_delay)
        self._note(str(exc))
        self._retry_at = time.monotonic() + self._retry_delay
        self._retry_delay = min(self._retry_delay * 2, max(RETRY_MIN, self.settings.retry_max))

    def _note(self, error: str) -> None:
        self.last_error, self.last_error_at = error, time.time()

    async def _call(self, work: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, work)


def _unavailable(settings: SinkSettings, exc: Exception) -> BrokerUnavailable:
    """A broker's failure as BrokerUnavailable; one the broker's client raised unexpectedly
    (not translated in brokers.py) is named by its type, without any password."""
    if isinstance(exc, BrokerUnavailable):
        return exc
    log.debug("sink %s: unexpected failure", settings.name, exc_info=True)
    reason = hidden_url(f"{type(exc).__name__}: {exc}")
    return BrokerUnavailable(f"sink {settings.name}: {settings.shown_url}: {reason}")


def events_of(records: Iterable[Record]) -> Iterable[Event]:
    for record in records:
        event = event_of(record)
        yield Event(event["id"], event["type"], _encode(event))


def build_sinks(settings: Settings, worker: int) -> list[BrokerSink]:
    """The configured sinks of one worker, each with its backlog file in
    ``data_dir/sinks/<name>-<worker>.db``. ConfigError names a filter that cannot match."""
    check_sinks(settings)
    return [
        BrokerSink(sink, settings.data_dir / "sinks" / f"{sink.name}-{worker}.db")
        for sink in settings.events.sinks
    ]


def check_sinks(settings: Settings) -> None:
    """ConfigError naming the key of an event type in a sink's ``types`` that is not one."""
    for index, sink in enumerate(settings.events.sinks):
        unknown = [name for name in sink.types if name not in RECORD_TYPES]
        if unknown:
            raise ConfigError(
                f"events.sinks.{index}.types: unknown event type {', '.join(unknown)} "
                f"(known: {', '.join(EVENT_TYPES.values())})"
            )
