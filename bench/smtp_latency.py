"""SMTP accept latency: from MAIL to the final 250 (which waits for the fsync), per message.

    .venv/bin/python bench/smtp_latency.py [-n 10000] [--sessions 20,200]

Epoxi relays to a loopback sink while the injector sends 5 KB messages, one command at a
time, over 20 and then 200 concurrent sessions. Prints p50, p99 and the rate for each.
"""

from __future__ import annotations

import argparse
import asyncio

from harness import Node, Receivers, emit, inject


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=10_000)
    parser.add_argument("--sessions", default="20,200")
    args = parser.parse_args()
    with Receivers(domains=1, hosts=1) as receivers:
        for sessions in (int(s) for s in args.sessions.split(",")):
            with Node(receivers) as node:
                asyncio.run(inject(node.smtp_port, 500, sessions, lambda i: f"w{i}@d0.bench"))
                node.wait_delivered(500)  # warmed up: routes cached, connections open
                result = asyncio.run(
                    inject(node.smtp_port, args.n, sessions, lambda i: f"u{i}@d0.bench")
                )
            emit({"bench": "smtp_latency", "sessions": sessions, **result.summary()})


if __name__ == "__main__":
    main()
