"""The machine's shaping, kept by the supervisor for all its workers.

:class:`SlotBoard` counts the open connections of each ready queue over every worker and
grants a new one only while the count is under the queue's ``connection_limit`` and its
``max_connection_rate`` allows; waiting workers are served first come, first served, so a
worker with mail gets the next slot another one gives back. While some wait, a worker that
holds more than its fair part (the limit over the workers holding or waiting) is asked to
close connections down to that part as each finishes its message, so a queue's slots are
spread over the workers that have mail for it instead of staying where they went first.
:class:`RateShares` splits each queue's ``max_message_rate`` between the workers that have
that queue, in proportion to their backlogs. Both are plain logic: the supervisor feeds them
what its workers say.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from epoxi.shaping.throttle import LocalThrottle, Rate

Grant = Callable[[int, int], None]  # (worker, acquire id): tell the worker its slot is free
Wanted = Callable[[int, str, int], None]  # (worker, queue, keep): close connections to keep
Later = Callable[[float, Callable[[], None]], object]  # call after a delay (loop.call_later)


@dataclass
class _Queue:
    limit: int
    open: Counter[int] = field(default_factory=Counter)  # worker -> connections it holds
    waiting: deque[tuple[int, int]] = field(default_factory=deque)  # (worker, acquire id)
    asked: dict[int, int] = field(default_factory=dict)  # holder -> the part it was told
    rate: str | None = None
    throttle: LocalThrottle | None = None
    timer: object | None = None  # a grant held back by the connection rate


class SlotBoard:
    """Connection slots per ready queue, for the whole machine."""

    def __init__(
        self,
        grant: Grant,
        later: Later,
        clock: Callable[[], float] = time.monotonic,
        wanted: Wanted = lambda worker, key, keep: None,
    ) -> None:
        self._grant = grant
        self._wanted = wanted
        self._later = later
        self._clock = clock
        self._queues: dict[str, _Queue] = {}

    def open_connections(self, key: str) -> int:
        queue = self._queues.get(key)
        return sum(queue.open.values()) if queue else 0

    def acquire(self, worker: int, ask: int, key: str, limit: int, rate: str | None) -> None:
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = _Queue(limit)
        queue.limit = limit  # the newest shaping wins (a reload reaches workers one by one)
        self._set_rate(queue, rate)
        queue.waiting.append((worker, ask))
        self._serve(key, queue)

    def cancel(self, worker: int, ask: int, key: str) -> None:
        queue = self._queues.get(key)
        if queue is None:
            return
        if (worker, ask) in queue.waiting:
            queue.waiting.remove((worker, ask))
        else:  # granted while the cancel was on its way
            self.release(worker, key)

    def release(self, worker: int, key: str) -> None:
        queue = self._queues.get(key)
        if queue is None or queue.open[worker] <= 0:
            return
        queue.open[worker] -= 1
        self._serve(key, queue)

    def forget(self, worker: int) -> None:
        """A worker died: its connections died with it, its waits are void."""
        for key, queue in list(self._queues.items()):
            queue.open.pop(worker, None)
            queue.waiting = deque(w for w in queue.waiting if w[0] != worker)
            self._serve(key, queue)

    def _set_rate(self, queue: _Queue, rate: str | None) -> None:
        if rate == queue.rate:
            return
        queue.rate = rate
        if rate is None:
            queue.throttle = None
        elif queue.throttle is None:
            queue.throttle = LocalThrottle(Rate.parse(rate), clock=self._clock)
        else:
            queue.throttle.set_rate(Rate.parse(rate))

    def _serve(self, key: str, queue: _Queue) -> None:
        while queue.waiting and sum(queue.open.values()) < queue.limit:
            if queue.throttle is not None:
                wait = queue.throttle.acquire()
                if wait > 0:
                    if queue.timer is None:
                        queue.timer = self._later(wait, lambda: self._after_wait(key))
                    return
            worker, ask = queue.waiting.popleft()
            queue.open[worker] += 1
            self._grant(worker, ask)
        self._spread(key, queue)
        if not queue.waiting and not any(queue.open.values()) and queue.timer is None:
            del self._queues[key]  # nothing open, nobody waiting: forget the queue

    def _spread(self, key: str, queue: _Queue) -> None:
        """Workers wait for a full queue: each holder above its fair part is told (once per
        part) to close connections down to it."""
        if not queue.waiting:
            queue.asked.clear()
            return
        wanting = {worker for worker, held in queue.open.items() if held}
        wanting |= {worker for worker, _ in queue.waiting}
        fair = max(1, queue.limit // len(wanting))
        for worker, held in queue.open.items():
            if held > fair and queue.asked.get(worker) != fair:
                queue.asked[worker] = fair
                self._wanted(worker, key, fair)

    def _after_wait(self, key: str) -> None:
        queue = self._queues.get(key)
        if queue is not None:
            queue.timer = None
            self._serve(key, queue)


class RateShares:
    """Each rate-limited queue's message rate, split between the workers that have it."""

    def __init__(self) -> None:
        self._backlogs: dict[int, dict[str, int]] = {}  # worker -> queue -> backlog

    def report(self, worker: int, queues: dict[str, int]) -> dict[int, dict[str, float]]:
        """A worker's backlogs (its whole list); returns the shares of every worker that has
        one of the queues concerned, ``backlog + 1`` over the sum of them."""
        before = set(self._backlogs.get(worker, {}))
        self._backlogs[worker] = dict(queues)
        return self._shares_of(before | set(queues))

    def forget(self, worker: int) -> dict[int, dict[str, float]]:
        gone = set(self._backlogs.pop(worker, {}))
        return self._shares_of(gone)

    def _shares_of(self, keys: set[str]) -> dict[int, dict[str, float]]:
        shares: dict[int, dict[str, float]] = {}
        for key in keys:
            holders = {w: q[key] + 1 for w, q in self._backlogs.items() if key in q}
            total = sum(holders.values())
            for worker, weight in holders.items():
                shares.setdefault(worker, {})[key] = weight / total
        return shares
