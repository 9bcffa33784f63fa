"""The spool as the rest of Epoxi sees it: a port, so the engine runs on a fake in unit tests.

:class:`~epoxi.spool.sqlite.Spool` is the real one; ``epoxi.testing.fakes.MemorySpool`` keeps
everything in memory. Stores resolve once durable; ``update`` and ``remove`` resolve once
committed, may be made durable later and may be left unawaited (a lost update or remove means
a duplicate delivery after a crash, never a loss).
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from epoxi.message import MessageMeta


class SpoolPort(Protocol):
    def unhealthy_reason(self) -> str | None:
        """Why new mail cannot be taken now, or None; cheap (no I/O)."""
        ...

    async def store(self, meta: MessageMeta, body: bytes) -> None: ...

    async def store_many(self, items: list[tuple[MessageMeta, bytes]]) -> None:
        """All or none, in one transaction."""
        ...

    def update(self, meta: MessageMeta) -> asyncio.Future[None]: ...

    def remove(self, message_id: str) -> asyncio.Future[None]: ...

    async def load_body(self, message_id: str) -> bytes: ...

    async def load_meta(self, message_id: str) -> MessageMeta | None: ...
