"""Relay smoke test: Epoxi as a child process between an SMTP injector and a sink.

The test brings its own load (SESSIONS asyncio SMTP sessions, COUNT numbered messages of
about 5 KB, like the relay yardstick) and its own receiver (``epoxi.testing``'s sink), so it
runs from a bare clone. Every acknowledged message must reach the sink once, byte for byte,
and the record log must say so: one Reception and one Delivery per message, nothing else.
Throughput against Postfix is measured by ``bench/relay.sh``, not here.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from pathlib import Path

from epoxi.events.records import RecordType, decode_record
from epoxi.testing.sink import Sink
from tests.conftest import EpoxiProcess

COUNT = 600
SESSIONS = 10
QUEUED = re.compile(rb"^250 .* queued as (\S+)\r\n$")
SEQ = re.compile(rb"^X-Seq: (\d+)\r$", re.MULTILINE)


def message(seq: int) -> bytes:
    """A 5 KB message whose every line says which one it is."""
    head = (
        f"From: bench@origin.test\r\nTo: rcpt{seq}@remote.test\r\nSubject: relay {seq}\r\n"
        f"X-Seq: {seq}\r\n\r\n"
    ).encode()
    return head + b"".join(
        f"{seq:06d} line {n:03d} ".encode() + b"x" * 60 + b"\r\n" for n in range(64)
    )


async def reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await asyncio.wait_for(reader.readline(), 30)
        assert line, "Epoxi closed the connection"
        if line[3:4] != b"-":
            return line


async def command(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes, code: bytes
) -> bytes:
    writer.write(data)
    answer = await reply(reader)
    assert answer.startswith(code), (data[:40], answer)
    return answer


async def inject(port: int, seqs: range, acked: dict[int, str]) -> None:
    """One session sending ``seqs`` in turn; ``acked`` gets each queue id from its 250."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await reply(reader)
        await command(reader, writer, b"EHLO injector.test\r\n", b"250")
        for seq in seqs:
            await command(reader, writer, b"MAIL FROM:<bench@origin.test>\r\n", b"250")
            await command(reader, writer, f"RCPT TO:<rcpt{seq}@remote.test>\r\n".encode(), b"250")
            await command(reader, writer, b"DATA\r\n", b"354")
            answer = await command(reader, writer, message(seq) + b".\r\n", b"250")
            match = QUEUED.match(answer)
            assert match, answer
            acked[seq] = match.group(1).decode()
        await command(reader, writer, b"QUIT\r\n", b"221")
    finally:
        writer.close()


async def test_relay_delivers_every_message_once_as_the_records_say(tmp_path: Path) -> None:
    process = EpoxiProcess(tmp_path / "data")
    acked: dict[int, str] = {}
    async with Sink("127.0.0.1", process.relay_port) as sink:
        await asyncio.to_thread(process.start)
        try:
            await asyncio.gather(
                *(inject(process.port, range(s, COUNT, SESSIONS), acked) for s in range(SESSIONS))
            )
            await sink.wait_for(COUNT, timeout=120)
        finally:
            code = await asyncio.to_thread(process.stop)  # SIGTERM: the record log is flushed
    assert code == 0, process.log()[-3000:]
    assert len(acked) == COUNT and len(set(acked.values())) == COUNT

    received: dict[int, bytes] = {}
    for got in sink.messages:
        (seq,) = [int(s) for s in SEQ.findall(got.data)]
        assert seq not in received, f"message {seq} delivered twice"
        received[seq] = got.data
        assert got.mail_from == "bench@origin.test" and got.rcpt_tos == [f"rcpt{seq}@remote.test"]
    assert sorted(received) == list(range(COUNT))
    for seq, data in received.items():
        assert data.startswith(b"Received: ") and data.endswith(message(seq)), seq

    lines = (process.data_dir / "logs" / "records.jsonl").read_bytes().splitlines()
    records = [decode_record(line) for line in lines]
    kinds = Counter(r.type for r in records)
    assert kinds == {RecordType.RECEPTION: COUNT, RecordType.DELIVERY: COUNT}, kinds
    by_id = {r.message_id: r for r in records if r.type is RecordType.DELIVERY}
    for seq, queue_id in acked.items():
        delivery = by_id[queue_id]
        assert delivery.recipient == f"rcpt{seq}@remote.test" and delivery.response
        assert delivery.response.code == 250 and delivery.peer_address == "127.0.0.1"
