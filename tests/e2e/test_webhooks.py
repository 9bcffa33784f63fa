"""Event webhooks end to end: a real HTTP receiver on loopback, signatures checked with the
standard library alone, retries after 500s and timeouts, a receiver that is down, rotation,
tenant scoping, and a SIGKILL of Epoxi while events wait."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from epoxi.events.records import RecordType
from epoxi.store import Scope
from epoxi.testing.receiver import Receiver
from tests.conftest import EpoxiProcess, eventually, send_batch, wait_for_port
from tests.e2e.conftest import Api, World, send

FAST = {"poll_interval": 0.05, "retry_interval": 0.2, "max_retry_interval": 0.4, "timeout": 0.5}


def verify(secret: str, header: str, body: bytes, now: float, tolerance: float = 300) -> bool:
    """What a receiver runs (docs/events.md): the standard library only."""
    fields = [part.split("=", 1) for part in header.split(",")]
    timestamp = int(next(value for name, value in fields if name == "t"))
    if abs(now - timestamp) > tolerance:
        return False  # an old call replayed
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return any(
        hmac.compare_digest(expected.hexdigest(), value) for name, value in fields if name == "v1"
    )


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver()
    await found.start()
    yield found
    await found.stop()


async def until(check: Callable[[], Any], timeout: float = 15.0, what: str = "it") -> None:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if asyncio.iscoroutine(found):
            found = await found
        if found:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout}s")
        await asyncio.sleep(0.02)


async def hooked(
    api: Api, receiver: Receiver, **webhook: Any
) -> tuple[World, httpx.AsyncClient, dict[str, Any]]:
    world, client = await api(webhooks=FAST)
    made = await client.post("/event-webhooks", json={"url": receiver.url, **webhook})
    assert made.status_code == 201, made.text
    return world, client, made.json()


def ids_of(receiver: Receiver, kind: str) -> set[str]:
    return {e["message_id"] for e in receiver.events() if e["type"] == kind}


async def test_events_arrive_signed_and_a_stdlib_check_accepts_them(
    api: Api, receiver: Receiver
) -> None:
    world, client, hook = await hooked(api, receiver, events=["reception", "delivery"])
    assert hook["secret"].startswith("whsec_") and hook["events"] == ["delivery", "reception"]
    [message_id] = await send(world, ["x@a.test"])
    await until(lambda: message_id in ids_of(receiver, "delivery"), what="the delivery event")
    assert message_id in ids_of(receiver, "reception")
    for call in receiver.calls:
        assert verify(hook["secret"], call.headers["epoxi-signature"], call.body, time.time())
        assert not verify("whsec_wrong", call.headers["epoxi-signature"], call.body, time.time())
        assert call.headers["content-type"] == "application/json"
    [delivery] = [e for e in receiver.events() if e["type"] == "delivery"]
    assert delivery["recipient"] == "x@a.test" and len(delivery["id"]) == 32
    assert {"transient_failure", "bounce"}.isdisjoint(e["type"] for e in receiver.events())
    shown = (await client.get("/event-webhooks")).json()["webhooks"]
    assert [h["id"] for h in shown] == [hook["id"]] and shown[0]["secret"] is None


async def test_500s_and_timeouts_are_retried_until_the_events_are_taken(
    api: Api, receiver: Receiver
) -> None:
    receiver.answers.extend(["500", "hang", "500"])
    world, client, _ = await hooked(api, receiver, events=["delivery"])
    ids = set(await send(world, ["y@a.test"], count=3))
    await until(lambda: ids <= ids_of(receiver, "delivery"), timeout=20, what="every delivery")
    statuses = [call.status for call in receiver.calls]
    assert statuses[:3] == [500, 0, 500] and statuses[-1] == 200  # (0: no answer in time)
    backlog = (await client.get("/admin/webhooks")).json()["webhooks"]
    assert backlog[0]["queued"] == 0 and backlog[0]["failures"] == 0
    assert backlog[0]["last_error"] is not None  # the last failure is remembered
    # every event of a batch that failed came again: stable ids, so the receiver can dedupe
    events = [e for e in receiver.events() if e["type"] == "delivery"]
    assert {e["message_id"] for e in events} == ids


async def test_a_receiver_down_leaves_a_backlog_that_goes_when_it_comes_back(
    api: Api, receiver: Receiver
) -> None:
    await receiver.stop()  # down from the start
    world, client, hook = await hooked(api, receiver, events=["delivery"])
    ids = set(await send(world, ["z@a.test"], count=4))
    await world.wait_records(RecordType.DELIVERY, 4)

    async def backlogged() -> bool:
        found = (await client.get("/admin/webhooks")).json()["webhooks"]
        return found[0]["queued"] == 4 and found[0]["failures"] >= 2

    await until(backlogged, what="a backlog of 4")
    url = str(client.base_url)
    shown = await asyncio.to_thread(cli, "webhooks", "status", "--url", url)
    assert "queued 4" in shown.stdout and "cannot POST" in shown.stdout
    await receiver.start()  # the same port
    replayed = await asyncio.to_thread(cli, "webhooks", "replay", hook["id"], "--url", url)
    assert replayed.returncode == 0, replayed.stderr
    await until(lambda: ids <= ids_of(receiver, "delivery"), what="the backlog delivered")
    found = (await client.get("/admin/webhooks")).json()["webhooks"]
    assert found[0]["queued"] == 0


async def test_a_rotated_secret_and_the_old_one_both_sign_for_a_while(
    api: Api, receiver: Receiver
) -> None:
    _, client, hook = await hooked(api, receiver)
    rotated = (await client.post(f"/event-webhooks/{hook['id']}/rotate", json={})).json()
    assert rotated["secret"] != hook["secret"] and rotated["old_secret_until"] > time.time()
    fired = await client.post(f"/event-webhooks/{hook['id']}/test", json={})
    assert fired.status_code == 202
    event_id = fired.json()["event_id"]
    await until(lambda: any(e["id"] == event_id for e in receiver.events()), what="the test")
    [call] = [c for c in receiver.calls if any(e["id"] == event_id for e in c.events)]
    header = call.headers["epoxi-signature"]
    assert header.count("v1=") == 2
    assert verify(rotated["secret"], header, call.body, time.time())
    assert verify(hook["secret"], header, call.body, time.time())


async def test_a_tenants_key_sees_and_gets_only_its_tenants_webhooks_and_events(
    api: Api, receiver: Receiver
) -> None:
    world, client = await api(webhooks=FAST)
    assert world.app.keys is not None
    _, admin = world.app.keys.create("ops", {Scope.ADMIN, Scope.READ, Scope.SEND})
    _, acme = world.app.keys.create("acme", {Scope.SEND, Scope.READ}, tenant="acme")
    _, other = world.app.keys.create("other", {Scope.SEND, Scope.READ}, tenant="other")

    def auth(key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    made = await client.post(
        "/event-webhooks", json={"url": receiver.url, "events": ["delivery"]}, headers=auth(acme)
    )
    assert made.status_code == 201 and made.json()["tenant"] == "acme"
    hook_id = made.json()["id"]
    theirs = await client.post(
        "/event-webhooks", json={"url": receiver.url, "tenant": "acme"}, headers=auth(other)
    )
    assert theirs.status_code == 403
    assert (await client.get("/event-webhooks", headers=auth(other))).json()["webhooks"] == []
    assert (await client.get(f"/event-webhooks/{hook_id}", headers=auth(other))).status_code == 404
    gone = await client.delete(f"/event-webhooks/{hook_id}", headers=auth(other))
    assert gone.status_code == 404
    tenant_body = b"X-Epoxi-Tenant: acme\r\nSubject: t\r\n\r\nHi.\r\n"
    [acme_id] = await send(world, ["t@a.test"], body=tenant_body)
    [plain_id] = await send(world, ["u@a.test"])
    await world.wait_records(RecordType.DELIVERY, 2)
    await until(lambda: acme_id in ids_of(receiver, "delivery"), what="acme's delivery event")
    assert plain_id not in ids_of(receiver, "delivery")
    backlog = await client.get("/admin/webhooks", headers=auth(acme))
    assert backlog.status_code == 403  # operators only
    assert (await client.get("/admin/webhooks", headers=auth(admin))).status_code == 200


async def test_bad_requests_get_problem_details(api: Api, receiver: Receiver) -> None:
    _, client = await api(webhooks=FAST)
    unknown = await client.post(
        "/event-webhooks", json={"url": receiver.url, "events": ["delivered"]}
    )
    assert unknown.status_code == 422 and "unknown event types ['delivered']" in unknown.text
    not_http = await client.post("/event-webhooks", json={"url": "ftp://x.test/hooks"})
    assert not_http.status_code == 422 and "url" in not_http.text
    for bad in ("http://[::1/hooks", "http://:80/hooks", "https://x.test:port/"):
        broken = await client.post("/event-webhooks", json={"url": bad})
        assert broken.status_code == 422 and "url" in broken.text, bad
    assert (await client.delete("/event-webhooks/wh_nope")).status_code == 404


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "epoxi", *args], capture_output=True, text=True, timeout=60
    )


async def test_sigkill_while_events_wait_loses_none_of_them(
    tmp_path: Path, receiver: Receiver
) -> None:
    await receiver.stop()  # every event waits in the queue
    config = tmp_path / "epoxi.toml"
    config.write_text(
        "[webhooks]\npoll_interval = 0.05\nretry_interval = 0.2\nmax_retry_interval = 0.4\n"
        "timeout = 0.5\n"
    )
    process = EpoxiProcess(tmp_path / "data")
    await asyncio.to_thread(process.start, config)
    await asyncio.to_thread(wait_for_port, "127.0.0.1", process.http_port)
    api_url = f"http://127.0.0.1:{process.http_port}"
    try:
        async with httpx.AsyncClient(base_url=api_url, timeout=30) as client:
            made = await client.post(
                "/event-webhooks", json={"url": receiver.url, "events": ["reception"]}
            )
            assert made.status_code == 201, made.text
            ids = set(
                await asyncio.to_thread(send_batch, process.port, 20, b"Subject: k\r\n\r\nk\r\n")
            )

            async def all_waiting() -> bool:
                found = (await client.get("/admin/webhooks")).json()["webhooks"]
                return bool(found) and found[0]["queued"] == len(ids)

            await until(all_waiting, what="20 events queued")
        await asyncio.to_thread(process.kill)
        await receiver.start()
        await asyncio.to_thread(process.start, config)
        await eventually(lambda: ids <= ids_of(receiver, "reception"), 20, "every event")
    finally:
        if process.proc is not None:
            await asyncio.to_thread(process.kill)
    counts: dict[str, int] = {}
    for event in receiver.events():
        counts[event["id"]] = counts.get(event["id"], 0) + 1
    assert len(counts) == len(ids)  # each event once or more, under one id
