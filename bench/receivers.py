"""The benchmarks' far end: ``--domains`` domains in a loopback DNS server, their MX hosts
spread over ``--hosts`` counting sinks on 127.0.0.2, 127.0.0.3, ...

Domain ``dN.bench`` has two MX hosts, a pair chosen by N, so the 1,000 domains fall into many
sites (distinct MX host sets). Prints ``ready`` once everything listens; stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal

import uvloop

from epoxi.testing.dnsserver import DnsServer, Zone
from epoxi.testing.sink import Sink


def zone(domains: int, hosts: int) -> Zone:
    z = Zone(default_ttl=3600)
    for h in range(hosts):
        z.add(f"mx{h}.bench", "A", f"127.0.0.{2 + h}")
    pairs = list(itertools.combinations(range(hosts), 2)) if hosts > 1 else [(0, 0)]
    for n in range(domains):
        first, second = pairs[n % len(pairs)]
        z.add(f"d{n}.bench", "MX", f"10 mx{first}.bench.")
        z.add(f"d{n}.bench", "MX", f"20 mx{second}.bench.")
    return z


async def main(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    dns = DnsServer(zone(args.domains, args.hosts), host="127.0.0.1", port=args.dns_port)
    sinks = [
        Sink(f"127.0.0.{2 + h}", args.sink_port, store=False, max_recipients=10_000)
        for h in range(args.hosts)
    ]
    async with dns:
        for sink in sinks:
            await sink.start()
        print("ready", flush=True)
        await stop.wait()
        for sink in sinks:
            await sink.stop()
    print(f"received {sum(s.received for s in sinks)}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--domains", type=int, default=1000)
    parser.add_argument("--hosts", type=int, default=8)
    parser.add_argument("--dns-port", type=int, required=True)
    parser.add_argument("--sink-port", type=int, required=True)
    uvloop.run(main(parser.parse_args()))
