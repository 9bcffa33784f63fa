"""Provider webhook events taken in (``POST /webhooks/{provider}``): the dedupe key.

A row per ``(provider, event id)`` applied, written after the event's records are in the
status store, so a redelivered event (a provider's retry, a replayed call) is seen and changes
nothing. Rows are kept for ``keep`` seconds (providers retry for hours to days).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from pathlib import Path

from epoxi.store.thread import StoreThread, immediate


class ProviderEventStore(StoreThread):
    def __init__(self, path: Path) -> None:
        super().__init__(path, "provider-events")

    async def seen(self, provider: str, event_ids: Iterable[str]) -> set[str]:
        """The ids among ``event_ids`` already applied for ``provider``."""
        wanted = list(event_ids)

        def run(conn: sqlite3.Connection) -> set[str]:
            found: set[str] = set()
            for start in range(0, len(wanted), 500):  # SQLite's bound-parameter limit
                chunk = wanted[start : start + 500]
                marks = ",".join("?" * len(chunk))
                found.update(
                    row[0]
                    for row in conn.execute(
                        "SELECT event_id FROM provider_events"
                        f" WHERE provider = ? AND event_id IN ({marks})",
                        (provider, *chunk),
                    )
                )
            return found

        return await self.call(run)

    async def remember(
        self, provider: str, rows: list[tuple[str, str, str, str]], at: float
    ) -> None:
        """(event id, message id, type, outcome) rows applied for ``provider``."""

        def run(conn: sqlite3.Connection) -> None:
            with immediate(conn):
                conn.executemany(
                    "INSERT OR IGNORE INTO provider_events VALUES (?, ?, ?, ?, ?, ?)",
                    [(provider, *row, at) for row in rows],
                )

        await self.call(run)

    async def purge(self, before: float) -> int:
        def run(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "DELETE FROM provider_events WHERE received_at < ?", (before,)
            ).rowcount

        return await self.call(run)
