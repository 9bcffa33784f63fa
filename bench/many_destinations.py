"""Many destinations against one: the same N messages to 1,000 domains or to one domain.

    .venv/bin/python bench/many_destinations.py [-n 20000] [--domains 1000] [--hosts 8] [--repeat 3]

The 1,000 domains live in a loopback DNS server; each has two MX hosts out of ``--hosts``
sinks on 127.0.0.2..., so there are 1,000 scheduled queues and (for 8 hosts) 28 ready queues.
The single-destination run sends everything to d0.bench. Both runs use the same injector
(20 SMTP sessions, 5 KB) and end when /metrics counts every message delivered. Prints one JSON
line per run and a summary with the ratio of the medians (many / single).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics

from harness import Node, Receivers, emit, inject


def run(kind: str, receivers: Receivers, n: int, domains: int) -> dict[str, object]:
    def recipient(i: int) -> str:
        return f"u{i}@d{i % domains if kind == 'many' else 0}.bench"

    with Node(receivers) as node:
        result = asyncio.run(inject(node.smtp_port, n, 20, recipient))
        drain = node.wait_delivered(n)
        queues = node.metric("epoxi_ready_queues")
    end_to_end = result.seconds + drain
    record = {
        "bench": "many_destinations",
        "kind": kind,
        "n": n,
        "domains": domains if kind == "many" else 1,
        "ready_queues": queues,
        "inject_s": round(result.seconds, 3),
        "end_to_end_s": round(end_to_end, 3),
        "msgs_per_s": round(n / end_to_end, 1),
    }
    emit(record)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=20_000)
    parser.add_argument("--domains", type=int, default=1000)
    parser.add_argument("--hosts", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rates: dict[str, list[float]] = {"single": [], "many": []}
    with Receivers(args.domains, args.hosts) as receivers:
        for _ in range(args.repeat):
            for kind in ("single", "many"):
                rates[kind].append(float(run(kind, receivers, args.n, args.domains)["msgs_per_s"]))
    single, many = statistics.median(rates["single"]), statistics.median(rates["many"])
    emit(
        {
            "summary": True,
            "bench": "many_destinations",
            "single_msgs_per_s": single,
            "many_msgs_per_s": many,
            "ratio_many_over_single": round(many / single, 3),
        }
    )


if __name__ == "__main__":
    main()
