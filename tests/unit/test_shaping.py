"""The shaping merge and the suspension registry, pure."""

from __future__ import annotations

from epoxi.message import MessageMeta
from epoxi.queue.model import Job, Message
from epoxi.queue.suspensions import Suspension, SuspensionRegistry
from epoxi.shaping.policy import ShapingPolicy
from epoxi.shaping.throttle import LocalThrottle, Rate
from epoxi.testing.fakes import ManualClock


def test_layers_merge_in_one_order_and_say_where_each_value_came_from() -> None:
    policy = ShapingPolicy(
        defaults={"connection_limit": 20, "max_message_rate": "100/s"},
        named={
            "mx.site.test": {"connection_limit": 5, "tls": "required"},
            "a.test": {"connection_limit": 3},
        },
        sources={"pool-a": {"max_message_rate": "10/s"}},
    )
    resolved = policy.explain("a.test", "mx.site.test", "pool-a")
    shaping = resolved.shaping
    assert shaping.connection_limit == 3 and resolved.origins["connection_limit"] == "domain a.test"
    assert shaping.tls == "required" and resolved.origins["tls"] == "site mx.site.test"
    assert shaping.max_message_rate == Rate.parse("10/s")
    assert resolved.origins["max_message_rate"] == "source pool-a"
    assert resolved.origins["idle_timeout"] == "built-in" and shaping.idle_timeout == 5.0
    other = policy.resolve("b.test", "mx.site.test", "default")
    assert other.connection_limit == 5 and other.max_message_rate == Rate.parse("100/s")


def test_no_configuration_gives_the_built_in_limits() -> None:
    shaping = ShapingPolicy().resolve("a.test", "mx.a.test")
    assert (shaping.connection_limit, shaping.max_deliveries_per_connection) == (10, 100)
    assert shaping.tls == "opportunistic" and shaping.max_message_rate is None


def _job(tenant: str = "", campaign: str = "", domain: str = "a.test") -> Job:
    meta = MessageMeta(
        id="m",
        sender="s@x.test",
        recipients=[f"r@{domain}"],
        received_at=0,
        size=1,
        tenant=tenant,
        campaign=campaign,
    )
    return Job(Message(meta, b""), domain, meta.recipients, queue=f"{tenant}@{domain}")


def test_registry_matches_jobs_and_paths_by_kind() -> None:
    registry = SuspensionRegistry(ManualClock())
    registry.suspend(Suspension("tenant", "shop", "complaints"))
    registry.suspend(Suspension("site", "mx.a.test", "maintenance"))
    assert registry.for_job(_job(tenant="shop")) is not None
    assert registry.for_job(_job(tenant="other")) is None
    assert registry.for_path("default", "mx.a.test") is not None
    assert registry.for_path("default", "mx.b.test") is None
    assert registry.for_job(_job(domain="mx.a.test")) is None  # a site is not a domain


def test_registry_tells_listeners_and_forgets_what_ran_out() -> None:
    clock = ManualClock()
    registry = SuspensionRegistry(clock)
    changes: list[int] = []
    registry.subscribe(lambda: changes.append(len(registry.active())))
    registry.suspend(Suspension("source", "pool-a", until=clock() + 10))
    registry.suspend(Suspension("campaign", "spring"))
    assert not registry.expire() and changes == [1, 2]
    clock.advance(11)
    assert registry.for_path("pool-a", "any") is None  # inactive at once, gone at expire
    assert registry.expire() and changes == [1, 2, 1]
    assert registry.resume("campaign", "spring") and not registry.resume("campaign", "spring")
    assert changes == [1, 2, 1, 0]


def test_a_fast_rate_goes_in_groups_of_its_window_and_a_slow_one_message_by_message() -> None:
    clock = ManualClock()
    fast = LocalThrottle(Rate(100_000, 1), clock=clock, window=0.01)
    taken = 0
    while fast.acquire() == 0:
        taken += 1
    assert taken == 1000  # 10 ms worth at once
    clock.advance(1.0)  # idle for a second: no credit saved beyond one window's burst
    assert sum(1 for _ in range(5000) if fast.acquire() == 0) == 1000
    slow = LocalThrottle(Rate(100, 1), clock=clock, window=0.01)
    assert slow.acquire() == 0 and slow.acquire() > 0  # 1 a time: no burst
