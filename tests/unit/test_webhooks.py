"""The webhook outbox on a real store file and a mock HTTP transport: filtering, batching,
retries and giving up."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

from epoxi.config import WebhookSettings
from epoxi.events.records import Record, RecordType
from epoxi.store.webhooks import Endpoint, WebhookStore
from epoxi.webhooks.outbox import Webhooks
from epoxi.webhooks.signing import signature


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@contextlib.asynccontextmanager
async def outbox(
    tmp_path: Path, answer: int, clock: Clock, **settings: float
) -> AsyncIterator[tuple[Webhooks, list[httpx.Request]]]:
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(answer)

    hooks = Webhooks(
        WebhookStore(tmp_path / "store.db"),
        WebhookSettings(  # no background rounds: the test drives them
            batch=2, retry_interval=10, max_retry_interval=40, poll_interval=3600, **settings
        ),
        sender=True,
        clock=clock,
        transport=httpx.MockTransport(handle),
    )
    await hooks.start()
    try:
        yield hooks, seen
    finally:
        await hooks.stop()


def record(kind: RecordType, message: str, queue: str = "acme@x.test") -> Record:
    return Record(type=kind, message_id=message, queue=queue, recipient="a@x.test")


async def add(hooks: Webhooks, **endpoint: object) -> None:
    await hooks.store.create(
        Endpoint(id="w1", url="http://hooks.test/in", secret="s", created_at=1.0, **endpoint)  # type: ignore[arg-type]
    )
    await hooks.refresh()


async def test_only_the_wanted_types_of_the_endpoints_tenant_go_out_in_batches(
    tmp_path: Path,
) -> None:
    clock = Clock()
    async with outbox(tmp_path, 200, clock) as (hooks, seen):
        await add(hooks, tenant="acme", events=frozenset({"delivery"}))
        for n in range(3):
            hooks.observe(record(RecordType.DELIVERY, f"m{n}"))
        hooks.observe(record(RecordType.BOUNCE, "b"))  # a type it does not want
        hooks.observe(record(RecordType.DELIVERY, "o", queue="other@x.test"))  # another tenant
        await hooks.flush()
        await hooks._send_due()
        await hooks.stop_sending()
        batches = [json.loads(r.content)["events"] for r in seen]
        assert sorted(len(b) for b in batches) == [1, 2]  # batch = 2
        assert sorted(e["message_id"] for b in batches for e in b) == ["m0", "m1", "m2"]
        request = seen[0]
        timestamp = int(clock.now)
        assert request.headers["epoxi-signature"] == signature(["s"], timestamp, request.content)
        assert (await hooks.store.backlogs(clock.now))[0].queued == 0


async def test_failures_back_off_and_old_events_are_given_up_on(tmp_path: Path) -> None:
    clock = Clock()
    async with outbox(tmp_path, 503, clock, max_age=60) as (hooks, seen):
        await add(hooks, tenant="", events=frozenset())
        hooks.observe(record(RecordType.DELIVERY, "m"))
        await hooks.flush()
        for _ in range(3):
            await hooks._send_due()
            await hooks.stop_sending()
        assert len(seen) == 1  # the retry is 10 s away
        clock.now += 11
        await hooks._send_due()
        await hooks.stop_sending()
        assert len(seen) == 2
        [state] = await hooks.store.backlogs(clock.now)
        assert (state.queued, state.failures, state.last_error) == (
            1,
            2,
            "answered 503 Service Unavailable",
        )
        clock.now += 100  # past max_age: the next failure gives it up
        await hooks._send_due()
        await hooks.stop_sending()
        [state] = await hooks.store.backlogs(clock.now)
        assert (state.queued, state.dropped) == (0, 1)
