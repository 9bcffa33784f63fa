"""IP warm-up counts and pauses in the store database, so a restart keeps today's count.

Each worker process counts its own jobs (its rows carry its index) and reads back only its
own at start. Paused warm-ups are one row per source, shared by every worker: each
:meth:`WarmupStore.sync` writes this worker's news, then reads every pause back, so a pause
made in one worker reaches the others within a sync. SQLite runs in the store's own thread,
never on the event loop.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from epoxi.store.thread import StoreThread

SentKey = tuple[int, str, str]  # (UTC day, source, provider or "")


@dataclass(slots=True)
class WarmupNews:
    """What a worker has to write: jobs counted, pauses made and lifted, since the last sync."""

    sent: dict[SentKey, int] = field(default_factory=dict)
    paused: dict[str, tuple[str, float]] = field(default_factory=dict)  # source -> reason, at
    resumed: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.sent or self.paused or self.resumed)


class WarmupStore(StoreThread):
    def __init__(self, path: Path, worker: int = 0) -> None:
        super().__init__(path, "warmup")
        self.worker = worker

    async def open(self, day: int) -> tuple[dict[tuple[str, str], int], dict[str, str]]:
        """Open the store; this worker's counts of ``day`` and every pause (source -> why)."""
        await self.start()
        worker = self.worker

        def read(conn: sqlite3.Connection) -> tuple[dict[tuple[str, str], int], dict[str, str]]:
            rows = conn.execute(
                "SELECT source, provider, sent FROM warmup_sent WHERE day = ? AND worker = ?",
                (day, worker),
            )
            return {(r[0], r[1]): r[2] for r in rows}, _pauses(conn)

        return await self.call(read)

    async def sync(self, news: WarmupNews, keep_from: int) -> dict[str, str]:
        """Write ``news`` in one transaction, forget counts of days before ``keep_from``;
        every pause now (source -> why)."""
        worker = self.worker
        return await self.call(lambda conn: _sync(conn, worker, news, keep_from))


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
