"""Scheduled queues: jobs wait here until due, then are released to routing.

One timer (a heap ordered by due time) serves every queue; each queue keeps its counts. A due
job whose queue, domain, tenant or campaign is suspended (in the suspension registry) is held
until the suspension is lifted or runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from epoxi.queue.model import Job
from epoxi.queue.suspensions import Suspension, SuspensionRegistry, Suspensions

log = logging.getLogger(__name__)


@dataclass
class ScheduledQueue:
    name: str
    scheduled: int = 0  # waiting for their due time
    held: list[Job] = field(default_factory=list)  # due, but suspended


class Scheduler:
    """Releases each job to ``release`` once due and not suspended."""

    def __init__(
        self,
        release: Callable[[Job], None],
        suspensions: Suspensions | None = None,
        clock: Callable[[], float] = time.time,
        on_hold: Callable[[Job, Suspension], None] | None = None,
    ) -> None:
        self._release = release
        self.on_hold = on_hold  # told of each job held back by a suspension
        self._clock = clock
        self._heap: list[tuple[float, int, Job]] = []
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self.queues: dict[str, ScheduledQueue] = {}
        self.suspensions = suspensions or SuspensionRegistry(clock)
        self.suspensions.subscribe(self._on_suspensions_changed)

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, job: Job) -> None:
        """Schedule ``job`` at ``job.due``; due now and not suspended means released at once."""
        queue = self.queues.get(job.queue)
        if queue is None:
            queue = self.queues[job.queue] = ScheduledQueue(job.queue)
        if job.due <= self._clock():
            self._release_or_hold(job, queue)
            return
        queue.scheduled += 1
        job.seq = next(self._seq)
        if not self._heap or job.due < self._heap[0][0]:
            self._wake.set()
        heapq.heappush(self._heap, (job.due, job.seq, job))

    def _release_or_hold(self, job: Job, queue: ScheduledQueue) -> None:
        suspension = self.suspensions.for_job(job)
        if suspension is None:
            self._release(job)
            return
        queue.held.append(job)
        if self.on_hold is not None:
            self.on_hold(job, suspension)

    async def run(self) -> None:
        """Release due jobs forever (cancel to stop)."""
        while True:
            self._release_due()
            self.suspensions.expire()  # releases held jobs through the subscription
            timeout = self._next_wait()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    def _next_wait(self) -> float:
        waits = [1.0]
        if self._heap:
            waits.append(self._heap[0][0] - self._clock())
        return max(0.0, min(waits))

    def _release_due(self) -> None:
        now = self._clock()
        while self._heap and self._heap[0][0] <= now:
            _, _, job = heapq.heappop(self._heap)
            queue = self.queues[job.queue]
            queue.scheduled -= 1
            self._release_or_hold(job, queue)

    def _on_suspensions_changed(self) -> None:
        self._release_held()

    def _release_held(self) -> int:
        """Release the held jobs no suspension holds any more; returns how many."""
        released = 0
        for queue in self.queues.values():
            held, queue.held = queue.held, []
            for job in held:
                self._release_or_hold(job, queue)
            released += len(held) - len(queue.held)
        return released

    # ----------------------------------------------------------------- inspection and admin

    def jobs(self) -> Iterator[Job]:
        """Every job waiting here, scheduled or held."""
        yield from (job for _, _, job in self._heap)
        for queue in self.queues.values():
            yield from queue.held

    def take(self, predicate: Callable[[Job], bool]) -> list[Job]:
        """Remove and return every waiting job that matches."""
        taken = [job for job in self.jobs() if predicate(job)]
        if taken:
            ids = {id(job) for job in taken}
            self._heap = [e for e in self._heap if id(e[2]) not in ids]
            heapq.heapify(self._heap)
            for queue in self.queues.values():
                queue.held = [j for j in queue.held if id(j) not in ids]
            self._recount()
        return taken

    def retry_now(self, predicate: Callable[[Job], bool]) -> list[Job]:
        """Make matching deferred jobs due now (held ones stay held).

        Deferred means attempted at least once: a message waiting for its ``send_at`` keeps it.
        """
        now = self._clock()
        changed = []
        for index, (due, seq, job) in enumerate(self._heap):
            if due > now and job.attempts > 0 and predicate(job):
                job.due = now
                self._heap[index] = (now, seq, job)
                changed.append(job)
        if changed:
            heapq.heapify(self._heap)
            self._wake.set()
        return changed

    def held_count(self) -> int:
        return sum(len(queue.held) for queue in self.queues.values())

    def gauges(self) -> dict[str, tuple[str, float]]:
        """Figures for the metrics: name -> (description, value)."""
        queues = list(self.queues.values())
        return {
            "scheduled_messages": ("Jobs waiting for their due time", len(self._heap)),
            "held_messages": ("Jobs due but held by a suspension", self.held_count()),
            "scheduled_queues": (
                "Scheduled queues that hold jobs",
                sum(1 for q in queues if q.scheduled or q.held),
            ),
        }

    def next_due(self) -> dict[str, float]:
        """The earliest due time of each queue that has scheduled jobs."""
        due: dict[str, float] = {}
        for when, _, job in self._heap:
            if when < due.get(job.queue, float("inf")):
                due[job.queue] = when
        return due

    def _recount(self) -> None:
        for queue in self.queues.values():
            queue.scheduled = 0
        for _, _, job in self._heap:
            self.queues[job.queue].scheduled += 1
