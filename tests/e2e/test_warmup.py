"""IP warm-up on real sockets: a source sends its day's allowance to the sinks and no more,
the rest waits (never bounced) or leaves from the fallback pool's source, /admin/pools and
`epoxi pool ls` show the progress, operators pause and resume, a restart keeps the count."""

from __future__ import annotations

import asyncio
import datetime
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from epoxi.events.records import RecordType
from epoxi.testing.sink import Sink
from tests.conftest import eventually
from tests.e2e import test_workers as workers
from tests.e2e.conftest import Api, MakeWorld, World, send

SOURCES = [
    {"name": "ip10", "bind": "127.0.0.10", "ehlo": "mta10.sender.test"},
    {"name": "ip20", "bind": "127.0.0.20", "ehlo": "mta20.sender.test"},
]
POOLS = [
    {"name": "warm", "sources": ["ip10"], "fallback": "spare"},
    {"name": "spare", "sources": ["ip20"]},
]
EHLO = {s["bind"]: s["ehlo"] for s in SOURCES}
FIVE_A_DAY = {"days": {"1": 5, "30": 5}}


def warming(**warmup: Any) -> dict[str, Any]:
    today = datetime.datetime.now(datetime.UTC).date().isoformat()
    return {
        "delivery": {
            "sources": SOURCES,
            "pools": POOLS,
            "default_pool": "warm",
            "warmup_profiles": {"five": FIVE_A_DAY},
            "warmup": {"ip10": {"start": today, "profile": "five", **warmup}},
        }
    }


def peers(world: World) -> Counter[str]:
    return Counter(m.peer for sink in world.sinks.values() for m in sink.messages)


async def held(client: httpx.AsyncClient, count: int, timeout: float = 15.0) -> dict[str, Any]:
    """The pipelines once ``count`` jobs are scheduled (held back), polled."""
    deadline = time.monotonic() + timeout
    while True:
        found: dict[str, Any] = (await client.get("/admin/pipelines")).json()
        if found["totals"]["scheduled"] >= count or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.02)


async def warmup_of(client: httpx.AsyncClient, source: str = "ip10") -> dict[str, Any]:
    pools = (await client.get("/admin/pools")).json()["pools"]
    found = next(s for p in pools for s in p["sources"] if s["name"] == source)
    return found["warmup"]  # type: ignore[no-any-return]


async def test_a_source_sends_its_allowance_and_the_rest_waits_for_tomorrow(api: Api) -> None:
    world, client = await api(**warming())
    await send(world, ["x@a.test"], count=8)
    await world.wait_records(RecordType.DELIVERY, 5)
    pipelines = await held(client, 3)
    assert pipelines["totals"]["scheduled"] == 3
    midnight = (int(time.time()) // 86400 + 1) * 86400
    [queue] = pipelines["scheduled"]
    assert midnight <= queue["next_due"] <= midnight + 60
    assert peers(world) == {"127.0.0.10": 5}
    assert not [r for r in world.records if r.type is RecordType.BOUNCE]
    warmup = await warmup_of(client)
    assert (warmup["profile"], warmup["day"], warmup["configured_as"]) == ("five", 1, "ip10")
    assert (warmup["sent_today"], warmup["allowed_today"], warmup["paused"]) == (5, 5, False)
    metrics = (await client.get("/metrics")).text
    assert "epoxi_warmup_sent_today 5.0" in metrics
    assert "epoxi_warmup_over_allowance 3.0" in metrics
    host, port = world.app.http.addresses[0]  # type: ignore[union-attr]
    shown = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "epoxi", "pool", "ls", "--url", f"http://{host}:{port}"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "300"},
    )
    assert shown.returncode == 0, shown.stderr
    assert "five day 1/30: 5/5 sent" in shown.stdout


async def test_with_spill_the_rest_leaves_from_the_fallback_pools_source(api: Api) -> None:
    world, client = await api(**warming(over_limit="spill"))
    await send(world, ["x@a.test"], count=8)
    await world.wait_records(RecordType.DELIVERY, 8)
    assert peers(world) == {"127.0.0.10": 5, "127.0.0.20": 3}
    for sink in world.sinks.values():
        assert all(m.helo == EHLO[m.peer] for m in sink.messages)
    spilled = [r for r in world.records if r.type is RecordType.REROUTED]
    assert [(r.source, r.pool) for r in spilled] == [("ip20", "spare")] * 3
    assert spilled[0].reason == (
        "source ip10 is over its warm-up allowance for today: sent through pool spare"
    )
    assert (await warmup_of(client))["sent_today"] == 5


async def test_an_operator_pauses_and_resumes_a_warmup_over_the_api_and_the_cli(
    api: Api,
) -> None:
    world, client = await api(**warming(over_limit="spill"))
    answer = await client.post("/admin/warmup/ip10/pause", json={"reason": "checking SNDS"})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"source": "ip10", "paused": True, "paused_reason": "checking SNDS"}
    await send(world, ["x@a.test"], count=2)
    await world.wait_records(RecordType.DELIVERY, 2)
    assert peers(world) == {"127.0.0.20": 2}  # paused: spilled
    spilled = [r for r in world.records if r.type is RecordType.REROUTED]
    assert spilled[0].reason.startswith("source ip10: warm-up paused (checking SNDS)")
    assert (await client.post("/admin/warmup/ip20/pause", json={})).status_code == 404
    host, port = world.app.http.addresses[0]  # type: ignore[union-attr]
    url = f"http://{host}:{port}"
    resumed = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "epoxi", "pool", "warmup", "resume", "ip10", "--url", url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "warm-up of ip10 running" in resumed.stdout
    await send(world, ["x@a.test"], count=1)
    await world.wait_records(RecordType.DELIVERY, 3)
    assert peers(world) == {"127.0.0.20": 2, "127.0.0.10": 1}


async def test_todays_count_survives_a_restart(make_world: MakeWorld) -> None:
    world: World = await make_world(**warming())
    await send(world, ["x@a.test"], count=3)
    await world.wait_records(RecordType.DELIVERY, 3)
    await world.app.stop()  # writes the counts it has not written yet
    world.app.stop = _stopped  # type: ignore[method-assign]  # the fixture stops it again
    again: World = await make_world(**warming())
    await send(again, ["x@a.test"], count=4)
    await again.wait_records(RecordType.DELIVERY, 2)
    info = again.app.warmup.info("ip10")
    assert info is not None and (info.sent_today, info.allowed_today) == (5, 5)
    assert peers(again) == {"127.0.0.10": 2}


async def _stopped() -> None:
    pass


async def test_with_two_workers_each_has_its_share_and_the_api_adds_them_up(
    tmp_path: Path,
) -> None:
    today = datetime.datetime.now(datetime.UTC).date().isoformat()
    config = (
        '[[delivery.sources]]\nname = "ip10"\nbind = "127.0.0.10"\nehlo = "mta10.test"\n'
        f'[delivery.warmup.ip10]\nstart = {today}\nprofile = "ten"\n'
        '[delivery.warmup_profiles.ten]\ndays = { "1" = 10, "30" = 10 }\n'
    )
    async with Sink("127.0.0.1") as sink:
        process = await workers.start(tmp_path, 2, config, env={"EPOXI_SMTP_PORT": str(sink.port)})
        try:
            sent = await workers.send_evenly(process)  # 12 or more to each worker: over 5
            await sink.wait_for(10, timeout=30)

            def warmup() -> dict[str, Any]:
                pools = workers.api(process, "GET", "/admin/pools").json()["pools"]
                return pools[0]["sources"][0]["warmup"]  # type: ignore[no-any-return]

            def waiting() -> int:
                totals = workers.api(process, "GET", "/admin/pipelines").json()["totals"]
                return int(totals["scheduled"])

            await eventually(lambda: waiting() == sent - 10, 15, "the rest waiting")
            found = warmup()
            assert (found["sent_today"], found["allowed_today"]) == (10, 10)
            assert sink.received == 10
            reply = workers.api(process, "POST", "/admin/warmup/ip10/pause", json={})
            assert reply.json()["paused_reason"] == "paused by an operator"
            await eventually(lambda: warmup()["paused"], 5, "the pause on both workers")
        finally:
            await workers.stop(process)


async def test_a_warmup_pauses_itself_when_receivers_defer_too_much(api: Api) -> None:
    world, client = await api(**warming(over_limit="spill", min_sample=6, pause_deferral_rate=0.2))
    await send(world, ["x@a.test"], count=4)
    await world.wait_records(RecordType.DELIVERY, 4)
    await send(world, ["tempfail-1@a.test", "tempfail-2@a.test"])  # 2 of 6 deferred: 33 %
    await world.wait_records(RecordType.TRANSIENT_FAILURE, 2, where=lambda r: r.source == "ip10")
    warmup = await warmup_of(client)
    assert warmup["paused"] and warmup["deferral_rate"] >= 2 / 6
    assert warmup["paused_reason"] == (
        "deferral rate 33% over 20% in the last 10 minutes (2 of 6 attempts)"
    )
    await send(world, ["y@a.test"])
    await world.wait_records(RecordType.DELIVERY, 5)
    assert peers(world) == {"127.0.0.10": 4, "127.0.0.20": 1}  # paused: spilled


async def test_a_reload_applies_new_warmup_settings_and_keeps_todays_count(api: Api) -> None:
    world, client = await api(**warming())
    await send(world, ["x@a.test"], count=5)
    await world.wait_records(RecordType.DELIVERY, 5)
    settings = world.app.settings
    entry = settings.delivery.warmup["ip10"].model_copy(update={"profile": "standard"})
    delivery = settings.delivery.model_copy(update={"warmup": {"ip10": entry}})
    world.app.reload(settings.model_copy(update={"delivery": delivery}))
    await send(world, ["x@a.test"], count=2)
    await world.wait_records(RecordType.DELIVERY, 7)
    warmup = await warmup_of(client)
    assert (warmup["profile"], warmup["sent_today"], warmup["allowed_today"]) == (
        "standard",
        7,
        200,
    )
