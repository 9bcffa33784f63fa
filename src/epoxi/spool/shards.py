"""Spool shards: one SQLite spool per worker process, in the data dir.

Worker 0 keeps ``spool.db`` (the spool of a single-process Epoxi, so going from one worker to
several keeps it in place); worker ``i`` has ``spool-<i>.db``. When Epoxi starts with fewer
workers than shards exist, the supervisor moves each orphaned shard into a live one before
any worker opens its own: :func:`merge_shard` copies every row in one transaction on the
target, then deletes the source files. A crash in between leaves both; the next start copies
again and the rows already there are kept (message ids are unique), so nothing is lost or
doubled.
"""

from __future__ import annotations

import logging
import re
import sqlite3
from pathlib import Path
from typing import Final

from epoxi.errors import SpoolError
from epoxi.spool.sqlite import Spool

log = logging.getLogger(__name__)

_SHARD: Final = re.compile(r"^spool(?:-([1-9][0-9]*))?\.db$")
_TABLES: Final = ("messages", "bodies", "quarantine")


def shard_path(data_dir: Path, index: int) -> Path:
    """The spool file of worker ``index``."""
    return data_dir / ("spool.db" if index == 0 else f"spool-{index}.db")


def shard_indexes(data_dir: Path) -> list[int]:
    """The indexes of the shards present in ``data_dir``, in order."""
    if not data_dir.is_dir():
        return []
    found = (_SHARD.match(path.name) for path in data_dir.iterdir())
    return sorted(int(match.group(1) or 0) for match in found if match)


def orphans(data_dir: Path, workers: int) -> dict[int, int]:
    """Shards no worker owns with ``workers`` workers -> the shard each is merged into."""
    return {index: index % workers for index in shard_indexes(data_dir) if index >= workers}


def adopt_orphans(data_dir: Path, workers: int) -> int:
    """Merge each shard that no worker of ``workers`` owns into one that is owned (blocking,
    before any worker opens its shard); returns the messages moved."""
    moved = 0
    for source, target in orphans(data_dir, workers).items():
        log.info("spool shard %d has no worker now: it goes to worker %d", source, target)
        moved += merge_shard(shard_path(data_dir, source), shard_path(data_dir, target))
    return moved


def merge_shard(source: Path, target: Path) -> int:
    """Move every message of ``source`` into ``target`` (both closed); returns how many.

    Blocking. The target is created (or upgraded) first, the source upgraded, so both have
    the current layout; then one transaction on the target copies what it lacks, and the
    source's files are removed only after that commit.
    """
    for path in (target, source):
        Spool(path).prepare()
    conn = sqlite3.connect(target, isolation_level=None, timeout=30)
    try:
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("ATTACH DATABASE ? AS source", (str(source),))
        moved = int(conn.execute("SELECT count(*) FROM source.messages").fetchone()[0])
        conn.execute("BEGIN IMMEDIATE")
        for table in _TABLES:
            conn.execute(f"INSERT OR IGNORE INTO main.{table} SELECT * FROM source.{table}")
        conn.execute("COMMIT")
        conn.execute("DETACH DATABASE source")
    except sqlite3.Error as exc:
        raise SpoolError(f"cannot merge spool shard {source} into {target}: {exc}") from exc
    finally:
        conn.close()
    for suffix in ("-wal", "-shm", ""):
        Path(f"{source}{suffix}").unlink(missing_ok=True)
    log.info("spool shard %s: %d messages moved into %s", source.name, moved, target.name)
    return moved
