"""Shaping files on a running node, over real sockets: the provider match and `shaping
resolve`, live edits (and refused ones), automation on receivers' replies (a path suspended
by a `421 [TS04]`, surviving a restart; thresholds; set_config; bounces), adaptive rates."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from epoxi.events.records import Record, RecordType
from epoxi.smtp.replies import Reply
from tests.e2e.conftest import Api, World, send

SITE = "mx1.a.test,mx2.a.test"  # a.test's MX hosts: the site its ready queues are named by
SOURCES = [
    {"name": "ip10", "bind": "127.0.0.10", "ehlo": "mta10.sender.test"},
    {"name": "ip11", "bind": "127.0.0.11", "ehlo": "mta11.sender.test"},
]
TS04 = Reply(421, "4.7.0", "[TS04] Messages from 127.0.0.10 temporarily deferred")


def shaping_file(tmp_path: Path, text: str, name: str = "shaping.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "epoxi", *args], capture_output=True, text=True, timeout=60
    )


def api_url(world: World) -> str:
    assert world.app.http is not None
    host, port = world.app.http.addresses[0]
    return f"http://{host}:{port}"


async def until(check: Callable[[], Any], timeout: float = 15.0) -> Any:
    """Wait for ``check()`` to be truthy (polling; the node works meanwhile)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if asyncio.iscoroutine(found):
            found = await found
        if found:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


async def ready_queue(client: httpx.AsyncClient, source: str = "") -> dict[str, Any] | None:
    ready = (await client.get("/admin/pipelines")).json()["ready"]
    found = [q for q in ready if q["site"] == SITE and (not source or q["source"] == source)]
    return found[0] if found else None


def deliveries(world: World, source: str | None = None) -> list[Record]:
    return [
        r
        for r in world.records
        if r.type is RecordType.DELIVERY and (source is None or r.source == source)
    ]


# --------------------------------------------------------------------- files and resolve


async def test_a_providers_mx_suffix_gives_its_values_and_resolve_says_from_where(
    api: Api, tmp_path: Path
) -> None:
    base = shaping_file(
        tmp_path,
        """
        [default]
        connection_limit = 7
        [providers.acme]
        match_mx_suffix = ["a.test"]
        max_message_rate = "600/m"
        connection_limit = 2
        [providers.acme.sources.ip10]
        max_connection_rate = "5/s"
        [domains."shared.test"]
        max_recipients_per_transaction = 10
        """,
        "base.toml",
    )
    mine = shaping_file(tmp_path, "[providers.acme]\nconnection_limit = 1\n", "mine.toml")
    world, client = await api(shaping_files=[str(base), str(mine)], delivery={"sources": SOURCES})
    answer = await client.get("/admin/shaping/resolve", params={"domain": "a.test"})
    assert answer.status_code == 200, answer.text
    found = answer.json()
    settings = {s["name"]: (s["value"], s["origin"]) for s in found["settings"]}
    assert (found["site"], found["provider"]) == (SITE, "acme")
    assert settings["connection_limit"] == (1, f"provider acme ({mine})")
    assert settings["max_message_rate"] == ("600/m", f"provider acme ({base})")
    assert settings["idle_timeout"] == (0.5, "delivery.defaults")  # the test world's own
    assert settings["max_connection_rate"] == (None, "built-in")
    # shared.test has MX hosts under a.test too: the provider's, then its own domain block
    shared = (
        await client.get(
            "/admin/shaping/resolve", params={"domain": "shared.test", "source": "ip10"}
        )
    ).json()
    by_name = {s["name"]: (s["value"], s["origin"]) for s in shared["settings"]}
    assert shared["provider"] == "acme"
    assert by_name["max_recipients_per_transaction"] == (10, f"domain shared.test ({base})")
    assert by_name["max_connection_rate"] == ("5/s", f"provider acme ({base}) source ip10")
    # the live ready queue took the provider's values
    await send(world, ["x@a.test"])
    await world.wait_records(RecordType.DELIVERY, 1)
    queue = await ready_queue(client)
    assert queue is not None
    assert (queue["connection_limit"], queue["max_message_rate"]) == (1, "600/m")
    # and the CLI prints the same, as a table and as JSON
    shown = await asyncio.to_thread(
        cli, "shaping", "resolve", "a.test", "--source", "ip10", "--url", api_url(world)
    )
    assert shown.returncode == 0, shown.stderr
    assert "provider" in shown.stdout and "acme" in shown.stdout
    assert "connection_limit" in shown.stdout and "mine.toml" in shown.stdout
    as_json = await asyncio.to_thread(
        cli, "shaping", "resolve", "a.test", "--url", api_url(world), "--json"
    )
    assert json.loads(as_json.stdout)["provider"] == "acme"
    unknown = await client.get(
        "/admin/shaping/resolve", params={"domain": "a.test", "source": "nope"}
    )
    assert unknown.status_code == 422 and "no egress source 'nope'" in unknown.text


# --------------------------------------------------------------------- live edits


async def test_an_edit_changes_the_live_rate_at_the_sink_and_a_bad_edit_is_refused(
    api: Api, tmp_path: Path
) -> None:
    path = shaping_file(tmp_path, '[domains."a.test"]\nmax_message_rate = "100/s"\n')
    world, client = await api(shaping_files=[str(path)], shaping_watch_interval=0.05)
    await send(world, ["x@a.test"])
    await world.wait_records(RecordType.DELIVERY, 1)
    before = await ready_queue(client)
    assert before is not None and before["max_message_rate"] == "100/s"

    path.write_text('[domains."a.test"]\nmax_message_rate = "4/s"\n')  # picked up by itself

    async def reshaped() -> bool:
        queue = await ready_queue(client)
        return queue is not None and queue["max_message_rate"] == "4/s"

    await until(reshaped)
    await send(world, ["x@a.test"], count=9)
    done = await world.wait_records(RecordType.DELIVERY, 10)
    paced = sorted(r.timestamp for r in done[1:])
    # 9 messages at 4 per second: at least 8 intervals of 0.25 s between the first and last
    assert paced[-1] - paced[0] >= 8 / 4 - 0.05, paced
    after = await ready_queue(client)
    assert after is not None and after["name"] == before["name"]  # the same queue, reshaped
    assert sum(len(s.messages) for s in world.sinks.values()) == 10

    path.write_text('[domains."a.test"]\nmax_message_rate = "fast"\n')  # invalid
    refused = await client.post("/admin/shaping/reload", json={})
    assert refused.status_code == 422, refused.text
    assert "running files are kept" in refused.text and "max_message_rate" in refused.text
    queue = await ready_queue(client)
    assert queue is not None and queue["max_message_rate"] == "4/s"
    checked = await asyncio.to_thread(cli, "shaping", "check", str(path))
    assert checked.returncode == 1 and "max_message_rate" in checked.stderr

    path.write_text('[domains."a.test"]\nmax_message_rate = "50/s"\n')
    reloaded = await asyncio.to_thread(cli, "shaping", "reload", "--url", api_url(world))
    assert reloaded.returncode == 0 and str(path) in reloaded.stdout
    queue = await ready_queue(client)
    assert queue is not None and queue["max_message_rate"] == "50/s"


# --------------------------------------------------------------------- automation


def throttling(flag: dict[str, bool], peer: str = "127.0.0.10", reply: Reply = TS04) -> Any:
    """A receiver that answers ``reply`` to one sending address while ``flag["on"]``."""

    def answer(client: str, recipient: str) -> Reply | None:
        return reply if flag["on"] and client == peer else None

    return answer


async def throttled(
    api: Api, tmp_path: Path, rules: str, reply: Reply = TS04, sources: int = 1, **delivery: Any
) -> tuple[World, httpx.AsyncClient, dict[str, bool]]:
    """A node with the shaping file ``rules`` and ``sources`` egress sources, whose receiver
    answers ``reply`` to 127.0.0.10 while the returned flag's "on" is true."""
    flag = {"on": True}
    world, client = await api(
        shaping_files=[str(shaping_file(tmp_path, rules))],
        delivery={"sources": SOURCES[:sources], **delivery},
        sink_options={"rcpt_answer": throttling(flag, reply=reply)},
    )
    return world, client, flag


async def test_ts04_suspends_that_path_only_which_resumes_after_the_duration_and_a_restart(
    api: Api, tmp_path: Path
) -> None:
    world, client, flag = await throttled(
        api,
        tmp_path,
        """
        [providers.yahooish]
        match_mx_suffix = ["a.test"]
        [[providers.yahooish.automation]]
        regex = '\\[TS04\\]'
        action = "suspend"
        trigger = "immediate"
        duration = "4s"
        """,
        sources=2,
    )
    await send(world, ["x@a.test"], count=30)
    [started] = await world.wait_records(RecordType.AUTOMATION, 1)
    assert "suspend on path ip10->" + SITE in started.reason and "[TS04]" in started.reason
    # ip11 goes on delivering its share; ip10's wait in their (suspended) queue
    ip11 = await world.wait_records(RecordType.DELIVERY, 1, where=lambda r: r.source == "ip11")
    assert ip11 and not deliveries(world, "ip10")
    held = await ready_queue(client, "ip10")
    assert held is not None and held["suspended"] and "automation" in held["suspended"]
    active = (await client.get("/admin/shaping")).json()["active"]
    assert [(a["action"], a["source"], a["site"]) for a in active] == [("suspend", "ip10", SITE)]

    await world.restart()  # the action is in the store: still in force
    assert [a.source for a in await world.app.automation.active()] == ["ip10"]
    suspended = world.app.suspensions.for_path("ip10", SITE)
    assert suspended is not None and suspended.site == SITE
    assert world.app.suspensions.for_path("ip11", SITE) is None
    flag["on"] = False  # the receiver is happy again; the suspension still runs its time
    await world.wait_records(
        RecordType.AUTOMATION, 1, timeout=20, where=lambda r: "ended (expired)" in r.reason
    )
    await until(lambda: len(deliveries(world)) >= 30, timeout=30)
    late = deliveries(world, "ip10")
    assert late and min(r.timestamp for r in late) >= started.timestamp + 4
    assert not [r for r in world.records if r.type is RecordType.BOUNCE]


async def test_a_threshold_rule_acts_at_its_nth_match_and_set_config_caps_the_path(
    api: Api, tmp_path: Path
) -> None:
    slow = Reply(451, "4.7.1", "please slow down")
    world, client, _ = await throttled(
        api,
        tmp_path,
        """
        [domains."a.test"]
        connection_limit = 4
        [[domains."a.test".automation]]
        regex = '^451 4\\.7\\.1 .*slow down'
        action = "set_config"
        name = "connection_limit"
        value = 1
        trigger = "3/h"
        duration = "1h"
        """,
        reply=slow,
        retry_interval=30,
    )
    for n in (1, 2):
        await send(world, [f"x{n}@a.test"])
        await world.wait_records(RecordType.TRANSIENT_FAILURE, n)
    assert not await world.app.automation.active()
    queue = await ready_queue(client)
    assert queue is not None and queue["connection_limit"] == 4
    await send(world, ["x3@a.test"])
    [started] = await world.wait_records(RecordType.AUTOMATION, 1)
    assert "set_config connection_limit=1" in started.reason and "trigger 3/h" in started.reason

    async def capped() -> bool:
        found = await ready_queue(client)
        return found is not None and found["connection_limit"] == 1

    await until(capped)
    resolved = (
        await client.get("/admin/shaping/resolve", params={"domain": "a.test", "source": "ip10"})
    ).json()
    origin = {s["name"]: s["origin"] for s in resolved["settings"]}["connection_limit"]
    assert origin.startswith("automation domain a.test")
    # an operator lifts it: the configured limit is back
    [action] = await world.app.automation.active()
    shown = await asyncio.to_thread(cli, "shaping", "active", "--url", api_url(world))
    assert action.id in shown.stdout and "connection_limit=1" in shown.stdout
    lifted = await asyncio.to_thread(cli, "shaping", "lift", action.id, "--url", api_url(world))
    assert lifted.returncode == 0, lifted.stderr

    async def restored() -> bool:
        found = await ready_queue(client)
        return found is not None and found["connection_limit"] == 4

    await until(restored)
    await world.wait_records(
        RecordType.AUTOMATION, 1, where=lambda r: "lifted by an operator" in r.reason
    )
    missing = await client.delete(f"/admin/shaping/automation/{action.id}")
    assert missing.status_code == 404


async def test_bounce_tenant_removes_that_tenants_waiting_mail_for_the_site_only(
    api: Api, tmp_path: Path
) -> None:
    blocked = Reply(450, "5.7.1", "tenant content blocked")
    world, _, flag = await throttled(
        api,
        tmp_path,
        """
        [domains."a.test"]
        [[domains."a.test".automation]]
        regex = '5\\.7\\.1 .*blocked'
        action = "bounce_tenant"
        duration = "1h"
        """,
        reply=blocked,
        retry_interval=60,
    )
    tenant = b"X-Epoxi-Tenant: spammy\r\nSubject: s\r\n\r\nHi.\r\n"
    other = b"X-Epoxi-Tenant: good\r\nSubject: s\r\n\r\nHi.\r\n"
    await send(world, ["x@a.test"], body=tenant)
    await world.wait_records(RecordType.AUTOMATION, 1)
    [bounced] = await world.wait_records(RecordType.ADMIN_BOUNCE, 1)  # the deferred one
    assert "automation" in bounced.reason and bounced.recipient == "x@a.test"
    flag["on"] = False
    await send(world, ["y@a.test"], body=tenant)  # more of it while the action lasts
    await send(world, ["z@a.test"], body=other)
    await world.wait_records(RecordType.ADMIN_BOUNCE, 2)
    [delivered] = await world.wait_records(RecordType.DELIVERY, 1)
    assert delivered.recipient == "z@a.test"


# --------------------------------------------------------------------- adaptive rates


async def test_rate_deferrals_halve_the_path_rate_and_deliveries_bring_it_back(
    api: Api, tmp_path: Path
) -> None:
    rate = Reply(451, "4.7.28", "Our system has detected an unusual rate of mail")
    world, client, flag = await throttled(
        api,
        tmp_path,
        """
        [domains."a.test"]
        max_message_rate = "40/s"
        [domains."a.test".adaptive_rate]
        floor = "5/s"
        ceiling = "40/s"
        decrease = 0.5
        increase = "10/s"
        every = "0.2s"
        """,
        reply=rate,
        retry_interval=0.2,
        max_retry_interval=0.2,
    )
    await send(world, ["x@a.test"])  # deferred every 0.2 s; the rate halves once a second

    async def adaptive() -> str | None:
        queue = await ready_queue(client)
        return queue["adaptive_message_rate"] if queue else None

    async def at_floor() -> bool:
        return await adaptive() == "5/s"  # 40 -> 20 -> 10 -> 5, and not below

    await until(at_floor, timeout=20)
    shown = (await client.get("/admin/shaping")).json()["adaptive"]
    assert [(a["configured"], a["current"], a["floor"]) for a in shown] == [("40/s", "5/s", "5/s")]
    flag["on"] = False
    # back up by 10/s every 0.2 s of deliveries, to the configured 40/s: then no override
    await send(world, ["y@a.test"], count=40)
    await world.wait_records(RecordType.DELIVERY, 41, timeout=30)
    await until(lambda: world.app.automation.rate_override("ip10", SITE) is None, timeout=10)
    queue = await ready_queue(client)
    assert queue is not None and queue["adaptive_message_rate"] is None
    assert queue["max_message_rate"] == "40/s"


async def test_a_domains_retry_schedule_and_max_age_come_from_its_shaping(
    api: Api, tmp_path: Path
) -> None:
    path = shaping_file(
        tmp_path,
        '[domains."a.test"]\nretry_interval = "0.2s"\nmax_retry_interval = "0.2s"\n'
        'max_age = "1.5s"\n',
    )
    world, _ = await api(
        shaping_files=[str(path)],
        delivery={"retry_interval": 600, "max_retry_interval": 600, "max_age": 86400},
    )
    await send(world, ["tempfail@a.test"])
    [expired] = await world.wait_records(RecordType.EXPIRATION, 1, timeout=20)
    failures = [r for r in world.records if r.type is RecordType.TRANSIENT_FAILURE]
    assert len(failures) >= 3  # retried every 0.2 s, not every 10 minutes
    assert "expired after" in expired.reason
    [reception] = [r for r in world.records if r.message_id == expired.message_id][:1]
    assert reception.type is RecordType.RECEPTION  # (the DSN is another message)
    # the age counts from receipt, which is before the Reception record by the spool commit
    assert expired.timestamp - reception.timestamp >= 1.5 - 0.1


async def test_suspend_campaign_holds_that_campaigns_mail_for_the_site_until_it_ends(
    api: Api, tmp_path: Path
) -> None:
    world, client, flag = await throttled(
        api,
        tmp_path,
        """
        [domains."a.test"]
        [[domains."a.test".automation]]
        regex = 'complaints'
        action = "suspend_campaign"
        duration = "2s"
        """,
        reply=Reply(451, "4.7.1", "complaints"),
    )
    spring = b"X-Epoxi-Campaign: spring\r\nSubject: s\r\n\r\nHi.\r\n"
    await send(world, ["x@a.test"], body=spring)
    [started] = await world.wait_records(RecordType.AUTOMATION, 1)
    assert "suspend_campaign on campaign spring on " + SITE in started.reason
    flag["on"] = False
    await send(world, ["y@a.test"], body=spring)  # held: its campaign is suspended there
    await send(world, ["z@a.test"])  # no campaign: goes
    [first] = await world.wait_records(RecordType.DELIVERY, 1)
    assert first.recipient == "z@a.test"
    await world.wait_records(RecordType.SUSPENDED, 1, where=lambda r: r.recipient == "y@a.test")
    pipelines = (await client.get("/admin/pipelines")).json()
    assert any(s["target"] == "campaign" and s["site"] == SITE for s in pipelines["suspensions"])
    done = await world.wait_records(RecordType.DELIVERY, 3, timeout=20)
    late = [r for r in done if r.recipient in ("x@a.test", "y@a.test")]
    assert len(late) == 2 and min(r.timestamp for r in late) >= started.timestamp + 2
