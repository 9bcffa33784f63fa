"""POST /send/bulk against POST /messages batches, in one run, on SQLite and on PostgreSQL.

    .venv/bin/python bench/bulk_send.py [-n 100000] [--batch 1000] [--rounds 2]
                                        [--database-url postgresql://postgres@127.0.0.1/test]

Each measurement is a fresh node (bench/harness.py) relaying to a loopback sink, with the same
message (bench/http_inject.py's: a subject and a 4 KB text, each rendered with the recipient's
own variable); rounds alternate the three:

- ``messages``: POST /messages, ``--batch`` recipients a request, two in flight;
- ``bulk-sqlite``: one POST /send/bulk of ``-n`` recipients, from a stored template;
- ``bulk-postgres``: the same, the platform store on PostgreSQL (a schema of its own, dropped).

A 202 means every message is fsynced in the spool. The figures are recipients accepted a second
until the (last) 202, and the node's memory growth while it ran (peak RSS less RSS before).
Delivery runs meanwhile, as it would in production.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from typing import Any

import asyncpg
import httpx
from harness import Node, Receivers, emit
from http_inject import TEXT, post_all

SENDER = "bench@epoxi.bench"


def recipients(n: int) -> list[str]:
    return [f"u{i}@d0.bench" for i in range(n)]


def messages_run(receivers: Receivers, n: int, batch: int) -> dict[str, Any]:
    everyone = recipients(n)
    batches = [everyone[i : i + batch] for i in range(0, n, batch)]
    with Node(receivers) as node:
        asyncio.run(post_all(node.http_port, [["warm@d0.bench"]] * 20, 4))
        before = node.rss_mb()
        seconds = asyncio.run(post_all(node.http_port, batches, 2))
        grown = node.memory_mb("VmHWM") - before
    return {"seconds": seconds, "rss_growth_mb": grown}


def bulk_run(receivers: Receivers, n: int, database: str) -> dict[str, Any]:
    extra = f'[database]\nurl = "{database}"\nschema = "bench_{uuid.uuid4().hex[:8]}"\n'
    with Node(receivers, extra_config=extra if database else "") as node:
        api = httpx.Client(base_url=f"http://127.0.0.1:{node.http_port}", timeout=3600)
        tenant = {"id": "bench", "name": "Bench", "sender": SENDER}
        template = {
            "tenant_id": "bench",
            "name": "bench",
            "subject_template": "Hello {{ name }}",
            "text_template": TEXT,
        }
        assert api.post("/tenants", json=tenant).status_code == 201
        template_id = api.post("/templates", json=template).json()["id"]
        _bulk(api, template_id, recipients(200), "warm")
        before = node.rss_mb()
        started = time.perf_counter()
        answer = _bulk(api, template_id, recipients(n), "bench")
        seconds = time.perf_counter() - started
        grown = node.memory_mb("VmHWM") - before
        assert answer["queued"] == n, answer
        if database:
            _drop_schema(database, extra)
    return {"seconds": seconds, "rss_growth_mb": grown}


def _bulk(api: httpx.Client, template_id: str, everyone: list[str], key: str) -> Any:
    body = {
        "tenant_id": "bench",
        "template_id": template_id,
        "recipients": [{"email": r, "variables": {"name": r.split("@")[0]}} for r in everyone],
        "idempotency_key": key,
    }
    answer = api.post("/send/bulk", json=body)
    if answer.status_code != 202:
        raise RuntimeError(f"{answer.status_code}: {answer.text[:300]}")
    return answer.json()


def _drop_schema(database: str, extra: str) -> None:
    schema = extra.split('schema = "')[1].split('"')[0]

    async def drop() -> None:
        conn = await asyncpg.connect(database)
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()

    asyncio.run(drop())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    runs: dict[str, list[dict[str, Any]]] = {"messages": [], "bulk-sqlite": [], "bulk-postgres": []}
    with Receivers(domains=1, hosts=1) as receivers:
        for round_ in range(1, args.rounds + 1):
            for kind in runs:
                if kind == "messages":
                    result = messages_run(receivers, args.n, args.batch)
                else:
                    database = args.database_url if kind == "bulk-postgres" else ""
                    result = bulk_run(receivers, args.n, database)
                result["recipients_per_s"] = round(args.n / result["seconds"], 1)
                runs[kind].append(result)
                emit({"bench": "bulk_send", "kind": kind, "round": round_, "n": args.n, **result})
    medians = {
        kind: statistics.median(r["recipients_per_s"] for r in results)
        for kind, results in runs.items()
    }
    emit(
        {
            "bench": "bulk_send",
            "summary": True,
            "recipients_per_s": medians,
            "rss_growth_mb_max": {k: max(r["rss_growth_mb"] for r in v) for k, v in runs.items()},
            "bulk_sqlite_over_messages": round(medians["bulk-sqlite"] / medians["messages"], 3),
            "bulk_postgres_over_messages": round(medians["bulk-postgres"] / medians["messages"], 3),
        }
    )


if __name__ == "__main__":
    main()
