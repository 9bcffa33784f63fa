"""Buffer now, write in batches later: the one loop every record consumer with I/O uses.

``add`` only appends, so producers (``RecordLog.emit`` and its subscribers) never wait. A task
hands the batch to ``write`` every ``interval``; a batch that fails is put back in front, in
order, and written again at the next turn, so nothing is lost to a full disk or a locked
database (the record log, the status store; webhooks and broker sinks next).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class BufferedWriter(Generic[T]):
    def __init__(
        self,
        write: Callable[[list[T]], Awaitable[None]],
        *,
        interval: float,
        name: str,
        retry_on: tuple[type[Exception], ...] = (OSError,),
    ) -> None:
        self.interval = interval
        self.name = name
        self._write = write
        self._retry_on = retry_on
        self._pending: list[T] = []
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, item: T) -> None:
        self._pending.append(item)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def flush(self) -> None:
        """Write what is pending now; on failure it stays pending and the error is raised."""
        if self._pending:
            batch, self._pending = self._pending, []
            try:
                await self._write(batch)
            except BaseException:
                self._pending[:0] = batch
                raise

    async def stop(self) -> None:
        """End the loop and write what is left. The loop is asked to end, not cancelled: a
        write cancelled while its thread goes on would be put back and written twice."""
        if self._task is not None:
            self._stopping.set()
            await self._task
        await self.flush()

    async def _run(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.interval)
            try:
                await self.flush()
            except self._retry_on as exc:
                log.warning("%s: cannot write (%s); will retry", self.name, exc)
                if self._stopping.is_set():
                    return  # stop's own flush tries once more and says why it cannot
