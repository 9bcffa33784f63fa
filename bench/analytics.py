"""GET /analytics over ten million events, on SQLite and on PostgreSQL.

    .venv/bin/python bench/analytics.py [--events 10000000] [--days 30] [--templates 5]
                                        [--database-url postgresql://postgres@127.0.0.1/test]

For each backend: the events (per email a Reception and a Delivery, and for some an Open, a
Click or a Bounce, spread over ``--days`` and ``--templates``) go through the platform store's
``apply_records`` in batches of 20,000, the path the record feed takes, and the rate it keeps is
reported. Then a node is started on that store and ``GET /analytics`` is timed over HTTP:
the whole span by day and by hour, with and without a template filter (median and worst of 20).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from harness import Node, emit

from epoxi.config import DatabaseSettings
from epoxi.events.records import Record, RecordType, Response
from epoxi.store.platform import open_platform_store

BATCH = 20_000
DELIVERED = Response(250, "2.0.0", "ok")
BOUNCED = Response(550, "5.1.1", "user unknown")


def records(events: int, days: int, templates: int, end: float) -> Any:
    """Yields batches of records, about ``events`` in all, oldest first."""
    rng = random.Random(7)
    start = end - days * 86400
    step = days * 86400 / (events / 3.2)  # about 3.2 events an email
    batch: list[Record] = []
    made, at, n = 0, start, 0
    while made < events:
        n += 1
        at += step
        email, template = f"E{n:09d}", f"tpl_{n % templates}"
        common = {"message_id": email, "tenant": "bench", "template": template}
        batch.append(Record(type=RecordType.RECEPTION, timestamp=at, recipients=["r@x"], **common))
        common["recipient"] = "r@x"
        if rng.random() < 0.03:
            batch.append(
                Record(type=RecordType.BOUNCE, timestamp=at + 5, response=BOUNCED, **common)
            )
        else:
            batch.append(
                Record(type=RecordType.DELIVERY, timestamp=at + 5, response=DELIVERED, **common)
            )
            if rng.random() < 0.8:
                batch.append(Record(type=RecordType.OPEN, timestamp=at + 600, **common))
            if rng.random() < 0.4:
                batch.append(
                    Record(type=RecordType.CLICK, timestamp=at + 700, url="https://x", **common)
                )
        if len(batch) >= BATCH:
            made += len(batch)
            yield batch
            batch = []
    if batch:
        yield batch


async def fill(
    database: DatabaseSettings, data_dir: Path, args: argparse.Namespace, end: float
) -> dict[str, Any]:
    store = open_platform_store(data_dir, database)
    await store.start()
    started, count = time.perf_counter(), 0
    for batch in records(args.events, args.days, args.templates, end):
        await store.apply_records(batch)
        count += len(batch)
    seconds = time.perf_counter() - started
    await store.stop()
    return {
        "events": count,
        "fill_seconds": round(seconds, 1),
        "events_per_s": round(count / seconds),
    }


def timed_queries(node: Node, args: argparse.Namespace, end: float) -> dict[str, Any]:
    client = httpx.Client(base_url=f"http://127.0.0.1:{node.http_port}", timeout=60)
    span = {
        "tenant_id": "bench",
        "from": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(end - args.days * 86400 - 3600)),
        "to": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(end + 86400)),
    }
    results: dict[str, Any] = {}
    for name, params in {
        "day": {**span, "group_by": "day"},
        "hour": {**span, "group_by": "hour"},
        "day_template": {**span, "group_by": "day", "template_id": "tpl_1"},
        "hour_template": {**span, "group_by": "hour", "template_id": "tpl_1"},
    }.items():
        client.get("/analytics", params=params).raise_for_status()  # warm
        times = []
        for _ in range(20):
            started = time.perf_counter()
            answer = client.get("/analytics", params=params)
            times.append((time.perf_counter() - started) * 1000)
            answer.raise_for_status()
        body = answer.json()
        results[name] = {
            "ms_median": round(statistics.median(times), 1),
            "ms_max": round(max(times), 1),
            "buckets": len(body["buckets"]),
            "accepted": body["totals"]["accepted"],
        }
    return results


def run(kind: str, args: argparse.Namespace) -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="epoxi-analytics-"))
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    url = args.database_url if kind == "postgres" else ""
    end = time.time()
    try:
        filled = asyncio.run(fill(DatabaseSettings(url=url, schema=schema), data_dir, args, end))
        extra = f'[database]\nurl = "{url}"\nschema = "{schema}"\n' if url else ""
        node = Node(data_dir=data_dir, extra_config=extra)
        node.start()
        try:
            queries = timed_queries(node, args, end)
        finally:
            node.stop()
        emit({"bench": "analytics", "backend": kind, **filled, "queries": queries})
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
        if url:
            asyncio.run(_drop(url, schema))


async def _drop(url: str, schema: str) -> None:
    conn = await asyncpg.connect(url)
    await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--templates", type=int, default=5)
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    args = parser.parse_args()
    for kind in ("sqlite", "postgres"):
        if args.backend in (kind, "both"):
            run(kind, args)


if __name__ == "__main__":
    main()
