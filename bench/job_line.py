"""Micro-benchmark of a ready queue's job line: put then pop 100,000 jobs, against the plain
deque it replaced (one tenant at one priority: the relay's case), and with 100 tenants at two
priorities. ``python bench/job_line.py``; prints the best of 5 runs, in ns per job."""

from __future__ import annotations

import timeit
from collections import deque

from epoxi.delivery.lines import JobLine, TenantLimits
from epoxi.message import MessageMeta
from epoxi.queue.model import Job, Message

N = 100_000


def jobs(tenants: int) -> list[Job]:
    made = []
    for i in range(N):
        meta = MessageMeta(
            id=f"m{i}", sender="", recipients=["x@a.test"], received_at=0.0, size=1,
            tenant=f"t{i % tenants}" if tenants > 1 else "",
        )  # fmt: skip
        made.append(Job(Message(meta, b""), "a.test", meta.recipients, "a.test"))
    return made


def plain(batch: list[Job]) -> None:
    line: deque[Job] = deque()
    for job in batch:
        line.append(job)
    for _ in range(N):
        line.popleft()


def job_line(batch: list[Job], priorities: int = 1) -> None:
    limits = TenantLimits()
    line = JobLine(limits)
    for i, job in enumerate(batch):
        line.put(job, limits.priority(job, i % priorities))
    for _ in range(N):
        line.pop()


def alternating(batch: list[Job]) -> None:
    """One in, one out: a queue that keeps up."""
    limits = TenantLimits()
    line = JobLine(limits)
    for job in batch:
        line.put(job, limits.priority(job, 0))
        line.pop()


def best(run: object) -> float:
    times = timeit.repeat(run, number=1, repeat=5)  # type: ignore[arg-type]
    return min(times) / N * 1e9


if __name__ == "__main__":
    one, many = jobs(1), jobs(100)
    print(f"deque append+popleft        {best(lambda: plain(one)):6.0f} ns/job")
    print(f"JobLine 1 tenant 1 priority {best(lambda: job_line(one)):6.0f} ns/job")
    print(f"JobLine alternating put/pop {best(lambda: alternating(one)):6.0f} ns/job")
    print(f"JobLine 100 tenants 2 prio  {best(lambda: job_line(many, 2)):6.0f} ns/job")
