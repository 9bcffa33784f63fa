"""The buffered writer shared by the record log and the status store."""

from __future__ import annotations

import pytest

from epoxi.events.buffer import BufferedWriter


async def test_a_failed_batch_is_kept_in_order_and_written_again() -> None:
    written: list[list[int]] = []
    failing = [True]

    async def write(batch: list[int]) -> None:
        if failing[0]:
            raise OSError("disk full")
        written.append(batch)

    buffer: BufferedWriter[int] = BufferedWriter(write, interval=60, name="test")
    buffer.add(1)
    buffer.add(2)
    with pytest.raises(OSError):
        await buffer.flush()
    buffer.add(3)
    assert len(buffer) == 3
    failing[0] = False
    await buffer.stop()  # never started: stop still writes what is left
    assert written == [[1, 2, 3]] and len(buffer) == 0


async def test_nothing_pending_writes_nothing() -> None:
    calls: list[list[str]] = []

    async def write(batch: list[str]) -> None:
        calls.append(batch)

    buffer: BufferedWriter[str] = BufferedWriter(write, interval=60, name="test")
    await buffer.flush()
    assert calls == []
