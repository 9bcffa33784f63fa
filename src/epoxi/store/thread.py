"""One connection to the store database on a thread of its own.

SQLite calls block; a store that serves the event loop runs each of them on its own
single thread (so the connection is only ever used from there) and awaits the result.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from epoxi.store.db import connect

T = TypeVar("T")


class StoreThread:
    """Open with :meth:`start`, run work with :meth:`call`, close with :meth:`stop`."""

    def __init__(self, path: Path, name: str) -> None:
        self.path = path
        self._name = name
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"epoxi-{name}")
        self._conn: sqlite3.Connection | None = None

    @property
    def started(self) -> bool:
        return self._conn is not None

    async def start(self) -> None:
        self._conn = await self._run(lambda: connect(self.path, check_same_thread=False))

    async def stop(self) -> None:
        if self._conn is not None:
            await self._run(self._conn.close)
            self._conn = None
        self._executor.shutdown(wait=True)

    async def call(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """``work(connection)`` on the store's thread."""
        conn = self._conn
        if conn is None:
            raise RuntimeError(f"the {self._name} store is not open")
        return await self._run(lambda: work(conn))

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)


@contextlib.contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """A write transaction taken at once: workers' check-then-write steps never interleave."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
