"""Kill one worker, not the supervisor, mid-stream: is anything that got a 250 lost?

    .venv/bin/python bench/worker_kill.py [-n 20000] [--workers 2] [--sessions 20]

Epoxi runs with ``--workers`` under its supervisor (``harness.Node``), relaying to a sink in
this process. The injector sends ``-n`` messages of 5 KB over ``--sessions`` connections and
records the queue id of every 250; halfway, one worker gets SIGKILL. The supervisor restarts it
on its spool shard. At the end every acknowledged id must have reached the sink: ``acked_lost``
must be 0 (``duplicates`` may not be: a message on a connection when its worker died is sent
again). Sessions cut by the kill reconnect and go on.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import time
from pathlib import Path

from harness import Node, emit, make_body, read_reply

from epoxi.testing.sink import Sink


async def inject(
    port: int, count: int, sessions: int, acked: set[str], kill_at: int, kill: asyncio.Event
) -> int:
    """Send ``count`` messages; returns how many sessions were cut (and reconnected)."""
    body = make_body(5120) + b".\r\n"
    numbers = iter(range(count))
    cut = 0

    async def session() -> None:
        nonlocal cut
        while True:
            try:
                await one_connection()
                return
            except (ConnectionError, RuntimeError):
                cut += 1  # its worker was killed: a message without a 250 is the client's

    async def one_connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await read_reply(reader)
        writer.write(b"EHLO injector.bench\r\n")
        await read_reply(reader)
        for _ in numbers:
            for command, code in (
                (b"MAIL FROM:<bench@epoxi.bench>\r\n", b"250"),
                (b"RCPT TO:<sink@remote.bench>\r\n", b"250"),
                (b"DATA\r\n", b"354"),
                (body, b"250"),
            ):
                writer.write(command)
                reply = await read_reply(reader)
                if not reply.startswith(code):
                    raise RuntimeError(reply.decode(errors="replace"))
            acked.add(reply.split()[-1].decode())
            if len(acked) >= kill_at:
                kill.set()
        writer.close()

    await asyncio.gather(*(session() for _ in range(sessions)))
    return cut


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sessions", type=int, default=20)
    args = parser.parse_args()
    async with Sink("127.0.0.1") as sink:
        with Node(workers=args.workers, relay_port=sink.port) as node:
            assert node.proc is not None
            await asyncio.to_thread(wait_for, node, f"ready: {args.workers} workers")
            acked: set[str] = set()
            kill = asyncio.Event()
            injecting = asyncio.ensure_future(
                inject(node.smtp_port, args.n, args.sessions, acked, args.n // 2, kill)
            )
            await kill.wait()
            victim = children(node.proc.pid)[-1]
            os.kill(victim, signal.SIGKILL)
            killed_at = len(acked)
            cut = await injecting
            started = time.monotonic()
            while not acked <= delivered_ids(sink) and time.monotonic() - started < 300:
                await asyncio.sleep(0.5)
            received = delivered_ids(sink)
            emit(
                {
                    "mode": "worker_kill",
                    "workers": args.workers,
                    "n": args.n,
                    "acked": len(acked),
                    "acked_at_kill": killed_at,
                    "sessions_cut": cut,
                    "delivered": len(received),
                    "acked_lost": len(acked - received),
                    "duplicates": sink.received - len(received),
                    "restarted": node.log().count("ready (pid") > args.workers,
                }
            )


def wait_for(node: Node, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in node.log():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{text!r} not in the log after {timeout}s")
        time.sleep(0.05)


def delivered_ids(sink: Sink) -> set[str]:
    """Queue ids of the messages at the sink, from the Received: field Epoxi added."""
    return {m.data.split(b" id ", 1)[1][:20].decode() for m in sink.messages}


if __name__ == "__main__":
    asyncio.run(main())
