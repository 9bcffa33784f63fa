"""Suppression lists: per tenant, the addresses new mail is not sent to.

A hard bounce, a complaint or an unsubscribe adds an address (with the reason and time), so
does an operator or application through the API; tenant ``*`` is the operator's global list,
which holds for every tenant. The table lives in the store every worker shares; each worker
keeps a copy in memory (:class:`SuppressionList`) that ingest asks without any I/O, kept fresh
by polling a version number every second and applying the changes logged since. SQLite runs on
the store's own thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

import msgspec

from epoxi.events.records import Record, RecordType
from epoxi.store.thread import StoreThread

log = logging.getLogger(__name__)

GLOBAL = "*"  # the operator's list: holds for every tenant
CHANGES_KEPT = 3600.0  # seconds the change log is kept; a worker further behind reloads all
# Bounce categories (bounce/rules.toml) that say the address itself is bad: not a full mailbox,
# a policy or content block, or a refused sender, which say nothing about the address
BAD_ADDRESS = frozenset({"InvalidRecipient", "BadDomain"})


class Reason(enum.StrEnum):
    BOUNCE = "bounce"  # a hard bounce: in-session, or out of band (a DSN that came back)
    COMPLAINT = "complaint"  # a spam complaint (ARF feedback)
    UNSUBSCRIBE = "unsubscribe"  # the recipient asked (List-Unsubscribe)
    MANUAL = "manual"  # added through the API or CLI


class Suppression(msgspec.Struct, kw_only=True):
    """One address on one tenant's list (``*``: the global list)."""

    tenant: str
    address: str  # lower-cased
    reason: Reason
    detail: str = ""  # what caused it: the reply, the message id, who added it
    created_at: float = 0.0


def normal(address: str) -> str:
    """The form an address is kept and looked up in."""
    return address.strip().lower()


# --------------------------------------------------------------------- the in-memory copy


class SuppressionList:
    """Each tenant's suppressed addresses, as this worker last read them: ``find`` is ingest's
    question, answered from memory (and at once while every list is empty)."""

    def __init__(self) -> None:
        self._lists: dict[str, dict[str, Reason]] = {}
        self.version = -1  # the store's version this copy reflects; -1: never read

    def find(self, tenant: str, recipients: Iterable[str]) -> list[tuple[str, Reason]]:
        """The recipients on ``tenant``'s list or the global one, with the reason."""
        if not self._lists:
            return []
        own, everyone = self._lists.get(tenant), self._lists.get(GLOBAL)
        if own is None and everyone is None:
            return []
        found = []
        for recipient in recipients:
            key = normal(recipient)
            reason = (own and own.get(key)) or (everyone and everyone.get(key))
            if reason:
                found.append((recipient, reason))
        return found

    def __len__(self) -> int:
        return sum(len(addresses) for addresses in self._lists.values())

    def replace(self, version: int, entries: Iterable[tuple[str, str, str]]) -> None:
        self._lists = {}
        self.apply(version, entries)

    def apply(self, version: int, changes: Iterable[tuple[str, str, str]]) -> None:
        """(tenant, address, reason) changes; reason "" removes the address."""
        for tenant, address, reason in changes:
            if reason:
                self._lists.setdefault(tenant, {})[address] = Reason(reason)
            elif (addresses := self._lists.get(tenant)) is not None:
                addresses.pop(address, None)
                if not addresses:
                    del self._lists[tenant]
        self.version = max(self.version, version)


# --------------------------------------------------------------------- the table


class SuppressionStore(StoreThread):
    def __init__(self, path: Path) -> None:
        super().__init__(path, "suppressions")

    async def add(self, entries: list[Suppression]) -> list[Suppression]:
        """Add the addresses not listed yet (one that is keeps its first reason and time);
        returns those added."""
        return await self.call(lambda conn: _add(conn, entries))

    async def remove(self, tenant: str, address: str) -> bool:
        return await self.call(lambda conn: _remove(conn, tenant, normal(address)))

    async def get(self, tenant: str, address: str) -> Suppression | None:
        def read(conn: sqlite3.Connection) -> Suppression | None:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM suppressions WHERE tenant = ? AND address = ?",
                (tenant, normal(address)),
            ).fetchone()
            return _entry(row) if row else None

        return await self.call(read)

    async def page(
        self, tenant: str | None, after: tuple[str, str] = ("", ""), limit: int = 100
    ) -> list[Suppression]:
        """Entries in (tenant, address) order after ``after``; ``tenant`` None: every list."""

        def read(conn: sqlite3.Connection) -> list[Suppression]:
            if tenant is None:
                rows = conn.execute(
                    f"SELECT {_COLUMNS} FROM suppressions WHERE (tenant, address) > (?, ?)"
                    " ORDER BY tenant, address LIMIT ?",
                    (*after, limit),
                )
            else:
                rows = conn.execute(
                    f"SELECT {_COLUMNS} FROM suppressions WHERE tenant = ? AND address > ?"
                    " ORDER BY address LIMIT ?",
                    (tenant, after[1], limit),
                )
            return [_entry(row) for row in rows]

        return await self.call(read)

    async def version(self) -> int:
        return await self.call(_version)

    async def refresh(self, copy: SuppressionList) -> None:
        """Bring ``copy`` up to the store's version: the changes since, or all of it when
        they were purged (or it was never read)."""
        if copy.version >= 0 and await self.version() == copy.version:
            return  # the common case, every second
        version, rows, full = await self.call(lambda conn: _since(conn, copy.version))
        if full:
            copy.replace(version, rows)
        else:
            copy.apply(version, rows)

    async def purge(self, before: float) -> None:
        """Forget changes logged before ``before`` (the list itself stays)."""

        def run(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM suppression_changes WHERE at < ?", (before,))

        await self.call(run)


_COLUMNS = "tenant, address, reason, detail, created_at"


def _entry(row: tuple[str, str, str, str, float]) -> Suppression:
    return Suppression(
        tenant=row[0], address=row[1], reason=Reason(row[2]), detail=row[3], created_at=row[4]
    )


def _version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT version FROM suppression_version").fetchone()[0])


def _log(conn: sqlite3.Connection, tenant: str, address: str, reason: str, now: float) -> None:
    conn.execute("UPDATE suppression_version SET version = version + 1")
    conn.execute(
        "INSERT INTO suppression_changes (version, tenant, address, reason, at)"
        " VALUES ((SELECT version FROM suppression_version), ?, ?, ?, ?)",
        (tenant, address, reason, now),
    )


def _add(conn: sqlite3.Connection, entries: list[Suppression]) -> list[Suppression]:
    added = []
    now = time.time()
    conn.execute("BEGIN IMMEDIATE")
    try:
        for entry in entries:
            entry.address = normal(entry.address)
            entry.created_at = entry.created_at or now
            cursor = conn.execute(
                "INSERT OR IGNORE INTO suppressions (tenant, address, reason, detail, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (entry.tenant, entry.address, entry.reason.value, entry.detail, entry.created_at),
            )
            if cursor.rowcount:
                _log(conn, entry.tenant, entry.address, entry.reason.value, now)
                added.append(entry)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return added


def _remove(conn: sqlite3.Connection, tenant: str, address: str) -> bool:
    conn.execute("BEGIN IMMEDIATE")
    try:
        cursor = conn.execute(
            "DELETE FROM suppressions WHERE tenant = ? AND address = ?", (tenant, address)
        )
        if cursor.rowcount:
            _log(conn, tenant, address, "", time.time())
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return bool(cursor.rowcount)


def _since(conn: sqlite3.Connection, seen: int) -> tuple[int, list[tuple[str, str, str]], bool]:
    """(version, rows, full): the changes after ``seen``, or every entry (full) when the log
    no longer reaches back to it. One read transaction: rows and version agree."""
    conn.execute("BEGIN")
    try:
        version = _version(conn)
        (oldest,) = conn.execute("SELECT min(version) FROM suppression_changes").fetchone()
        logged = oldest is not None and oldest <= seen + 1
        if seen >= 0 and (logged or version == seen):
            query = "SELECT tenant, address, reason FROM suppression_changes WHERE version > ?"
            rows = conn.execute(query + " ORDER BY version", (seen,)).fetchall()
            return version, rows, False
        rows = conn.execute("SELECT tenant, address, reason FROM suppressions").fetchall()
        return version, rows, True
    finally:
        conn.execute("COMMIT")


# --------------------------------------------------------------------- the service


class Suppressions:
    """This worker's suppression lists: the store, the in-memory copy ingest asks, and the
    record-log subscriber that adds an address on a hard bounce or a complaint."""

    def __init__(self, store: SuppressionStore) -> None:
        self.store = store
        self.list = SuppressionList()
        self._pending: set[asyncio.Task[None]] = set()
        self._reading = asyncio.Lock()  # one refresh at a time: changes apply in order

    async def start(self) -> None:
        await self.store.start()
        await self.refresh()

    async def stop(self) -> None:
        await self.settle()
        await self.store.stop()

    async def settle(self) -> None:
        """Wait for the automatic adds under way."""
        while self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    async def refresh(self) -> None:
        async with self._reading:
            await self.store.refresh(self.list)

    async def add(self, entries: list[Suppression]) -> list[Suppression]:
        """Add to the store, and to this worker's copy at once (the others read it within a
        second)."""
        added = await self.store.add(entries)
        await self.refresh()
        return added

    async def remove(self, tenant: str, address: str) -> bool:
        removed = await self.store.remove(tenant, address)
        await self.refresh()
        return removed

    def observe(self, record: Record) -> None:
        """A record-log subscriber: a record that says the address is bad adds it."""
        entry = automatic(record)
        if entry is None:
            return
        task = asyncio.get_running_loop().create_task(self._add_one(entry))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _add_one(self, entry: Suppression) -> None:
        try:
            if await self.add([entry]):
                log.info(
                    "%s suppressed for tenant %r: %s", entry.address, entry.tenant, entry.detail
                )
        except Exception:
            log.exception("could not add %s to the suppression list", entry.address)


def automatic(record: Record) -> Suppression | None:
    """The entry a record adds: a hard bounce for a bad address (in session or out of band),
    a complaint or an unsubscribe; None for any other record."""
    reason = _automatic_reason(record)
    if reason is None or not record.recipient:
        return None
    return Suppression(
        tenant=record.tenant,
        address=record.recipient,
        reason=reason,
        detail=_detail(record),
        created_at=record.timestamp,
    )


def _automatic_reason(record: Record) -> Reason | None:
    kind = record.type
    if kind is RecordType.FEEDBACK:
        return Reason.COMPLAINT
    if kind is RecordType.UNSUBSCRIBE:
        return Reason.UNSUBSCRIBE
    if kind is RecordType.BOUNCE or (kind is RecordType.OOB and _permanent(record)):
        return Reason.BOUNCE if record.classification in BAD_ADDRESS else None
    return None


def _permanent(record: Record) -> bool:
    response = record.response
    return response is None or response.code >= 500 or response.enhanced.startswith("5.")


def _detail(record: Record) -> str:
    parts = [f"{record.type.value} of message {record.message_id}"]
    if record.response is not None:
        response = record.response
        parts.append(
            " ".join(str(p) for p in (response.code, response.enhanced, response.text) if p)
        )
    elif record.reason:
        parts.append(record.reason)
    return ": ".join(parts)[:500]
