"""IP warm-up counts and pauses in the store database, so a restart keeps today's count.

Each worker process counts its own jobs (its rows carry its index) and reads back only its
own at start. Paused warm-ups are one row per source, shared by every worker: each
:meth:`WarmupStore.sync` writes this worker's news, then reads every pause back, so a pause
made in one worker reaches the others within a sync. SQLite runs in the store's own thread,
never on the event loop.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from epoxi.store.db import connect

T = TypeVar("T")

SentKey = tuple[int, str, str]  # (UTC day, source, provider or "")


@dataclass(slots=True)
class WarmupNews:
    """What a worker has to write: jobs counted, pauses made and lifted, since the last sync."""

    sent: dict[SentKey, int] = field(default_factory=dict)
    paused: dict[str, tuple[str, float]] = field(default_factory=dict)  # source -> reason, at
    resumed: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.sent or self.paused or self.resumed)


class WarmupStore:
    def __init__(self, path: Path, worker: int = 0) -> None:
        self.path = path
        self.worker = worker
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="epoxi-warmup")
        self._conn: sqlite3.Connection | None = None

    async def start(self, day: int) -> tuple[dict[tuple[str, str], int], dict[str, str]]:
        """Open the store; this worker's counts of ``day`` and every pause (source -> why)."""
        self._conn = await self._call(lambda: connect(self.path, check_same_thread=False))
        conn, worker = self._conn, self.worker

        def read() -> tuple[dict[tuple[str, str], int], dict[str, str]]:
            rows = conn.execute(
                "SELECT source, provider, sent FROM warmup_sent WHERE day = ? AND worker = ?",
                (day, worker),
            )
            return {(r[0], r[1]): r[2] for r in rows}, _pauses(conn)

        return await self._call(read)

    @property
    def started(self) -> bool:
        return self._conn is not None

    async def sync(self, news: WarmupNews, keep_from: int) -> dict[str, str]:
        """Write ``news`` in one transaction, forget counts of days before ``keep_from``;
        every pause now (source -> why)."""
        conn, worker = self._require(), self.worker
        return await self._call(lambda: _sync(conn, worker, news, keep_from))

    async def stop(self) -> None:
        if self._conn is not None:
            await self._call(self._conn.close)
            self._conn = None
        self._executor.shutdown(wait=True)

    async def _call(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def _require(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("the warm-up store is not started")
        return self._conn


def _sync(
    conn: sqlite3.Connection, worker: int, news: WarmupNews, keep_from: int
) -> dict[str, str]:
    if news:
        conn.execute("BEGIN")
        try:
            conn.executemany(
                "INSERT INTO warmup_sent VALUES (?, ?, ?, ?, ?) ON CONFLICT DO UPDATE"
                " SET sent = sent + excluded.sent",
                [(day, s, p, worker, n) for (day, s, p), n in news.sent.items()],
            )
            conn.executemany(
                "INSERT OR REPLACE INTO warmup_paused VALUES (?, ?, ?)",
                [(s, why, at) for s, (why, at) in news.paused.items()],
            )
            conn.executemany(
                "DELETE FROM warmup_paused WHERE source = ?", [(s,) for s in news.resumed]
            )
            conn.execute("DELETE FROM warmup_sent WHERE day < ?", (keep_from,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return _pauses(conn)


def _pauses(conn: sqlite3.Connection) -> dict[str, str]:
    return dict(conn.execute("SELECT source, reason FROM warmup_paused").fetchall())
