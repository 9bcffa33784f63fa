"""The spool: SQLite in WAL mode with ``synchronous=FULL``, written by one thread in groups.

Every write (store, update, remove) goes to a queue. The writer thread takes everything
queued, up to ``max_batch``, runs it in one transaction and commits: one fsync for the
whole group. Callers that must not go on before the data is durable (the 250, the 202)
await the future of their write; the futures of a group are resolved together with one
call into the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec

from epoxi.errors import SpoolError, SpoolUnavailable
from epoxi.spool.records import MessageMeta, decode_meta, encode_meta

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (id TEXT PRIMARY KEY, meta BLOB NOT NULL, body BLOB NOT NULL)
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS quarantine (id TEXT, meta BLOB, body BLOB, reason TEXT, at REAL);
"""
_FREE_SPACE_EVERY = 0.5  # seconds between free-space checks

_STORE, _UPDATE, _REMOVE = 0, 1, 2
_SQL = {
    _STORE: "INSERT OR REPLACE INTO messages (id, meta, body) VALUES (?, ?, ?)",
    _UPDATE: "UPDATE messages SET meta = ? WHERE id = ?",
    _REMOVE: "DELETE FROM messages WHERE id = ?",
}


@dataclass(slots=True)
class _Op:
    kind: int
    params: tuple[object, ...]
    future: asyncio.Future[None] | None


_STOP = _Op(-1, (), None)


class Spool:
    """Durable message store. Thread-safe for its callers on one event loop."""

    def __init__(
        self,
        path: Path,
        *,
        max_batch: int = 512,
        max_pending: int = 20_000,
        min_free_bytes: int = 256 * 1024 * 1024,
        checkpoint_interval: float = 1.0,
        journal_size_limit: int = 64 * 1024 * 1024,
    ) -> None:
        self.path = path
        self.max_batch = max_batch
        self.max_pending = max_pending
        self.min_free_bytes = min_free_bytes
        self.checkpoint_interval = checkpoint_interval
        self.journal_size_limit = journal_size_limit
        self.commits = 0  # group commits so far (for tests and metrics)
        self.committed = 0  # writes committed so far
        self._ops: queue.SimpleQueue[_Op] = queue.SimpleQueue()
        self._enqueued = 0  # only the event loop thread writes this
        self._done = 0  # only the writer thread writes this
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = True
        self._disk_reason: str | None = None
        self._write_failed: str | None = None
        self._reader: sqlite3.Connection | None = None
        self._reader_lock = threading.Lock()

    # ----------------------------------------------------------------- life cycle

    def open(self) -> None:
        """Create or open the database and start the writer thread."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        writer = self._connect()
        self._migrate(writer)
        self._check_free_space()
        self._closed = False
        self._thread = threading.Thread(
            target=self._run_writer, args=(writer,), name="epoxi-spool-writer", daemon=True
        )
        self._thread.start()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(f"PRAGMA journal_size_limit={int(self.journal_size_limit)}")
        conn.execute("PRAGMA busy_timeout=5000")
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise SpoolError(f"{self.path}: schema {version} is newer than this Epoxi knows")
        conn.executescript(_SCHEMA)
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    async def close(self) -> None:
        """Refuse new writes, finish every queued one, checkpoint, and stop the thread."""
        if self._closed:
            return
        self._closed = True
        self._ops.put(_STOP)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    # ----------------------------------------------------------------- health

    def unhealthy_reason(self) -> str | None:
        """Why new mail must be refused now, or None. No I/O: safe on the hot path."""
        if self._closed:
            return "spool closed"
        pending = self._enqueued - self._done
        if pending > self.max_pending:
            return f"spool writer behind ({pending} writes pending)"
        return self._disk_reason or self._write_failed

    def _check_free_space(self) -> None:
        try:
            stat = os.statvfs(self.path.parent)
        except OSError as exc:
            self._disk_reason = f"cannot stat spool directory: {exc}"
            return
        free = stat.f_bavail * stat.f_frsize
        ok = free >= self.min_free_bytes
        self._disk_reason = None if ok else f"disk nearly full ({free // 1048576} MiB free)"
        if ok and self._write_failed:
            self._write_failed = None  # space came back: try writing again

    # ----------------------------------------------------------------- writes

    async def store(self, meta: MessageMeta, body: bytes) -> None:
        """Store a new message; returns once it is committed and fsynced."""
        await self._submit(_STORE, (meta.id, encode_meta(meta), body), check=True)

    async def store_many(self, items: list[tuple[MessageMeta, bytes]]) -> None:
        """Store several messages in one group; returns once all are durable."""
        self._refuse_if_unhealthy()
        futures = [self._enqueue(_STORE, (m.id, encode_meta(m), b), wait=True) for m, b in items]
        await asyncio.gather(*futures)  # type: ignore[arg-type]

    def update(self, meta: MessageMeta) -> asyncio.Future[None]:
        """Replace a message's metadata (attempts, due time, recipients left). Batched."""
        future = self._enqueue(_UPDATE, (encode_meta(meta), meta.id), wait=True)
        assert future is not None
        return future

    def remove(self, message_id: str) -> asyncio.Future[None]:
        """Delete a finished message. Batched."""
        future = self._enqueue(_REMOVE, (message_id,), wait=True)
        assert future is not None
        return future

    def _refuse_if_unhealthy(self) -> None:
        reason = self.unhealthy_reason()
        if reason is not None:
            raise SpoolUnavailable(reason)

    async def _submit(self, kind: int, params: tuple[object, ...], *, check: bool) -> None:
        if check:
            self._refuse_if_unhealthy()
        future = self._enqueue(kind, params, wait=True)
        assert future is not None
        await future

    def _enqueue(
        self, kind: int, params: tuple[object, ...], *, wait: bool
    ) -> asyncio.Future[None] | None:
        if self._closed:
            raise SpoolUnavailable("spool closed")
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        future = self._loop.create_future() if wait else None
        self._enqueued += 1
        self._ops.put(_Op(kind, params, future))
        return future

    # ----------------------------------------------------------------- the writer thread

    def _run_writer(self, conn: sqlite3.Connection) -> None:
        last_checkpoint = last_statvfs = time.monotonic()
        try:
            while True:
                batch, stop = self._take_batch()
                if batch:
                    self._commit(conn, batch)
                now = time.monotonic()
                if now - last_statvfs >= _FREE_SPACE_EVERY or not batch:
                    self._check_free_space()
                    last_statvfs = now
                if now - last_checkpoint >= self.checkpoint_interval:
                    self._checkpoint(conn, "PASSIVE")
                    last_checkpoint = now
                if stop:
                    break
        finally:
            self._checkpoint(conn, "TRUNCATE")
            conn.close()

    def _take_batch(self) -> tuple[list[_Op], bool]:
        try:
            first = self._ops.get(timeout=self.checkpoint_interval)
        except queue.Empty:
            return [], False
        if first is _STOP:
            return [], True
        batch = [first]
        while len(batch) < self.max_batch:
            try:
                op = self._ops.get_nowait()
            except queue.Empty:
                break
            if op is _STOP:
                self._ops.put(_STOP)  # finish this batch, then stop on the next round
                break
            batch.append(op)
        return batch, False

    def _commit(self, conn: sqlite3.Connection, batch: list[_Op]) -> None:
        error: BaseException | None = None
        try:
            conn.execute("BEGIN IMMEDIATE")
            for kind, params in _group(batch):
                conn.executemany(_SQL[kind], params)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            error = exc
            self._rollback(conn)
            self._note_failure(exc)
        self.commits += error is None
        self.committed += len(batch) if error is None else 0
        self._done += len(batch)
        self._resolve(batch, error)

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")

    def _note_failure(self, exc: sqlite3.Error) -> None:
        log.error("spool commit failed: %s", exc)
        code = getattr(exc, "sqlite_errorcode", None)
        if code in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR) or "full" in str(exc):
            self._write_failed = f"spool write failed: {exc}"

    def _resolve(self, batch: list[_Op], error: BaseException | None) -> None:
        futures = [op.future for op in batch if op.future is not None]
        if futures and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(_settle, futures, error)

    def _checkpoint(self, conn: sqlite3.Connection, mode: str) -> None:
        try:
            conn.execute(f"PRAGMA wal_checkpoint({mode})")
        except sqlite3.Error as exc:
            log.warning("spool checkpoint (%s) failed: %s", mode, exc)

    # ----------------------------------------------------------------- reads

    def _read_conn(self) -> sqlite3.Connection:
        if self._reader is None:
            self._reader = sqlite3.connect(
                f"file:{self.path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
            )
        return self._reader

    def _load_body_sync(self, message_id: str) -> bytes:
        with self._reader_lock:
            try:
                row = (
                    self._read_conn()
                    .execute("SELECT body FROM messages WHERE id = ?", (message_id,))
                    .fetchone()
                )
            except sqlite3.Error as exc:
                raise SpoolError(f"cannot read message {message_id}: {exc}") from exc
        if row is None:
            raise SpoolError(f"message {message_id} is not in the spool")
        return bytes(row[0])

    async def load_body(self, message_id: str) -> bytes:
        """Read a message's body (in a worker thread)."""
        return await asyncio.to_thread(self._load_body_sync, message_id)

    def count(self) -> int:
        with self._reader_lock:
            return int(self._read_conn().execute("SELECT count(*) FROM messages").fetchone()[0])

    def iter_meta(self, batch: int = 5000) -> Iterator[list[MessageMeta]]:
        """Every message's metadata, in id order, in batches (blocking: call from a thread).

        A row whose metadata cannot be decoded is moved to the quarantine table with a
        warning, and enumeration goes on.
        """
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            yield from self._iter_rows(conn, batch)
        finally:
            conn.close()

    def _iter_rows(self, conn: sqlite3.Connection, batch: int) -> Iterator[list[MessageMeta]]:
        after = ""
        while True:
            rows = conn.execute(
                "SELECT id, meta FROM messages WHERE id > ? ORDER BY id LIMIT ?", (after, batch)
            ).fetchall()
            if not rows:
                return
            after = rows[-1][0]
            metas = []
            for message_id, raw in rows:
                try:
                    metas.append(decode_meta(raw))
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    self._quarantine(conn, message_id, str(exc))
            yield metas

    def _quarantine(self, conn: sqlite3.Connection, message_id: str, reason: str) -> None:
        log.warning("spool record %s is corrupt (%s): moved to quarantine", message_id, reason)
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "INSERT INTO quarantine SELECT id, meta, body, ?, ? FROM messages WHERE id = ?",
            (reason, time.time(), message_id),
        )
        conn.execute("DELETE FROM messages WHERE id = ?", (message_id,))
        conn.execute("COMMIT")


def _group(batch: list[_Op]) -> Iterator[tuple[int, list[tuple[object, ...]]]]:
    """Consecutive ops of the same kind, so each run is one executemany (order is kept)."""
    kind, params = batch[0].kind, [batch[0].params]
    for op in batch[1:]:
        if op.kind != kind:
            yield kind, params
            kind, params = op.kind, []
        params.append(op.params)
    yield kind, params


def _settle(futures: list[asyncio.Future[None]], error: BaseException | None) -> None:
    for future in futures:
        if future.done():
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(SpoolError(f"spool commit failed: {error}"))
