"""The durable copy of traffic shaping automation: active actions and threshold counts.

Every worker process (and a restarted node) reads the same table, so an action one worker
starts holds in all of them and outlives a restart; it ends by itself at ``until``, or when an
operator lifts it. A version number grows with every change (never down, a purge included): a
worker polls it to know when to read the actions again. Matches of threshold rules are counted
here too, so "5 per hour" counts the replies every worker saw. SQLite runs on the store's own
thread, never on the event loop.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import msgspec

from epoxi.shaping.automation import Automated
from epoxi.store.thread import StoreThread, immediate

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Automated).decode


class AutomationStore(StoreThread):
    def __init__(self, path: Path) -> None:
        super().__init__(path, "automation")

    async def matched(self, candidate: Automated, count: int, period: float) -> Automated | None:
        """A rule matched: count it (thresholds), and start ``candidate`` if the trigger is
        met and no action of the same rule and scope is active. Returns the new action."""
        return await self.call(lambda conn: _matched(conn, candidate, count, period))

    async def active(self, now: float) -> list[Automated]:
        def read(conn: sqlite3.Connection) -> list[Automated]:
            rows = conn.execute(
                "SELECT entry FROM automation WHERE ended IS NULL AND until > ? ORDER BY started",
                (now,),
            )
            return [_decode(entry) for (entry,) in rows]

        return await self.call(read)

    async def version(self) -> int:
        return await self.call(_version)

    async def expire(self, now: float) -> list[Automated]:
        """End the actions whose time ran out; returns those this call ended (so one worker
        records each)."""

        def run(conn: sqlite3.Connection) -> list[Automated]:
            due = "SELECT 1 FROM automation WHERE ended IS NULL AND until <= ? LIMIT 1"
            if conn.execute(due, (now,)).fetchone() is None:
                return []  # the common case, every second: no write lock taken
            with immediate(conn):
                rows = conn.execute(
                    "SELECT id FROM automation WHERE ended IS NULL AND until <= ?", (now,)
                ).fetchall()
                return [_end(conn, action_id, "expired", now) for (action_id,) in rows]

        return await self.call(run)

    async def end(self, action_id: str, why: str, now: float) -> Automated | None:
        """End an active action now (an operator lifted it); None if none is active."""

        def run(conn: sqlite3.Connection) -> Automated | None:
            with immediate(conn):
                row = conn.execute(
                    "SELECT 1 FROM automation WHERE id = ? AND ended IS NULL", (action_id,)
                ).fetchone()
                return _end(conn, action_id, why, now) if row else None

        return await self.call(run)

    async def purge(self, before: float) -> None:
        """Forget threshold matches and ended actions older than ``before``."""

        def run(conn: sqlite3.Connection) -> None:
            with immediate(conn):
                conn.execute("DELETE FROM automation_hits WHERE at < ?", (before,))
                conn.execute("DELETE FROM automation WHERE ended < ?", (before,))

        await self.call(run)


def _version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT version FROM automation_version").fetchone()[0])


def _next_version(conn: sqlite3.Connection) -> int:
    """Count one change (inside the change's write transaction)."""
    conn.execute("UPDATE automation_version SET version = version + 1")
    return _version(conn)


def _matched(
    conn: sqlite3.Connection, candidate: Automated, count: int, period: float
) -> Automated | None:
    rule, scope, now = candidate.rule, candidate.scope, candidate.started
    with immediate(conn):
        running = conn.execute(
            "SELECT 1 FROM automation WHERE rule = ? AND scope = ? AND ended IS NULL AND until > ?",
            (rule, scope, now),
        ).fetchone()
        if running:
            return None  # matches while it acts count for nothing, not towards the next one
        if count > 1:
            conn.execute(
                "INSERT INTO automation_hits (rule, scope, at) VALUES (?, ?, ?)", (rule, scope, now)
            )
            (seen,) = conn.execute(
                "SELECT count(*) FROM automation_hits WHERE rule = ? AND scope = ? AND at > ?",
                (rule, scope, now - period),
            ).fetchone()
            if seen < count:
                return None
        conn.execute("DELETE FROM automation_hits WHERE rule = ? AND scope = ?", (rule, scope))
        conn.execute(
            "INSERT INTO automation (id, rule, scope, version, started, until, ended, entry)"
            " VALUES (?, ?, ?, ?, ?, ?, NULL, ?)",
            (
                candidate.id,
                rule,
                scope,
                _next_version(conn),
                now,
                candidate.until,
                _encode(candidate),
            ),
        )
        return candidate


def _end(conn: sqlite3.Connection, action_id: str, why: str, now: float) -> Automated:
    (entry,) = conn.execute("SELECT entry FROM automation WHERE id = ?", (action_id,)).fetchone()
    ended = msgspec.structs.replace(_decode(entry), ended=now, ended_why=why)
    conn.execute(
        "UPDATE automation SET ended = ?, version = ?, entry = ? WHERE id = ?",
        (now, _next_version(conn), _encode(ended), action_id),
    )
    return ended
