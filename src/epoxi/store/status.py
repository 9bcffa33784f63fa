"""Message status and history, built from the delivery records off the hot path.

``feed`` (a record-log subscriber) only appends to a list; every ``flush_interval`` the batch
is written in one transaction by the store's own thread, which also serves every read, so
SQLite is never touched on the event loop. ``message`` flushes first: a client reads what
it has just been told was queued.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from epoxi.events.buffer import BufferedWriter
from epoxi.events.records import Record, RecordType, decode_record, encode_record
from epoxi.store.db import connect

log = logging.getLogger(__name__)

T = TypeVar("T")


class State(StrEnum):
    QUEUED = "queued"
    SCHEDULED = "scheduled"  # send_at in the future
    DEFERRED = "deferred"  # a transient failure; will be retried
    DELIVERED = "delivered"
    BOUNCED = "bounced"
    EXPIRED = "expired"
    SUPPRESSED = "suppressed"
    CANCELLED = "cancelled"


_PENDING = (State.DEFERRED, State.QUEUED, State.SCHEDULED)  # most telling first
_OUTCOME_STATE = {
    RecordType.DELIVERY: State.DELIVERED,
    RecordType.TRANSIENT_FAILURE: State.DEFERRED,
    RecordType.BOUNCE: State.BOUNCED,
    RecordType.ADMIN_BOUNCE: State.BOUNCED,
    RecordType.EXPIRATION: State.EXPIRED,
    RecordType.CANCELLED: State.CANCELLED,
    RecordType.REMOTE_DELIVERY: State.DELIVERED,  # a provider's "delivered", after the handover
}


def _outcome_state(record: Record) -> State | None:
    """The recipient state a record sets, if any. An out-of-band bounce that is permanent
    undoes a delivery: the receiving side took the message, then gave up on it."""
    if record.type is RecordType.OOB:
        response = record.response
        return State.BOUNCED if response is not None and response.code >= 500 else None
    return _OUTCOME_STATE.get(record.type)


class RecipientStatus(msgspec.Struct, kw_only=True):
    recipient: str
    state: State
    attempts: int
    last_response: str
    next_attempt: float | None


class MessageStatus(msgspec.Struct, kw_only=True):
    id: str
    state: State
    tenant: str
    campaign: str
    sender: str
    origin: str
    size: int
    received_at: float
    updated_at: float
    attempts: int
    last_response: str
    recipients: list[RecipientStatus]
    events: list[Record]


def overall_state(states: list[State]) -> State:
    """One state for a message from its recipients' (pending ones win)."""
    for state in _PENDING:
        if state in states:
            return state
    if states and all(s is State.DELIVERED for s in states):
        return State.DELIVERED
    for state in (State.BOUNCED, State.EXPIRED, State.SUPPRESSED):
        if state in states:
            return state
    return State.QUEUED


class StatusStore:
    """Status and history per message, and idempotency keys, in the store database."""

    def __init__(self, path: Path, *, flush_interval: float = 0.25) -> None:
        self.path = path
        self._buffer: BufferedWriter[Record] = BufferedWriter(
            self._write_batch,
            interval=flush_interval,
            name=f"store {path}",
            retry_on=(sqlite3.Error,),
        )
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="epoxi-store")
        self._conn: sqlite3.Connection | None = None

    # ----------------------------------------------------------------- life cycle

    async def start(self) -> None:
        self._conn = await self._call(lambda: connect(self.path, check_same_thread=False))
        self._buffer.start()

    async def stop(self) -> None:
        await self._buffer.stop()
        if self._conn is not None:
            await self._call(self._conn.close)
        self._executor.shutdown(wait=True)

    async def _call(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    # ----------------------------------------------------------------- records in

    def feed(self, record: Record) -> None:
        """A record-log subscriber: cheap, the write comes later."""
        self._buffer.add(record)

    async def flush(self) -> None:
        if self._conn is not None:
            await self._buffer.flush()

    async def _write_batch(self, batch: list[Record]) -> None:
        conn = self._require()
        await self._call(lambda: _apply(conn, batch))

    # ----------------------------------------------------------------- reads

    async def message(self, message_id: str) -> MessageStatus | None:
        await self.flush()
        conn = self._require()
        return await self._call(lambda: _read_message(conn, message_id))

    async def owner(self, message_id: str) -> tuple[str, str] | None:
        """The (tenant, campaign) of a message Epoxi took in, or None if it knows none."""
        await self.flush()  # its Reception record may still wait in the buffer
        conn = self._require()

        def read() -> tuple[str, str] | None:
            row = conn.execute(
                "SELECT tenant, campaign FROM messages WHERE id = ?", (message_id,)
            ).fetchone()
            return (row[0], row[1]) if row else None

        return await self._call(read)

    async def addressees(self, message_id: str) -> tuple[str, str, frozenset[str]] | None:
        """The (tenant, campaign, recipients) of a message in the store, or None. Records
        still in the buffer are not seen: :meth:`flush` first where they matter."""
        conn = self._require()

        def read() -> tuple[str, str, frozenset[str]] | None:
            row = conn.execute(
                "SELECT tenant, campaign FROM messages WHERE id = ?", (message_id,)
            ).fetchone()
            if row is None:
                return None
            rows = conn.execute(
                "SELECT recipient FROM recipients WHERE message_id = ?", (message_id,)
            )
            return row[0], row[1], frozenset(r[0].lower() for r in rows)

        return await self._call(read)

    # ----------------------------------------------------------------- idempotency

    async def idempotent_response(
        self, tenant: str, key: str, ttl: float
    ) -> tuple[str, bytes] | None:
        """(fingerprint, response) saved for ``key`` within ``ttl`` seconds, or None."""
        conn = self._require()
        since = time.time() - ttl

        def read() -> tuple[str, bytes] | None:
            row = conn.execute(
                "SELECT fingerprint, response FROM idempotency "
                "WHERE tenant = ? AND key = ? AND created_at >= ?",
                (tenant, key, since),
            ).fetchone()
            return (row[0], row[1]) if row else None

        return await self._call(read)

    async def save_idempotent_response(
        self, tenant: str, key: str, fingerprint: str, response: bytes
    ) -> None:
        conn = self._require()
        now = time.time()

        def write() -> None:
            conn.execute(
                "INSERT OR REPLACE INTO idempotency VALUES (?, ?, ?, ?, ?)",
                (tenant, key, fingerprint, response, now),
            )

        await self._call(write)

    async def purge(self, idempotency_ttl: float, history_ttl: float) -> None:
        """Forget idempotency keys and finished message histories older than their TTLs."""
        conn = self._require()
        now = time.time()
        await self._call(lambda: _purge(conn, now - idempotency_ttl, now - history_ttl))

    def _require(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("the status store is not started")
        return self._conn


# --------------------------------------------------------------------- in the store's thread


_INSERT_MESSAGE = "INSERT OR IGNORE INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
_INSERT_RECIPIENT = (
    "INSERT OR IGNORE INTO recipients (message_id, recipient, state, next_attempt, updated_at)"
    " VALUES (?, ?, ?, ?, ?)"
)
_UPDATE_RECIPIENT = (
    "UPDATE recipients SET state = ?, attempts = MAX(attempts, ?), last_response = ?,"
    " next_attempt = ?, updated_at = ? WHERE message_id = ? AND recipient = ?"
)
_TOUCH_MESSAGE = "UPDATE messages SET updated_at = ? WHERE id = ?"
_INSERT_EVENT = "INSERT INTO events (message_id, record) VALUES (?, ?)"


def _apply(conn: sqlite3.Connection, batch: list[Record]) -> None:
    """One transaction, a statement per kind of row for the whole batch: receptions first
    (a message's Reception always comes before its outcomes), then the outcomes in order."""
    receptions = [r for r in batch if r.type is RecordType.RECEPTION]
    suppressed = [r for r in batch if r.type is RecordType.SUPPRESSION]
    outcomes = [(s, r) for r in batch if (s := _outcome_state(r)) is not None]
    conn.execute("BEGIN")
    try:
        if receptions:
            conn.executemany(_INSERT_MESSAGE, map(_message_row, receptions))
            conn.executemany(_INSERT_RECIPIENT, _recipient_rows(receptions))
        if suppressed:  # a message left without recipients has no Reception: its row is here
            conn.executemany(_INSERT_MESSAGE, map(_message_row, suppressed))
            conn.executemany(_INSERT_RECIPIENT, map(_suppressed_row, suppressed))
        if outcomes:
            conn.executemany(_UPDATE_RECIPIENT, [_outcome_row(s, r) for s, r in outcomes])
            conn.executemany(_TOUCH_MESSAGE, [(r.timestamp, r.message_id) for _, r in outcomes])
        events = [(r.message_id, encode_record(r)) for r in batch if r.message_id]
        conn.executemany(_INSERT_EVENT, events)  # not the node's own (automation ending)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _message_row(record: Record) -> tuple[Any, ...]:
    return (
        record.message_id,
        record.tenant,
        record.campaign,
        record.sender,
        record.origin,
        record.size,
        record.timestamp,
        record.timestamp,
    )


def _recipient_rows(receptions: list[Record]) -> list[tuple[Any, ...]]:
    rows = []
    for record in receptions:
        scheduled = record.next_attempt > record.timestamp
        state = (State.SCHEDULED if scheduled else State.QUEUED).value
        rows += [
            (record.message_id, r, state, record.next_attempt, record.timestamp)
            for r in record.recipients
        ]
    return rows


def _suppressed_row(record: Record) -> tuple[Any, ...]:
    return (record.message_id, record.recipient, State.SUPPRESSED.value, 0.0, record.timestamp)


def _outcome_row(state: State, record: Record) -> tuple[Any, ...]:
    return (
        state.value,
        record.attempt,
        _response_text(record),
        record.next_attempt,
        record.timestamp,
        record.message_id,
        record.recipient,
    )


def _response_text(record: Record) -> str:
    response = record.response
    if response is None:
        return record.reason
    return " ".join(str(part) for part in (response.code, response.enhanced, response.text) if part)


def _read_message(conn: sqlite3.Connection, message_id: str) -> MessageStatus | None:
    row = conn.execute(
        "SELECT id, tenant, campaign, sender, origin, size, received_at, updated_at"
        " FROM messages WHERE id = ?",
        (message_id,),
    ).fetchone()
    if row is None:
        return None
    recipients = [
        RecipientStatus(
            recipient=r[0],
            state=State(r[1]),
            attempts=r[2],
            last_response=r[3],
            next_attempt=r[4] or None,
        )
        for r in conn.execute(
            "SELECT recipient, state, attempts, last_response, next_attempt FROM recipients"
            " WHERE message_id = ? ORDER BY recipient",
            (message_id,),
        )
    ]
    events = [
        decode_record(r[0])
        for r in conn.execute(
            "SELECT record FROM events WHERE message_id = ? ORDER BY seq", (message_id,)
        )
    ]
    _show_signatures_on_attempts(events)
    latest = max(recipients, key=lambda r: r.attempts, default=None)
    return MessageStatus(
        id=row[0],
        state=overall_state([r.state for r in recipients]),
        tenant=row[1],
        campaign=row[2],
        sender=row[3],
        origin=row[4],
        size=row[5],
        received_at=row[6],
        updated_at=row[7],
        attempts=latest.attempts if latest else 0,
        last_response=next((e.last_response for e in recipients if e.last_response), ""),
        recipients=recipients,
        events=events,
    )


def _show_signatures_on_attempts(events: list[Record]) -> None:
    """Each attempt's event shows the DKIM signatures the message went with. They are made
    once, at reception, and only that record carries them in the log (no repeat per
    recipient and attempt)."""
    signed = next((e.dkim for e in events if e.type is RecordType.RECEPTION), "")
    for event in events:
        if event.type in _OUTCOME_STATE and event.attempt and not event.dkim:
            event.dkim = signed


def _purge(conn: sqlite3.Connection, idempotent_before: float, history_before: float) -> None:
    conn.execute("BEGIN")
    try:
        conn.execute("DELETE FROM idempotency WHERE created_at < ?", (idempotent_before,))
        finished = (
            "SELECT id FROM messages WHERE updated_at < ? AND NOT EXISTS (SELECT 1 FROM"
            " recipients WHERE message_id = messages.id AND state IN (?, ?, ?))"
        )
        pending = tuple(s.value for s in _PENDING)
        args: tuple[Any, ...] = (history_before, *pending)
        conn.execute(f"DELETE FROM events WHERE message_id IN ({finished})", args)
        conn.execute(f"DELETE FROM recipients WHERE message_id IN ({finished})", args)
        conn.execute(f"DELETE FROM messages WHERE id IN ({finished})", args)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
