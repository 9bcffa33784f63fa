"""A sink's backlog: the events its broker has not acknowledged yet, in a small SQLite file.

Bounded: past ``limit`` events the oldest are deleted and counted (these are events, not
mail: ``synchronous=NORMAL`` is enough). The calls block; :class:`~epoxi.sinks.sink.BrokerSink`
makes them on a thread of its own, in batches.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from epoxi import schema

SCHEMA_VERSION = 1

_CREATE = [
    """CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL,
        type TEXT NOT NULL,
        body BLOB NOT NULL
    )""",
]


@dataclass(frozen=True, slots=True)
class Event:
    """One event as a sink sends it: its id, its type (snake case) and its JSON body."""

    id: str
    type: str
    body: bytes


class Backlog:
    """Open with :meth:`open`; every other call after it, from one thread at a time."""

    def __init__(self, path: Path, limit: int) -> None:
        self.path = path
        self.limit = limit
        self._conn: sqlite3.Connection | None = None

    def open(self) -> int:
        """Open (create) the file; returns the number of events waiting in it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        schema.migrate(conn, target=SCHEMA_VERSION, create=_CREATE, upgrades={})
        self._conn = conn
        return self.count()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError(f"the backlog {self.path} is not open")
        return self._conn

    def count(self) -> int:
        """Events waiting. Deletes only ever take the oldest, so the sequence numbers left
        are one run: two index lookups, however long the backlog."""
        row = self.conn.execute("SELECT coalesce(max(seq) - min(seq) + 1, 0) FROM events")
        return int(row.fetchone()[0])

    def append(self, events: list[Event]) -> tuple[int, int]:
        """Add ``events`` (oldest first) and drop the oldest past the limit, in one
        transaction; returns (events now waiting, events dropped)."""
        conn = self.conn
        conn.execute("BEGIN")
        try:
            conn.executemany(
                "INSERT INTO events (id, type, body) VALUES (?, ?, ?)",
                [(e.id, e.type, e.body) for e in events],
            )
            size = self.count()
            dropped = max(0, size - self.limit)
            if dropped:
                conn.execute(
                    "DELETE FROM events WHERE seq IN (SELECT seq FROM events ORDER BY seq LIMIT ?)",
                    (dropped,),
                )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return size - dropped, dropped

    def oldest(self, count: int) -> tuple[int, list[Event]]:
        """The ``count`` oldest events, and the sequence number of the last of them."""
        rows = self.conn.execute(
            "SELECT seq, id, type, body FROM events ORDER BY seq LIMIT ?", (count,)
        ).fetchall()
        last = rows[-1][0] if rows else 0
        return last, [Event(id, kind, bytes(body)) for _, id, kind, body in rows]

    def remove_through(self, seq: int) -> int:
        """Delete the events up to ``seq`` (the broker has them); returns those left."""
        self.conn.execute("DELETE FROM events WHERE seq <= ?", (seq,))
        return self.count()
