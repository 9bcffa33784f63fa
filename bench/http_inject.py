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
import json
import time
from typing import Any

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
    """POST every batch over ``concurrency`` keep-alive connections; seconds until the last 202.

    A lean HTTP/1.1 client (asyncio streams, requests encoded up front), so that the load
    generator costs little of the CPU it shares with Epoxi.
    """
    bodies = [json.dumps(request(batch)).encode() for batch in batches]
    pending = iter(bodies)

    async def connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for body in pending:
            writer.write(
                b"POST /messages HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            status = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            answer = await reader.readexactly(length)
            if b" 202 " not in status:
                raise RuntimeError(f"{status!r}: {answer[:300]!r}")
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(concurrency)))
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
