"""Event webhooks in the store: the endpoints, and each event waiting for its endpoint.

Every worker process enqueues the events of its own records; one of them sends (the queue is
one table for all). A row leaves the queue only when its endpoint answered 2xx, so an event
that was enqueued survives a crash or a restart and is sent at least once. ``webhooks_version``
grows with every change of the endpoints, so each worker knows when to read them again.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from epoxi.store.thread import StoreThread, immediate


@dataclass(frozen=True)
class Endpoint:
    id: str
    tenant: str  # "" for the operator's own: every tenant's events
    url: str
    events: frozenset[str]  # event type names; empty means every type
    secret: str
    old_secret: str = ""  # still valid (sent alongside) until old_secret_until
    old_secret_until: float = 0.0
    created_at: float = 0.0

    def wants(self, event_type: str, tenant: str) -> bool:
        return (not self.events or event_type in self.events) and (
            not self.tenant or self.tenant == tenant
        )

    def secrets(self, now: float) -> list[str]:
        """The secrets to sign with now: the current one, and the old one while it lasts."""
        return [self.secret, self.old_secret] if self.old_secret_until > now else [self.secret]


@dataclass(frozen=True)
class Queued:
    seq: int
    event: bytes  # the event's JSON
    attempts: int
    created_at: float


@dataclass(frozen=True)
class Backlog:
    """One endpoint's queue and health, for operators."""

    endpoint: str
    queued: int
    due: int
    oldest: float | None
    last_error: str
    last_error_at: float
    last_success_at: float
    failures: int  # failed sends in a row
    dropped: int  # events given up on (too old)


_COLUMNS = "id, tenant, url, events, secret, old_secret, old_secret_until, created_at"


class WebhookStore(StoreThread):
    def __init__(self, path: Path) -> None:
        super().__init__(path, "webhooks")

    # ----------------------------------------------------------------- endpoints

    async def create(self, endpoint: Endpoint) -> None:
        def run(conn: sqlite3.Connection) -> None:
            with immediate(conn):
                conn.execute(
                    f"INSERT INTO webhooks ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    _row(endpoint),
                )
                _bump(conn)

        await self.call(run)

    async def endpoints(self) -> list[Endpoint]:
        return await self.call(_endpoints)

    async def rotate(self, endpoint_id: str, secret: str, grace: float) -> Endpoint | None:
        """A new secret; the current one stays valid for ``grace`` seconds more."""

        def run(conn: sqlite3.Connection) -> Endpoint | None:
            with immediate(conn):
                changed = conn.execute(
                    "UPDATE webhooks SET old_secret = secret, old_secret_until = ?, secret = ?"
                    " WHERE id = ?",
                    (time.time() + grace, secret, endpoint_id),
                ).rowcount
                _bump(conn)
            found = [e for e in _endpoints(conn) if e.id == endpoint_id]
            return found[0] if changed and found else None

        return await self.call(run)

    async def delete(self, endpoint_id: str) -> bool:
        """Remove an endpoint and the events waiting for it."""

        def run(conn: sqlite3.Connection) -> bool:
            with immediate(conn):
                gone = conn.execute("DELETE FROM webhooks WHERE id = ?", (endpoint_id,)).rowcount
                conn.execute("DELETE FROM webhook_queue WHERE endpoint = ?", (endpoint_id,))
                conn.execute("DELETE FROM webhook_state WHERE endpoint = ?", (endpoint_id,))
                _bump(conn)
            return bool(gone)

        return await self.call(run)

    async def version(self) -> int:
        return await self.call(_version)

    # ----------------------------------------------------------------- the queue

    async def enqueue(self, items: list[tuple[str, bytes]], now: float) -> None:
        """(endpoint id, event JSON) pairs, due now, in one transaction."""

        def run(conn: sqlite3.Connection) -> None:
            with immediate(conn):
                conn.executemany(
                    "INSERT INTO webhook_queue (endpoint, event, next_at, created_at)"
                    " SELECT ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM webhooks WHERE id = ?)",
                    [(endpoint, event, now, now, endpoint) for endpoint, event in items],
                )

        await self.call(run)

    async def due(self, endpoint: str, now: float, limit: int, skip: set[int]) -> list[Queued]:
        """The endpoint's due events, oldest first, leaving out those being sent (``skip``)."""

        def run(conn: sqlite3.Connection) -> list[Queued]:
            rows = conn.execute(
                "SELECT seq, event, attempts, created_at FROM webhook_queue"
                " WHERE endpoint = ? AND next_at <= ? ORDER BY seq LIMIT ?",
                (endpoint, now, limit + len(skip)),
            ).fetchall()
            return [Queued(*row) for row in rows if row[0] not in skip][:limit]

        return await self.call(run)

    async def delivered(self, endpoint: str, seqs: list[int], now: float) -> None:
        def run(conn: sqlite3.Connection) -> None:
            with immediate(conn):
                conn.executemany("DELETE FROM webhook_queue WHERE seq = ?", [(s,) for s in seqs])
                conn.execute(
                    "INSERT INTO webhook_state (endpoint, last_success_at) VALUES (?, ?)"
                    " ON CONFLICT DO UPDATE SET last_success_at = excluded.last_success_at,"
                    " failures = 0",
                    (endpoint, now),
                )

        await self.call(run)

    async def failed(
        self, endpoint: str, seqs: list[int], error: str, now: float, next_at: float, too_old: float
    ) -> int:
        """The endpoint refused or did not answer: try these again at ``next_at``; events
        created before ``too_old`` are given up on. Returns how many were given up on."""

        def run(conn: sqlite3.Connection) -> int:
            marks = ",".join("?" * len(seqs))
            with immediate(conn):
                dropped = conn.execute(
                    f"DELETE FROM webhook_queue WHERE seq IN ({marks}) AND created_at < ?",
                    (*seqs, too_old),
                ).rowcount
                conn.execute(
                    f"UPDATE webhook_queue SET attempts = attempts + 1, next_at = ?"
                    f" WHERE seq IN ({marks})",
                    (next_at, *seqs),
                )
                conn.execute(
                    "INSERT INTO webhook_state (endpoint, last_error, last_error_at, failures,"
                    " dropped) VALUES (?, ?, ?, 1, ?) ON CONFLICT DO UPDATE SET"
                    " last_error = excluded.last_error, last_error_at = excluded.last_error_at,"
                    " failures = failures + 1, dropped = dropped + excluded.dropped",
                    (endpoint, error, now, dropped),
                )
            return int(dropped)

        return await self.call(run)

    async def backlogs(self, now: float) -> list[Backlog]:
        def run(conn: sqlite3.Connection) -> list[Backlog]:
            rows = conn.execute(
                "SELECT w.id, count(q.seq), coalesce(sum(q.next_at <= ?), 0), min(q.created_at),"
                " coalesce(s.last_error, ''), coalesce(s.last_error_at, 0),"
                " coalesce(s.last_success_at, 0), coalesce(s.failures, 0),"
                " coalesce(s.dropped, 0)"
                " FROM webhooks w LEFT JOIN webhook_queue q ON q.endpoint = w.id"
                " LEFT JOIN webhook_state s ON s.endpoint = w.id GROUP BY w.id ORDER BY w.id",
                (now,),
            ).fetchall()
            return [Backlog(*row) for row in rows]

        return await self.call(run)

    async def replay(self, endpoint: str, now: float) -> int:
        """Make every waiting event of ``endpoint`` due now; returns how many."""

        def run(conn: sqlite3.Connection) -> int:
            with immediate(conn):
                return int(
                    conn.execute(
                        "UPDATE webhook_queue SET next_at = ? WHERE endpoint = ?", (now, endpoint)
                    ).rowcount
                )

        return await self.call(run)

    async def drop(self, endpoint: str) -> int:
        """Forget every waiting event of ``endpoint``; returns how many."""

        def run(conn: sqlite3.Connection) -> int:
            with immediate(conn):
                return int(
                    conn.execute(
                        "DELETE FROM webhook_queue WHERE endpoint = ?", (endpoint,)
                    ).rowcount
                )

        return await self.call(run)


def _row(endpoint: Endpoint) -> tuple[object, ...]:
    return (
        endpoint.id,
        endpoint.tenant,
        endpoint.url,
        json.dumps(sorted(endpoint.events)),
        endpoint.secret,
        endpoint.old_secret,
        endpoint.old_secret_until,
        endpoint.created_at,
    )


def _endpoints(conn: sqlite3.Connection) -> list[Endpoint]:
    rows = conn.execute(f"SELECT {_COLUMNS} FROM webhooks ORDER BY created_at").fetchall()
    return [
        Endpoint(
            id=row[0],
            tenant=row[1],
            url=row[2],
            events=frozenset(json.loads(row[3])),
            secret=row[4],
            old_secret=row[5],
            old_secret_until=row[6],
            created_at=row[7],
        )
        for row in rows
    ]


def _version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT version FROM webhooks_version").fetchone()[0])


def _bump(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE webhooks_version SET version = version + 1")
