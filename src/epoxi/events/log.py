"""The record log: JSON lines in the data dir, rotated by size, plus in-process subscribers.

``emit`` is cheap (an append to a list); a background task writes batches in a thread, so
the event loop never waits on the disk for records.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from epoxi.events.buffer import BufferedWriter
from epoxi.events.records import Record, encode_record

log = logging.getLogger(__name__)

Subscriber = Callable[[Record], None]


class RecordLog:
    """Appends records to ``directory/name`` (``records.jsonl``); rotates at ``max_bytes``.

    Each worker process has a file of its own (``records-<i>.jsonl``)."""

    def __init__(
        self,
        directory: Path,
        *,
        name: str = "records.jsonl",
        max_bytes: int = 100 * 1024 * 1024,
        keep: int = 10,
        flush_interval: float = 0.2,
    ) -> None:
        self.directory = directory
        self.path = directory / name
        self.max_bytes = max_bytes
        self.keep = keep
        self._buffer: BufferedWriter[bytes] = BufferedWriter(
            self._write_batch, interval=flush_interval, name=f"record log {self.path}"
        )
        self._subscribers: list[Subscriber] = []
        self._size = 0

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Call ``subscriber`` for every record from now on; returns the unsubscribe function."""
        self._subscribers.append(subscriber)
        return lambda: self._subscribers.remove(subscriber)

    def emit(self, record: Record) -> None:
        self._buffer.add(encode_record(record))
        for subscriber in self._subscribers:
            try:
                subscriber(record)
            except Exception:  # a subscriber's bug must not stop the emitter's work
                log.exception("record subscriber %r failed", subscriber)

    async def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._size = self.path.stat().st_size if self.path.exists() else 0
        self._buffer.start()

    async def flush(self) -> None:
        await self._buffer.flush()

    async def _write_batch(self, batch: list[bytes]) -> None:
        await asyncio.to_thread(self._write, batch)

    def _write(self, batch: list[bytes]) -> None:
        data = b"\n".join(batch) + b"\n"
        if self._size and self._size + len(data) > self.max_bytes:
            self._rotate()
        try:
            with self.path.open("ab") as f:
                f.write(data)
        except OSError:
            with contextlib.suppress(OSError):
                os.truncate(self.path, self._size)  # no torn line: the batch is written again
            raise
        self._size += len(data)

    def _rotate(self) -> None:
        for index in range(self.keep - 1, 0, -1):
            older = self.path.with_suffix(f".jsonl.{index}")
            if older.exists():
                os.replace(older, self.path.with_suffix(f".jsonl.{index + 1}"))
        os.replace(self.path, self.path.with_suffix(".jsonl.1"))
        self._size = 0

    async def stop(self) -> None:
        await self._buffer.stop()
