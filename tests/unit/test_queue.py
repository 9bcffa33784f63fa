"""Scheduled queues, retry policy, throttles and control headers."""

from __future__ import annotations

import asyncio
import random

from epoxi.ingest.control import take_control_headers
from epoxi.message import MessageMeta
from epoxi.queue.model import Job, Message, queue_name, split_by_domain
from epoxi.queue.retry import RetryPolicy
from epoxi.queue.scheduled import Scheduler
from epoxi.queue.suspensions import Suspension
from epoxi.shaping.throttle import LocalThrottle, Rate


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_job(
    domain: str = "a.example", due: float = 0.0, tenant: str = "", campaign: str = ""
) -> Job:
    meta = MessageMeta(
        id="X",
        sender="s@x",
        recipients=[f"r@{domain}"],
        received_at=0,
        size=1,
        tenant=tenant,
        campaign=campaign,
    )
    return Job(
        Message(meta, b""), domain, [f"r@{domain}"], queue_name(domain, tenant, campaign), due=due
    )


def test_queue_names() -> None:
    assert queue_name("d.example") == "d.example"
    assert queue_name("d.example", "acme", "spring") == "spring:acme@d.example"
    assert split_by_domain(["a@X.example", "b@x.example", "c@y.example"]) == {
        "x.example": ["a@X.example", "b@x.example"],
        "y.example": ["c@y.example"],
    }


async def test_due_now_is_released_at_once_and_later_when_due() -> None:
    clock, released = Clock(), []
    second = asyncio.Event()

    def release(job: Job) -> None:
        released.append(job)
        if len(released) == 2:
            second.set()

    scheduler = Scheduler(release, clock=clock)
    now_job, later_job, last_job = make_job(), make_job(due=1005.0), make_job(due=2000.0)
    scheduler.add(now_job)
    scheduler.add(later_job)
    assert released == [now_job] and scheduler.queues["a.example"].scheduled == 1
    task = asyncio.get_running_loop().create_task(scheduler.run())
    try:
        clock.now = 1006.0
        scheduler.add(last_job)  # wakes the timer, which finds later_job due
        await asyncio.wait_for(second.wait(), 5)
    finally:
        task.cancel()
    assert released == [now_job, later_job]
    assert list(scheduler.jobs()) == [last_job]  # not due: still waiting


def test_suspend_holds_and_resume_releases() -> None:
    clock, released, held = Clock(), [], []
    scheduler = Scheduler(released.append, clock=clock, on_hold=lambda j, s: held.append(j))
    scheduler.suspensions.suspend(Suspension("tenant", "acme", "complaints"))
    job = make_job(tenant="acme")
    other = make_job(tenant="other")
    scheduler.add(job)
    scheduler.add(other)
    assert released == [other] and held == [job]
    assert scheduler.suspensions.resume("tenant", "acme")
    assert released == [other, job]


def test_suspension_by_domain_campaign_and_queue_with_expiry() -> None:
    clock, released = Clock(), []
    scheduler = Scheduler(released.append, clock=clock)
    scheduler.suspensions.suspend(Suspension("domain", "b.example", until=1010.0))
    scheduler.suspensions.suspend(Suspension("campaign", "c1"))
    scheduler.suspensions.suspend(Suspension("queue", "q.example"))
    for job in (make_job("b.example"), make_job(campaign="c1"), make_job("q.example")):
        scheduler.add(job)
    assert released == []
    clock.now = 1011.0
    assert scheduler.suspensions.expire()
    assert [j.domain for j in released] == ["b.example"]


def test_take_removes_matching_jobs() -> None:
    clock = Clock()
    scheduler = Scheduler(lambda j: None, clock=clock)
    scheduler.add(make_job("x.example", due=2000))
    scheduler.add(make_job("y.example", due=2000))
    taken = scheduler.take(lambda j: j.domain == "x.example")
    assert [j.domain for j in taken] == ["x.example"] and len(scheduler) == 1


def test_retry_backoff_grows_and_caps() -> None:
    policy = RetryPolicy(60, 600, 86400)
    rng = random.Random(1)
    delays = [policy.delay(n, rng) for n in range(1, 8)]
    assert 48 <= delays[0] <= 72 and 96 <= delays[1] <= 144
    assert all(d <= 600 for d in delays) and delays[-1] >= 480
    assert policy.expired(0, 86400) and not policy.expired(0, 86399)


def test_throttle_rate_and_burst() -> None:
    clock = Clock()
    throttle = LocalThrottle(Rate.parse("10/s"), burst=2, clock=clock)
    assert throttle.acquire() == 0 and throttle.acquire() == 0
    assert 0.09 < throttle.acquire() < 0.11
    clock.now += 0.1
    assert throttle.acquire() == 0
    assert Rate.parse("2000/h").interval == 1.8


def test_control_headers_are_taken_out() -> None:
    body = (
        b"Subject: x\r\nX-Epoxi-Tenant: acme\r\nx-epoxi-campaign: spring\r\n\r\n"
        b"X-Epoxi-Tenant: body\r\n"
    )
    stripped, found = take_control_headers(body)
    assert found == {"tenant": "acme", "campaign": "spring"}
    assert stripped == b"Subject: x\r\n\r\nX-Epoxi-Tenant: body\r\n"
    assert take_control_headers(b"Subject: y\r\n\r\nhi\r\n") == (b"Subject: y\r\n\r\nhi\r\n", {})


def test_equal_mx_preferences_are_tried_in_random_order() -> None:
    from epoxi.delivery.client import TlsPolicy
    from epoxi.delivery.routing import Destination

    hosts = (("a", 25), ("b", 25), ("c", 25), ("d", 25))
    mx = Destination("s", hosts, TlsPolicy(), preferences=(10, 10, 10, 20))
    orders = {tuple(mx.attempt_order(random.Random(seed))) for seed in range(30)}
    assert len(orders) > 1 and all(order[-1] == ("d", 25) for order in orders)
    static = Destination("s", hosts, TlsPolicy())
    assert static.attempt_order() == list(hosts)


def test_rate_meter_counts_the_last_window_only() -> None:
    from epoxi.delivery.ready import RateMeter

    now = [1000.0]
    meter = RateMeter(window=60, clock=lambda: now[0])
    for _ in range(3):
        meter.tick()
    now[0] += 30
    meter.tick()
    assert meter.count() == 4
    now[0] += 31  # the first three are more than 60 s old
    assert meter.count() == 1
    now[0] += 60
    assert meter.count() == 0
