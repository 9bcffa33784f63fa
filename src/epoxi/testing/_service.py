"""What the test servers share: ``start``/``stop`` and use as an async context manager."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Service:
    """A server a test starts and stops; ``async with`` does both."""

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
