"""Start-up and memory with a large spool: N deferred messages waiting for their retry.

    .venv/bin/python bench/startup_memory.py [-n 1000000] [--size 1024] [--keep DIR]

Writes N messages straight into a fresh spool (each deferred once, due in a day, to 1,000
domains), then starts ``epoxi serve`` on it and measures:
- seconds from exec to the first SMTP connection accepted (listeners open before the load);
- seconds until the log says the whole spool is queued again;
- RSS of the process with every message in the scheduler (and with an empty spool, for scale).
``--keep DIR`` reuses (or keeps) a spool built earlier, since building one takes a while.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import time
from pathlib import Path

from harness import Node, emit

from epoxi.ids import new_message_id
from epoxi.message import MessageMeta
from epoxi.spool import Spool


async def build_spool(path: Path, count: int, size: int) -> float:
    spool = Spool(path, max_batch=5000, max_pending=50_000)
    spool.open()
    body = b"Subject: waiting\r\n\r\n" + b"x" * max(0, size - 22) + b"\r\n"
    now = time.time()
    started = time.perf_counter()
    for start in range(0, count, 5000):
        items = [
            (
                MessageMeta(
                    id=new_message_id(now - 3600 + i * 1e-6),
                    sender="bench@epoxi.bench",
                    recipients=[f"user{i}@d{i % 1000}.bench"],
                    received_at=now - 3600,
                    size=len(body),
                    attempts=1,
                    due=now + 86400,
                    last_response="451 4.4.1 connection failed",
                ),
                body,
            )
            for i in range(start, min(count, start + 5000))
        ]
        await spool.store_many(items)
    await spool.close()
    return time.perf_counter() - started


def measure(data_dir: Path, count: int) -> dict[str, float]:
    node = Node(data_dir=data_dir)
    accepting = node.start(wait_http=False)
    deadline = time.monotonic() + 900
    pattern = re.compile(r"(\d+) messages queued in ([\d.]+)s")
    while not (match := pattern.search(node.log())):
        if time.monotonic() > deadline:
            raise TimeoutError("the spool was not loaded after 900 s")
        time.sleep(0.2)
    enumerated = time.monotonic() - node.started_at
    time.sleep(2)  # let the allocator settle
    rss = node.rss_mb()
    node.stop()
    if int(match.group(1)) != count:
        raise RuntimeError(f"queued {match.group(1)} messages, expected {count}")
    return {
        "accepting_s": round(accepting, 3),
        "enumerated_s": round(enumerated, 2),
        "rss_mb": round(rss, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=1_000_000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--keep", type=Path, default=None)
    args = parser.parse_args()
    empty = Path(f"/tmp/epoxi-empty-{time.time_ns()}")
    empty.mkdir()
    baseline = measure(empty, 0)
    shutil.rmtree(empty, ignore_errors=True)
    data_dir = args.keep or Path(f"/tmp/epoxi-startup-{time.time_ns()}")
    data_dir.mkdir(parents=True, exist_ok=True)
    spool_path = data_dir / "spool.db"
    build_s = None
    if not spool_path.exists():
        build_s = round(asyncio.run(build_spool(spool_path, args.n, args.size)), 1)
    result = measure(data_dir, args.n)
    emit(
        {
            "bench": "startup_memory",
            "messages": args.n,
            "body_bytes": args.size,
            "spool_build_s": build_s,
            "spool_mb": round(spool_path.stat().st_size / 2**20),
            "empty_rss_mb": baseline["rss_mb"],
            "empty_accepting_s": baseline["accepting_s"],
            **result,
        }
    )
    if args.keep is None:
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
