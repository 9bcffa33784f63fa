"""The SQLite spool: durability, group commit, health, quarantine."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from epoxi.errors import SpoolUnavailable
from epoxi.spool import Spool
from epoxi.spool.ids import is_message_id, new_message_id
from epoxi.spool.records import MessageMeta


def meta(n: int = 0) -> MessageMeta:
    return MessageMeta(
        id=new_message_id(), sender="a@x.test", recipients=[f"r{n}@y.test"], received_at=1.0, size=5
    )


def all_metas(spool: Spool) -> list[MessageMeta]:
    return [m for batch in spool.iter_meta(batch=7) for m in batch]


async def test_store_update_remove_and_reopen(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db")
    spool.open()
    first, second = meta(1), meta(2)
    await spool.store(first, b"body one")
    await spool.store(second, b"body two")
    first.attempts = 3
    await spool.update(first)
    await spool.remove(second.id)
    assert await spool.load_body(first.id) == b"body one"
    await spool.close()
    reopened = Spool(tmp_path / "spool.db")
    reopened.open()
    (loaded,) = all_metas(reopened)
    assert loaded.id == first.id and loaded.attempts == 3
    await reopened.close()


async def test_concurrent_stores_share_commits(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db")
    spool.open()
    await asyncio.gather(*(spool.store(meta(i), b"x" * 5000) for i in range(500)))
    assert spool.committed == 500 and spool.commits < 100
    assert len(all_metas(spool)) == 500
    await spool.close()


async def test_store_many(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db")
    spool.open()
    await spool.store_many([(meta(i), b"b") for i in range(50)])
    assert spool.count() == 50
    await spool.close()


async def test_unhealthy_when_disk_nearly_full_or_closed(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db", min_free_bytes=1 << 62)
    spool.open()
    assert "disk nearly full" in (spool.unhealthy_reason() or "")
    with pytest.raises(SpoolUnavailable):
        await spool.store(meta(), b"x")
    await spool.close()
    assert spool.unhealthy_reason() == "spool closed"
    with pytest.raises(SpoolUnavailable):
        await spool.store(meta(), b"x")


async def test_unhealthy_when_writer_is_behind(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db", max_pending=3)
    spool.open()
    futures = [spool.update(meta(i)) for i in range(5)]  # queued faster than committed
    assert "writer behind" in (spool.unhealthy_reason() or "")
    await asyncio.gather(*futures)
    assert spool.unhealthy_reason() is None
    await spool.close()


async def test_close_drains_queued_writes(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db")
    spool.open()
    stores = [asyncio.ensure_future(spool.store(meta(i), b"x")) for i in range(100)]
    await asyncio.sleep(0)
    await spool.close()
    await asyncio.gather(*stores)
    check = Spool(tmp_path / "spool.db")
    check.open()
    assert check.count() == 100
    await check.close()


async def test_corrupt_record_is_quarantined(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path / "spool.db")
    spool.open()
    good = meta(1)
    await spool.store(good, b"ok")
    await spool.close()
    with sqlite3.connect(tmp_path / "spool.db") as conn:
        conn.execute("INSERT INTO messages VALUES ('BROKEN', x'c1ff00', x'00')")
    spool = Spool(tmp_path / "spool.db")
    spool.open()
    assert [m.id for m in all_metas(spool)] == [good.id]
    assert "BROKEN" in caplog.text and "quarantine" in caplog.text
    with sqlite3.connect(tmp_path / "spool.db") as conn:
        assert conn.execute("SELECT id FROM quarantine").fetchall() == [("BROKEN",)]
    await spool.close()


def test_sigkill_after_store_keeps_the_row(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import asyncio, os, signal, sys
        from pathlib import Path
        from epoxi.spool import Spool
        from epoxi.spool.records import MessageMeta
        async def main():
            spool = Spool(Path({str(tmp_path / "spool.db")!r}))
            spool.open()
            ids = [f"ID{{i:018d}}" for i in range(200)]
            await asyncio.gather(*(spool.store(MessageMeta(id=i, sender='', recipients=['r@x'],
                                    received_at=0, size=1), b'x' * 1000) for i in ids))
            print('stored', flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        asyncio.run(main())
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.stdout.strip() == "stored" and result.returncode == -9
    with sqlite3.connect(tmp_path / "spool.db") as conn:
        assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 200


def test_message_ids_sort_by_time() -> None:
    early, late = new_message_id(1_000_000.0), new_message_id(2_000_000.0)
    assert is_message_id(early) and early < late
