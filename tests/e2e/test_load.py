"""Load over real loopback sockets: 1,000 concurrent sessions, slowloris, a 50 MB message.

The connection and slowloris tests run Epoxi as a child process (``EpoxiProcess``), so its
resident memory (``/proc/<pid>/status``) is Epoxi's alone and the clients cannot starve its
event loop. The 50 MB test runs Epoxi in the test's loop and relays to a loopback ``Sink``.
Figures are printed (``pytest -s``) and repeated in assertion messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import resource
import smtplib
import statistics
import threading
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from epoxi.spool import Spool
from epoxi.testing.sink import Sink
from tests.conftest import EpoxiProcess, free_port
from tests.e2e.conftest import MakeServer, Running

MiB = 1024 * 1024
BODY = b"From: load@remote.test\r\nTo: rcpt@local.test\r\nSubject: load\r\n\r\nHello.\r\n"
QUEUED = re.compile(r"^250 2\.0\.0 Ok: queued as (\S+)\r\n$")
RSS_GROWTH_LIMIT_MB = 300.0


# --------------------------------------------------------------------- helpers


def ensure_open_files(needed: int) -> int:
    """Raise the soft RLIMIT_NOFILE to ``needed`` if it is lower (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return soft
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {needed} needed")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    return needed


def memory_mb(pid: int | str = "self") -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak) of a process, in MB."""
    figures = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            figures[key] = int(value.split()[0]) / 1024
    return figures


class RssSampler:
    """Polls a process's VmRSS in the background and keeps the highest figure seen."""

    def __init__(self, pid: int | str) -> None:
        self.pid = pid
        self.baseline = memory_mb(pid)["VmRSS"]
        self.peak = self.baseline
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> float:
        rss = memory_mb(self.pid)["VmRSS"]
        self.peak = max(self.peak, rss)
        return rss

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(0.05)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> str:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        now = self.sample()
        hwm = memory_mb(self.pid)["VmHWM"]
        self.peak = max(self.peak, hwm)  # the kernel's high-water mark misses nothing
        return (
            f"RSS baseline {self.baseline:.1f} MB, peak {self.peak:.1f} MB "
            f"(growth {self.growth:.1f} MB), now {now:.1f} MB"
        )

    @property
    def growth(self) -> float:
        return self.peak - self.baseline


def summary(values: Iterable[float]) -> str:
    data = sorted(values)
    if not data:
        return "n=0"
    p99 = data[min(len(data) - 1, int(len(data) * 0.99))]
    return (
        f"n={len(data)} median {statistics.median(data) * 1000:.0f} ms, "
        f"p99 {p99 * 1000:.0f} ms, max {data[-1] * 1000:.0f} ms"
    )


class Client:
    """A raw asyncio SMTP client: one reply per command, nothing pipelined."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int) -> tuple[Client, str]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        client = cls(reader, writer)
        return client, await client.reply()

    async def reply(self) -> str:
        lines = []
        while True:
            line = (await self.reader.readline()).decode()
            if not line:
                raise ConnectionError(f"closed after {lines!r}")
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                return "".join(lines)

    async def command(self, data: bytes) -> str:
        self.writer.write(data)
        await self.writer.drain()
        return await self.reply()

    async def transaction(self, name: str, body: bytes = BODY) -> str:
        """EHLO, MAIL, RCPT, DATA; returns the queue id of the 250."""
        for line, code in (
            (f"EHLO {name}\r\n".encode(), "250"),
            (b"MAIL FROM:<load@remote.test>\r\n", "250"),
            (f"RCPT TO:<{name}@local.test>\r\n".encode(), "250"),
            (b"DATA\r\n", "354"),
        ):
            reply = await self.command(line)
            assert reply.startswith(code), (line, reply)
        reply = await self.command(body + b".\r\n")
        match = QUEUED.match(reply)
        assert match, reply
        return match.group(1)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


def send_ordinary(port: int, name: str) -> str:
    """One smtplib transaction with ordinary timeouts; returns the queue id."""
    with smtplib.SMTP("127.0.0.1", port, timeout=5) as smtp:
        smtp.ehlo(name)
        smtp.mail("ordinary@remote.test")
        code, text = smtp.rcpt(f"{name}@local.test")
        assert code == 250, text
        code, text = smtp.data(BODY)
        assert code == 250, text
        return text.decode().split()[-1]


async def start_epoxi(process: EpoxiProcess, tmp_path: Path, **smtp: object) -> int:
    """Start the child with ``[smtp]`` overrides from a config file; return its pid."""
    config = tmp_path / "epoxi.toml"
    lines = ["[smtp]", *(f"{key} = {value!r}" for key, value in smtp.items())]
    config.write_text("\n".join(lines) + "\n")
    await asyncio.to_thread(process.start, config)
    assert process.proc is not None
    await asyncio.to_thread(send_ordinary, process.port, "warmup")  # imports, first commit
    await asyncio.sleep(0.5)
    return process.proc.pid


async def smtp_sessions(process: EpoxiProcess) -> int:
    """Epoxi's own count of open inbound sessions, from ``GET /metrics``."""
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.get(f"http://127.0.0.1:{process.http_port}/metrics")
    match = re.search(r"^epoxi_smtp_sessions (\S+)$", response.text, re.MULTILINE)
    assert match, response.text[:500]
    return int(float(match.group(1)))


async def spooled_ids(data_dir: Path) -> set[str]:
    spool = Spool(data_dir / "spool.db")
    spool.open()
    try:
        return await asyncio.to_thread(lambda: {m.id for b in spool.iter_meta() for m in b})
    finally:
        await spool.close()


async def stop_epoxi(process: EpoxiProcess) -> None:
    code = await asyncio.to_thread(process.stop)
    assert code == 0, process.log()[-3000:]


# --------------------------------------------------------------------- 1,000 connections

CONNECTIONS = 1000


@pytest.mark.slow
async def test_thousand_concurrent_connections(epoxi_process: EpoxiProcess, tmp_path: Path) -> None:
    limit = ensure_open_files(CONNECTIONS + 1024)
    pid = await start_epoxi(
        epoxi_process, tmp_path, max_connections=CONNECTIONS + 500, max_connections_per_ip=2000
    )
    port = epoxi_process.port
    rss = RssSampler(pid)
    rss.start()

    # Phase 1: every connection is opened and greeted; none is closed before all are open.
    async def open_one() -> tuple[Client, str, float]:
        started = time.monotonic()
        client, banner = await Client.connect(port)
        return client, banner, time.monotonic() - started

    started = time.monotonic()
    async with asyncio.timeout(60):
        opened = await asyncio.gather(
            *(open_one() for _ in range(CONNECTIONS)), return_exceptions=True
        )
    connect_phase = time.monotonic() - started
    clients = [r[0] for r in opened if isinstance(r, tuple)]
    errors = [repr(r) for r in opened if not isinstance(r, tuple)]
    banners = [r[1] for r in opened if isinstance(r, tuple)]
    greeted = sum(b.startswith("220 ") for b in banners)
    open_sessions = await smtp_sessions(epoxi_process)

    # Phase 2: all of them run a transaction at once, still all open.
    async def transact(i: int, client: Client) -> tuple[str, float]:
        began = time.monotonic()
        queue_id = await client.transaction(f"c{i:04d}")
        return queue_id, time.monotonic() - began

    started = time.monotonic()
    async with asyncio.timeout(60):
        results = await asyncio.gather(
            *(transact(i, c) for i, c in enumerate(clients)), return_exceptions=True
        )
    transaction_phase = time.monotonic() - started
    ids = [r[0] for r in results if isinstance(r, tuple)]
    errors += [repr(r) for r in results if not isinstance(r, tuple)]
    sessions_after = await smtp_sessions(epoxi_process)

    async with asyncio.timeout(30):
        quits = await asyncio.gather(
            *(c.command(b"QUIT\r\n") for c in clients), return_exceptions=True
        )
        await asyncio.gather(*(c.close() for c in clients))
    memory = await rss.stop()
    await stop_epoxi(epoxi_process)
    spooled = await spooled_ids(epoxi_process.data_dir)

    figures = (
        f"{CONNECTIONS} connections (RLIMIT_NOFILE {limit}): {len(clients)} open, {greeted} got "
        f"220, Epoxi counted {open_sessions} sessions (after transactions {sessions_after}); "
        f"connect phase {connect_phase:.2f}s (banner latency {summary(r[2] for r in opened if isinstance(r, tuple))}); "
        f"transactions {len(ids)} x 250 in {transaction_phase:.2f}s "
        f"(latency {summary(r[1] for r in results if isinstance(r, tuple))}); "
        f"{sum(isinstance(q, str) and q.startswith('221') for q in quits)} x 221; "
        f"{len(spooled & set(ids))}/{len(ids)} acknowledged ids spooled; {memory}; "
        f"errors {errors[:5]}"
    )
    print(f"\n[load] {figures}")
    assert not errors, figures
    assert greeted == CONNECTIONS and open_sessions >= CONNECTIONS, figures
    assert len(set(ids)) == CONNECTIONS, figures
    assert set(ids) <= spooled, figures
    assert rss.growth < RSS_GROWTH_LIMIT_MB, figures


# --------------------------------------------------------------------- slowloris

SLOW = 300
TIMEOUT = 3  # idle_timeout and data_timeout of these tests
DRIBBLE = 6.0  # seconds the slow clients of the first test dribble before they stall


@dataclass
class SlowResult:
    kind: str
    sent: int = 0
    last_byte: float = 0.0
    reply: str = ""
    closed_at: float | None = None  # when the reply (then EOF) came
    eof: bool = False
    error: str = ""
    started: float = field(default_factory=time.monotonic)


async def slowloris(port: int, kind: str, i: int, dribble_for: float, wait: float) -> SlowResult:
    """Dribble one byte a second (an EHLO line, or message data) for ``dribble_for`` seconds
    or until Epoxi answers; then wait up to ``wait`` seconds for its reply and the close."""
    result = SlowResult(kind)
    try:
        client, banner = await Client.connect(port)
    except OSError as exc:
        result.error = f"connect: {exc!r}"
        return result
    try:
        assert banner.startswith("220 "), banner
        if kind == "data":  # a quick envelope, then the message data a byte at a time
            for line, code in (
                (f"EHLO slow{i:03d}.test\r\n", "250"),
                ("MAIL FROM:<slow@remote.test>\r\n", "250"),
                (f"RCPT TO:<slow{i:03d}@local.test>\r\n", "250"),
                ("DATA\r\n", "354"),
            ):
                answer = await client.command(line.encode())
                assert answer.startswith(code), (line, answer)
            payload = b"Subject: slow\r\n\r\n" + b"x" * 10_000
        else:
            payload = f"EHLO slowloris-{i:03d}-".encode() + b"y" * 500
        reply = asyncio.ensure_future(client.reply())
        deadline = time.monotonic() + dribble_for
        for byte in payload:
            if reply.done() or time.monotonic() >= deadline:
                break
            with contextlib.suppress(ConnectionError):
                client.writer.write(bytes([byte]))
                await client.writer.drain()
                result.sent += 1
                result.last_byte = time.monotonic()
            await asyncio.wait([reply], timeout=1.0)
        done, _ = await asyncio.wait([reply], timeout=wait)
        if done and reply.exception() is None:
            result.reply = reply.result()
            result.closed_at = time.monotonic()
            with contextlib.suppress(ConnectionError, TimeoutError):
                result.eof = await asyncio.wait_for(client.reader.read(), 3) == b""
        elif done:
            result.error = repr(reply.exception())
        else:
            reply.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await reply
    except (AssertionError, ConnectionError) as exc:
        result.error = repr(exc)
    finally:
        await client.close()
    return result


def slow_figures(results: list[SlowResult]) -> str:
    closed = [r for r in results if r.closed_at is not None]
    timed_out = [r for r in closed if r.reply.startswith("421 4.4.2") and r.eof]
    after_last = [r.closed_at - r.last_byte for r in timed_out if r.closed_at and r.last_byte]
    after_connect = [r.closed_at - r.started for r in timed_out if r.closed_at]
    kinds = sorted({r.kind for r in results})
    return (
        f"{len(results)} slow connections ({', '.join(kinds)}): {len(timed_out)} closed with "
        f"421 4.4.2 + EOF, {len(closed) - len(timed_out)} other replies "
        f"{sorted({r.reply[:40] for r in closed if r not in timed_out})[:3]}, "
        f"{len(results) - len(closed)} never answered; bytes dribbled per connection "
        f"max {max((r.sent for r in results), default=0)}; closed after last byte "
        f"{summary(after_last)}; closed after connect {summary(after_connect)}; "
        f"errors {[r.error for r in results if r.error][:3]}"
    )


@pytest.mark.slow
async def test_slowloris_does_not_starve_ordinary_clients(
    epoxi_process: EpoxiProcess, tmp_path: Path
) -> None:
    ensure_open_files(SLOW + 1024)
    pid = await start_epoxi(
        epoxi_process,
        tmp_path,
        idle_timeout=TIMEOUT,
        data_timeout=TIMEOUT,
        max_connections=SLOW + 500,
        max_connections_per_ip=SLOW + 500,
    )
    port = epoxi_process.port
    rss = RssSampler(pid)
    rss.start()

    slow = [
        asyncio.ensure_future(
            slowloris(port, "command" if i % 2 else "data", i, DRIBBLE, TIMEOUT + 6)
        )
        for i in range(SLOW)
    ]
    await asyncio.sleep(1.5)  # every slow connection is open and dribbling
    open_sessions = await smtp_sessions(epoxi_process)

    stop = threading.Event()
    latencies: list[float] = []
    ids: list[str] = []
    failures: list[str] = []

    def ordinary(worker: int) -> None:
        n = 0
        while not stop.is_set():
            began = time.monotonic()
            try:
                ids.append(send_ordinary(port, f"w{worker}n{n}"))
            except (OSError, smtplib.SMTPException, AssertionError) as exc:
                failures.append(repr(exc))
            latencies.append(time.monotonic() - began)
            n += 1

    workers = [asyncio.ensure_future(asyncio.to_thread(ordinary, w)) for w in range(4)]
    await asyncio.sleep(DRIBBLE - 2)
    stop.set()
    await asyncio.gather(*workers)
    async with asyncio.timeout(TIMEOUT + 20):
        results = await asyncio.gather(*slow)
    sessions_left = await smtp_sessions(epoxi_process)
    memory = await rss.stop()
    await stop_epoxi(epoxi_process)
    spooled = await spooled_ids(epoxi_process.data_dir)

    figures = (
        f"{slow_figures(results)}; Epoxi counted {open_sessions} sessions while dribbling, "
        f"{sessions_left} at the end (warm-up excluded); ordinary clients: {len(ids)} x 250, "
        f"latency {summary(latencies)}, failures {failures[:3]}; "
        f"{len(spooled & set(ids))}/{len(ids)} spooled; {memory}"
    )
    print(f"\n[load] {figures}")
    assert open_sessions >= SLOW, figures
    assert not failures and len(ids) >= 20, figures
    assert max(latencies) < 5.0, figures
    assert set(ids) <= spooled, figures
    for r in results:
        assert not r.error and r.reply.startswith("421 4.4.2") and r.eof, (r, figures)
        assert r.closed_at is not None and r.closed_at - r.last_byte < TIMEOUT + 3, (r, figures)
    assert sessions_left == 0, figures
    assert rss.growth < RSS_GROWTH_LIMIT_MB, figures


ENDLESS = 10.0  # how long the slow clients below keep dribbling, 1 byte a second


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["command", "data"])
async def test_slowloris_dribbling_forever_is_cut_off(
    epoxi_process: EpoxiProcess, tmp_path: Path, kind: str
) -> None:
    ensure_open_files(SLOW + 1024)
    await start_epoxi(
        epoxi_process,
        tmp_path,
        idle_timeout=TIMEOUT,
        data_timeout=TIMEOUT,
        max_connections=SLOW + 500,
        max_connections_per_ip=SLOW + 500,
    )
    async with asyncio.timeout(ENDLESS + 30):
        results = await asyncio.gather(
            *(slowloris(epoxi_process.port, kind, i, ENDLESS, 2) for i in range(SLOW))
        )
    figures = slow_figures(results)
    print(f"\n[load] dribbling for up to {ENDLESS:.0f}s with timeouts of {TIMEOUT}s: {figures}")
    cut = [
        r
        for r in results
        if r.reply.startswith("421 4.4.2") and r.closed_at and r.closed_at - r.started < ENDLESS
    ]
    assert len(cut) == SLOW, figures


# --------------------------------------------------------------------- one 50 MB message

BIG = 50 * MiB


def big_body() -> bytes:
    """50 MiB of CRLF lines, some starting with a dot (smtplib stuffs them, Epoxi unstuffs)."""
    head = b"From: big@remote.test\r\nTo: big@local.test\r\nSubject: fifty megabytes\r\n\r\n"
    block = b"".join(
        (b"." if n % 7 == 0 else b"")
        + hashlib.sha256(str(n).encode()).hexdigest().encode() * 2
        + b"\r\n"
        for n in range(1024)
    )
    body = head + block * (BIG // len(block) + 1)
    cut = body.rfind(b"\r\n", 0, BIG) + 2
    return body[:cut]


@pytest.fixture
async def relay_sink() -> AsyncIterator[Sink]:
    sink = Sink("127.0.0.1", free_port(), max_size=BIG + MiB)
    await sink.start()
    yield sink
    await sink.stop()


@pytest.mark.slow
async def test_fifty_megabyte_message_is_spooled_and_delivered_intact(
    make_server: MakeServer, relay_sink: Sink
) -> None:
    server: Running = await make_server(
        smtp={"max_message_size": BIG + MiB},
        relay={"host": "127.0.0.1", "port": relay_sink.port, "tls": "disabled"},
    )
    server.app.admin.suspend("domain", "local.test", "hold until the spool is checked")
    body = big_body()
    digest = hashlib.sha256(body).hexdigest()
    rss = RssSampler(os.getpid())
    rss.start()

    def send() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", server.ports.open, timeout=60) as smtp:
            smtp.ehlo("big.test")
            smtp.mail("big@remote.test", [f"SIZE={len(body)}"])
            smtp.rcpt("big@local.test")
            return smtp.data(body)

    started = time.monotonic()
    code, text = await asyncio.to_thread(send)
    accepted = time.monotonic() - started
    assert code == 250, text
    queue_id = text.decode().split()[-1]

    spooled = await server.app.spool.load_body(queue_id)
    assert spooled.startswith(b"Received: ") and spooled.endswith(body)
    header = spooled[: len(spooled) - len(body)]
    assert re.fullmatch(rb"Received: [^\r\n]*(\r\n\t[^\r\n]*)*\r\n", header), header
    spooled_ok = hashlib.sha256(spooled[len(header) :]).hexdigest() == digest
    del spooled

    started = time.monotonic()
    assert server.app.admin.resume("domain", "local.test") == 1
    await relay_sink.wait_for(1, timeout=60)
    delivered = time.monotonic() - started
    memory = await rss.stop()
    (message,) = relay_sink.messages
    received = message.data
    header = received[: len(received) - len(body)]
    sink_digest = hashlib.sha256(received[len(header) :]).hexdigest()

    figures = (
        f"{len(body) / MiB:.1f} MiB message: 250 after {accepted:.2f}s "
        f"({len(body) / MiB / accepted:.0f} MiB/s), delivered to the sink {delivered:.2f}s after "
        f"release; spool copy intact {spooled_ok}, sink copy intact {sink_digest == digest} "
        f"(sent {len(body)} octets, sink got {len(received)} incl. {len(header)} octets of "
        f"Received); test process (Epoxi + sink + client) {memory}"
    )
    print(f"\n[load] {figures}")
    assert spooled_ok, figures
    assert message.rcpt_tos == ["big@local.test"] and message.mail_from == "big@remote.test"
    assert received.startswith(b"Received: ") and header.count(b"Received:") == 1, figures
    assert re.fullmatch(rb"Received: [^\r\n]*(\r\n\t[^\r\n]*)*\r\n", header), figures
    assert sink_digest == digest, figures
