"""Traffic shaping automation without sockets: rules as the files give them, triggers,
the durable store shared by workers, site-scoped suspensions, AIMD."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from epoxi.delivery.automation import Aimd, Automation
from epoxi.delivery.dispatcher import _back_off
from epoxi.errors import ConfigError
from epoxi.events.records import Record, RecordType, Response
from epoxi.message import MessageMeta
from epoxi.queue.model import Job, Message, tenant_campaign
from epoxi.queue.suspensions import Suspension, SuspensionRegistry
from epoxi.shaping.automation import Automated
from epoxi.shaping.files import AdaptiveRate, ShapingFiles, parse
from epoxi.shaping.policy import ShapingPolicy
from epoxi.shaping.throttle import Rate
from epoxi.store.automation import AutomationStore
from epoxi.testing.fakes import Recorder

RULES = """
[providers.yahoo]
match_mx_suffix = ["yahoodns.net"]
[[providers.yahoo.automation]]
regex = '\\[TS04\\]'
action = "suspend"
duration = "2h"
[[providers.yahoo.automation]]
regex = 'TS03'
action = "set_config"
name = "max_message_rate"
value = "100/h"
trigger = "5/h"
duration = "30m"
[domains."example.com"]
[[domains."example.com".automation]]
regex = 'blocked'
action = "bounce_campaign"
duration = "1d"
"""
YAHOO_SITE = "mta5.am0.yahoodns.net,mta6.am0.yahoodns.net"


def test_rules_parse_with_their_triggers_and_durations() -> None:
    parsed = parse(RULES)
    suspend, change = parsed.providers["yahoo"].automation
    assert (suspend.action, suspend.trigger.immediate, suspend.duration) == ("suspend", True, 7200)
    assert (change.trigger.count, change.trigger.period, str(change.trigger)) == (5, 3600, "5/h")
    assert change.change() == {"max_message_rate": "100/h"}
    assert suspend.pattern.search("421 4.7.0 [TS04] Messages from 192.0.2.1 deferred")


@pytest.mark.parametrize(
    ("rule", "says"),
    [
        ('regex = "(unclosed"\naction = "suspend"\nduration = "1h"', "not a valid regular"),
        ('regex = "x"\naction = "explode"\nduration = "1h"', "action"),
        ('regex = "x"\naction = "suspend"', "duration"),
        ('regex = "x"\naction = "suspend"\nduration = "1h"\ntrigger = "often"', "trigger"),
        ('regex = "x"\naction = "suspend"\nduration = "1h"\ntrigger = "2.5/h"', "whole matches"),
        ('regex = "x"\naction = "set_config"\nduration = "1h"', "set_config needs name"),
        (
            'regex = "x"\naction = "set_config"\nname = "connection_limit"\nvalue = 0\n'
            'duration = "1h"',
            "connection_limit",
        ),
        ('regex = "x"\naction = "suspend"\nname = "tls"\nvalue = 1\nduration = "1h"', "only"),
    ],
)
def test_a_bad_rule_is_refused_naming_what_is_wrong(rule: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(f'[[domains."x.test".automation]]\n{rule}\n', "mine.toml")
    assert "mine.toml" in str(caught.value) and says in str(caught.value)


def test_rules_of_every_applicable_block_are_found_by_provider_through_the_mx() -> None:
    files = ShapingFiles([("rules.toml", parse(RULES))])
    found = files.rules("any-yahoo-hosted.test", YAHOO_SITE)
    assert [label for label, _ in found] == [
        "provider yahoo (rules.toml) rule 1",
        "provider yahoo (rules.toml) rule 2",
    ]
    assert [label for label, _ in files.rules("example.com", "mx.example.com")] == [
        "domain example.com (rules.toml) rule 1"
    ]
    shipped = ShapingFiles([("shipped.toml", parse(RULES))], mx_only=frozenset({"shipped.toml"}))
    assert shipped.rules("example.com", "route:relay.test:25") == []  # a static route


def test_an_adaptive_rate_needs_its_floor_below_its_ceiling() -> None:
    with pytest.raises(ConfigError, match="floor must not be above ceiling"):
        parse('[default.adaptive_rate]\nfloor = "10/s"\nceiling = "100/m"\n')


def test_aimd_halves_down_to_the_floor_and_climbs_back_after_each_quiet_interval() -> None:
    config = AdaptiveRate(floor="10/m", ceiling="120/m", increase="30/m", every=60.0)
    aimd = Aimd.start(config, "x.test", Rate(100, 60), now=0.0)  # the configured, under 120/m
    assert str(aimd.rate) == "100/m"
    changes = [aimd.backed_off(now) for now in (1.0, 1.5, 3.0, 5.0, 7.0, 9.0)]
    assert changes == [True, False, True, True, True, False]  # once a second at most
    assert str(aimd.rate) == "10/m"  # not below the floor
    top = Aimd.top(config, Rate(100, 60))
    assert not aimd.succeeded(30.0, top)  # not yet a minute since the last change
    assert aimd.succeeded(70.0, top) and str(aimd.rate) == "40/m"
    for now in (140.0, 210.0, 280.0):
        aimd.succeeded(now, top)
    assert str(aimd.rate) == "100/m"  # the configured rate caps it, not the ceiling
    assert not aimd.succeeded(400.0, top)


def test_a_path_suspension_stops_one_site_of_a_source_and_a_tenant_one_on_one_site() -> None:
    registry = SuspensionRegistry(clock=lambda: 100.0)
    registry.suspend(Suspension("source", "ip1", "TS04", until=200.0, site="yahoo-site"))
    registry.suspend(Suspension("tenant", "bulk", "blocked", until=200.0, site="gmail-site"))
    assert registry.for_path("ip1", "yahoo-site") is not None
    assert registry.for_path("ip1", "gmail-site") is None
    assert registry.for_path("ip2", "yahoo-site") is None

    def job(tenant: str, site: str) -> Job:
        meta = MessageMeta(id="m", sender="", recipients=["a@x"], received_at=0, size=1)
        meta.tenant = tenant
        found = Job(Message(meta, b""), "x", ["a@x"], "x")
        found.site = site
        return found

    assert registry.for_job(job("bulk", "gmail-site")) is not None
    assert registry.for_job(job("bulk", "yahoo-site")) is None
    assert registry.for_job(job("other", "gmail-site")) is None
    assert registry.resume("source", "ip1", "yahoo-site")
    assert registry.for_path("ip1", "yahoo-site") is None


def test_queue_names_give_their_tenant_and_campaign() -> None:
    assert tenant_campaign("spring:acme@example.com") == ("acme", "spring")
    assert tenant_campaign("acme@example.com") == ("acme", "")
    assert tenant_campaign("spring:example.com") == ("", "spring")
    assert tenant_campaign("example.com") == ("", "")


def action(rule: str = "r", source: str = "ip1", started: float = 100.0) -> Automated:
    return Automated(
        id=f"{rule}-{source}-{started}",
        action="suspend",
        rule=rule,
        trigger="3/h",
        site="site",
        source=source,
        reply="421 4.7.0 [TS04]",
        started=started,
        until=started + 60,
    )


async def test_the_store_counts_matches_to_the_threshold_and_starts_one_action_per_scope(
    tmp_path: Path,
) -> None:
    store = AutomationStore(tmp_path / "store.db")
    other = AutomationStore(tmp_path / "store.db")  # another worker on the same store
    await store.start()
    await other.start()
    try:
        assert await store.matched(action(started=100.0), 3, 3600) is None
        assert await other.matched(action(started=101.0), 3, 3600) is None
        started = await store.matched(action(started=102.0), 3, 3600)
        assert started is not None and started.id == "r-ip1-102.0"
        assert await other.matched(action(started=103.0), 1, 0) is None  # one is running
        assert await other.matched(action(source="ip2", started=103.0), 1, 0) is not None
        assert [a.source for a in await other.active(110.0)] == ["ip1", "ip2"]
        version = await other.version()
        ended = await store.end("r-ip1-102.0", "lifted by an operator", 120.0)
        assert ended is not None and ended.ended_why == "lifted by an operator"
        assert await other.version() > version
        assert await store.end("r-ip1-102.0", "again", 121.0) is None
        expired = await store.expire(163.0)
        assert [a.source for a in expired] == ["ip2"] and await other.expire(164.0) == []
        assert await store.active(164.0) == []
        # a match an hour later than the others starts counting again
        assert await store.matched(action(started=5000.0), 3, 3600) is None
    finally:
        await store.stop()
        await other.stop()


# --------------------------------------------------------------------- the engine, on fakes

SITE = "mx.x.test"


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeDispatcher:
    """What the engine needs of a dispatcher: the policy, and being told of rate changes."""

    def __init__(self, policy: ShapingPolicy) -> None:
        self.policy = policy
        self.steering: object = None
        self.rate_changes: list[tuple[str, str]] = []

    def reshape(self, policy: ShapingPolicy) -> None:
        self.policy = policy

    def rate_changed(self, source: str, site: str) -> None:
        self.rate_changes.append((source, site))


def policy_of(text: str) -> ShapingPolicy:
    return ShapingPolicy(files=ShapingFiles([("t.toml", parse(text))]))


@contextlib.asynccontextmanager
async def engine(
    tmp_path: Path, text: str, clock: Clock, name: str = "store.db"
) -> AsyncIterator[tuple[Automation, FakeDispatcher, SuspensionRegistry]]:
    suspensions = SuspensionRegistry(clock=clock)
    dispatcher = FakeDispatcher(policy_of(text))
    auto = Automation(
        store=AutomationStore(tmp_path / name),
        dispatcher=dispatcher,  # type: ignore[arg-type]
        suspensions=suspensions,
        records=Recorder(),
        take=lambda predicate: [],
        bounce=lambda jobs, why: 0,
        clock=clock,
    )
    await auto.store.start()
    await auto.start()
    try:
        yield auto, dispatcher, suspensions
    finally:
        await auto.store.stop()


async def settled(auto: Automation) -> None:
    """Wait for the matches being counted (they go to the store off the loop)."""
    while auto._tasks:
        await asyncio.gather(*list(auto._tasks))


def reply(
    text: str,
    message: str = "m1",
    recipient: str = "a@x.test",
    source: str = "ip1",
    kind: RecordType = RecordType.TRANSIENT_FAILURE,
) -> Record:
    code = 250 if kind is RecordType.DELIVERY else 421
    return Record(
        type=kind,
        message_id=message,
        queue="x.test",
        site=SITE,
        source=source,
        recipient=recipient,
        attempt=1,
        response=Response(code, "4.7.0", text),
    )


THRESHOLD = """
[sites."mx.x.test"]
[[sites."mx.x.test".automation]]
regex = 'unusual rate'
action = "suspend"
trigger = "3/h"
duration = "30m"
"""


async def test_one_reply_to_many_recipients_is_one_match(tmp_path: Path) -> None:
    async with engine(tmp_path, THRESHOLD, Clock()) as (auto, _, _):
        for n in range(5):  # one transaction, five recipients, one 421 at DATA
            auto.observe(reply("unusual rate", recipient=f"r{n}@x.test"))
        await settled(auto)
        assert await auto.active() == []
        for message in ("m2", "m3"):
            auto.observe(reply("unusual rate", message=message))
        await settled(auto)
        assert len(await auto.active()) == 1


async def test_matches_while_an_action_runs_do_not_count_towards_the_next(
    tmp_path: Path,
) -> None:
    clock = Clock()
    async with engine(tmp_path, THRESHOLD, clock) as (auto, _, suspensions):
        for n in range(20):  # a burst: the 3rd starts it, the other 17 come while it runs
            auto.observe(reply("unusual rate", message=f"m{n}"))
        await settled(auto)
        assert len(await auto.active()) == 1
        clock.now += 1800 + 5
        await auto.sync()
        assert await auto.active() == [] and suspensions.for_path("ip1", SITE) is None
        auto.observe(reply("unusual rate", message="late"))
        await settled(auto)
        assert await auto.active() == []


TWO_RULES = """
[sites."mx.x.test"]
[[sites."mx.x.test".automation]]
regex = 'TS04'
action = "suspend"
duration = "1h"
[[sites."mx.x.test".automation]]
regex = 'blocked'
action = "suspend"
duration = "10m"
"""


async def test_two_actions_on_one_path_hold_it_as_long_as_the_longer(tmp_path: Path) -> None:
    clock = Clock()
    async with engine(tmp_path, TWO_RULES, clock) as (auto, _, suspensions):
        auto.observe(reply("[TS04] deferred", message="m1"))
        await settled(auto)
        clock.now += 10
        auto.observe(reply("blocked for now", message="m2"))
        await settled(auto)
        assert len(await auto.active()) == 2
        clock.now += 700  # the 10-minute one ran out
        await auto.sync()
        assert len(await auto.active()) == 1
        suspended = suspensions.for_path("ip1", SITE)
        assert suspended is not None and suspended.until == 1000.0 + 3600
        clock.now += 3600
        await auto.sync()
        assert suspensions.for_path("ip1", SITE) is None


async def test_a_purge_never_hides_new_actions_from_another_worker(tmp_path: Path) -> None:
    clock = Clock()
    async with (
        engine(tmp_path, TWO_RULES, clock) as (one, _, _),
        engine(tmp_path, TWO_RULES, clock) as (two, _, suspensions),
    ):
        one.observe(reply("[TS04] deferred", message="m1"))
        await settled(one)
        clock.now += 3601
        await one.sync()
        await two.sync()
        clock.now += 86400
        await one.store.purge(clock.now - 3600)  # the ended action's row goes
        one.observe(reply("[TS04] deferred", message="m2", source="ip1"))
        one.observe(reply("[TS04] deferred", message="m3", source="ip2"))
        await settled(one)
        await two.sync()
        assert suspensions.for_path("ip1", SITE) is not None
        assert suspensions.for_path("ip2", SITE) is not None


AIMD = """
[sites."mx.x.test"]
max_message_rate = "100/m"
[sites."mx.x.test".adaptive_rate]
floor = "10/m"
ceiling = "1000/m"
every = "1m"
"""


async def test_an_adaptive_rate_backs_off_once_per_burst_and_never_passes_the_configured(
    tmp_path: Path,
) -> None:
    clock = Clock()
    async with engine(tmp_path, AIMD, clock) as (auto, dispatcher, _):
        for n in range(4):  # four connections told at once
            auto.observe(reply("rate limited", message=f"m{n}"))
        assert str(auto.rate_override("ip1", SITE)) == "50/m"  # from 100/m, the configured
        for step in range(1, 20):
            clock.now = 1000.0 + 61 * step
            auto.observe(reply("ok", kind=RecordType.DELIVERY))
        assert auto.rate_override("ip1", SITE) is None  # back to the configured 100/m
        assert dispatcher.rate_changes[-1] == ("ip1", SITE)


async def test_a_reload_of_the_files_ends_adaptive_rates(tmp_path: Path) -> None:
    async with engine(tmp_path, AIMD, Clock()) as (auto, dispatcher, _):
        auto.observe(reply("rate limited"))
        assert auto.rate_override("ip1", SITE) is not None
        dispatcher.reshape(policy_of('[sites."mx.x.test"]\nmax_message_rate = "20/m"\n'))
        assert auto.rate_override("ip1", SITE) is None


def test_a_full_queue_sends_jobs_back_for_part_of_its_drain_time_or_its_suspension() -> None:
    now = time.time()
    running = SimpleNamespace(suspension=None, drain_time=lambda: 0.0)
    assert 1.0 <= _back_off(running) <= 3.0  # type: ignore[arg-type]
    backlog = SimpleNamespace(suspension=None, drain_time=lambda: 100.0)  # 10,000 at 100/s
    assert 1.0 + 25 <= _back_off(backlog) <= 3.0 + 75  # type: ignore[arg-type]
    huge = SimpleNamespace(suspension=None, drain_time=lambda: 10_000.0)
    assert 301.0 <= _back_off(huge) <= 303.0  # type: ignore[arg-type]
    soon = SimpleNamespace(suspension=Suspension("source", "ip1", "TS04", now + 60, site=SITE))
    assert 60 - 1 <= _back_off(soon) <= 60 + 3  # type: ignore[arg-type]
    later = SimpleNamespace(suspension=Suspension("source", "ip1", "TS04", now + 3600))
    assert 300 <= _back_off(later) <= 303  # type: ignore[arg-type]


def test_retries_are_looked_up_only_when_some_layer_sets_them() -> None:
    assert not policy_of(AIMD).sets_retries
    assert policy_of('[providers.p]\nmatch_domains = ["x.test"]\nmax_age = "7d"\n').sets_retries
    assert policy_of('[default.sources.ip1]\nretry_interval = "1m"\n').sets_retries
    assert ShapingPolicy(defaults={"max_age": 3600.0}).sets_retries
