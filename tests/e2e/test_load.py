"""Load over real loopback sockets: 1,000 concurrent sessions, slowloris, a 50 MB message.

The connection and slowloris tests run Epoxi as a child process (``EpoxiProcess``), so the
clients cannot starve its event loop. The 50 MB test runs Epoxi in the test's loop and relays
to a loopback ``Sink``. These tests assert behaviour only; memory and latency under the same
loads are measured by ``bench/connections.py`` (see docs/performance.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import resource
import smtplib
import statistics
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
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
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:  # a hang guard only
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
    await start_epoxi(
        epoxi_process, tmp_path, max_connections=CONNECTIONS + 500, max_connections_per_ip=2000
    )
    port = epoxi_process.port

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
    await stop_epoxi(epoxi_process)
    spooled = await spooled_ids(epoxi_process.data_dir)

    figures = (
        f"{CONNECTIONS} connections (RLIMIT_NOFILE {limit}): {len(clients)} open, {greeted} got "
        f"220, Epoxi counted {open_sessions} sessions (after transactions {sessions_after}); "
        f"connect phase {connect_phase:.2f}s (banner latency {summary(r[2] for r in opened if isinstance(r, tuple))}); "
        f"transactions {len(ids)} x 250 in {transaction_phase:.2f}s "
        f"(latency {summary(r[1] for r in results if isinstance(r, tuple))}); "
        f"{sum(isinstance(q, str) and q.startswith('221') for q in quits)} x 221; "
        f"{len(spooled & set(ids))}/{len(ids)} acknowledged ids spooled; "
        f"errors {errors[:5]}"
    )
    print(f"\n[load] {figures}")
    assert not errors, figures
    assert greeted == CONNECTIONS and open_sessions >= CONNECTIONS, figures
    assert len(set(ids)) == CONNECTIONS, figures
    assert set(ids) <= spooled, figures


# --------------------------------------------------------------------- slowloris

SLOW = 300
TIMEOUT = 3  # idle_timeout and data_timeout of these tests
ORDINARY = 40  # transactions of ordinary clients while the slow ones hold their sessions


@dataclass
class SlowResult:
    kind: str
    sent: int = 0
    reply: str = ""
    eof: bool = False
    error: str = ""
    still_dribbling: bool = False  # Epoxi answered before the client had sent everything


async def slowloris(port: int, kind: str, i: int) -> SlowResult:
    """Dribble one byte a second (an EHLO line, or message data without a line end) until
    Epoxi answers; the payload would last minutes, so only Epoxi's timeout can end it."""
    result = SlowResult(kind)
    try:
        client, banner = await Client.connect(port)
    except OSError as exc:
        result.error = f"connect: {exc!r}"
        return result
    try:
        assert banner.startswith("220 "), banner
        if kind == "data":
            await envelope(client, i)
            payload = b"Subject: slow\r\n\r\n" + b"x" * 10_000
        else:
            payload = f"EHLO slowloris-{i:03d}-".encode() + b"y" * 500
        reply = asyncio.ensure_future(client.reply())
        for byte in payload:
            if reply.done():
                break
            with contextlib.suppress(ConnectionError):
                client.writer.write(bytes([byte]))
                result.sent += 1
            await asyncio.wait([reply], timeout=1.0)
        result.still_dribbling = result.sent < len(payload)
        await finish(client, reply, result)
    except (AssertionError, ConnectionError) as exc:
        result.error = repr(exc)
    finally:
        await client.close()
    return result


async def envelope(client: Client, i: int) -> None:
    """A quick envelope, up to the 354 that opens the message data."""
    for line, code in (
        (f"EHLO slow{i:03d}.test\r\n", "250"),
        ("MAIL FROM:<slow@remote.test>\r\n", "250"),
        (f"RCPT TO:<slow{i:03d}@local.test>\r\n", "250"),
        ("DATA\r\n", "354"),
    ):
        answer = await client.command(line.encode())
        assert answer.startswith(code), (line, answer)


async def finish(client: Client, reply: asyncio.Future[str], result: SlowResult) -> None:
    """Epoxi's reply (it must come), then the end of the connection."""
    result.reply = await reply
    with contextlib.suppress(ConnectionError, TimeoutError):
        result.eof = await asyncio.wait_for(client.reader.read(), 30) == b""


async def held_open(port: int, kind: str, i: int, release: asyncio.Event) -> SlowResult:
    """A slow client that stays within the timeouts (a whole line of message data,
    or a NOOP, every half second) until ``release``, then stalls until Epoxi's timeout closes the session."""
    result = SlowResult(kind)
    client, banner = await Client.connect(port)
    try:
        assert banner.startswith("220 "), banner
        if kind == "data":
            await envelope(client, i)
        while not release.is_set():
            if kind == "data":
                client.writer.write(b"x" * 20 + b"\r\n")
            else:
                assert (await client.command(b"NOOP\r\n")).startswith("250")
            result.sent += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(release.wait(), 0.5)
        await finish(client, asyncio.ensure_future(client.reply()), result)
    except (AssertionError, ConnectionError) as exc:
        result.error = repr(exc)
    finally:
        await client.close()
    return result


def slow_figures(results: list[SlowResult]) -> str:
    cut = [r for r in results if r.reply.startswith("421 4.4.2") and r.eof]
    kinds = sorted({r.kind for r in results})
    return (
        f"{len(results)} slow connections ({', '.join(kinds)}): {len(cut)} closed with "
        f"421 4.4.2 + EOF, other replies "
        f"{sorted({r.reply[:40] for r in results if r not in cut})[:3]}; lines or bytes sent "
        f"per connection max {max((r.sent for r in results), default=0)}; "
        f"errors {[r.error for r in results if r.error][:3]}"
    )


@pytest.mark.slow
async def test_slow_clients_do_not_starve_ordinary_clients(
    epoxi_process: EpoxiProcess, tmp_path: Path
) -> None:
    """While SLOW slow clients hold sessions open, ordinary clients get every transaction
    through; once the slow ones stall, each is cut off with 421 and the connection closed."""
    ensure_open_files(SLOW + 1024)
    await start_epoxi(
        epoxi_process,
        tmp_path,
        idle_timeout=TIMEOUT,
        data_timeout=TIMEOUT,
        max_connections=SLOW + 500,
        max_connections_per_ip=SLOW + 500,
    )
    port = epoxi_process.port
    release = asyncio.Event()
    slow = [
        asyncio.ensure_future(held_open(port, "command" if i % 2 else "data", i, release))
        for i in range(SLOW)
    ]
    try:
        async with asyncio.timeout(60):
            while await smtp_sessions(epoxi_process) < SLOW:
                await asyncio.sleep(0.1)  # until every slow client is connected

        def ordinary(worker: int) -> list[str]:
            return [send_ordinary(port, f"w{worker}n{n}") for n in range(ORDINARY // 4)]

        batches = await asyncio.gather(*(asyncio.to_thread(ordinary, w) for w in range(4)))
        held_meanwhile = await smtp_sessions(epoxi_process)
    finally:
        release.set()
    async with asyncio.timeout(TIMEOUT + 60):
        results = await asyncio.gather(*slow)
    sessions_left = await smtp_sessions(epoxi_process)
    await stop_epoxi(epoxi_process)
    spooled = await spooled_ids(epoxi_process.data_dir)
    ids = [queue_id for batch in batches for queue_id in batch]

    figures = (
        f"{slow_figures(results)}; Epoxi counted {held_meanwhile} sessions after the ordinary "
        f"clients, {sessions_left} at the end; ordinary clients: {len(ids)} x 250, "
        f"{len(spooled & set(ids))}/{len(ids)} spooled"
    )
    print(f"\n[load] {figures}")
    assert len(set(ids)) == ORDINARY and set(ids) <= spooled, figures
    assert held_meanwhile >= SLOW, figures  # the slow ones were all still there meanwhile
    for r in results:
        assert not r.error and r.reply.startswith("421 4.4.2") and r.eof, (r, figures)
    assert sessions_left == 0, figures


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
    async with asyncio.timeout(TIMEOUT + 60):
        results = await asyncio.gather(
            *(slowloris(epoxi_process.port, kind, i) for i in range(SLOW))
        )
    figures = slow_figures(results)
    print(f"\n[load] dribbling one byte a second with timeouts of {TIMEOUT}s: {figures}")
    for r in results:
        assert not r.error and r.reply.startswith("421 4.4.2") and r.eof, (r, figures)
        assert r.still_dribbling, (r, figures)  # cut off by Epoxi, not by running out


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
    (message,) = relay_sink.messages
    received = message.data
    header = received[: len(received) - len(body)]
    sink_digest = hashlib.sha256(received[len(header) :]).hexdigest()

    figures = (
        f"{len(body) / MiB:.1f} MiB message: 250 after {accepted:.2f}s "
        f"({len(body) / MiB / accepted:.0f} MiB/s), delivered to the sink {delivered:.2f}s after "
        f"release; spool copy intact {spooled_ok}, sink copy intact {sink_digest == digest} "
        f"(sent {len(body)} octets, sink got {len(received)} incl. {len(header)} octets of "
        f"Received)"
    )
    print(f"\n[load] {figures}")
    assert spooled_ok, figures
    assert message.rcpt_tos == ["big@local.test"] and message.mail_from == "big@remote.test"
    assert received.startswith(b"Received: ") and header.count(b"Received:") == 1, figures
    assert re.fullmatch(rb"Received: [^\r\n]*(\r\n\t[^\r\n]*)*\r\n", header), figures
    assert sink_digest == digest, figures
