"""IP warm-up: schedules, allowances per UTC day and provider, the day boundary on an
injected clock, pauses on rates, the store keeping counts, and the engine holding or
spilling jobs over the allowance (on fakes: no sockets, no sleeping)."""

from __future__ import annotations

import datetime
import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from epoxi.api.peers import merge_pools
from epoxi.api_types import PoolList
from epoxi.config import Settings, warmup_of
from epoxi.delivery.pools import Pools
from epoxi.delivery.warmup import Warmup
from epoxi.events.records import Record, RecordType
from epoxi.queue.suspensions import SuspensionRegistry
from epoxi.shaping.warmup import SHIPPED, Profile, day_number, figure_at, next_day_at
from epoxi.store import db
from epoxi.store.db import store_path
from epoxi.store.warmup import WarmupStore
from epoxi.testing.fakes import ManualClock
from tests.unit.test_engine import Engine

START = datetime.date(2026, 11, 20)
SOURCES = [{"name": "ip10"}, {"name": "ip11"}, {"name": "ip20"}]
POOLS = [
    {"name": "bulk", "sources": ["ip10", "ip11"], "fallback": "spare"},
    {"name": "solo", "sources": ["ip10"], "fallback": "spare"},
    {"name": "spare", "sources": ["ip20"]},
    {"name": "default", "sources": ["ip20"]},
]
FIVE = {"days": {"1": 5, "2": 10, "4": 40}, "providers": {"google": {"1": 2, "2": 4}}}


def at(day: datetime.date, hour: int = 12, minute: int = 0) -> float:
    moment = datetime.datetime(day.year, day.month, day.day, hour, minute, tzinfo=datetime.UTC)
    return moment.timestamp()


def settings(warmup: dict[str, Any] | None = None, **delivery: Any) -> Settings:
    entry = {"start": START.isoformat(), "profile": "five", **(warmup or {})}
    return Settings.model_validate(
        {
            "hostname": "mx.sender.test",
            "delivery": {
                "sources": SOURCES,
                "pools": POOLS,
                "warmup_profiles": {"five": FIVE},
                "warmup": {"ip10": entry},
                "routes": [{"domains": ["*"], "hosts": ["192.0.2.1:25"]}],
                "defaults": {"idle_timeout": 0.01},
                **delivery,
            },
        }
    )


def warmup(config: Settings, clock: ManualClock, **options: Any) -> tuple[Warmup, Pools]:
    pools = Pools(config.delivery, SuspensionRegistry(clock), clock)
    return Warmup(config.delivery, pools, clock=clock, **options), pools


# --------------------------------------------------------------------- the schedule


def test_day_one_is_the_start_date_in_utc() -> None:
    assert day_number(START, at(START, 0, 0)) == 1
    assert day_number(START, at(START, 23, 59)) == 1
    assert day_number(START + datetime.timedelta(days=1), at(START, 23, 59)) == 0
    assert day_number(START, at(START + datetime.timedelta(days=9))) == 10
    assert next_day_at(at(START, 13)) == at(START + datetime.timedelta(days=1), 0, 0)


def test_a_day_keeps_the_last_listed_figure_and_after_the_last_day_there_is_no_cap() -> None:
    ramp = ((1, 5), (2, 10), (4, 40))
    assert [figure_at(ramp, day) for day in (0, 1, 2, 3, 4, 5)] == [5, 5, 10, 10, 40, None]
    profile = Profile("p", ramp, {"google": ((1, 2), (2, 4))})
    assert profile.allowance(1, "google") == (5, 2)
    assert profile.allowance(3, "google") == (10, None)  # google's ramp is over first
    assert profile.allowance(3, "yahoo") == (10, None)
    assert profile.allowance(5) == (None, None) and profile.last_day == 4


def test_the_shipped_profiles_ramp_up_and_cap_the_big_providers() -> None:
    for profile in SHIPPED.values():
        figures = [figure for _, figure in profile.overall]
        assert figures == sorted(figures) and figures[0] <= 200
        google = profile.allowance(1, "google")
        assert google[1] is not None and google[0] is not None and google[1] < google[0]
    assert SHIPPED["standard"].last_day == 14 and SHIPPED["conservative"].last_day == 28


# --------------------------------------------------------------------- settings


def test_a_pools_warmup_applies_to_each_of_its_sources_and_a_sources_own_wins() -> None:
    pool = {"start": "2026-11-01", "profile": "conservative"}
    own = {"start": "2026-11-20"}
    delivery = {"sources": SOURCES, "pools": POOLS, "warmup": {"bulk": pool, "ip10": own}}
    found = warmup_of(Settings.model_validate({"delivery": delivery}).delivery)
    assert {name: w.profile for name, w in found.items()} == {
        "ip10": "standard",
        "ip11": "conservative",
    }


@pytest.mark.parametrize(
    ("delivery", "complaint"),
    [
        ({"warmup": {"ip10": {"start": "2026-11-20", "profile": "fast"}}}, "warmup.ip10.profile"),
        ({"warmup": {"nope": {"start": "2026-11-20"}}}, "neither a source nor a pool"),
        ({"warmup": {"ip10": {"start": "someday"}}}, "start"),
        ({"warmup": {"ip10": {"start": "2026-11-20", "over_limit": "bounce"}}}, "over_limit"),
        ({"warmup": {"ip10": {"start": "2026-11-20", "pause_bounce_rate": 2}}}, "less than"),
        ({"warmup_profiles": {"standard": {"days": {"1": 5}}}}, "is a shipped profile"),
        ({"warmup_profiles": {"x": {"days": {}}}}, "at least one day"),
        ({"warmup_profiles": {"x": {"days": {"0": 5}}}}, "greater than or equal to 1"),
        ({"warmup_profiles": {"x": {"days": {"1": -5}}}}, "greater than or equal to 0"),
        (
            {
                "pools": [*POOLS, {"name": "other", "sources": ["ip10"]}],
                "warmup": {"bulk": {"start": "2026-11-20"}, "other": {"start": "2026-11-20"}},
            },
            "source ip10 is in pools bulk and other",
        ),
    ],
)
def test_bad_warmup_settings_are_refused_naming_the_key(
    delivery: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(ValidationError, match=re.escape(complaint)):
        Settings.model_validate({"delivery": {"sources": SOURCES, "pools": POOLS, **delivery}})


# --------------------------------------------------------------------- the allowance


def test_the_allowance_runs_out_at_23_59_and_is_fresh_at_midnight_utc() -> None:
    clock = ManualClock(at(START, 23, 58))
    found, _ = warmup(settings(), clock)
    assert [found.allow("ip10", None) for _ in range(6)] == [True] * 5 + [False]
    clock.now = at(START, 23, 59) + 59.9
    assert not found.allow("ip10", None)
    clock.now = at(START + datetime.timedelta(days=1), 0, 0)  # day 2: 10
    assert [found.allow("ip10", None) for _ in range(11)] == [True] * 10 + [False]
    info = found.info("ip10")
    assert info is not None
    assert (info.day, info.sent_today, info.allowed_today) == (2, 10, 10)


def test_each_provider_has_its_own_cap_inside_the_overall_one() -> None:
    clock = ManualClock(at(START))
    found, _ = warmup(settings(), clock)
    assert [found.allow("ip10", "google") for _ in range(3)] == [True, True, False]
    assert [found.allow("ip10", "yahoo") for _ in range(4)] == [True, True, True, False]
    assert found.allow("ip11", "google")  # no warm-up: no cap
    info = found.info("ip10")
    assert info is not None and info.sent_today == 5
    assert [(p.name, p.sent, p.allowed) for p in info.providers] == [
        ("google", 2, 2),
        ("yahoo", 3, None),
    ]


def test_before_the_start_day_ones_figures_apply_and_after_the_last_day_none() -> None:
    clock = ManualClock(at(START - datetime.timedelta(days=3)))
    found, _ = warmup(settings(), clock)
    assert sum(found.allow("ip10", None) for _ in range(9)) == 5
    clock.now = at(START + datetime.timedelta(days=4))  # day 5: the profile ended on day 4
    assert all(found.allow("ip10", None) for _ in range(100))
    info = found.info("ip10")
    assert info is not None and info.over and info.allowed_today is None


def test_each_worker_has_its_share_and_the_shares_add_up() -> None:
    clock = ManualClock(at(START))
    shares = []
    for worker in range(3):
        found, _ = warmup(settings(), clock, worker=worker, workers=3)
        shares.append(sum(found.allow("ip10", None) for _ in range(10)))
    assert shares == [2, 2, 1]


def test_a_reload_takes_a_new_profile_and_keeps_todays_count() -> None:
    clock = ManualClock(at(START))
    found, _ = warmup(settings(), clock)
    assert sum(found.allow("ip10", None) for _ in range(9)) == 5
    found.configure(settings(warmup={"profile": "standard"}).delivery)  # day 1: 200
    assert sum(found.allow("ip10", None) for _ in range(300)) == 195


# --------------------------------------------------------------------- pauses


def outcome(kind: RecordType, source: str = "ip10") -> Record:
    return Record(type=kind, message_id="m", source=source)


def test_a_warmup_pauses_itself_past_the_deferral_rate_and_an_operator_resumes_it() -> None:
    clock = ManualClock(at(START))
    found, pools = warmup(settings(warmup={"min_sample": 10}), clock)

    def feed(kind: RecordType, count: int) -> None:
        for _ in range(count):
            record = outcome(kind)
            pools.observe(record)
            found.observe(record)

    feed(RecordType.DELIVERY, 7)
    feed(RecordType.TRANSIENT_FAILURE, 2)  # 2 of 9: too few to judge
    assert not found.paused("ip10")
    feed(RecordType.TRANSIENT_FAILURE, 1)  # 3 of 10: 30% > 20%
    assert found.paused("ip10") and not found.allow("ip10", None)
    info = found.info("ip10")
    assert info is not None and info.paused
    assert (
        info.paused_reason == "deferral rate 30% over 20% in the last 10 minutes (3 of 10 attempts)"
    )
    assert found.resume("ip10") and found.allow("ip10", None)
    feed(RecordType.TRANSIENT_FAILURE, 5)  # the old window is not judged again at once
    assert not found.paused("ip10")
    clock.advance(11 * 60)
    feed(RecordType.DELIVERY, 5)
    feed(RecordType.BOUNCE, 5)  # 50% bounced
    assert found.pause_reason("ip10").startswith("bounce rate 50% over 10%")


def test_paused_in_the_configuration_lets_nothing_through_and_cannot_be_resumed() -> None:
    found, _ = warmup(settings(warmup={"paused": True}), ManualClock(at(START)))
    assert not found.allow("ip10", None) and not found.resume("ip10")
    assert found.pause_reason("ip10") == "paused in the configuration"


# --------------------------------------------------------------------- the store


async def test_todays_counts_and_pauses_survive_a_restart(tmp_path: Path) -> None:
    clock = ManualClock(at(START))
    path = store_path(tmp_path)
    first, _ = warmup(settings(), clock, store=WarmupStore(path))
    await first.start()
    assert sum(first.allow("ip10", "google") for _ in range(3)) == 2
    first.allow("ip10", None)
    first.pause("ip10", "blocklisted")
    await first.stop()

    again, _ = warmup(settings(), clock, store=WarmupStore(path))
    await again.start()
    assert again.pause_reason("ip10") == "blocklisted"
    again.resume("ip10")
    assert sum(again.allow("ip10", None) for _ in range(5)) == 2  # 3 of 5 were sent
    assert not again.allow("ip10", "google")
    await again.sync()
    other, _ = warmup(settings(), clock, store=WarmupStore(path, worker=1))
    await other.start()  # another worker: its own counts, the shared pauses
    assert not other.paused("ip10") and sum(other.allow("ip10", None) for _ in range(9)) == 5
    await other.stop()
    await again.stop()


# --------------------------------------------------------------------- the engine


def engine_with_warmup(config: Settings) -> Engine:
    engine = Engine(config)
    engine.clock.now = at(START)
    engine.dispatcher.warmup = Warmup(config.delivery, engine.pools, clock=engine.clock)
    return engine


async def test_jobs_over_the_allowance_wait_for_the_next_utc_day_and_never_bounce() -> None:
    engine = engine_with_warmup(settings(default_pool="solo"))
    try:
        for index in range(8):
            await engine.send(f"r{index}@a.test")
        await engine.records.wait(lambda r: r.type is RecordType.DELIVERY, 5)
        assert [s.source for s in engine.transport.sent] == ["ip10"] * 5
        held = engine.rescheduled
        tomorrow = at(START + datetime.timedelta(days=1), 0, 0)
        assert len(held) == 3 and all(tomorrow <= job.due <= tomorrow + 60 for job in held)
        assert not engine.records.of(RecordType.BOUNCE)
    finally:
        await engine.close()


async def test_with_spill_jobs_over_the_allowance_leave_through_the_fallback_pool() -> None:
    engine = engine_with_warmup(settings(default_pool="solo", warmup={"over_limit": "spill"}))
    try:
        for index in range(8):
            await engine.send(f"r{index}@a.test")
        await engine.records.wait(lambda r: r.type is RecordType.DELIVERY, 8)
        sent = sorted(s.source for s in engine.transport.sent)
        assert sent == ["ip10"] * 5 + ["ip20"] * 3
        spilled = engine.records.of(RecordType.REROUTED)
        assert len(spilled) == 3 and {(r.source, r.pool) for r in spilled} == {("ip20", "spare")}
        assert spilled[0].reason == (
            "source ip10 is over its warm-up allowance for today: sent through pool spare"
        )
        assert not engine.rescheduled
    finally:
        await engine.close()


# --------------------------------------------------------------------- over the workers


def test_admin_pools_adds_up_the_workers_counts_and_shares() -> None:
    clock = ManualClock(at(START))
    parts = []
    for worker, (sent, deferred) in enumerate(((3, 1), (1, 3))):
        found, pools = warmup(settings(), clock, worker=worker, workers=2)
        for _ in range(sent):
            found.allow("ip10", "google")
        for kind in [RecordType.DELIVERY] * 4 + [RecordType.TRANSIENT_FAILURE] * deferred:
            pools.observe(outcome(kind))
        if worker:
            found.pause("ip10", "blocklisted")
        snapshot = pools.snapshot()
        for pool in snapshot:
            for source in pool.sources:
                source.warmup = found.info(source.name)
        parts.append(PoolList(pools=snapshot))
    merged = merge_pools(parts)
    [ip10] = [s for p in merged.pools if p.name == "bulk" for s in p.sources if s.name == "ip10"]
    info = ip10.warmup
    assert info is not None
    assert (info.sent_today, info.allowed_today) == (2, 5)  # google's share: 1 of 2 each
    assert [(p.name, p.sent, p.allowed) for p in info.providers] == [("google", 2, 2)]
    assert (ip10.deferred, info.deferral_rate) == (4, 4 / 12)
    assert info.paused and info.paused_reason == "blocklisted"


def test_a_store_of_schema_1_gains_the_warmup_tables(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    with sqlite3.connect(path) as old:
        for sql in db._STEPS[1]:
            old.execute(sql)
        old.execute("PRAGMA user_version=1")
    old.close()
    conn = db.connect(path)
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert {"warmup_sent", "warmup_paused", "messages"} <= tables
    assert conn.execute("PRAGMA user_version").fetchone()[0] == db.SCHEMA_VERSION
    conn.close()


async def test_stopping_a_warmup_whose_store_never_started_writes_nothing(tmp_path: Path) -> None:
    found, _ = warmup(settings(), ManualClock(at(START)), store=WarmupStore(store_path(tmp_path)))
    assert found.allow("ip10", None)
    await found.stop()  # Epoxi.stop after a start that failed early
    assert not store_path(tmp_path).exists()
