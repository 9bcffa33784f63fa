"""Egress pools: which source each job leaves from, source health, fallback, and the engine
moving jobs off a suspended or failing source (on fakes: no sockets, no sleeping)."""

from __future__ import annotations

import errno
import re
from collections import Counter
from typing import Any

import pytest
from pydantic import ValidationError

from epoxi.config import Settings
from epoxi.delivery.pools import Pools, SourceHealth
from epoxi.errors import ConnectionFailed, MessageRefused
from epoxi.events.records import RecordType
from epoxi.message import MessageMeta
from epoxi.queue.suspensions import Suspension, SuspensionRegistry
from epoxi.testing.fakes import ManualClock
from tests.unit.test_engine import Engine

SOURCES = [
    {"name": "ip10", "bind": "127.0.0.10", "ehlo": "mta10.sender.test"},
    {"name": "ip11", "bind": "127.0.0.11", "ehlo": "mta11.sender.test"},
    {"name": "ip20", "bind": "127.0.0.20", "ehlo": "mta20.sender.test"},
]
POOLS = [
    {"name": "bulk", "sources": {"ip10": 3, "ip11": 1}, "fallback": "spare"},
    {"name": "spare", "sources": ["ip20"]},
    {"name": "default", "sources": ["ip10"]},
]


def pooled(**delivery: Any) -> Settings:
    delivery = {"sources": SOURCES, "pools": POOLS, **delivery}
    delivery.setdefault("routes", [{"domains": ["*"], "hosts": ["192.0.2.1:25"]}])
    delivery.setdefault("defaults", {"idle_timeout": 0.01})
    return Settings.model_validate({"hostname": "mx.sender.test", "delivery": delivery})


def meta(pool: str = "", tenant: str = "", message_id: str = "m") -> MessageMeta:
    return MessageMeta(
        id=message_id, sender="a@sender.test", recipients=["x@a.test"], received_at=0.0,
        size=1, pool=pool, tenant=tenant,
    )  # fmt: skip


def pools_of(settings: Settings, clock: ManualClock | None = None) -> tuple[Pools, Any]:
    clock = clock or ManualClock()
    suspensions = SuspensionRegistry(clock)
    return Pools(settings.delivery, suspensions, clock), suspensions


# --------------------------------------------------------------------- picking


def test_weights_hold_and_a_message_keeps_its_source() -> None:
    pools, _ = pools_of(pooled())
    picks = {f"m{i}": pools.pick(meta("bulk", message_id=f"m{i}")).source.name for i in range(4000)}
    counts = Counter(picks.values())
    assert abs(counts["ip10"] - 3000) <= 4 * 27  # binomial sd of 4,000 picks at 3/4: 27.4
    assert all(
        pools.pick(meta("bulk", message_id=m)).source.name == s
        for m, s in list(picks.items())[:200]
    )
    other, _ = pools_of(pooled())  # another worker, or after a restart: the same answers
    assert all(
        other.pick(meta("bulk", message_id=m)).source.name == s
        for m, s in list(picks.items())[:200]
    )


def test_a_suspended_source_moves_only_its_own_messages() -> None:
    pools, suspensions = pools_of(pooled())
    before = {f"m{i}": pools.pick(meta("bulk", message_id=f"m{i}")).source.name for i in range(400)}
    suspensions.suspend(Suspension("source", "ip11", "listed"))
    after = {m: pools.pick(meta("bulk", message_id=m)).source.name for m in before}
    assert set(after.values()) == {"ip10"}
    assert all(after[m] == s for m, s in before.items() if s == "ip10")


def test_the_pool_comes_from_the_message_then_the_tenant_then_the_default() -> None:
    pools, _ = pools_of(pooled(tenant_pools={"acme": "spare"}))
    assert pools.pick(meta("bulk", tenant="acme")).pool == "bulk"
    assert pools.pick(meta(tenant="acme")).pool == "spare"
    assert pools.pick(meta(tenant="other")).pool == "default"


def test_a_pool_gone_from_the_configuration_falls_back_to_the_default_with_a_reason() -> None:
    pools, _ = pools_of(pooled())
    pick = pools.pick(meta("retired"))
    assert (pick.pool, pick.source.name) == ("default", "ip10")
    assert "pool retired is not configured any more" in pick.why


def test_a_suspended_source_is_left_out_and_its_pool_falls_back_when_none_is_left() -> None:
    pools, suspensions = pools_of(pooled())
    suspensions.suspend(Suspension("source", "ip10", "blocklisted"))
    assert {pools.pick(meta("bulk")).source.name for _ in range(8)} == {"ip11"}
    suspensions.suspend(Suspension("source", "ip11", "warming"))
    pick = pools.pick(meta("bulk"))
    assert (pick.pool, pick.source.name) == ("spare", "ip20")
    assert pick.why == (
        "pool bulk has no usable source (ip10 suspended, ip11 suspended): sent through pool spare"
    )
    suspensions.resume("source", "ip11")
    assert pools.pick(meta("bulk")).source.name == "ip11"


def test_with_no_usable_source_anywhere_a_job_stays_in_its_own_pool() -> None:
    pools, suspensions = pools_of(pooled())
    for name in ("ip10", "ip11", "ip20"):
        suspensions.suspend(Suspension("source", name))
    pick = pools.pick(meta("bulk"))
    assert pick.pool == "bulk" and pick.why == ""


# --------------------------------------------------------------------- health


def test_an_address_that_cannot_be_bound_makes_a_source_failing_at_once() -> None:
    clock = ManualClock()
    health = SourceHealth(failures_needed=5, retry_after=60, clock=clock)
    assert health.connect_failed("site-a", "cannot bind", local=True)
    assert health.failing()
    clock.advance(61)
    assert not health.failing()  # tried again after retry_after


def test_failures_at_one_site_are_the_sites_problem_not_the_sources() -> None:
    health = SourceHealth(failures_needed=3, retry_after=60, clock=ManualClock())
    for _ in range(10):
        health.connect_failed("site-a", "refused")
    assert not health.failing()
    health.connect_failed("site-b", "refused")
    assert health.failing()
    health.connected()
    assert not health.failing()


def test_health_counts_cover_the_last_ten_minutes() -> None:
    clock = ManualClock()
    health = SourceHealth(failures_needed=3, retry_after=60, clock=clock)
    health.outcome(RecordType.DELIVERY)
    health.outcome(RecordType.BOUNCE)
    clock.advance(300)
    health.outcome(RecordType.TRANSIENT_FAILURE)
    health.connected()
    assert health.counts() == (1, 1, 1, 1, 0)
    clock.advance(400)  # the first minute is more than ten minutes ago now
    assert health.counts() == (0, 1, 0, 1, 0)


def test_a_connection_error_is_local_when_its_cause_is_a_bind_failure() -> None:
    pools, _ = pools_of(pooled())
    unbound = OSError(errno.EADDRNOTAVAIL, "cannot assign requested address")
    try:
        raise ConnectionFailed("cannot connect") from unbound
    except ConnectionFailed as exc:
        assert pools.connect_failed("ip11", "site-a", exc)
    assert not pools.usable("ip11")
    assert not pools.connect_failed("ip10", "site-a", ConnectionFailed("timeout"))
    assert pools.usable("ip10")


# --------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("delivery", "complaint"),
    [
        ({"pools": [{"name": "p", "sources": ["nope"]}]}, "pool p names no source ['nope']"),
        ({"pools": [{"name": "p", "sources": ["ip10"], "fallback": "q"}]}, "fallback 'q'"),
        (
            {"pools": [{"name": "p", "sources": ["ip10"], "fallback": "p"}]},
            "pool fallbacks go round: p -> p",
        ),
        ({"pools": [{"name": "p", "sources": []}]}, "at least one source"),
        ({"pools": [{"name": "p", "sources": {"ip10": 0}}]}, "greater than or equal to 1"),
        ({"pools": POOLS, "default_pool": "nope"}, "default_pool: 'nope' is not a pool"),
        ({"pools": POOLS, "tenant_pools": {"acme": "x"}}, "tenant_pools.acme: 'x' is not a pool"),
        ({"pools": [*POOLS, POOLS[0]]}, "pools: names must be unique"),
        (
            {"pools": [{"name": "default", "sources": ["ip10"]}], "sources": [{"name": "a b"}]},
            "name",
        ),
        ({"sources": [{"name": "x", "bind": "not-an-ip"}]}, "does not appear to be an IPv4"),
    ],
)
def test_bad_pool_settings_are_refused_with_the_reason(
    delivery: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(ValidationError, match=re.escape(complaint)):
        Settings.model_validate({"delivery": {"sources": SOURCES, **delivery}})


def test_without_pools_every_source_is_in_the_default_pool_with_weight_one() -> None:
    settings = Settings.model_validate({"delivery": {"sources": SOURCES}})
    [pool] = settings.delivery.pool_table().values()
    assert pool.name == "default" and pool.sources == {"ip10": 1, "ip11": 1, "ip20": 1}


# --------------------------------------------------------------------- the engine


async def test_each_job_leaves_from_a_source_of_its_pool_and_records_say_which() -> None:
    engine = Engine(pooled())
    try:
        for index in range(40):
            await engine.send(f"r{index}@a.test", f"s{index}@b.test", pool="bulk")
        await engine.records.wait(lambda r: r.type is RecordType.DELIVERY, 80)
        used = Counter(sent.source for sent in engine.transport.sent)
        assert used.keys() == {"ip10", "ip11"} and sum(used.values()) == 80
        deliveries = engine.records.of(RecordType.DELIVERY)
        assert {(r.pool, r.source) for r in deliveries} == {("bulk", "ip10"), ("bulk", "ip11")}
        by_message: dict[str, set[str]] = {}
        for sent in engine.transport.sent:
            by_message.setdefault(sent.meta.id, set()).add(sent.source)
        assert all(len(sources) == 1 for sources in by_message.values())  # both domains
    finally:
        await engine.close()


async def test_an_unbindable_source_hands_its_jobs_to_another_of_its_pool() -> None:
    engine = Engine(pooled())
    engine.transport.unbindable = {"ip11"}
    try:
        for index in range(40):  # about 10 hash to ip11 (none: a chance of 1e-5)
            await engine.send(f"r{index}@a.test", pool="bulk")
        await engine.records.wait(lambda r: r.type is RecordType.DELIVERY, 40)
        assert {sent.source for sent in engine.transport.sent} == {"ip10"}
        [moved, *_] = engine.records.of(RecordType.REROUTED)
        assert moved.source == "ip10" and moved.pool == "bulk"
        assert moved.reason.startswith("source ip11 is failing (cannot bind 127.0.0.11)")
        assert not engine.records.of(RecordType.TRANSIENT_FAILURE)  # no attempt was lost
        assert engine.pools.snapshot()[0].sources[1].state == "failing"
    finally:
        await engine.close()


async def test_suspending_a_source_moves_its_queued_jobs_to_the_others() -> None:
    engine = Engine(pooled())
    engine.suspensions.suspend(Suspension("source", "ip20", "maintenance"))
    engine.suspensions.suspend(Suspension("source", "ip10", "maintenance"))
    engine.suspensions.suspend(Suspension("source", "ip11", "maintenance"))
    try:
        await engine.send("x@a.test", pool="bulk")  # nowhere to go: held by its own pool
        engine.suspensions.suspend(Suspension("domain", "other.test"))  # any change re-applies
        assert not engine.transport.sent and not engine.records.of(RecordType.REROUTED)
        engine.suspensions.resume("source", "ip20")  # the fallback pool is back
        assert await engine.outcome("x@a.test") is RecordType.DELIVERY
        [sent] = engine.transport.sent
        assert sent.source == "ip20"
        [moved] = engine.records.of(RecordType.REROUTED)
        assert moved.pool == "spare"  # its own source (ip10 or ip11, by its id) was held
        assert re.match(
            r"source ip1[01] suspended: maintenance: moved to source ip20", moved.reason
        )
    finally:
        await engine.close()


async def test_an_unknown_pool_is_refused_at_the_door() -> None:
    engine = Engine(pooled())
    try:
        with pytest.raises(MessageRefused) as refused:
            await engine.send("x@a.test", pool="nope")
        assert (refused.value.reply.code, refused.value.reply.enhanced) == (550, "5.3.5")
        assert "'nope'" in refused.value.reply.text
        assert not engine.spool.messages
    finally:
        await engine.close()


async def test_a_reload_moves_the_jobs_of_a_removed_source_and_renames_the_others() -> None:
    engine = Engine(pooled())
    engine.suspensions.suspend(Suspension("site", "route:192.0.2.1:25", "hold"))
    try:
        for index in range(40):
            await engine.send(f"r{index}@a.test", pool="bulk")
        on_ip11 = {
            j.id for r in engine.dispatcher.ready.values() for j in r.jobs if j.source == "ip11"
        }
        assert on_ip11 and len(on_ip11) < 40
        renamed = [{**s, "ehlo": "new." + s["ehlo"]} for s in SOURCES if s["name"] != "ip11"]
        pools = [{**POOLS[0], "sources": {"ip10": 1}}, *POOLS[1:]]
        engine.dispatcher.reconfigure(pooled(sources=renamed, pools=pools).delivery)
        queues = {r.source.name: r for r in engine.dispatcher.ready.values()}
        assert queues["ip10"].source.ehlo == "new.mta10.sender.test"
        assert len(queues["ip10"]) == 40 and len(queues["ip11"]) == 0
        moved = engine.records.of(RecordType.REROUTED)
        assert {r.message_id for r in moved} == on_ip11
        assert {r.reason for r in moved} == {
            "source ip11 was removed from the configuration: moved to source ip10 of pool bulk"
        }
        engine.suspensions.resume("site", "route:192.0.2.1:25")
        await engine.records.wait(lambda r: r.type is RecordType.DELIVERY, 40)
        assert {sent.source for sent in engine.transport.sent} == {"ip10"}
    finally:
        await engine.close()


def test_a_source_bound_to_one_address_family_tries_only_addresses_of_that_family() -> None:
    from epoxi.config import SourceSettings
    from epoxi.delivery.transport import _reachable_from

    addresses = ["192.0.2.1", "2001:db8::1", "192.0.2.2"]
    assert _reachable_from(SourceSettings(name="v4", bind="127.0.0.10"), addresses) == [
        "192.0.2.1",
        "192.0.2.2",
    ]
    assert _reachable_from(SourceSettings(name="v6", bind="::1"), addresses) == ["2001:db8::1"]
    assert _reachable_from(SourceSettings(name="any"), addresses) == addresses


async def test_a_removed_sources_jobs_never_leave_from_it_even_with_the_rest_suspended() -> None:
    engine = Engine(pooled())
    engine.suspensions.suspend(Suspension("site", "route:192.0.2.1:25", "hold"))
    try:
        for index in range(4):
            await engine.send(f"r{index}@a.test", pool="bulk")
        engine.suspensions.suspend(Suspension("source", "ip10", "listed"))
        pools = [{**POOLS[0], "sources": {"ip10": 1}}, *POOLS[1:]]
        kept = [s for s in SOURCES if s["name"] != "ip11"]
        engine.dispatcher.reconfigure(pooled(sources=kept, pools=pools).delivery)
        queues = {r.source.name: len(r) for r in engine.dispatcher.ready.values()}
        assert queues.get("ip11", 0) == 0 and queues.get("ip10", 0) + queues.get("ip20", 0) == 4
    finally:
        await engine.close()


async def test_tls_policy_failures_do_not_make_a_source_failing() -> None:
    from epoxi.errors import TlsFailed

    routes = [{"domains": [d], "hosts": [f"192.0.2.{n}:25"]} for n, d in enumerate("abc", 1)]
    routes = [{**route, "domains": [f"{route['domains'][0]}.test"]} for route in routes]
    engine = Engine(pooled(source_failures=2, routes=routes))  # three sites
    engine.transport.connect_error = TlsFailed("TLS required but not offered", policy="required")
    try:
        for domain in ("a.test", "b.test", "c.test"):
            await engine.send(f"x@{domain}", pool="bulk")
        await engine.records.wait(lambda r: r.type is RecordType.TRANSIENT_FAILURE, 3)
        assert all(engine.pools.usable(name) for name in ("ip10", "ip11"))
        assert not engine.records.of(RecordType.REROUTED)
    finally:
        await engine.close()


def test_a_failing_source_is_left_out_until_its_retry_time_then_picked_again() -> None:
    clock = ManualClock()
    pools, _ = pools_of(pooled(), clock)
    ids = [f"m{i}" for i in range(200)]
    before = {m: pools.pick(meta("bulk", message_id=m)).source.name for m in ids}
    unbound = OSError(errno.EADDRNOTAVAIL, "cannot assign requested address")
    try:
        raise ConnectionFailed("cannot connect") from unbound
    except ConnectionFailed as exc:
        assert pools.connect_failed("ip11", "site-a", exc)
    assert {pools.pick(meta("bulk", message_id=m)).source.name for m in ids} == {"ip10"}
    clock.advance(61)  # source_retry_after: tried again, each message on its own source
    assert {m: pools.pick(meta("bulk", message_id=m)).source.name for m in ids} == before
