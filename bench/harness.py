"""What the benchmarks share: an Epoxi node as a child process, receivers, an SMTP injector.

Everything runs on loopback. The receivers (sinks on 127.0.0.2..., and the loopback DNS server
that points 1,000 domains at them) run in a child process of their own, so the injector, Epoxi
and the receivers each have a process; they still share the machine's cores.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
SINK_PORT_DEFAULT = 2726


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> float:
    """Seconds until something accepts on 127.0.0.1:``port``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return time.monotonic() - start
        except OSError:
            time.sleep(0.005)
    raise TimeoutError(f"nothing on port {port} after {timeout}s")


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))
    return ordered[index]


# --------------------------------------------------------------------- receivers


class Receivers:
    """``bench/receivers.py`` in a child process: DNS on loopback and sinks on 127.0.0.x."""

    def __init__(self, domains: int = 1000, hosts: int = 8) -> None:
        self.domains = domains
        self.hosts = hosts
        self.dns_port = free_port()
        self.sink_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Receivers:
        args = [PYTHON, str(ROOT / "bench" / "receivers.py"), "--domains", str(self.domains)]
        args += ["--hosts", str(self.hosts), "--dns-port", str(self.dns_port)]
        args += ["--sink-port", str(self.sink_port)]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if b"ready" not in line:
            raise RuntimeError(f"receivers did not start: {line!r}")
        return self

    def __exit__(self, *_: object) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)


# --------------------------------------------------------------------- the node


@dataclass
class Node:
    """``epoxi serve`` as a child process with its own data dir and config."""

    receivers: Receivers | None = None
    data_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="epoxi-bench-")))
    extra_config: str = ""
    smtp_config: str = ""  # more [smtp] settings
    workers: int = 1
    relay_port: int | None = None  # a smarthost on 127.0.0.1 for all mail
    smtp_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0

    def config(self) -> Path:
        dns = f'nameservers = ["127.0.0.1:{self.receivers.dns_port}"]' if self.receivers else ""
        mx_port = f"mx_port = {self.receivers.sink_port}" if self.receivers else ""
        relay = f'[relay]\nhost = "127.0.0.1"\nport = {self.relay_port}' if self.relay_port else ""
        text = f"""
hostname = "epoxi.bench"
data_dir = "{self.data_dir}"
http_listen = ["127.0.0.1:{self.http_port}"]
log_level = "info"
workers = {self.workers}
{relay}
[smtp]
listeners = [{{ address = "127.0.0.1:{self.smtp_port}" }}]
{self.smtp_config}
[dns]
{dns}
[delivery]
{mx_port}
{self.extra_config}
"""
        path = self.data_dir / "epoxi.toml"
        path.write_text(text)
        return path

    def start(self, wait_http: bool = True) -> float:
        """Start; returns the seconds until SMTP accepted a connection."""
        log = (self.data_dir / "epoxi.log").open("ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("EPOXI_")}
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "epoxi", "serve", "-c", str(self.config())],
            stdout=log,
            stderr=log,
            env=env,
        )
        ready = wait_for_port(self.smtp_port, self.proc)
        if wait_http:
            wait_for_port(self.http_port, self.proc)
        return ready

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None

    def __enter__(self) -> Node:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def log(self) -> str:
        return (self.data_dir / "epoxi.log").read_text(errors="replace")

    def rss_mb(self) -> float:
        return self.memory_mb("VmRSS")

    def memory_mb(self, field: str) -> float:
        """A memory figure of the process from /proc: VmRSS now, VmHWM its peak."""
        assert self.proc is not None
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        match = re.search(rf"{field}:\s+(\d+) kB", status)
        return int(match.group(1)) / 1024 if match else 0.0

    def metric(self, name: str, labels: str = "") -> float:
        url = f"http://127.0.0.1:{self.http_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
        wanted = f"{name}{{{labels}}}" if labels else name
        for line in text.splitlines():
            if line.startswith(wanted + " "):
                return float(line.split()[-1])
        return 0.0

    def wait_delivered(self, count: int, timeout: float = 600) -> float:
        """Seconds until ``count`` Delivery records, polling /metrics."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.metric("epoxi_records_total", 'type="Delivery"') >= count:
                return time.monotonic() - start
            time.sleep(0.05)
        raise TimeoutError(f"fewer than {count} delivered after {timeout}s")


# --------------------------------------------------------------------- SMTP injector


@dataclass
class InjectResult:
    sent: int
    seconds: float
    latencies: list[float]  # MAIL sent -> final 250 received, per message

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0

    def summary(self) -> dict[str, Any]:
        ms = [x * 1000 for x in self.latencies]
        return {
            "sent": self.sent,
            "seconds": round(self.seconds, 3),
            "msgs_per_s": round(self.rate, 1),
            "latency_ms_p50": round(percentile(ms, 50), 2),
            "latency_ms_p99": round(percentile(ms, 99), 2),
            "latency_ms_mean": round(statistics.fmean(ms), 2) if ms else 0.0,
        }


def make_body(size: int) -> bytes:
    head = b"From: bench@epoxi.bench\r\nSubject: bench\r\n\r\n"
    line = b"x" * 78 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


async def inject(
    port: int,
    count: int,
    sessions: int,
    recipient: Callable[[int], str],
    size: int = 5120,
) -> InjectResult:
    """Send ``count`` messages over ``sessions`` connections, one command at a time."""
    body = make_body(size) + b".\r\n"
    numbers = iter(range(count))
    latencies: list[float] = []

    async def session() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await read_reply(reader)
        writer.write(b"EHLO injector.bench\r\n")
        await read_reply(reader)
        for n in numbers:
            started = time.perf_counter()
            writer.write(b"MAIL FROM:<bench@epoxi.bench>\r\n")
            await _expect(reader, b"250")
            writer.write(f"RCPT TO:<{recipient(n)}>\r\n".encode())
            await _expect(reader, b"250")
            writer.write(b"DATA\r\n")
            await _expect(reader, b"354")
            writer.write(body)
            await _expect(reader, b"250")
            latencies.append(time.perf_counter() - started)
        writer.write(b"QUIT\r\n")
        await writer.drain()
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(session() for _ in range(sessions)))
    return InjectResult(len(latencies), time.perf_counter() - started, latencies)


async def read_reply(reader: asyncio.StreamReader) -> bytes:
    """The last line of the next SMTP reply (multi-line replies read whole)."""
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("server closed the connection")
        if line[3:4] != b"-":
            return line


async def _expect(reader: asyncio.StreamReader, code: bytes) -> None:
    line = await read_reply(reader)
    if not line.startswith(code):
        raise RuntimeError(f"expected {code!r}, got {line!r}")
