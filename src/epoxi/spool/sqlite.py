"""The spool: SQLite in WAL mode, written by one thread in groups.

Two kinds of write, with two promises:

- **Stores** (``store``, ``store_many``) are what a client waits for: its ``250`` is sent only
  once the store's future resolves, and that is after the commit, fsync included
  (``synchronous=FULL``), returned. Stores go first: whenever one is waiting, the writer's next
  transaction holds stores and nothing else, so one fsync serves every session that queued
  meanwhile. While a commit's fsync runs (a slow disk: tens of milliseconds), new stores queue
  and form the next group.
- **Updates and removes** (after a delivery attempt) wait for no one. They are kept aside and
  committed later in bigger groups (``max_batch`` of them, or the oldest ``lazy_delay``
  seconds old; 50 ms by default), with ``synchronous=NORMAL``: no fsync of their own. At most
  one such group goes between two store groups, so a store never waits behind more than one,
  and that one has no fsync. Once committed, a write survives a process crash (the WAL is in
  the page cache) and is durable after the next store commit (which syncs the whole WAL), the
  next checkpoint or ``close``. What a crash can take is an update or a remove, never a
  store: those still waiting aside (a process crash) or not yet synced (a power loss). The
  message then comes back as it was and is delivered again: a duplicate, never a loss.

Order: a store is committed before any update or remove queued after it; updates and removes
keep their queue order among themselves. Within one transaction of them all updates run
before all removes, which equals queue order for every message, since a removed row is never
written again (ids are unique by construction, and an update of a missing row is a no-op).

Layout: ``messages(id, meta)`` holds the small msgpack metadata and ``bodies(id, body)`` the
message. They are separate tables, not separate columns, because SQLite rewrites a whole row
on UPDATE: with the body in the same row a retry (new attempt count, due time) wrote the body
again (~9 KB of WAL per update for a 5 KB message, against ~0.5 KB now). Start-up enumeration
reads only ``messages``. ``secure_delete`` is ``FAST`` (Debian builds SQLite with it on): a
removed body's pages go to the free list without being zeroed and written again; they are
reused by the next stores.

Reads (``load_body``, ``count``) use read-only connections of their own; WAL lets them run
alongside the writer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Any, Final

import msgspec

from epoxi.errors import SpoolError, SpoolUnavailable
from epoxi.message import MessageMeta
from epoxi.schema import SchemaTooNew, migrate
from epoxi.spool.records import decode_meta, encode_meta

log = logging.getLogger(__name__)

MiB: Final = 1024 * 1024

# ----------------------------------------------------------------------------- schema

SCHEMA_VERSION: Final = 2  # PRAGMA user_version of the layout below

_CREATE: Final = (
    "CREATE TABLE messages (id TEXT PRIMARY KEY, meta BLOB NOT NULL) WITHOUT ROWID",
    "CREATE TABLE bodies (id TEXT PRIMARY KEY, body BLOB NOT NULL)",
    "CREATE TABLE quarantine (id TEXT NOT NULL, meta BLOB, body BLOB, reason TEXT NOT NULL,"
    " at REAL NOT NULL)",
)

# From version N to N + 1. Version 1 (the first draft) kept meta and body in one row.
_UPGRADES: Final[dict[int, tuple[str, ...]]] = {
    1: (
        "ALTER TABLE messages RENAME TO messages_v1",
        _CREATE[0],
        _CREATE[1],
        "INSERT INTO messages (id, meta) SELECT id, meta FROM messages_v1",
        "INSERT INTO bodies (id, body) SELECT id, body FROM messages_v1",
        "DROP TABLE messages_v1",
    ),
}

# Statements of the writer. A store row is (id, meta, body), an update row (id, meta), a
# remove row (id,); the store rows are split per table with itemgetter (in C, no Python loop).
_INSERT_META: Final = "INSERT OR REPLACE INTO messages (id, meta) VALUES (?, ?)"
_INSERT_BODY: Final = "INSERT OR REPLACE INTO bodies (id, body) VALUES (?, ?)"
_UPDATE_META: Final = "UPDATE messages SET meta = ?2 WHERE id = ?1"
_DELETE_META: Final = "DELETE FROM messages WHERE id = ?"
_DELETE_BODY: Final = "DELETE FROM bodies WHERE id = ?"
_ID_META: Final = itemgetter(0, 1)
_ID_BODY: Final = itemgetter(0, 2)

# ----------------------------------------------------------------------------- queue items

_STORE, _STORE_MANY, _UPDATE, _REMOVE, _STOP = range(5)  # a kind below _UPDATE is a store
# (kind, row or list of rows, future). A plain tuple: the cheapest thing to build per write.
_Op = tuple[int, Any, asyncio.Future[None] | None]
_STOP_OP: Final[_Op] = (_STOP, None, None)
_Rows = list[tuple[Any, ...]]

_FREE_SPACE_EVERY: Final = 0.5  # seconds between free-space checks (and idle wake-ups)
_BUSY_TIMEOUT_MS: Final = 5000
_CLOSED: Final = "spool closed"
_WRITER_BEHIND: Final = "spool writer behind"
_DISK_ERRORS: Final = frozenset({sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR})


class Spool:
    """Durable message store: one SQLite database, one writer thread, group commits.

    Writes (``store``, ``store_many``, ``update``, ``remove``) must be called from the thread
    of the event loop the spool serves (the first loop that uses it); reads may be called
    from any thread. ``max_batch`` bounds the writes of one transaction; ``lazy_delay`` is
    how long an update or a remove may wait for more to join its group. Counters for
    metrics: ``commits`` (group commits), ``committed`` (writes in them), ``failed_commits``,
    ``free_bytes`` (last statvfs).
    """

    def __init__(
        self,
        path: Path,
        *,
        max_batch: int = 512,
        lazy_delay: float = 0.05,
        max_pending: int = 20_000,
        min_free_bytes: int = 256 * MiB,
        checkpoint_interval: float = 1.0,
        journal_size_limit: int = 64 * MiB,
    ) -> None:
        self.path = Path(path)
        self.max_batch = max_batch
        self.lazy_delay = lazy_delay
        self.max_pending = max_pending
        self.min_free_bytes = min_free_bytes
        self.checkpoint_interval = checkpoint_interval
        self.journal_size_limit = journal_size_limit
        self.commits = 0
        self.committed = 0
        self.failed_commits = 0
        self.free_bytes = -1
        self._ops: queue.SimpleQueue[_Op] = queue.SimpleQueue()
        self._enqueued = 0  # written by the loop thread only
        self._done = 0  # written by the writer thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None  # the writer's; used by its thread only
        self._sync_full = True  # the writer connection's synchronous setting (its thread only)
        self._closed = True
        self._disk_reason: str | None = None  # set by the free-space check
        self._write_failed: str | None = None  # set when a commit hit a full or failing disk
        self._write_failed_at = 0.0
        self._dead: str | None = None  # set if the writer thread ever stops unexpectedly
        self._idle_readers: list[sqlite3.Connection] = []

    # ------------------------------------------------------------------------- life cycle

    def open(self) -> None:
        """Create or open the database, upgrade its schema, and start the writer thread.

        Blocking (file creation, schema changes): call it at start-up. Works inside a
        coroutine; the running loop, if any, is the one whose futures the writer resolves
        (otherwise the loop of the first write).
        """
        if self._thread is not None:
            raise SpoolError(f"{self.path}: spool is already open")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = self._connect_writer()
        self._check_free_space(time.monotonic())
        self._loop = _running_loop()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="epoxi-spool-writer", daemon=True)
        self._thread.start()

    def prepare(self) -> None:
        """Create or upgrade the database, checkpoint it and close it again (no writer thread).

        Blocking; for tools that work on closed spools (merging shards)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = self._connect_writer()
        _checkpoint(conn, "TRUNCATE")
        conn.close()

    async def close(self) -> None:
        """Refuse new writes, let the writer commit everything queued, checkpoint, stop.

        Returns once the thread has joined; every write queued before ``close`` is durable
        (or its future failed) by then. Safe to call twice.
        """
        thread = self._thread
        if thread is None:
            return
        self._closed = True
        self._ops.put(_STOP_OP)
        await asyncio.to_thread(thread.join)
        self._thread = None
        self._loop = None
        self._close_readers()

    def _connect_writer(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise SpoolError(f"{self.path}: cannot open the spool: {exc}") from exc
        try:
            _set_pragmas(conn, self.journal_size_limit)
            self._migrate(conn)
        except BaseException as exc:
            conn.close()
            if isinstance(exc, sqlite3.Error):
                raise SpoolError(f"{self.path}: cannot prepare the spool: {exc}") from exc
            raise
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        try:
            version = migrate(conn, target=SCHEMA_VERSION, create=_CREATE, upgrades=_UPGRADES)
        except SchemaTooNew as exc:
            raise SpoolError(
                f"{self.path}: spool schema {exc.version} is newer than this Epoxi"
            ) from exc
        if version != SCHEMA_VERSION:
            log.info("spool %s: schema %d -> %d", self.path, version, SCHEMA_VERSION)

    # ------------------------------------------------------------------------- health

    def unhealthy_reason(self) -> str | None:
        """Why new mail must be refused now (answer 4xx), or None.

        Cost: a few attribute reads; no I/O, no syscall, no allocation. Safe on the hot
        path (every MAIL). The free-space figure is refreshed by the writer thread.
        """
        if self._closed:
            return _CLOSED
        if self._enqueued - self._done > self.max_pending:
            return _WRITER_BEHIND
        return self._dead or self._disk_reason or self._write_failed

    @property
    def pending(self) -> int:
        """Writes queued and not yet committed (or failed)."""
        return self._enqueued - self._done

    def _check_free_space(self, now: float) -> None:
        """statvfs the spool directory; writer thread (and ``open``) only."""
        try:
            stat = os.statvfs(self.path.parent)
        except OSError as exc:
            self._disk_reason = f"spool disk unreadable: {exc}"
            return
        self.free_bytes = free = stat.f_bavail * stat.f_frsize
        if free < self.min_free_bytes:
            self._disk_reason = f"disk nearly full ({free // MiB} MiB free)"
            return
        self._disk_reason = None
        if self._write_failed and now - self._write_failed_at >= _FREE_SPACE_EVERY:
            log.info("spool %s: disk has room again, accepting mail", self.path)
            self._write_failed = None

    # ------------------------------------------------------------------------- writes

    async def store(self, meta: MessageMeta, body: bytes) -> None:
        """Store a new message; returns only once it is committed and fsynced.

        Raises SpoolUnavailable at once when ``unhealthy_reason()`` is not None, SpoolError
        when the commit failed. Cancelling the caller does not withdraw the write.
        """
        reason = self.unhealthy_reason()
        if reason is not None:
            raise SpoolUnavailable(reason)
        future = self._future()
        self._enqueued += 1
        self._ops.put((_STORE, (meta.id, encode_meta(meta), body), future))
        await future

    async def store_many(self, items: list[tuple[MessageMeta, bytes]]) -> None:
        """Store several messages in one transaction: all are durable, or none and it raises."""
        reason = self.unhealthy_reason()
        if reason is not None:
            raise SpoolUnavailable(reason)
        if not items:
            return
        rows = [(meta.id, encode_meta(meta), body) for meta, body in items]
        future = self._future()
        self._enqueued += len(rows)
        self._ops.put((_STORE_MANY, rows, future))
        await future

    def update(self, meta: MessageMeta) -> asyncio.Future[None]:
        """Replace a message's metadata (encoded now, so ``meta`` may change afterwards).

        Committed later, in a group of updates and removes (see the module documentation):
        the future resolves once it is committed, durable after the next store commit; it
        may be dropped (a failure is logged by the writer). Accepted while unhealthy; raises
        SpoolUnavailable only when the spool is closed. No-op if the id is unknown.
        """
        return self._put(_UPDATE, (meta.id, encode_meta(meta)))

    def remove(self, message_id: str) -> asyncio.Future[None]:
        """Delete a message and its body (delivered, bounced, expired). Committed like update:
        lost in a power failure, it costs a duplicate delivery, never a loss."""
        return self._put(_REMOVE, (message_id,))

    def _put(self, kind: int, row: tuple[Any, ...]) -> asyncio.Future[None]:
        if self._closed:
            raise SpoolUnavailable(_CLOSED)
        future = self._future()
        self._enqueued += 1
        self._ops.put((kind, row, future))
        return future

    def _future(self) -> asyncio.Future[None]:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop.create_future()

    # ------------------------------------------------------------------------- the writer thread

    def _run(self) -> None:
        """The writer thread: commit groups until told to stop, then checkpoint and close."""
        conn = self._conn
        assert conn is not None
        try:
            self._write_loop(conn)
        except BaseException as exc:  # a bug: say so loudly and refuse mail from now on
            log.critical("spool writer thread died", exc_info=True)
            self._dead = f"spool writer stopped: {exc!r}"
            raise
        finally:
            self._finish(conn)

    def _write_loop(self, conn: sqlite3.Connection) -> None:
        idle = min(_FREE_SPACE_EVERY, self.checkpoint_interval)
        waiting = _Waiting()
        next_checkpoint = time.monotonic() + self.checkpoint_interval
        next_statvfs = 0.0
        while True:
            self._take(waiting, waiting.wait_time(time.monotonic(), idle, self.lazy_delay))
            if waiting.stores:  # whoever waits for a 250 goes first, and alone
                self._commit(conn, waiting.take_stores(self.max_batch), full=True)
                next_statvfs = 0.0  # a statvfs after each store commit: they fill the disk
            now = time.monotonic()
            if waiting.lazy_due(now, self.max_batch, self.lazy_delay):  # then, at most one
                self._commit(conn, waiting.take_lazy(self.max_batch, now), full=waiting.stop)
            elif waiting.stop and not waiting.stores:
                return
            now = time.monotonic()
            if now >= next_statvfs:
                self._check_free_space(now)
                next_statvfs = now + _FREE_SPACE_EVERY
            if now >= next_checkpoint:
                _checkpoint(conn, "PASSIVE")
                next_checkpoint = now + self.checkpoint_interval

    def _take(self, waiting: _Waiting, timeout: float) -> None:
        """Wait up to ``timeout`` for a write (not at all when 0), then take all queued."""
        ops = self._ops
        try:
            op = ops.get(timeout=timeout) if timeout > 0 else ops.get_nowait()
            while True:
                waiting.add(op)
                op = ops.get_nowait()
        except queue.Empty:
            return

    def _commit(self, conn: sqlite3.Connection, batch: list[_Op], *, full: bool) -> None:
        """Run one group in one transaction, then settle all its futures with one call.
        ``full``: the commit fsyncs (``synchronous=FULL``); else it waits for the next one."""
        stores, updates, removes, futures = _split(batch)
        error: Exception | None = None
        try:
            self._set_sync(conn, full)
            _write(conn, stores, updates, removes)
        except Exception as exc:  # sqlite3.Error mostly; anything else must not kill us
            error = exc
            self._note_failure(exc, len(futures))
        else:
            self.commits += 1
            self.committed += len(stores) + len(updates) + len(removes)
        self._done += len(stores) + len(updates) + len(removes)
        self._resolve(futures, error)

    def _set_sync(self, conn: sqlite3.Connection, full: bool) -> None:
        if full != self._sync_full:
            conn.execute("PRAGMA synchronous=FULL" if full else "PRAGMA synchronous=NORMAL")
            self._sync_full = full

    def _note_failure(self, exc: Exception, waiting: int) -> None:
        self.failed_commits += 1
        log.error("spool %s: commit of %d writes failed: %s", self.path, waiting, exc)
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF  # primary code of an extended one
        if code in _DISK_ERRORS:
            self._write_failed = f"spool write failed: {exc}"
            self._write_failed_at = time.monotonic()

    def _resolve(self, futures: list[asyncio.Future[None]], error: Exception | None) -> None:
        loop = self._loop
        if not futures or loop is None:
            return
        try:
            loop.call_soon_threadsafe(_settle, futures, error)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            log.debug("spool %s: event loop closed, %d futures dropped", self.path, len(futures))

    def _finish(self, conn: sqlite3.Connection) -> None:
        if not self._sync_full:  # the last commit had no fsync: sync it now, checkpoint or not
            _fsync(Path(f"{self.path}-wal"))
        _checkpoint(conn, "TRUNCATE")
        conn.close()
        self._conn = None

    # ------------------------------------------------------------------------- reads

    async def load_body(self, message_id: str) -> bytes:
        """The message's body, read in a worker thread. Raises SpoolError if it is missing."""
        return await asyncio.to_thread(self._load_body, message_id)

    def _load_body(self, message_id: str) -> bytes:
        row = self._read("SELECT body FROM bodies WHERE id = ?", (message_id,))
        if row is None:
            raise SpoolError(f"message {message_id} is not in the spool")
        return bytes(row[0])

    async def load_meta(self, message_id: str) -> MessageMeta | None:
        """The message's metadata as last written, or None if it is not in the spool."""
        row = await asyncio.to_thread(
            self._read, "SELECT meta FROM messages WHERE id = ?", (message_id,)
        )
        return decode_meta(row[0]) if row is not None else None

    def count(self) -> int:
        """Messages in the spool (blocking: scans the metadata table)."""
        row = self._read("SELECT count(*) FROM messages", ())
        assert row is not None
        return int(row[0])

    def _read(self, sql: str, params: tuple[str, ...]) -> Any:
        conn = self._borrow_reader()
        try:
            return conn.execute(sql, params).fetchone()
        except sqlite3.Error as exc:
            raise SpoolError(f"{self.path}: read failed: {exc}") from exc
        finally:
            self._idle_readers.append(conn)

    def _borrow_reader(self) -> sqlite3.Connection:
        """An idle read-only connection, or a new one (list pop/append are atomic)."""
        try:
            return self._idle_readers.pop()
        except IndexError:
            pass
        try:
            uri = self.path.resolve().as_uri() + "?mode=ro"
            return sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise SpoolError(f"{self.path}: cannot open for reading: {exc}") from exc

    def _close_readers(self) -> None:
        while self._idle_readers:
            self._idle_readers.pop().close()

    def iter_meta(self, batch: int = 5000) -> Generator[list[MessageMeta], None, None]:
        """Every message's metadata in id order, ``batch`` at a time (for start-up).

        Blocking: run it in a thread (one page at a time, never two at once). Uses its own
        connection; each batch is its own read
        transaction, so a slow consumer holds no snapshot. A row whose metadata cannot be
        decoded (or names another id) is moved to ``quarantine`` with a warning, and the
        enumeration goes on. Call after ``open`` (which creates the tables).
        """
        try:
            conn = sqlite3.connect(
                self.path,
                isolation_level=None,
                timeout=_BUSY_TIMEOUT_MS / 1000,
                check_same_thread=False,  # pages may be read by different worker threads
            )
        except sqlite3.Error as exc:
            raise SpoolError(f"{self.path}: cannot open for enumeration: {exc}") from exc
        try:
            yield from self._pages(conn, batch)
        except sqlite3.Error as exc:
            raise SpoolError(f"{self.path}: enumeration failed: {exc}") from exc
        finally:
            conn.close()

    def _pages(self, conn: sqlite3.Connection, size: int) -> Iterator[list[MessageMeta]]:
        after = ""
        while rows := conn.execute(
            "SELECT id, meta FROM messages WHERE id > ? ORDER BY id LIMIT ?", (after, size)
        ).fetchall():
            after = rows[-1][0]
            metas = [meta for row in rows if (meta := self._decode(conn, *row)) is not None]
            if metas:
                yield metas

    def _decode(self, conn: sqlite3.Connection, message_id: str, raw: Any) -> MessageMeta | None:
        try:
            meta = decode_meta(raw)
        except (msgspec.DecodeError, TypeError) as exc:
            self._quarantine(conn, message_id, f"undecodable metadata: {exc}")
            return None
        if meta.id != message_id:
            self._quarantine(conn, message_id, f"metadata names another id: {meta.id!r}")
            return None
        return meta

    def _quarantine(self, conn: sqlite3.Connection, message_id: str, reason: str) -> None:
        log.warning("spool message %s quarantined: %s", message_id, reason)
        try:
            _run_in_transaction(conn, _quarantine_steps(message_id, reason))
        except sqlite3.Error as exc:  # skip it this time; it is tried again at next start
            log.error("spool message %s could not be quarantined: %s", message_id, exc)


# ----------------------------------------------------------------------------- helpers


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _set_pragmas(conn: sqlite3.Connection, journal_size_limit: int) -> None:
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise sqlite3.OperationalError(f"journal_mode is {mode}, WAL is unavailable here")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA secure_delete=FAST")
    conn.execute(f"PRAGMA journal_size_limit={int(journal_size_limit)}")
    conn.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")


def _quarantine_steps(message_id: str, reason: str) -> list[tuple[str, tuple[object, ...]]]:
    return [
        (
            "INSERT INTO quarantine (id, meta, body, reason, at) SELECT m.id, m.meta,"
            " (SELECT body FROM bodies WHERE id = m.id), ?, ? FROM messages m WHERE m.id = ?",
            (reason, time.time(), message_id),
        ),
        ("DELETE FROM messages WHERE id = ?", (message_id,)),
        ("DELETE FROM bodies WHERE id = ?", (message_id,)),
    ]


def _run_in_transaction(
    conn: sqlite3.Connection, statements: list[str] | list[tuple[str, tuple[object, ...]]]
) -> None:
    """Run statements (SQL, or (SQL, params)) in one immediate transaction."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in statements:
            sql, params = (statement, ()) if isinstance(statement, str) else statement
            conn.execute(sql, params)
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise


@dataclass
class _Waiting:
    """The writes the writer thread has taken from the queue: stores, and the rest aside."""

    stores: list[_Op] = field(default_factory=list)
    lazy: list[_Op] = field(default_factory=list)  # updates and removes, in queue order
    lazy_since: float = 0.0  # when the oldest of ``lazy`` was taken
    stop: bool = False

    def add(self, op: _Op) -> None:
        kind = op[0]
        if kind < _UPDATE:
            self.stores.append(op)
        elif kind == _STOP:
            self.stop = True
        else:
            if not self.lazy:
                self.lazy_since = time.monotonic()
            self.lazy.append(op)

    def wait_time(self, now: float, idle: float, lazy_delay: float) -> float:
        """How long the writer may block for the next write: 0 when it has work now."""
        if self.stores or self.stop:
            return 0.0
        if self.lazy:
            return min(idle, max(0.0, self.lazy_since + lazy_delay - now))
        return idle

    def lazy_due(self, now: float, size: int, delay: float) -> bool:
        """Whether updates and removes are to be committed now (no store is waiting)."""
        if not self.lazy:
            return False
        return self.stop or len(self.lazy) >= size or now >= self.lazy_since + delay

    def take_stores(self, size: int) -> list[_Op]:
        batch, self.stores = self.stores[:size], self.stores[size:]
        return batch

    def take_lazy(self, size: int, now: float) -> list[_Op]:
        batch, self.lazy = self.lazy[:size], self.lazy[size:]
        self.lazy_since = now
        return batch


def _split(batch: list[_Op]) -> tuple[_Rows, _Rows, _Rows, list[asyncio.Future[None]]]:
    """Rows by kind, queue order kept within each kind, and the futures to settle."""
    stores: _Rows = []
    updates: _Rows = []
    removes: _Rows = []
    futures: list[asyncio.Future[None]] = []
    by_kind: dict[int, Callable[[Any], None]] = {
        _STORE: stores.append,
        _UPDATE: updates.append,
        _REMOVE: removes.append,
        _STORE_MANY: stores.extend,
    }
    for kind, row, future in batch:
        by_kind[kind](row)
        if future is not None:
            futures.append(future)
    return stores, updates, removes, futures


def _write(conn: sqlite3.Connection, stores: _Rows, updates: _Rows, removes: _Rows) -> None:
    """One transaction: stores, then updates, then removes. Commit = the group's fsync."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        if stores:
            conn.executemany(_INSERT_META, map(_ID_META, stores))
            conn.executemany(_INSERT_BODY, map(_ID_BODY, stores))
        if updates:
            conn.executemany(_UPDATE_META, updates)
        if removes:
            conn.executemany(_DELETE_META, removes)
            conn.executemany(_DELETE_BODY, removes)
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error as exc:  # SQLite may have rolled back already
            log.debug("spool rollback: %s", exc)


def _fsync(path: Path) -> None:
    """fsync a file if it exists (fsync is per file, whoever else has it open)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        log.warning("spool fsync of %s failed: %s", path, exc)
    finally:
        os.close(fd)


def _checkpoint(conn: sqlite3.Connection, mode: str) -> None:
    """Copy the WAL into the database (PASSIVE: never waits; TRUNCATE: also empties it)."""
    try:
        conn.execute(f"PRAGMA wal_checkpoint({mode})")
    except sqlite3.Error as exc:
        log.warning("spool checkpoint (%s) failed: %s", mode, exc)


def _settle(futures: list[asyncio.Future[None]], error: Exception | None) -> None:
    """On the event loop: resolve a group's futures (skipping cancelled ones)."""
    if error is None:
        for future in futures:
            if not future.done():
                future.set_result(None)
        return
    for future in futures:
        if not future.done():
            exc = SpoolError(f"spool commit failed: {error}")
            exc.__cause__ = error
            future.set_exception(exc)
            future.exception()  # mark retrieved: the writer has logged it; awaiters still raise
