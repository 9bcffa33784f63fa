"""HTTP injection: recipients per second through POST /messages, until every 202.

    .venv/bin/python bench/http_inject.py [-n 20000] [--batch 1000] [--concurrency 20]

Two runs on a fresh node each, relaying to a loopback sink:
- single: one recipient per request, ``--concurrency`` requests in flight (httpx, keep-alive);
- batch: ``--batch`` recipients per request (each rendered with its own variable), two in flight.
A 202 means every message of the request is fsynced in the spool. The figure is recipients
accepted per second; delivery runs meanwhile, as it would in production.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import httpx

from harness import Node, Receivers, emit

TEXT = "Hello {{ name }},\n\n" + "This is the body of a benchmark message.\n" * 100


def request(recipients: list[str]) -> dict[str, Any]:
    return {
        "message": {
            "from": "bench@epoxi.bench",
            "to": recipients,
            "subject": "Hello {{ name }}",
            "text": TEXT,
            "data": {r: {"name": r.split("@")[0]} for r in recipients},
        }
    }


async def post_all(port: int, batches: list[list[str]], concurrency: int) -> float:
    pending = iter(batches)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", timeout=300, limits=limits
    ) as client:

        async def worker() -> None:
            for batch in pending:
                reply = await client.post("/messages", json=request(batch))
                if reply.status_code != 202:
                    raise RuntimeError(f"{reply.status_code}: {reply.text[:300]}")

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started


def run(kind: str, receivers: Receivers, n: int, size: int, concurrency: int) -> None:
    recipients = [f"u{i}@d0.bench" for i in range(n)]
    batches = [recipients[i : i + size] for i in range(0, n, size)]
    with Node(receivers) as node:
        asyncio.run(post_all(node.http_port, [["warm@d0.bench"]] * 20, 4))
        seconds = asyncio.run(post_all(node.http_port, batches, concurrency))
    emit(
        {
            "bench": "http_inject",
            "kind": kind,
            "recipients": n,
            "per_request": size,
            "concurrency": concurrency,
            "seconds": round(seconds, 3),
            "recipients_per_s": round(n / seconds, 1),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=20)
    args = parser.parse_args()
    with Receivers(domains=1, hosts=1) as receivers:
        run("single", receivers, args.n // 4, 1, args.concurrency)
        run("batch", receivers, args.n, args.batch, 2)


if __name__ == "__main__":
    main()
