"""Receivers that misbehave: each fault is a transient failure with its record, nothing is
lost, and a duplicate happens only where SMTP makes it unavoidable (the data-end reply lost).

a.test's MX hosts are the sinks on 127.0.0.2/3; later.test's MX (127.0.0.6) is served by a
scripted server written for each test.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from epoxi.events.records import RecordType
from tests.e2e.conftest import MakeWorld, World, send

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
FAST_RETRY = {"retry_interval": 0.3, "max_retry_interval": 0.5}


def sink_copies(world: World, recipient: str) -> int:
    return sum(1 for sink in world.sinks.values() for m in sink.messages if recipient in m.rcpt_tos)


async def delivered_after_one_failure(world: World, recipient: str) -> None:
    (failure,) = await world.wait_records(
        RecordType.TRANSIENT_FAILURE, 1, where=lambda r: r.recipient == recipient
    )
    assert failure.next_attempt > failure.timestamp
    await world.wait_records(RecordType.DELIVERY, 1, where=lambda r: r.recipient == recipient)


@asynccontextmanager
async def scripted(world: World, handler: Handler) -> AsyncIterator[None]:
    """``handler`` serves every connection to later.test's MX host."""

    async def guarded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(guarded, "127.0.0.6", world.sink_port)
    try:
        yield
    finally:
        server.close()
        await server.wait_closed()


async def test_connection_dropped_mid_data(make_world: MakeWorld) -> None:
    world: World = await make_world(sink_options={"fault_times": 1}, delivery=FAST_RETRY)
    await send(world, ["disconnect-in-data-1@a.test"])
    await delivered_after_one_failure(world, "disconnect-in-data-1@a.test")
    assert sink_copies(world, "disconnect-in-data-1@a.test") == 1


async def test_reply_after_the_timeout(make_world: MakeWorld) -> None:
    world: World = await make_world(
        sink_options={"fault_times": 1, "slow_delay": 1.5},
        delivery={**FAST_RETRY, "timeouts": {"data_end": 0.4, "connect": 2}},
    )
    await send(world, ["slow-1@a.test"])
    (failure,) = await world.wait_records(RecordType.TRANSIENT_FAILURE, 1)
    assert "timeout" in (failure.response.text if failure.response else failure.reason).lower()
    await world.wait_records(RecordType.DELIVERY, 1)
    assert sink_copies(world, "slow-1@a.test") <= 2  # the late 250 was lost: one duplicate


async def test_reply_lost_after_data_gives_at_most_one_duplicate(make_world: MakeWorld) -> None:
    world: World = await make_world(sink_options={"fault_times": 1}, delivery=FAST_RETRY)
    await send(world, ["reset-after-data-1@a.test"])
    await delivered_after_one_failure(world, "reset-after-data-1@a.test")
    copies = [m for s in world.sinks.values() for m in s.messages]
    assert len(copies) == 2 and sum(m.reply_lost for m in copies) == 1


async def test_421_at_greeting(make_world: MakeWorld) -> None:
    world: World = await make_world(sink_options={"fail_connections": 1}, delivery=FAST_RETRY)
    await send(world, ["x@a.test"])
    await world.wait_records(RecordType.DELIVERY, 1)
    assert sink_copies(world, "x@a.test") == 1
    assert await _spool_empties(world)


async def _spool_empties(world: World) -> bool:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if world.app.spool.count() == 0:
            return True
        await asyncio.sleep(0.05)
    return False


async def test_tempfail_then_delivered(make_world: MakeWorld) -> None:
    world: World = await make_world(sink_options={"fault_times": 1}, delivery=FAST_RETRY)
    await send(world, ["tempfail-data-1@a.test"])
    await delivered_after_one_failure(world, "tempfail-data-1@a.test")


async def test_garbage_instead_of_a_greeting(make_world: MakeWorld) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"\x00\xffHELLO THERE this is not SMTP\r\n")
        await writer.drain()
        await reader.read(100)

    world: World = await make_world(delivery=FAST_RETRY)
    async with scripted(world, garbage):
        (queue_id,) = await send(world, ["x@later.test"])
        (failure,) = await world.wait_records(RecordType.TRANSIENT_FAILURE, 1)
    assert failure.message_id == queue_id
    assert world.app.spool.count() == 1  # kept for the next attempt


async def test_tls_handshake_failure(make_world: MakeWorld) -> None:
    async def broken_tls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 later.test ESMTP\r\n")
        await reader.readline()
        writer.write(b"250-later.test\r\n250 STARTTLS\r\n")
        await reader.readline()
        writer.write(b"220 2.0.0 go ahead\r\n")
        await reader.read(1000)  # the ClientHello
        writer.write(b"this is no TLS record at all\r\n" * 4)
        await writer.drain()

    world: World = await make_world(
        delivery={**FAST_RETRY, "shaping": {"later.test": {"tls": "required"}}}
    )
    async with scripted(world, broken_tls):
        await send(world, ["x@later.test"])
        (failure,) = await world.wait_records(RecordType.TRANSIENT_FAILURE, 1)
    assert failure.response is not None and failure.response.code // 100 == 4
    assert world.app.spool.count() == 1


async def test_multiline_replies_split_across_packets(make_world: MakeWorld) -> None:
    received: list[bytes] = []

    async def dribble(writer: asyncio.StreamWriter, reply: bytes) -> None:
        for i in range(0, len(reply), 3):  # three octets a packet
            writer.write(reply[i : i + 3])
            await writer.drain()
            await asyncio.sleep(0.002)

    async def split(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await dribble(writer, b"220-later.test ESMTP\r\n220-more greeting\r\n220 ready\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                await dribble(writer, b"250-later.test\r\n250-SIZE 1000000\r\n250 8BITMIME\r\n")
            elif verb == b"DATA":
                await dribble(writer, b"354 go\r\n")
                body = b""
                while not body.endswith(b"\r\n.\r\n"):
                    body += await reader.readline()
                received.append(body)
                await dribble(writer, b"250-2.0.0 queued\r\n250 2.0.0 as 42\r\n")
            elif verb == b"QUIT":
                await dribble(writer, b"221 bye\r\n")
                return
            else:
                await dribble(writer, b"250-2.1.0 ok\r\n250 2.1.0 ok\r\n")

    world: World = await make_world()
    async with scripted(world, split):
        await send(world, ["x@later.test"])
        (delivery,) = await world.wait_records(RecordType.DELIVERY, 1)
    assert delivery.response is not None and delivery.response.text.endswith("as 42")
    assert len(received) == 1 and received[0].endswith(b"Hi.\r\n.\r\n")
