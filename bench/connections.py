"""Memory and latency under connection load: the figures the load tests no longer assert.

    .venv/bin/python bench/connections.py [--connections 1000] [--slow 300] [--seconds 4]

1. ``--connections`` SMTP sessions opened at once, each greeted, then each runs a transaction
   while all stay open: Epoxi's RSS growth (VmHWM minus RSS before) and the 250 latency.
2. ``--slow`` slowloris clients dribbling one byte a second while 4 ordinary smtplib clients
   send for ``--seconds``: the ordinary clients' transaction latency and Epoxi's RSS growth.
Epoxi runs as a child process (``harness.Node``); its mail waits in the spool (no receivers).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import smtplib
import threading
import time

from harness import Node, emit, percentile, read_reply

TIMEOUT = 3  # idle and data timeouts of the node, as in tests/e2e/test_load.py


# Many connections from loopback, and short timeouts so slowloris clients are cut off soon.
LOAD_SMTP = (
    f"max_connections = 5000\nmax_connections_per_ip = 5000\n"
    f"idle_timeout = {TIMEOUT}\ndata_timeout = {TIMEOUT}"
)


async def session(port: int, i: int, go: asyncio.Event) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await read_reply(reader)
    await go.wait()
    began = time.monotonic()
    for line in (
        f"EHLO c{i}.bench\r\n",
        "MAIL FROM:<load@remote.bench>\r\n",
        f"RCPT TO:<c{i}@d0.bench>\r\n",
        "DATA\r\n",
        "Subject: load\r\n\r\nHello.\r\n.\r\n",
    ):
        writer.write(line.encode())
        await read_reply(reader)
    latency = time.monotonic() - began
    writer.close()
    return latency


async def many_connections(node: Node, count: int) -> None:
    before = node.rss_mb()
    go = asyncio.Event()
    tasks = [asyncio.ensure_future(session(node.smtp_port, i, go)) for i in range(count)]
    while node.metric("epoxi_smtp_sessions") < count:
        await asyncio.sleep(0.05)
    go.set()
    latencies = await asyncio.gather(*tasks)
    emit(
        {
            "bench": "connections",
            "connections": count,
            "rss_before_mb": round(before, 1),
            "rss_growth_mb": round(node.memory_mb("VmHWM") - before, 1),
            "p50_ms": round(percentile(latencies, 50) * 1000, 1),
            "p99_ms": round(percentile(latencies, 99) * 1000, 1),
        }
    )


async def dribble(port: int, i: int, stop: asyncio.Event) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await read_reply(reader)
    for byte in f"EHLO slowloris-{i}-".encode() + b"y" * 500:
        if stop.is_set() or reader.at_eof():
            break
        writer.write(bytes([byte]))
        try:
            await asyncio.wait_for(reader.read(1), 1.0)
            break  # Epoxi answered (421): cut off
        except TimeoutError:
            pass
    writer.close()


def ordinary(port: int, until: float, latencies: list[float]) -> None:
    n = 0
    while time.monotonic() < until:
        began = time.monotonic()
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            smtp.sendmail("o@remote.bench", [f"o{n}@d0.bench"], b"Subject: o\r\n\r\nHi.\r\n")
        latencies.append(time.monotonic() - began)
        n += 1


async def slowloris(node: Node, slow: int, seconds: float) -> None:
    before = node.rss_mb()
    stop = asyncio.Event()
    slow_tasks = [asyncio.ensure_future(dribble(node.smtp_port, i, stop)) for i in range(slow)]
    while node.metric("epoxi_smtp_sessions") < slow:
        await asyncio.sleep(0.05)
    latencies: list[float] = []
    until = time.monotonic() + seconds
    workers = [
        threading.Thread(target=ordinary, args=(node.smtp_port, until, latencies)) for _ in range(4)
    ]
    for worker in workers:
        worker.start()
    while any(worker.is_alive() for worker in workers):
        await asyncio.sleep(0.1)
    stop.set()
    await asyncio.gather(*slow_tasks)
    emit(
        {
            "bench": "slowloris",
            "slow": slow,
            "ordinary_transactions": len(latencies),
            "ordinary_p50_ms": round(percentile(latencies, 50) * 1000, 1),
            "ordinary_p99_ms": round(percentile(latencies, 99) * 1000, 1),
            "ordinary_max_ms": round(max(latencies, default=0) * 1000, 1),
            "rss_growth_mb": round(node.memory_mb("VmHWM") - before, 1),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--slow", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = args.connections + 1024
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))
    with Node(smtp_config=LOAD_SMTP) as node:
        asyncio.run(many_connections(node, args.connections))
    with Node(smtp_config=LOAD_SMTP) as node:
        asyncio.run(slowloris(node, args.slow, args.seconds))


if __name__ == "__main__":
    main()
