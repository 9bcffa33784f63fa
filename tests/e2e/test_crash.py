"""SIGKILL at random moments under load, then restart: no acknowledged message is lost.

Mail flows all the time (20 sessions), some of it bounced by the sink so that DSNs are being
made, and Epoxi is killed again and again: during DATA, right after a 250, during a group
commit, mid-delivery or while a DSN is written, wherever the moment falls. After the last
restart every acknowledged message must reach the sink (a bounced one as a DSN to its
sender); duplicates are counted and reported, never losses.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from pathlib import Path

import pytest

from epoxi.testing.sink import Sink
from tests.conftest import EpoxiProcess

SEQ = re.compile(rb"X-Seq: (\d+)")
SESSIONS = 20
KILLS = 5
CONNECTIONS = 10  # connection_limit of the relay's ready queue
MAX_BATCH = 64  # spool writes per commit
# A duplicate is a message whose outcome was not yet committed when the process died: at most,
# per kill, one message on each delivery connection, plus one writer batch of removals (and DSN
# hand-offs) queued behind the fsync in progress.
MAX_DUPLICATES = KILLS * (CONNECTIONS + MAX_BATCH)


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


@pytest.mark.slow
async def test_random_sigkills_under_load_lose_nothing(tmp_path: Path) -> None:
    rng = random.Random()
    config = tmp_path / "epoxi.toml"
    config.write_text(
        f"[spool]\nmax_batch = {MAX_BATCH}\n"
        f'[delivery]\nretry_interval = "1s"\nmax_retry_interval = "2s"\n'
        f"[delivery.defaults]\nconnection_limit = {CONNECTIONS}\n"
    )
    process = EpoxiProcess(tmp_path / "data")
    async with Sink("127.0.0.1", process.relay_port) as sink:
        await asyncio.to_thread(process.start, config)
        injector = Injector(process.port)
        sessions = [asyncio.create_task(injector.session()) for _ in range(SESSIONS)]
        try:
            for _ in range(KILLS):
                await asyncio.sleep(rng.uniform(0.3, 1.5))
                process.kill()
                await asyncio.to_thread(process.start, config)
            await asyncio.sleep(1.0)
        finally:
            injector.running = False
            await asyncio.gather(*sessions, return_exceptions=True)
        delivered_ok = injector.acked - injector.bounced
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            delivered, in_dsn = seen_at(sink)
            if delivered_ok <= set(delivered) and injector.bounced <= set(in_dsn):
                break
            await asyncio.sleep(0.2)
        process.stop()
    delivered, in_dsn = seen_at(sink)
    lost = delivered_ok - set(delivered)
    lost_dsn = injector.bounced - set(in_dsn)
    duplicates = len(delivered) - len(set(delivered)) + len(in_dsn) - len(set(in_dsn))
    report = (
        f"acked {len(injector.acked)}, delivered {len(set(delivered))}, "
        f"DSNs {len(set(in_dsn))}, duplicates {duplicates}, lost {sorted(lost)[:10]}, "
        f"lost DSNs {sorted(lost_dsn)[:10]}"
    )
    print(report)
    assert len(injector.acked) > 500, report  # the load was real
    assert not lost and not lost_dsn, report
    assert duplicates <= MAX_DUPLICATES, report  # only outcomes not yet committed at a kill
