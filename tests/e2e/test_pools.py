"""Egress sources and pools on real sockets: each source binds its own loopback address and
says its own EHLO name, the sinks see which one each message came from, weights hold over
thousands of messages, and suspension, failing sources and fallback leave their records."""

from __future__ import annotations

import asyncio
import json
import os
import smtplib
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from epoxi.dkim import generate
from epoxi.events.records import RecordType
from tests.e2e.conftest import Api, World, message_request, send

SOURCES = [
    {"name": "ip10", "bind": "127.0.0.10", "ehlo": "mta10.sender.test"},
    {"name": "ip11", "bind": "127.0.0.11", "ehlo": "mta11.sender.test"},
    {"name": "ip20", "bind": "127.0.0.20", "ehlo": "mta20.sender.test"},
    {"name": "gone", "bind": "192.0.2.55", "ehlo": "gone.sender.test"},  # not on this machine
]
POOLS = [
    {"name": "bulk", "sources": {"ip10": 3, "ip11": 1}, "fallback": "spare"},
    {"name": "spare", "sources": ["ip20"]},
    {"name": "shaky", "sources": ["gone", "ip11"]},
    {"name": "default", "sources": ["ip20"]},
]
EHLO = {s["bind"]: s["ehlo"] for s in SOURCES}


def pooled(**delivery: Any) -> dict[str, Any]:
    return {"delivery": {"sources": SOURCES, "pools": POOLS, **delivery}}


def body(pool: str | None = None) -> bytes:
    control = f"X-Epoxi-Pool: {pool}\r\n" if pool else ""
    return f"{control}Subject: pools\r\nFrom: s@sender.test\r\n\r\nHi.\r\n".encode()


def peers(world: World) -> Counter[str]:
    """Messages received by the sinks, by the address they came from."""
    return Counter(m.peer for sink in world.sinks.values() for m in sink.messages)


def assert_each_source_said_its_own_name(world: World) -> None:
    for sink in world.sinks.values():
        for message in sink.messages:
            assert message.helo == EHLO[message.peer], (message.peer, message.helo)


async def test_weights_hold_and_each_source_binds_its_address_and_says_its_name(
    api: Api,
) -> None:
    world, client = await api(**pooled(tenant_pools={"acme": "spare"}))
    await send(world, ["x@a.test"], body=body("bulk"), count=2000)
    await send(world, ["y@a.test"], body=body(), count=20)  # the default pool
    tenant = await client.post("/messages", json={**message_request(), "tenant": "acme"})
    chosen = await client.post("/messages", json={**message_request(), "ip_pool": "bulk"})
    assert (tenant.status_code, chosen.status_code) == (202, 202)
    await world.wait_records(RecordType.DELIVERY, 2022, timeout=60)
    # Rendezvous hashing of message ids: 3:1 on average. Of 2,001 messages, 1,500.75 expected
    # from ip10 (binomial sd 19.4); the tolerance is 4 sd, 78 messages either way.
    counts = peers(world)
    assert counts["127.0.0.10"] + counts["127.0.0.11"] == 2001 and counts["127.0.0.20"] == 21
    assert abs(counts["127.0.0.10"] - 1500.75) <= 78, counts
    assert_each_source_said_its_own_name(world)


async def test_each_attempt_shows_its_source_pool_and_dkim_signatures(
    api: Api, tmp_path: Path
) -> None:
    key = tmp_path / "e2026.pem"
    key.write_bytes(generate("ed25519"))
    signing = {"keys": [{"domain": "sender.test", "selector": "e2026", "key_file": str(key)}]}
    world, client = await api(**pooled(), dkim=signing)
    chosen = await client.post("/messages", json={**message_request(), "ip_pool": "spare"})
    await world.wait_records(RecordType.DELIVERY, 1)
    message_id = chosen.json()["messages"][0]["id"]
    status = (await client.get(f"/messages/{message_id}")).json()
    [delivery] = [e for e in status["events"] if e["type"] == "Delivery"]
    assert (delivery["pool"], delivery["source"], delivery["attempt"]) == ("spare", "ip20", 1)
    assert delivery["dkim"].startswith("d=sender.test s=e2026 a=ed25519-sha256")


async def test_an_unknown_pool_is_refused_over_smtp_and_the_api(api: Api) -> None:
    world, client = await api(**pooled())

    def refused() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", world.port, timeout=20) as smtp:
            smtp.ehlo("client.test")
            smtp.mail("s@sender.test")
            smtp.rcpt("x@a.test")
            return smtp.data(body("nope"))

    code, text = await asyncio.to_thread(refused)
    assert (code, text[:5]) == (550, b"5.3.5") and b"'nope'" in text
    answer = await client.post("/messages", json={**message_request(), "ip_pool": "nope"})
    assert answer.status_code == 422
    assert "no egress pool 'nope'" in json.dumps(answer.json())
    assert not [r for r in world.records if r.type is RecordType.RECEPTION]


async def test_suspended_sources_send_their_pool_to_its_fallback_with_a_record(
    api: Api,
) -> None:
    world, client = await api(**pooled())
    for source in ("ip10", "ip11"):
        answer = await client.post(
            "/admin/suspend", json={"source": source, "reason": "listed at a blocklist"}
        )
        assert answer.status_code == 200
    [message_id] = await send(world, ["x@a.test"], body=body("bulk"))
    [delivery] = await world.wait_records(RecordType.DELIVERY, 1)
    assert (delivery.pool, delivery.source) == ("spare", "ip20")
    assert peers(world) == {"127.0.0.20": 1}
    status = (await client.get(f"/messages/{message_id}")).json()
    [rerouted] = [e for e in status["events"] if e["type"] == "Rerouted"]
    assert rerouted["reason"] == (
        "pool bulk has no usable source (ip10 suspended, ip11 suspended): sent through pool spare"
    )
    pools = {p["name"]: p for p in (await client.get("/admin/pools")).json()["pools"]}
    states = {s["name"]: s["state"] for s in pools["bulk"]["sources"]}
    assert states == {"ip10": "suspended", "ip11": "suspended"}
    assert pools["spare"]["sources"][0]["delivered"] == 1


async def test_a_source_whose_address_is_gone_is_failing_and_its_mail_leaves_by_another(
    api: Api,
) -> None:
    world, _ = await api(**pooled())
    await send(world, ["x@a.test"], body=body("shaky"), count=20)  # some hash to "gone"
    await world.wait_records(RecordType.DELIVERY, 20)
    assert peers(world) == {"127.0.0.11": 20}
    moved = [r for r in world.records if r.type is RecordType.REROUTED]
    assert moved and all(r.source == "ip11" for r in moved)
    assert not [r for r in world.records if r.type is RecordType.TRANSIENT_FAILURE]
    host, port = world.app.http.addresses[0]  # type: ignore[union-attr]
    shown = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "epoxi", "pool", "ls", "--url", f"http://{host}:{port}", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    shaky = next(p for p in json.loads(shown.stdout)["pools"] if p["name"] == "shaky")
    gone = next(s for s in shaky["sources"] if s["name"] == "gone")
    assert gone["state"] == "failing" and "192.0.2.55" in gone["last_error"]
    table = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "epoxi", "pool", "ls", "--url", f"http://{host}:{port}"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert "failing" in table.stdout and "mta20.sender.test" in table.stdout


async def test_pools_reload_with_sighup_settings(api: Api) -> None:
    world, client = await api(**pooled())
    new = world.app.settings.model_copy(
        update={
            "delivery": world.app.settings.delivery.model_copy(
                update={"default_pool": "bulk", "tenant_pools": {}}
            )
        }
    )
    world.app.reload(new)
    await send(world, ["x@a.test"], body=body(), count=20)
    await world.wait_records(RecordType.DELIVERY, 20)
    assert set(peers(world)) == {"127.0.0.10", "127.0.0.11"}  # bulk's, no longer ip20
    assert sum(peers(world).values()) == 20
    pools = (await client.get("/admin/pools")).json()["pools"]
    assert [p["name"] for p in pools if p["default"]] == ["bulk"]
