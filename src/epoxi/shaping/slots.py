"""Connection slots and rate shares: how one machine's limits are kept by many workers.

A ready queue asks its :class:`ConnectionSlots` for a slot before it opens a connection and
gives it back when the connection closes; its message rate is the configured one times its
``rate_share``. :class:`LocalSlots` is the single-process answer (every slot is free up to
the queue's own limit, the whole rate is this process's). With worker processes the
supervisor hands out slots and shares for the whole machine
(:class:`epoxi.workers.link.SupervisorLink`); a cluster would keep them in Redis.
"""

from __future__ import annotations

from typing import Protocol

from epoxi.shaping.throttle import Rate


class ConnectionSlots(Protocol):
    async def acquire(self, key: str, limit: int, connection_rate: Rate | None) -> None:
        """Wait until one more connection of ready queue ``key`` may open, machine-wide.

        ``limit`` and ``connection_rate`` are the queue's shaping, the same in every worker.
        Cancelling the wait gives the slot back if it was granted meanwhile."""
        ...

    def release(self, key: str) -> None:
        """A connection of ``key`` closed (or a granted slot was not used)."""
        ...

    def rate_share(self, key: str) -> float:
        """The part (0 < share <= 1) of ``key``'s message rate this process may use."""
        ...


class LocalSlots:
    """One process owns the machine: the ready queue's own count is the limit."""

    async def acquire(self, key: str, limit: int, connection_rate: Rate | None) -> None:
        return None

    def release(self, key: str) -> None:
        return None

    def rate_share(self, key: str) -> float:
        return 1.0
