"""The webhook outbox: records in, signed JSON batches out to each endpoint.

Each worker reads its own records (a record-log subscriber that only appends to a buffer)
and, every ``poll_interval``, writes the events its endpoints want to the store's queue in one
transaction. One worker (the sender) takes due events from the queue, endpoint by endpoint,
at most ``batch`` to a POST and ``concurrency`` POSTs in flight per endpoint, and deletes
them once the endpoint answered 2xx. A refusal, an error or no answer within ``timeout``
leaves them queued for a retry after ``retry_interval``, doubling up to
``max_retry_interval``; an event still not taken after ``max_age`` is given up on (counted
per endpoint). So an event is delivered at least once, across crashes and restarts; its id
is stable, so a receiver can drop the repeats.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sqlite3
import time
from collections.abc import Callable, Coroutine

import httpx
import msgspec

from epoxi.config import WebhookSettings
from epoxi.events.buffer import BufferedWriter
from epoxi.events.outbound import EVENT_TYPES, event_of
from epoxi.events.records import Record
from epoxi.queue.model import tenant_campaign
from epoxi.store.webhooks import Endpoint, Queued, WebhookStore
from epoxi.webhooks.signing import HEADER, signature

log = logging.getLogger(__name__)

USER_AGENT = "Epoxi-Webhooks/1"


class Webhooks:
    def __init__(
        self,
        store: WebhookStore,
        settings: WebhookSettings,
        *,
        sender: bool,
        clock: Callable[[], float] = time.time,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.sender = sender
        self._clock = clock
        self.endpoints: list[Endpoint] = []
        self._version = -1
        self._buffer: BufferedWriter[tuple[str, bytes]] = BufferedWriter(
            self._enqueue,
            interval=settings.poll_interval,
            name="webhooks",
            retry_on=(sqlite3.Error,),
        )
        self._sending: dict[str, set[int]] = {}  # endpoint -> seqs in a POST now
        self._posts: dict[str, int] = {}  # endpoint -> POSTs in flight
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.Task[None] | None = None
        self._transport = transport
        self._client: httpx.AsyncClient | None = None

    # ----------------------------------------------------------------- life cycle

    async def start(self) -> None:
        await self.store.start()
        await self.refresh()
        self._buffer.start()
        self._client = httpx.AsyncClient(
            timeout=self.settings.timeout,
            headers={"User-Agent": USER_AGENT},
            transport=self._transport,
            follow_redirects=False,
        )
        self._loop = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=self.settings.timeout)
        await self._buffer.stop()  # enqueue what was seen: it is sent after the restart
        if self._client is not None:
            await self._client.aclose()
        await self.store.stop()

    async def refresh(self) -> None:
        """Read the endpoints again if they changed (in this worker or another)."""
        version = await self.store.version()
        if version != self._version:
            self._version = version
            self.endpoints = await self.store.endpoints()

    # ----------------------------------------------------------------- records in

    def observe(self, record: Record) -> None:
        """A record subscriber: the events some endpoint wants go to the buffer."""
        if not self.endpoints:
            return
        kind = EVENT_TYPES[record.type]
        tenant = record.tenant or tenant_campaign(record.queue)[0]
        targets = [e.id for e in self.endpoints if e.wants(kind, tenant)]
        if targets:
            event = msgspec.json.encode(event_of(record))
            for target in targets:
                self._buffer.add((target, event))

    def add(self, endpoint: str, event: bytes) -> None:
        """Queue one event for one endpoint (a test-fire)."""
        self._buffer.add((endpoint, event))

    async def flush(self) -> None:
        await self._buffer.flush()

    async def _enqueue(self, items: list[tuple[str, bytes]]) -> None:
        await self.store.enqueue(items, self._clock())

    # ----------------------------------------------------------------- sending

    async def stop_sending(self) -> None:
        """Wait for the POSTs under way (tests, and a clean stop)."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_interval)
            try:
                await self.refresh()
                if self.sender:
                    await self._send_due()
            except Exception:
                log.exception("webhooks: a round of sending failed")

    async def _send_due(self) -> None:
        for endpoint in self.endpoints:
            await self._fill(endpoint)

    async def _fill(self, endpoint: Endpoint) -> None:
        """Start POSTs of the endpoint's due events, up to its concurrency."""
        now = self._clock()
        while self._posts.get(endpoint.id, 0) < self.settings.concurrency:
            sending = self._sending.setdefault(endpoint.id, set())
            batch = await self.store.due(endpoint.id, now, self.settings.batch, sending)
            if not batch:
                return
            sending.update(item.seq for item in batch)
            self._posts[endpoint.id] = self._posts.get(endpoint.id, 0) + 1
            self._spawn(self._post(endpoint, batch))

    def _spawn(self, work: Coroutine[None, None, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _post(self, endpoint: Endpoint, batch: list[Queued]) -> None:
        seqs = [item.seq for item in batch]
        try:
            error = await self._deliver(endpoint, batch)
            now = self._clock()
            if error is None:
                await self.store.delivered(endpoint.id, seqs, now)
                if len(batch) == self.settings.batch and endpoint in self.endpoints:
                    self._spawn(self._fill(endpoint))  # more waiting: no pause under load
                return
            attempts = min(item.attempts for item in batch) + 1
            retry_at = now + self._backoff(attempts)
            too_old = now - self.settings.max_age
            dropped = await self.store.failed(endpoint.id, seqs, error, now, retry_at, too_old)
            log.warning(
                "webhook %s (%s): %s; %d events retried in %.0fs%s",
                endpoint.id,
                endpoint.url,
                error,
                len(seqs) - dropped,
                retry_at - now,
                f", {dropped} given up on (older than max_age)" if dropped else "",
            )
        except Exception:
            log.exception("webhook %s: recording a POST's outcome failed", endpoint.id)
        finally:
            self._sending.get(endpoint.id, set()).difference_update(seqs)
            self._posts[endpoint.id] -= 1

    async def _deliver(self, endpoint: Endpoint, batch: list[Queued]) -> str | None:
        """POST the batch; None when the endpoint took it (2xx), else what went wrong."""
        assert self._client is not None
        body = b'{"events":[' + b",".join(item.event for item in batch) + b"]}"
        now = int(self._clock())
        headers = {
            "Content-Type": "application/json",
            HEADER: signature(endpoint.secrets(now), now, body),
        }
        try:
            reply = await self._client.post(endpoint.url, content=body, headers=headers)
        except httpx.TimeoutException:
            return f"no answer within {self.settings.timeout:g}s"
        except httpx.HTTPError as exc:
            return f"cannot POST: {exc or type(exc).__name__}"
        if 200 <= reply.status_code < 300:
            return None
        return f"answered {reply.status_code} {reply.reason_phrase}".strip()

    def _backoff(self, attempts: int) -> float:
        base = self.settings.retry_interval * 2.0 ** (attempts - 1)
        return min(base, self.settings.max_retry_interval) * random.uniform(0.9, 1.1)
