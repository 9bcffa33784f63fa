"""Schema versions of Epoxi's SQLite files (the spool, the store), kept in ``PRAGMA user_version``.

One runner for both: a new file gets the current layout at once (``create``); an older one
runs the upgrade steps from its version up (``upgrades[n]`` takes version n to n + 1). All of
it happens in one immediate transaction that reads the version again inside, so two processes
opening the same file at once migrate it once.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence


class SchemaTooNew(Exception):
    """The file was written by a newer Epoxi; callers translate it into their own error."""

    def __init__(self, version: int, known: int) -> None:
        super().__init__(f"schema {version} is newer than this Epoxi knows ({known})")
        self.version = version


def migrate(
    conn: sqlite3.Connection,
    *,
    target: int,
    create: Sequence[str],
    upgrades: Mapping[int, Sequence[str]],
) -> int:
    """Bring the file on ``conn`` (autocommit mode) to version ``target``; returns the version
    it had. Raises :class:`SchemaTooNew` for a file newer than ``target``."""
    version = _version(conn)
    if version == target:
        return version
    if version > target:
        raise SchemaTooNew(version, target)
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = _version(conn)  # another process may have migrated meanwhile
        if version < target:
            steps = create if version == 0 else _steps(upgrades, version, target)
            for sql in steps:
                conn.execute(sql)
            conn.execute(f"PRAGMA user_version={target}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return version


def _version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _steps(upgrades: Mapping[int, Sequence[str]], version: int, target: int) -> list[str]:
    return [sql for start in range(version, target) for sql in upgrades[start]]
