"""The SQLite spool: durability, group commit, health, quarantine, schema upgrades.

Everything runs against real database files in ``tmp_path``. To hold the writer back
deterministically, a test takes SQLite's write lock from a second connection
(``writer_blocked``): the writer then waits in ``BEGIN IMMEDIATE`` while work piles up.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from epoxi.errors import SpoolError, SpoolUnavailable
from epoxi.ids import is_message_id, new_message_id
from epoxi.message import MessageMeta
from epoxi.spool import Spool
from epoxi.spool.records import encode_meta
from epoxi.spool.sqlite import SCHEMA_VERSION
from tests.conftest import eventually


def meta(n: int = 0) -> MessageMeta:
    return MessageMeta(
        id=new_message_id(), sender="a@x.test", recipients=[f"r{n}@y.test"], received_at=1.0, size=5
    )


def all_metas(spool: Spool, batch: int = 7) -> list[MessageMeta]:
    return [m for page in spool.iter_meta(batch=batch) for m in page]


def query(path: Path, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


@contextlib.contextmanager
def writer_blocked(path: Path) -> Iterator[None]:
    """Hold SQLite's write lock, so the spool's writer waits (up to its busy timeout)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        conn.execute("COMMIT")
        conn.close()


async def wait_until_healthy(spool: Spool, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while spool.unhealthy_reason() is not None:
        assert time.monotonic() < deadline, spool.unhealthy_reason()
        await asyncio.sleep(0.05)


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    spool = Spool(tmp_path / "spool.db")
    spool.open()
    yield spool
    await spool.close()


# ----------------------------------------------------------------------------- storing


async def test_store_then_reopen_and_enumerate_in_id_order(tmp_path: Path) -> None:
    first = Spool(tmp_path / "spool.db")
    first.open()
    stored = [meta(i) for i in range(20)]
    for m in reversed(stored):
        await first.store(m, f"body {m.id}".encode())
    await first.close()

    again = Spool(tmp_path / "spool.db")
    again.open()
    pages = list(again.iter_meta(batch=7))
    assert [len(p) for p in pages] == [7, 7, 6]
    assert [m for p in pages for m in p] == sorted(stored, key=lambda m: m.id)
    assert await again.load_body(stored[3].id) == f"body {stored[3].id}".encode()
    assert again.count() == 20
    await again.close()


async def test_concurrent_stores_share_commits(spool: Spool) -> None:
    await asyncio.gather(*(spool.store(meta(i), b"x" * 5000) for i in range(500)))
    assert spool.committed == 500
    assert spool.commits < 50  # one fsync serves many sessions
    assert spool.count() == 500


async def test_store_many_is_one_commit(spool: Spool) -> None:
    await spool.store_many([(meta(i), b"b%d" % i) for i in range(50)])
    assert (spool.commits, spool.committed) == (1, 50)
    assert spool.count() == 50
    await spool.store_many([])
    assert spool.commits == 1


async def test_a_cancelled_store_is_still_committed(spool: Spool) -> None:
    m = meta()
    with writer_blocked(spool.path):
        task = asyncio.create_task(spool.store(m, b"x"))
        await eventually(lambda: spool.pending == 1, what="the store queued")
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await spool.remove("nothing")  # a later write: the store's group is done by now
    assert await spool.load_body(m.id) == b"x"


# ----------------------------------------------------------------------------- update, remove, read


async def test_update_replaces_meta_and_keeps_body(tmp_path: Path, spool: Spool) -> None:
    m = meta(1)
    await spool.store(m, b"the body")
    m.attempts, m.due, m.recipients = 2, 1234.5, ["left@y.test"]
    future = spool.update(m)
    m.attempts = 99  # encoded at call time: later changes do not leak in
    await future
    (loaded,) = all_metas(spool)
    assert (loaded.attempts, loaded.due, loaded.recipients) == (2, 1234.5, ["left@y.test"])
    assert await spool.load_body(m.id) == b"the body"


async def test_remove_deletes_meta_and_body(spool: Spool) -> None:
    keep, gone = meta(1), meta(2)
    await spool.store_many([(keep, b"keep"), (gone, b"gone")])
    await spool.remove(gone.id)
    assert [m.id for m in all_metas(spool)] == [keep.id]
    with pytest.raises(SpoolError, match="not in the spool"):
        await spool.load_body(gone.id)
    assert query(spool.path, "SELECT id FROM bodies") == [(keep.id,)]


async def test_unawaited_updates_and_removes_are_written_by_close(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db")
    spool.open()
    a, b = meta(1), meta(2)
    await spool.store_many([(a, b"a"), (b, b"b")])
    a.attempts = 5
    spool.update(a)  # fire and forget, as the delivery engine does
    spool.remove(b.id)
    await spool.close()
    assert query(spool.path, "SELECT count(*) FROM messages") == [(1,)]
    again = Spool(tmp_path / "spool.db")
    again.open()
    assert [(m.id, m.attempts) for m in all_metas(again)] == [(a.id, 5)]
    await again.close()


async def test_load_body_of_unknown_message_raises(spool: Spool) -> None:
    with pytest.raises(SpoolError, match="NOPE"):
        await spool.load_body("NOPE")


# ----------------------------------------------------------------------------- quarantine


async def test_corrupt_meta_rows_are_quarantined_and_the_rest_loads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path / "spool.db")
    spool.open()
    good = [meta(i) for i in range(10)]
    await spool.store_many([(m, b"ok") for m in good])
    other = meta(99)
    with sqlite3.connect(spool.path) as conn:
        conn.execute("INSERT INTO messages VALUES ('00BROKEN', x'c1ff00')")
        conn.execute("INSERT INTO bodies VALUES ('00BROKEN', x'0102')")
        conn.execute("INSERT INTO messages VALUES ('00WRONGID', ?)", (encode_meta(other),))
    conn.close()

    assert [m.id for m in all_metas(spool, batch=3)] == [m.id for m in good]
    assert "00BROKEN" in caplog.text and "00WRONGID" in caplog.text
    assert "quarantine" in caplog.text
    rows = query(spool.path, "SELECT id, body FROM quarantine ORDER BY id")
    assert rows == [("00BROKEN", b"\x01\x02"), ("00WRONGID", None)]
    assert query(spool.path, "SELECT count(*) FROM bodies WHERE id LIKE '00%'") == [(0,)]
    assert spool.count() == 10
    await spool.close()


# ----------------------------------------------------------------------------- stores first


def record_groups(spool: Spool) -> list[tuple[bool, int]]:
    """(fsynced, writes) of each group the writer commits from now on, in commit order."""
    groups: list[tuple[bool, int]] = []
    commit = spool._commit

    def recording(conn: sqlite3.Connection, batch: list[Any], *, full: bool) -> None:
        groups.append((full, len(batch)))
        commit(conn, batch, full=full)

    spool._commit = recording  # type: ignore[method-assign]
    return groups


async def test_a_store_is_not_delayed_behind_a_large_group_of_removes(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db", max_batch=100, lazy_delay=3600)
    spool.open()
    old = [meta(i) for i in range(500)]
    await spool.store_many([(m, b"x") for m in old])
    groups = record_groups(spool)
    with writer_blocked(spool.path):  # the writer waits to commit the first store
        first = asyncio.ensure_future(spool.store(meta(1000), b"1"))
        await eventually(
            lambda: spool.pending == 1 and spool._ops.empty(), what="the writer took the store"
        )
        removes = [spool.remove(m.id) for m in old]  # all queued before the late store
        late = asyncio.ensure_future(spool.store(meta(1001), b"2"))
    await asyncio.gather(first, late, *removes)
    # The writer may have taken some removes along with the first store: one group of them
    # (max_batch) may go between two store groups, never all 500 queued before the late one.
    stores = [index for index, (fsynced, _) in enumerate(groups) if fsynced]
    assert stores[:2] in ([0, 1], [0, 2]), groups
    assert [size for fsynced, size in groups if not fsynced] == [100] * 5
    assert spool.count() == 2
    await spool.close()


async def test_stores_queued_during_a_slow_commit_form_the_next_group(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db")
    spool.open()
    with writer_blocked(spool.path):  # as a 30 ms fsync would: the writer is in a commit
        first = asyncio.ensure_future(spool.store(meta(), b"x"))
        await eventually(
            lambda: spool.pending == 1 and spool._ops.empty(), what="the writer took the store"
        )
        rest = [asyncio.ensure_future(spool.store(meta(i), b"x")) for i in range(50)]
        await eventually(lambda: spool.pending == 51, what="the other stores queued")
    await asyncio.gather(first, *rest)
    assert (spool.commits, spool.committed) == (2, 51)
    await spool.close()


async def test_removes_wait_aside_while_stores_commit(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db", lazy_delay=3600)
    spool.open()
    gone = meta(1)
    await spool.store(gone, b"x")
    removed = spool.remove(gone.id)
    await spool.store(meta(2), b"y")  # committed while the remove waits for company
    assert not removed.done()
    assert spool.count() == 2
    await spool.close()  # commits it, durably
    assert removed.done() and removed.exception() is None
    assert query(spool.path, "SELECT count(*) FROM messages") == [(1,)]
    assert query(spool.path, "SELECT count(*) FROM bodies") == [(1,)]


async def test_updates_and_removes_land_in_queue_order_across_groups(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db", max_batch=1, lazy_delay=0)  # one write a group
    spool.open()
    a, b = meta(1), meta(2)
    await spool.store_many([(a, b"a"), (b, b"b")])
    writes = []
    for attempts in (1, 2, 3):
        a.attempts = b.attempts = attempts
        writes += [spool.update(a), spool.update(b)]
    writes.append(spool.remove(a.id))  # after its updates: the row is gone at the end
    await asyncio.gather(*writes)
    assert spool.commits == 1 + 7
    assert [(m.id, m.attempts) for m in all_metas(spool)] == [(b.id, 3)]
    await spool.close()


async def test_removes_are_durable_after_close(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db", lazy_delay=3600)
    spool.open()
    metas = [meta(i) for i in range(10)]
    await spool.store_many([(m, b"x") for m in metas])
    for m in metas[:7]:
        spool.remove(m.id)  # fire and forget, as delivery does
    await spool.close()
    wal = tmp_path / "spool.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0  # in the database file itself
    again = Spool(tmp_path / "spool.db")
    again.open()
    assert [m.id for m in all_metas(again)] == sorted(m.id for m in metas[7:])
    await again.close()


async def test_close_syncs_the_wal_after_a_commit_without_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[Path] = []
    monkeypatch.setattr("epoxi.spool.sqlite._fsync", synced.append)
    spool = Spool(tmp_path / "spool.db", lazy_delay=0)
    spool.open()
    m = meta()
    await spool.store(m, b"x")
    await spool.remove(m.id)  # committed alone, without an fsync of its own
    assert synced == []
    await spool.close()
    assert synced == [tmp_path / "spool.db-wal"]


# ----------------------------------------------------------------------------- health


async def test_unhealthy_when_writer_is_behind(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db", max_pending=3)
    spool.open()
    with writer_blocked(spool.path):
        futures = [spool.update(meta(i)) for i in range(5)]
        assert spool.pending == 5
        assert spool.unhealthy_reason() == "spool writer behind"
        with pytest.raises(SpoolUnavailable, match="writer behind"):
            await spool.store(meta(), b"x")
    await asyncio.gather(*futures)
    assert spool.unhealthy_reason() is None
    await spool.store(meta(), b"x")
    await spool.close()


async def test_unhealthy_when_disk_nearly_full_then_recovers(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db", min_free_bytes=1 << 62)
    spool.open()
    assert "disk nearly full" in (spool.unhealthy_reason() or "")
    assert spool.free_bytes > 0
    with pytest.raises(SpoolUnavailable, match="disk nearly full"):
        await spool.store(meta(), b"x")
    await spool.remove("whatever")  # removes and updates still go through: they free space
    spool.min_free_bytes = 0  # as if space came back: the writer's next statvfs sees it
    await wait_until_healthy(spool)
    await spool.store(meta(), b"x")
    await spool.close()


async def test_full_database_fails_the_group_marks_unhealthy_and_recovers(
    tmp_path: Path,
) -> None:
    # A long checkpoint interval keeps the writer's connection idle, so the test may set a
    # page limit on it: SQLite then fails the commit with SQLITE_FULL, as on a full disk.
    spool = Spool(tmp_path / "spool.db", checkpoint_interval=3600)
    spool.open()
    await spool.store(meta(), b"x")
    writer = spool._conn
    assert writer is not None
    pages = writer.execute("PRAGMA page_count").fetchone()[0]
    writer.execute(f"PRAGMA max_page_count={pages}")
    with pytest.raises(SpoolError) as failure:
        await spool.store(meta(), os.urandom(100_000))
    assert isinstance(failure.value.__cause__, sqlite3.Error)
    assert "write failed" in (spool.unhealthy_reason() or "")
    assert spool.failed_commits == 1
    writer.execute("PRAGMA max_page_count=1073741823")
    await wait_until_healthy(spool)  # the next statvfs after the failure shows room
    await spool.store(meta(), b"y")
    assert spool.count() == 2
    await spool.close()


async def test_other_commit_failures_raise_but_keep_the_spool_healthy(spool: Spool) -> None:
    with sqlite3.connect(spool.path) as conn:
        conn.execute("DROP TABLE bodies")
    conn.close()
    with pytest.raises(SpoolError, match="commit failed") as failure:
        await spool.store(meta(), b"x")
    assert isinstance(failure.value.__cause__, sqlite3.Error)
    assert spool.unhealthy_reason() is None
    assert spool.failed_commits == 1


async def test_closed_spool_refuses_writes(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db")
    assert spool.unhealthy_reason() == "spool closed"  # not opened yet
    spool.open()
    with pytest.raises(SpoolError, match="already open"):
        spool.open()
    await spool.close()
    await spool.close()  # twice is fine
    assert spool.unhealthy_reason() == "spool closed"
    with pytest.raises(SpoolUnavailable):
        await spool.store(meta(), b"x")
    with pytest.raises(SpoolUnavailable):
        await spool.store_many([(meta(), b"x")])
    with pytest.raises(SpoolUnavailable):
        spool.update(meta())
    with pytest.raises(SpoolUnavailable):
        spool.remove("x")


# ----------------------------------------------------------------------------- close, crash, schema


async def test_close_drains_pending_work(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db")
    spool.open()
    metas = [meta(i) for i in range(100)]
    with writer_blocked(spool.path):
        stores = [asyncio.create_task(spool.store(m, b"x")) for m in metas]
        await eventually(lambda: spool.pending == 100, what="all queued behind the writer")
        closing = asyncio.create_task(spool.close())
        await eventually(lambda: spool.unhealthy_reason() == "spool closed", what="closing")
    await closing
    await asyncio.gather(*stores)
    assert spool.committed == 100 and spool.pending == 0
    assert query(tmp_path / "spool.db", "SELECT count(*) FROM messages") == [(100,)]
    wal = tmp_path / "spool.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0  # checkpointed (TRUNCATE) on close


def test_sigkill_right_after_store_keeps_the_rows(tmp_path: Path) -> None:
    # The child never checkpoints, so the rows survive only through the WAL it fsynced.
    script = textwrap.dedent(f"""
        import asyncio, time
        from pathlib import Path
        from epoxi.spool import Spool
        from epoxi.ids import new_message_id
        from epoxi.message import MessageMeta

        async def main():
            spool = Spool(Path({str(tmp_path / "spool.db")!r}), checkpoint_interval=3600)
            spool.open()
            def one(i):
                m = MessageMeta(id=new_message_id(), sender='', recipients=['r@x.test'],
                                received_at=0.0, size=1000)
                return spool.store(m, bytes([i % 256]) * 1000)
            await asyncio.gather(*(one(i) for i in range(200)))
            print('stored', flush=True)
            time.sleep(60)  # blocks everything; the parent kills us now

        asyncio.run(main())
    """)
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        _, err = child.communicate(timeout=30)
    assert line.strip() == "stored", err
    assert child.returncode == -signal.SIGKILL
    assert (tmp_path / "spool.db-wal").stat().st_size > 0  # the rows were only in the WAL
    assert query(tmp_path / "spool.db", "SELECT count(*) FROM messages") == [(200,)]
    assert query(tmp_path / "spool.db", "SELECT count(*) FROM bodies") == [(200,)]


async def test_schema_version_is_recorded(spool: Spool) -> None:
    assert query(spool.path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert query(spool.path, "PRAGMA journal_mode") == [("wal",)]


async def test_version_1_spool_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    m = meta()
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE messages (id TEXT PRIMARY KEY, meta BLOB NOT NULL, body BLOB NOT NULL)"
            " WITHOUT ROWID"
        )
        conn.execute(
            "CREATE TABLE quarantine (id TEXT, meta BLOB, body BLOB, reason TEXT, at REAL)"
        )
        conn.execute("INSERT INTO messages VALUES (?, ?, ?)", (m.id, encode_meta(m), b"old body"))
        conn.execute("PRAGMA user_version=1")
    conn.close()
    spool = Spool(path)
    spool.open()
    assert all_metas(spool) == [m]
    assert await spool.load_body(m.id) == b"old body"
    assert query(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    await spool.close()


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(SpoolError, match="newer"):
        Spool(path).open()


def test_message_ids_sort_by_time() -> None:
    early, late = new_message_id(1_000_000.0), new_message_id(2_000_000.0)
    assert is_message_id(early) and early < late


def test_message_ids_spell_the_time_in_crockford_base_32() -> None:
    one_second = new_message_id(1.0)  # 1,000,000 us = 30, 16, 18, 0 in base 32
    assert one_second[:11] == "0000000YGJ0"
    assert is_message_id(one_second) and len({new_message_id(1.0) for _ in range(50)}) == 50
