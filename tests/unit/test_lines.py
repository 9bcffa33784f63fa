"""A ready queue's job line: priority first, tenants in turn, tenants over their rate passed
over; and where a job's priority comes from (on fakes: a ManualClock, no sockets)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from epoxi.app import shaping_policy
from epoxi.config import Settings
from epoxi.delivery.lines import JobLine, TenantLimits
from epoxi.errors import MessageRefused
from epoxi.events.records import RecordType
from epoxi.ingest import Ingest
from epoxi.ingest.control import parse_priority
from epoxi.message import MessageMeta
from epoxi.queue.model import Job, Message
from epoxi.shaping.files import ShapingFiles, parse
from epoxi.shaping.throttle import Rate
from epoxi.testing.fakes import ManualClock, MemorySpool, Recorder
from tests.unit.test_engine import Engine, settings


def job(tenant: str = "", name: str = "m", priority: int | None = None) -> Job:
    meta = MessageMeta(
        id=name, sender="a@sender.test", recipients=["x@a.test"], received_at=0.0, size=1,
        tenant=tenant, priority=priority,
    )  # fmt: skip
    return Job(Message(meta, b""), "a.test", meta.recipients, "a.test")


def drain(line: JobLine) -> list[str]:
    names = []
    while True:
        taken, _ = line.pop()
        if taken is None:
            return names
        names.append(taken.id)


def test_higher_priority_leaves_first_and_each_level_keeps_arrival_order() -> None:
    line = JobLine()
    for name, priority in [("a", 0), ("b", -5), ("c", 10), ("d", 0), ("e", 10)]:
        line.put(job(name=name), priority)
    assert len(line) == 5 and [j.id for j in line] == ["c", "e", "a", "d", "b"]
    assert drain(line) == ["c", "e", "a", "d", "b"] and len(line) == 0
    line.put(job(name="f"), 3)  # the emptied levels were dropped: made again
    line.put(job(name="g"), 4)
    assert drain(line) == ["g", "f"]


def test_tenants_take_turns_so_a_small_one_is_not_behind_a_big_backlog() -> None:
    line = JobLine()
    for i in range(1000):
        line.put(job("bulk", f"bulk{i}"))
    for i in range(3):
        line.put(job("shop", f"shop{i}"))
    first = drain(line)[:6]
    assert first == ["bulk0", "shop0", "bulk1", "shop1", "bulk2", "shop2"]


def test_a_tenant_coming_back_joins_the_turn_again() -> None:
    line = JobLine()
    line.put(job("a", "a0"))
    line.put(job("b", "b0"))
    assert drain(line) == ["a0", "b0"]
    line.put(job("b", "b1"))
    line.put(job("a", "a1"))
    line.put(job("b", "b2"))
    assert drain(line) == ["b1", "a1", "b2"]


def test_take_removes_matching_jobs_and_keeps_the_order_of_the_rest() -> None:
    line = JobLine()
    for i in range(4):
        line.put(job("a", f"a{i}"))
        line.put(job("b", f"b{i}"), 5)
    taken = line.take(lambda j: j.id in {"a1", "b0", "b1", "b2", "b3"})
    assert sorted(j.id for j in taken) == ["a1", "b0", "b1", "b2", "b3"]
    assert len(line) == 3 and drain(line) == ["a0", "a2", "a3"]
    line.put(job("b", "b9"), 5)
    assert drain(line) == ["b9"]


def test_a_tenant_over_its_rate_is_passed_over_and_the_shortest_wait_is_given() -> None:
    clock = ManualClock()
    limits = TenantLimits(clock=clock)
    limits.set_rates({("bulk", None): Rate(1, 10.0), ("shop", "google"): Rate(1, 4.0)})
    line = JobLine(limits, provider="google")
    for i in range(3):
        line.put(job("bulk", f"bulk{i}"))
        line.put(job("shop", f"shop{i}"))
        line.put(job("free", f"free{i}"), -1)  # lower priority, no rate
    assert drain(line) == ["bulk0", "shop0", "free0", "free1", "free2"]
    assert line.pop() == (None, 4.0)  # shop may send again first
    clock.advance(4.0)
    assert drain(line) == ["shop1"]
    clock.advance(6.0)
    assert drain(line) == ["bulk1", "shop2"]


def test_a_provider_rate_applies_only_to_that_providers_queues() -> None:
    clock = ManualClock()
    limits = TenantLimits(clock=clock)
    limits.set_rates({("shop", "google"): Rate(1, 60.0)})
    google, other = JobLine(limits, "google"), JobLine(limits, None)
    for i in range(2):
        google.put(job("shop", f"g{i}"))
        other.put(job("shop", f"o{i}"))
    assert drain(google) == ["g0"] and drain(other) == ["o0", "o1"]


def test_priority_comes_from_the_message_else_the_tenant_else_the_destination() -> None:
    limits = TenantLimits.from_settings(
        settings(tenant_priorities={"shop": 50, "bulk": -20}).delivery
    )
    assert limits.priority(job("shop", priority=-3), 7) == -3
    assert limits.priority(job("shop"), 7) == 50
    assert limits.priority(job("other"), 7) == 7


def test_tenant_settings_are_validated_and_a_reload_keeps_throttle_state() -> None:
    delivery = settings(
        tenant_priorities={"shop": 100},
        tenant_rates={"bulk": {"max_message_rate": "100/m", "providers": {"google": "20/m"}}},
    ).delivery
    clock = ManualClock()
    limits = TenantLimits(workers=2, clock=clock)
    limits.configure(delivery)
    assert limits.wait("bulk", "google") == 0 and limits.wait("bulk", "google") == 6.0  # 10/m
    limits.configure(settings().delivery)
    assert not limits.rated and limits.wait("bulk", "google") == 0
    bad: list[dict[str, Any]] = [
        {"tenant_priorities": {"shop": 101}},
        {"tenant_rates": {"bulk": {"max_message_rate": "fast"}}},
        {"tenant_rates": {"bulk": {"providers": {"google": "0/s"}}}},
        {"tenant_rates": {"bulk": {"surprise": 1}}},
    ]
    for delivery_overrides in bad:
        with pytest.raises(ValidationError):
            Settings.model_validate({"hostname": "h.test", "delivery": delivery_overrides})


def test_the_destinations_shaping_gives_a_default_priority() -> None:
    engine = Engine(settings(defaults={"priority": -10}, shaping={"a.test": {"priority": 30}}))
    policy = engine.dispatcher.policy
    assert policy.resolve("a.test", "a.test").priority == 30
    assert policy.resolve("b.test", "b.test").priority == -10
    assert Engine(settings()).dispatcher.policy.resolve("a.test", "a.test").priority == 0
    text = '[providers.acme]\nmatch_domains = ["a.test"]\npriority = 20\n'
    files = ShapingFiles([("f", parse(text, "f"))])
    assert shaping_policy(settings().delivery, files).resolve("a.test", "a.test").priority == 20


# --------------------------------------------------------------------- X-Epoxi-Priority


@pytest.mark.parametrize(
    ("text", "value"),
    [("0", 0), ("100", 100), ("-100", -100), ("+7", 7), ("101", None), ("1.5", None),
     ("high", None), ("", None), ("٣", None), ("+-5", None), ("0100", None)],
)  # fmt: skip
def test_parse_priority(text: str, value: int | None) -> None:
    assert parse_priority(text) == value


def _meta() -> MessageMeta:
    return MessageMeta(
        id="m1", sender="a@sender.test", recipients=["x@a.test"], received_at=0.0, size=1
    )


async def test_x_epoxi_priority_from_a_trusted_client_is_taken_and_removed() -> None:
    spool, jobs = MemorySpool(), []
    ingest = Ingest(spool=spool, records=Recorder(), schedule=jobs.append)
    meta = _meta()
    await ingest.accept(meta, b"X-Epoxi-Priority: 40\r\nSubject: s\r\n\r\nhi\r\n", trusted=True)
    assert meta.priority == 40 and spool.messages[meta.id][1] == b"Subject: s\r\n\r\nhi\r\n"
    untrusted = _meta()
    untrusted.id = "m2"
    await ingest.accept(untrusted, b"X-Epoxi-Priority: 40\r\n\r\nhi\r\n", trusted=False)
    assert untrusted.priority is None


@pytest.mark.parametrize("value", ["101", "urgent", "-1000"])
async def test_a_bad_x_epoxi_priority_is_refused(value: str) -> None:
    spool = MemorySpool()
    ingest = Ingest(spool=spool, records=Recorder(), schedule=lambda job: None)
    body = f"X-Epoxi-Priority: {value}\r\n\r\nhi\r\n".encode()
    with pytest.raises(MessageRefused) as info:
        await ingest.accept(_meta(), body, trusted=True)
    assert (info.value.reply.code, info.value.reply.enhanced) == (550, "5.6.0")
    assert "X-Epoxi-Priority" in info.value.reply.text and spool.messages == {}


async def test_a_connection_waiting_for_a_tenants_rate_takes_another_tenants_job() -> None:
    engine = Engine(settings(defaults={"idle_timeout": 30, "connection_limit": 1}))
    engine.dispatcher.tenants.set_rates({("bulk", None): Rate(1, 3600.0)})
    await engine.send("x0@a.test", tenant="bulk")
    assert await engine.outcome("x0@a.test") is RecordType.DELIVERY
    await engine.send("x1@a.test", tenant="bulk")  # an hour to wait: the connection waits
    await engine.send("y0@a.test", tenant="shop")
    assert await engine.outcome("y0@a.test") is RecordType.DELIVERY
    assert engine.transport.connects == 1
    assert [r.recipient for r in engine.records.records if r.type is RecordType.DELIVERY] == [
        "x0@a.test",
        "y0@a.test",
    ]
    [ready] = engine.dispatcher.ready.values()
    assert [job.recipients for job in ready.jobs] == [["x1@a.test"]]
    await engine.close()
