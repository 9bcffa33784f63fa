"""The delivery client against the sink and against scripted servers, over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from epoxi.delivery.client import ClientAuth, ClientTimeouts, SmtpClient, TlsPolicy
from epoxi.errors import ConnectionFailed, ProtocolError
from epoxi.smtp.replies import Reply
from epoxi.testing.certs import make_test_tls_context
from epoxi.testing.sink import Sink

BODY = b"Subject: t\r\n\r\n.dot line\r\nbody\r\n"


async def connect(sink: Sink, **kwargs: object) -> SmtpClient:
    return await SmtpClient.connect(
        sink.host, sink.port, server_name="sink.test", ehlo_name="client.test", **kwargs
    )  # type: ignore[arg-type]


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    async with Sink("127.0.0.2") as running:
        yield running


async def test_pipelined_transaction_in_one_round_trip(sink: Sink) -> None:
    client = await connect(sink)
    result = await client.send("a@x.test", ["b@y.test", "c@y.test"], BODY)
    assert result.round_trips == 2  # envelope + DATA, then the body
    assert [r.code for _, r in result.outcomes()] == [250, 250]
    (message,) = sink.messages
    assert message.envelope_flights == 1 and message.data == BODY
    assert message.mail_params == f"SIZE={len(BODY)}"
    await client.quit()


async def test_connection_reuse(sink: Sink) -> None:
    client = await connect(sink)
    for _ in range(5):
        await client.send("a@x.test", ["b@y.test"], BODY)
    await client.quit()
    assert sink.connections == 1 and [m.transaction for m in sink.messages] == [1, 2, 3, 4, 5]


async def test_without_pipelining_one_command_at_a_time() -> None:
    async with Sink("127.0.0.2", advertise={"8BITMIME", "SIZE"}) as sink:
        client = await connect(sink)
        result = await client.send("a@x.test", ["b@y.test", "reject-c@y.test"], BODY)
        assert result.round_trips == 5  # MAIL, RCPT, RCPT, DATA, then the body
        assert [(r, reply.code) for r, reply in result.outcomes()] == [
            ("b@y.test", 250),
            ("reject-c@y.test", 550),
        ]
        assert sink.messages[0].envelope_flights == 4  # MAIL, RCPT, RCPT, DATA


async def test_per_recipient_outcomes(sink: Sink) -> None:
    client = await connect(sink)
    result = await client.send(
        "a@x.test", ["ok@y.test", "reject-x@y.test", "tempfail-z@y.test", "quota-q@y.test"], BODY
    )
    assert [reply.code for _, reply in result.outcomes()] == [250, 550, 450, 552]
    assert sink.messages[0].rcpt_tos == ["ok@y.test"]


async def test_all_recipients_rejected_sends_no_message(sink: Sink) -> None:
    client = await connect(sink)
    result = await client.send("a@x.test", ["reject-a@y.test", "reject-b@y.test"], BODY)
    assert [reply.code for _, reply in result.outcomes()] == [550, 550]
    assert not sink.messages and client.is_usable
    assert (await client.send("a@x.test", ["ok@y.test"], BODY)).data == Reply(
        250, "2.0.0", "Ok: queued as sink-1"
    )


async def test_data_end_rejection_applies_to_every_recipient(sink: Sink) -> None:
    client = await connect(sink)
    result = await client.send("a@x.test", ["reject-data-a@y.test", "b@y.test"], BODY)
    assert [reply.code for _, reply in result.outcomes()] == [554, 554]


async def test_smtputf8_required_but_missing() -> None:
    async with Sink("127.0.0.2", advertise={"PIPELINING"}) as sink:
        client = await connect(sink)
        result = await client.send("jösé@x.test", ["b@y.test"], BODY, smtputf8=True)
        assert [str(r) for _, r in result.outcomes()] == [
            "553 5.6.7 remote server does not support SMTPUTF8"
        ]
        assert sink.transactions == 0


async def test_smtputf8_when_offered(sink: Sink) -> None:
    client = await connect(sink)
    await client.send("jösé@x.test", ["ü@y.test"], BODY, smtputf8=True, body_8bit=True)
    assert sink.messages[0].mail_params.endswith("BODY=8BITMIME SMTPUTF8")


@pytest.mark.both_loops
async def test_starttls_opportunistic_and_auth() -> None:
    context, _, _ = make_test_tls_context("sink.test")
    async with Sink("127.0.0.2", tls=context, auth={"u": "p"}) as sink:
        client = await connect(sink, auth=ClientAuth("u", "p"))
        assert client.tls_active
        await client.send("a@x.test", ["b@y.test"], BODY)
        assert sink.messages[0].tls and sink.messages[0].auth_user == "u"


async def test_auth_login_when_plain_is_not_offered() -> None:
    async with Sink("127.0.0.2", auth={"u": "p"}, auth_plaintext=True) as sink:
        client = await connect(sink, auth=ClientAuth("u", "p"), tls=TlsPolicy("disabled"))
        await client.send("a@x.test", ["b@y.test"], BODY)
        assert sink.messages[0].auth_user == "u"


async def test_bad_credentials_fail_the_connection() -> None:
    async with Sink("127.0.0.2", auth={"u": "p"}, auth_plaintext=True) as sink:
        with pytest.raises(ConnectionFailed) as info:
            await connect(sink, auth=ClientAuth("u", "wrong"), tls=TlsPolicy("disabled"))
        assert info.value.reply is not None and info.value.reply.code == 535
        assert "wrong" not in repr(ClientAuth("u", "wrong"))


async def test_tls_required_but_not_offered(sink: Sink) -> None:
    with pytest.raises(ConnectionFailed, match="TLS required"):
        await connect(sink, tls=TlsPolicy("required"))


@pytest.mark.both_loops
async def test_implicit_tls() -> None:
    context, _, _ = make_test_tls_context("sink.test")
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _TlsEcho(), "127.0.0.2", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    client = await SmtpClient.connect(
        "127.0.0.2", port, server_name="sink.test", ehlo_name="c.test", tls=TlsPolicy("implicit")
    )
    assert client.tls_active
    await client.quit()
    server.close()


class _TlsEcho(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.write(b"220 tls.test ready\r\n")  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        for line in data.split(b"\r\n"):
            if line[:4].upper() in (b"EHLO", b"HELO"):
                self.transport.write(b"250 tls.test\r\n")  # type: ignore[attr-defined]
            elif line[:4].upper() == b"QUIT":
                self.transport.write(b"221 bye\r\n")  # type: ignore[attr-defined]


async def test_421_banner() -> None:
    async with Sink("127.0.0.2", greeting=Reply(421, "4.3.2", "busy")) as sink:
        with pytest.raises(ConnectionFailed) as info:
            await connect(sink)
        assert info.value.reply == Reply(421, "4.3.2", "busy")


async def test_phase_timeout_names_the_phase() -> None:
    async with Sink("127.0.0.2", slow_delay=2) as sink:
        client = await connect(sink, timeouts=ClientTimeouts(data_end=0.3))
        with pytest.raises(ConnectionFailed, match="data-end"):
            await client.send("a@x.test", ["slow-b@y.test"], BODY)
        assert not client.is_usable


async def test_connection_dropped_mid_data() -> None:
    async with Sink("127.0.0.2") as sink:
        client = await connect(sink)
        with pytest.raises(ConnectionFailed):
            await client.send("a@x.test", ["disconnect-in-data-b@y.test"], BODY * 100)
        assert not client.is_usable


async def test_connection_refused() -> None:
    with pytest.raises(ConnectionFailed, match="cannot connect"):
        await SmtpClient.connect("127.0.0.9", 1, server_name="x", ehlo_name="c.test")


async def test_source_address_binding(sink: Sink) -> None:
    client = await connect(sink, source_address="127.0.0.10")
    await client.send("a@x.test", ["b@y.test"], BODY)
    assert sink.messages[0].peer == "127.0.0.10"


Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def scripted(script: Script) -> AsyncIterator[int]:
    """A server on 127.0.0.2 that plays ``script`` to each client; yields its port."""
    writers: list[asyncio.StreamWriter] = []

    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await script(reader, writer)

    server = await asyncio.start_server(run, "127.0.0.2", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for writer in writers:
            writer.transport.abort()
        server.close()
        await server.wait_closed()


@pytest.mark.both_loops
async def test_bytes_before_the_tls_handshake_are_discarded() -> None:
    context, _, _ = make_test_tls_context("evil.test")

    async def evil(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 evil.test\r\n")
        await reader.readline()
        writer.write(b"250-evil.test\r\n250 STARTTLS\r\n")
        await reader.readline()
        # The 220 and an injected reply in one segment, before the handshake.
        writer.write(b"220 go ahead\r\n250 2.0.0 injected\r\n")
        await writer.drain()
        await writer.start_tls(context)
        line = await reader.readline()
        writer.write(b"250 evil.test after tls\r\n" if line.startswith(b"EHLO") else b"500 ?\r\n")
        await reader.readline()
        writer.write(b"250 2.1.0 sender ok\r\n")
        await writer.drain()
        await reader.read()

    async with scripted(evil) as port:
        client = await SmtpClient.connect(
            "127.0.0.2", port, server_name="evil.test", ehlo_name="c.test"
        )
        assert client.tls_active and client.extensions == {}
        reply = await client._command("MAIL FROM:<a@x.test>", "MAIL", 5)
        assert reply == Reply(250, "2.1.0", "sender ok")
        client.close()


async def test_garbage_from_the_server_is_a_protocol_error() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with scripted(garbage) as port:
        with pytest.raises(ProtocolError, match="malformed reply"):
            await SmtpClient.connect("127.0.0.2", port, server_name="x", ehlo_name="c.test")
