"""SIGKILL at random moments under load, then restart: no acknowledged message is lost.

Mail flows all the time (20 sessions), some of it bounced by the sink so that DSNs are being
made, and Epoxi is killed again and again: during DATA, right after a 250, during a group
commit, mid-delivery or while a DSN is written, wherever the moment falls. After the last
restart every acknowledged message must reach the sink (a bounced one as a DSN to its
sender).

Duplicates are allowed only where a kill explains them. Each life of the process relays to
a sink of its own, so every copy is known to come from one life. A message is re-delivered
when it reached the sink but the spool removal that ends it was not committed before the
kill. At one kill that is at most:
- the deliveries in flight: one per connection, so CONNECTION_LIMIT (the relay is one ready
  queue; a connection carries one transaction at a time, whatever max_deliveries is);
- the removals (and the DSN's original's removal) queued for the spool's writer and not yet
  committed: the group being committed, at most MAX_BATCH writes, and the group queued behind
  it, at most MAX_BATCH more while the writer keeps up (it takes everything queued, up to
  MAX_BATCH, in each commit).
So duplicates <= KILLS * (CONNECTION_LIMIT + 2 * MAX_BATCH), and none within one life.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from pathlib import Path

import pytest

from epoxi.testing.sink import Sink
from tests.conftest import EpoxiProcess, free_port

SEQ = re.compile(rb"X-Seq: (\d+)")
SESSIONS = 20
KILLS = 5
CONNECTION_LIMIT = 10  # delivery connections to the relay
MAX_BATCH = 32  # writes per spool group commit
PER_KILL = CONNECTION_LIMIT + 2 * MAX_BATCH
CONFIG = f"""
[delivery]
retry_interval = "1s"
max_retry_interval = "2s"
[delivery.defaults]
connection_limit = {CONNECTION_LIMIT}
[spool]
max_batch = {MAX_BATCH}
"""


class Injector:
    """Sends numbered messages over several sessions; remembers which got their 250."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.next_seq = 0
        self.acked: set[int] = set()
        self.bounced: set[int] = set()  # acknowledged, to a recipient the sink rejects
        self.running = True

    def message(self, seq: int) -> tuple[str, bytes]:
        bounce = seq % 10 == 0
        recipient = f"reject-{seq}@remote.test" if bounce else f"user{seq}@remote.test"
        body = (
            f"From: sender@origin.test\r\nTo: {recipient}\r\nSubject: crash {seq}\r\n"
            f"X-Seq: {seq}\r\n\r\n".encode()
            + (b"y" * 76 + b"\r\n") * 20
        )
        return recipient, body

    async def session(self) -> None:
        while self.running:
            try:
                await self._send_some()
            except (OSError, ConnectionError, asyncio.IncompleteReadError, RuntimeError):
                await asyncio.sleep(0.05)  # Epoxi is down: try again

    async def _send_some(self) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            await _expect(reader, b"220")
            writer.write(b"EHLO injector.test\r\n")
            await _expect(reader, b"250")
            while self.running:
                seq = self.next_seq
                self.next_seq += 1
                recipient, body = self.message(seq)
                writer.write(
                    f"MAIL FROM:<sender@origin.test>\r\nRCPT TO:<{recipient}>\r\nDATA\r\n".encode()
                )
                await _expect(reader, b"250")
                await _expect(reader, b"250")
                await _expect(reader, b"354")
                writer.write(body + b".\r\n")
                await _expect(reader, b"250")
                self.acked.add(seq)
                if recipient.startswith("reject-"):
                    self.bounced.add(seq)
        finally:
            writer.close()


async def _expect(reader: asyncio.StreamReader, code: bytes) -> None:
    while True:
        line = await asyncio.wait_for(reader.readline(), 10)
        if not line:
            raise ConnectionError("closed")
        if line[3:4] != b"-":
            break
    if not line.startswith(code):
        raise RuntimeError(f"expected {code!r}, got {line!r}")


def seen_at(sink: Sink) -> tuple[list[int], list[int]]:
    """Sequence numbers delivered, and those that came back inside a DSN."""
    delivered, in_dsn = [], []
    for message in sink.messages:
        match = SEQ.search(message.data)
        if match is None:
            continue
        (in_dsn if message.mail_from == "" else delivered).append(int(match.group(1)))
    return delivered, in_dsn


def extra_copies(seqs: list[int]) -> int:
    return len(seqs) - len(set(seqs))


class Lives:
    """Epoxi restarted again and again, each life relaying to a sink of its own."""

    def __init__(self, tmp_path: Path) -> None:
        self.process = EpoxiProcess(tmp_path / "data")
        self.config = tmp_path / "epoxi.toml"
        self.config.write_text(CONFIG)
        self.sinks: list[Sink] = []

    async def start(self) -> None:
        sink = Sink("127.0.0.1", free_port())
        await sink.start()
        self.sinks.append(sink)
        self.process.relay_port = sink.port
        await asyncio.to_thread(self.process.start, self.config)

    async def kill_and_restart(self) -> None:
        await asyncio.to_thread(self.process.kill)
        await self.start()

    def seen(self) -> tuple[list[int], list[int]]:
        delivered: list[int] = []
        in_dsn: list[int] = []
        for sink in self.sinks:
            messages, dsns = seen_at(sink)
            delivered += messages
            in_dsn += dsns
        return delivered, in_dsn

    async def stop(self) -> None:
        if self.process.proc is not None:
            await asyncio.to_thread(self.process.stop)
        for sink in self.sinks:
            await sink.stop()


@pytest.mark.slow
async def test_random_sigkills_under_load_lose_nothing(tmp_path: Path) -> None:
    rng = random.Random()
    lives = Lives(tmp_path)
    try:
        await lives.start()
        injector = Injector(lives.process.port)
        sessions = [asyncio.create_task(injector.session()) for _ in range(SESSIONS)]
        try:
            for _ in range(KILLS):
                await asyncio.sleep(rng.uniform(0.3, 1.5))  # load runs this long, then a kill
                await lives.kill_and_restart()
            await asyncio.sleep(1.0)  # and a last stretch of load
        finally:
            injector.running = False
            await asyncio.gather(*sessions, return_exceptions=True)
        delivered_ok = injector.acked - injector.bounced
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # wait for the last life to deliver everything
            delivered, in_dsn = lives.seen()
            if delivered_ok <= set(delivered) and injector.bounced <= set(in_dsn):
                break
            await asyncio.sleep(0.2)
    finally:
        await lives.stop()
    delivered, in_dsn = lives.seen()
    lost = delivered_ok - set(delivered)
    lost_dsn = injector.bounced - set(in_dsn)
    duplicates = extra_copies(delivered) + extra_copies(in_dsn)
    within_a_life = [extra_copies(seen_at(sink)[0]) for sink in lives.sinks]
    report = (
        f"acked {len(injector.acked)}, delivered {len(set(delivered))}, "
        f"DSNs {len(set(in_dsn))}, duplicates {duplicates} (bound {KILLS * PER_KILL}), "
        f"re-sent within one life {within_a_life}, lost {sorted(lost)[:10]}, "
        f"lost DSNs {sorted(lost_dsn)[:10]}"
    )
    print(report)
    assert len(injector.acked) > 500, report  # the load was real
    assert not lost and not lost_dsn, report
    assert not any(within_a_life), report  # a life never sends a message twice
    assert duplicates <= KILLS * PER_KILL, report
