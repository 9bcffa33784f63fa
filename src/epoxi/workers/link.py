"""A worker's end of its supervisor's control channel: the machine's connection slots and
rate shares (a :class:`~epoxi.shaping.slots.ConnectionSlots`), and word that it serves."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Iterable
from typing import Final

import msgspec

from epoxi.shaping.throttle import Rate
from epoxi.workers import wire

log = logging.getLogger(__name__)

REPORT_EVERY: Final = 0.5  # seconds between backlog reports of rate-limited queues


class SupervisorLink:
    """Slots are granted by the supervisor; rate shares come from it as backlogs change.

    ``backlogs`` reports this worker's rate-limited queues (set by the composition root),
    ``on_shares`` hears which queues' shares changed, ``on_wanted`` how many connections of a
    queue to keep while other workers wait for its slots, ``on_lost`` that the supervisor is gone.
    """

    def __init__(self, sock: socket.socket, *, count: int) -> None:
        self.backlogs: Callable[[], dict[str, tuple[str, int]]] = dict
        self.on_shares: Callable[[Iterable[str]], None] = lambda keys: None
        self.on_wanted: Callable[[str, int], None] = lambda key, keep: None
        self.on_lost: Callable[[], None] = lambda: None
        self._sock = sock
        self._default_share = 1.0 / count  # until the supervisor has seen this worker's backlog
        self._shares: dict[str, float] = {}
        self._grants: dict[int, asyncio.Future[None]] = {}
        self._next_id = 0
        self._writer: asyncio.StreamWriter | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._reported: dict[str, tuple[str, int]] = {}

    async def start(self) -> None:
        reader, self._writer = await asyncio.open_unix_connection(
            sock=self._sock, limit=wire.MAX_LINE
        )
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._read(reader)), loop.create_task(self._report())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._writer is not None:
            self._writer.close()

    def ready(self) -> None:
        self._send(wire.Ready())

    # ----------------------------------------------------------------- ConnectionSlots

    async def acquire(self, key: str, limit: int, connection_rate: Rate | None) -> None:
        self._next_id += 1
        ask = self._next_id
        granted = asyncio.get_running_loop().create_future()
        self._grants[ask] = granted
        self._send(wire.Acquire(ask, key, limit, str(connection_rate) if connection_rate else None))
        try:
            await granted
        except asyncio.CancelledError:
            if self._grants.pop(ask, None) is not None:
                self._send(wire.Cancel(ask, key))  # the supervisor frees it if it granted it
            else:
                self.release(key)  # granted, but the wait was given up in the same tick
            raise

    def release(self, key: str) -> None:
        self._send(wire.Release(key))

    def rate_share(self, key: str) -> float:
        return self._shares.get(key, self._default_share)

    # ----------------------------------------------------------------- the channel

    def _send(self, message: wire.ToSupervisor) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(wire.line(message))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while data := await reader.readline():
                self._on_message(wire.from_supervisor(data))
        except (OSError, ValueError, msgspec.DecodeError) as exc:
            log.error("control channel to the supervisor broke: %s", exc)
        log.warning("the supervisor is gone; stopping")
        self.on_lost()

    def _on_message(self, message: wire.ToWorker) -> None:
        if isinstance(message, wire.Granted):
            granted = self._grants.pop(message.id, None)
            if granted is not None and not granted.done():
                granted.set_result(None)
            return
        if isinstance(message, wire.Wanted):
            self.on_wanted(message.key, message.keep)
            return
        changed = [k for k, v in message.shares.items() if self._shares.get(k) != v]
        self._shares.update(message.shares)
        if changed:
            self.on_shares(changed)

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(REPORT_EVERY)
            self.report()

    def report(self) -> None:
        """Tell the supervisor the backlog of each rate-limited queue (when it changed)."""
        queues = self.backlogs()
        if queues != self._reported:
            self._reported = queues
            self._send(wire.Backlog(queues))
