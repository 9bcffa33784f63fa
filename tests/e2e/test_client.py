"""The delivery client against the sink and against scripted servers, over real sockets."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email
import email.policy
from collections.abc import AsyncIterator, Awaitable, Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from epoxi.config import TimeoutSettings
from epoxi.delivery.client import ClientAuth, DsnEnvelope, SmtpClient, TlsPolicy
from epoxi.errors import ConnectionFailed, ProtocolError
from epoxi.message import MessageMeta
from epoxi.smtp.replies import Reply
from epoxi.testing.certs import make_test_tls_context
from epoxi.testing.sink import Sink

BODY = b"Subject: t\r\n\r\n.dot line\r\nbody\r\n"
HOST = "127.0.0.2"


async def connect(sink: Sink, **kwargs: Any) -> SmtpClient:
    return await SmtpClient.connect(
        sink.host, sink.port, server_name="sink.test", ehlo_name="client.test", **kwargs
    )


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    async with Sink(HOST) as running:
        yield running


@pytest.fixture(scope="module")
def tls_files() -> tuple[Any, Path]:
    context, cert, _ = make_test_tls_context("sink.test", addresses=(HOST,))
    return context, cert


# ----------------------------------------------------------------- transactions


async def test_pipelined_transaction_in_one_round_trip(sink: Sink) -> None:
    client = await connect(sink)
    result = await client.send("a@x.test", ["b@y.test", "c@y.test"], BODY)
    assert result.round_trips == 2  # envelope + DATA, then the message
    assert [r.code for _, r in result.outcomes()] == [250, 250]
    (message,) = sink.messages
    assert message.envelope_flights == 1 and message.data == BODY
    assert message.mail_params == f"SIZE={len(BODY)}"
    await client.quit()


async def test_connection_reuse(sink: Sink) -> None:
    client = await connect(sink)
    for _ in range(5):
        assert (await client.send("a@x.test", ["b@y.test"], BODY)).round_trips == 2
    await client.quit()
    assert sink.connections == 1 and [m.transaction for m in sink.messages] == [1, 2, 3, 4, 5]


async def test_without_pipelining_one_command_at_a_time() -> None:
    async with Sink(HOST, advertise={"8BITMIME", "SIZE"}) as sink:
        client = await connect(sink)
        result = await client.send("a@x.test", ["b@y.test", "reject-c@y.test"], BODY)
        assert result.round_trips == 5  # MAIL, RCPT, RCPT, DATA, then the message
        assert [(r, reply.code) for r, reply in result.outcomes()] == [
            ("b@y.test", 250),
            ("reject-c@y.test", 550),
        ]
        assert sink.messages[0].envelope_flights == 4  # MAIL, RCPT, RCPT, DATA
        await client.quit()


async def test_without_pipelining_no_data_when_no_recipient_is_accepted() -> None:
    async with Sink(HOST, advertise={"SIZE"}) as sink:
        client = await connect(sink)
        result = await client.send("a@x.test", ["reject-a@y.test", "reject-b@y.test"], BODY)
        assert result.round_trips == 3 and result.data is None
        assert [reply.code for _, reply in result.outcomes()] == [550, 550]
        # The open transaction is reset (one more round trip) before the next one.
        assert (await client.send("a@x.test", ["b@y.test"], BODY)).round_trips == 5
        assert len(sink.messages) == 1
        await client.quit()


async def test_per_recipient_outcomes(sink: Sink) -> None:
    client = await connect(sink)
    result = await client.send(
        "a@x.test", ["ok@y.test", "reject-x@y.test", "tempfail-z@y.test", "quota-q@y.test"], BODY
    )
    assert [reply.code for _, reply in result.outcomes()] == [250, 550, 450, 552]
    assert result.outcomes()[1][1] == Reply(550, "5.1.1", "User unknown")
    assert sink.messages[0].rcpt_tos == ["ok@y.test"]
    await client.quit()


async def test_all_recipients_rejected_sends_no_message(sink: Sink) -> None:
    client = await connect(sink)
    result = await client.send("a@x.test", ["reject-a@y.test", "reject-b@y.test"], BODY)
    assert [reply.code for _, reply in result.outcomes()] == [550, 550]
    assert result.data is None and not sink.messages and client.is_usable
    # The RSET the server needs now rides in the next flight: still two round trips.
    following = await client.send("a@x.test", ["ok@y.test"], BODY)
    assert following.round_trips == 2 and following.data is not None
    assert following.data.code == 250 and sink.messages[0].envelope_flights == 1
    await client.quit()


async def test_explicit_rset_clears_the_pending_reset(sink: Sink) -> None:
    client = await connect(sink)
    await client.send("a@x.test", ["reject-a@y.test"], BODY)
    assert await client.rset() == Reply(250, "2.0.0", "Reset OK")
    assert (await client.send("a@x.test", ["b@y.test"], BODY)).round_trips == 2
    assert sink.messages[0].transaction == 2 and client.is_usable
    await client.quit()


async def test_data_end_rejection_applies_to_every_recipient(sink: Sink) -> None:
    client = await connect(sink)
    result = await client.send("a@x.test", ["reject-data-a@y.test", "b@y.test"], BODY)
    assert [reply.code for _, reply in result.outcomes()] == [554, 554]
    assert client.is_usable
    await client.quit()


async def test_smtputf8_required_but_missing() -> None:
    async with Sink(HOST, advertise={"PIPELINING"}) as sink:
        client = await connect(sink)
        for sender, flag in (("jösé@x.test", False), ("a@x.test", True)):
            result = await client.send(sender, ["b@y.test"], BODY, smtputf8=flag)
            assert [str(r) for _, r in result.outcomes()] == [
                "553 5.6.7 remote server does not support SMTPUTF8"
            ]
            assert result.round_trips == 0
        assert sink.transactions == 0 and client.is_usable
        await client.quit()


async def test_smtputf8_and_8bitmime_when_offered(sink: Sink) -> None:
    client = await connect(sink)
    await client.send("jösé@x.test", ["ü@y.test"], BODY, body_8bit=True)
    assert sink.messages[0].mail_params == f"SIZE={len(BODY)} BODY=8BITMIME SMTPUTF8"
    await client.quit()


SEVEN_BIT_SERVER = {"PIPELINING", "SIZE", "ENHANCEDSTATUSCODES"}
MIME_8BIT = (
    "MIME-Version: 1.0\r\nSubject: hi\r\nContent-Type: text/plain; charset=utf-8\r\n"
    "Content-Transfer-Encoding: 8bit\r\n\r\nGrüße aus Köln\r\n.dot\r\n"
).encode()


async def test_8bit_mime_is_converted_for_a_server_without_8bitmime() -> None:
    async with Sink(HOST, advertise=SEVEN_BIT_SERVER) as sink:
        client = await connect(sink)
        result = await client.send("a@x.test", ["b@y.test"], MIME_8BIT, body_8bit=True)
        assert [r.code for _, r in result.outcomes()] == [250]
        (message,) = sink.messages
        assert message.data.isascii()
        assert message.mail_params == f"SIZE={len(message.data)}"  # no BODY=, converted size
        assert b"Content-Transfer-Encoding: quoted-printable\r\n" in message.data
        parsed = email.message_from_bytes(message.data, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        assert parsed.get_content() == "Grüße aus Köln\r\n.dot\r\n"
        await client.quit()


async def test_undeclared_8bit_body_is_converted_too() -> None:
    async with Sink(HOST, advertise=SEVEN_BIT_SERVER) as sink:
        client = await connect(sink)
        await client.send("a@x.test", ["b@y.test"], MIME_8BIT)  # body_8bit not set
        assert sink.messages[0].data.isascii()
        await client.quit()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("Subject: hi\r\n\r\nGrüße\r\n".encode(), "message is not MIME"),
        ("MIME-Version: 1.0\r\nSubject: Grüße\r\n\r\nx\r\n".encode(), "8-bit data in a header"),
    ],
)
async def test_8bit_that_cannot_be_converted_fails_permanently(body: bytes, reason: str) -> None:
    async with Sink(HOST, advertise=SEVEN_BIT_SERVER) as sink:
        client = await connect(sink)
        result = await client.send("a@x.test", ["b@y.test", "c@y.test"], body, body_8bit=True)
        replies = [reply for _, reply in result.outcomes()]
        assert [(r.code, r.enhanced) for r in replies] == [(554, "5.6.3")] * 2
        assert "conversion required but not possible" in replies[0].text
        assert reason in replies[0].text
        assert result.round_trips == 0 and sink.transactions == 0 and client.is_usable
        await client.quit()


async def test_8bit_goes_unchanged_to_a_server_with_8bitmime(sink: Sink) -> None:
    client = await connect(sink)
    await client.send("a@x.test", ["b@y.test"], MIME_8BIT, body_8bit=True)
    assert sink.messages[0].data == MIME_8BIT
    assert sink.messages[0].mail_params == f"SIZE={len(MIME_8BIT)} BODY=8BITMIME"
    await client.quit()


async def test_smtputf8_message_is_refused_not_converted_without_smtputf8() -> None:
    async with Sink(HOST, advertise=SEVEN_BIT_SERVER) as sink:
        client = await connect(sink)
        result = await client.send("a@x.test", ["b@y.test"], MIME_8BIT, smtputf8=True)
        assert result.outcomes()[0][1].enhanced == "5.6.7" and sink.transactions == 0
        await client.quit()


DSN_SERVER = {"PIPELINING", "8BITMIME", "SIZE", "ENHANCEDSTATUSCODES", "DSN"}
DSN = DsnEnvelope(
    ret="HDRS",
    envid="batch 7+id=x",
    notify={"b@y.test": "SUCCESS,FAILURE", "c@y.test": "NEVER"},
    orcpt={"b@y.test": "rfc822;Old+B@y.test"},
)


@pytest.mark.parametrize("pipelining", [True, False])
async def test_dsn_parameters_go_to_a_server_that_offers_dsn(pipelining: bool) -> None:
    advertise = DSN_SERVER if pipelining else DSN_SERVER - {"PIPELINING"}
    async with Sink(HOST, advertise=advertise) as sink:
        client = await connect(sink)
        result = await client.send("a@x.test", ["b@y.test", "c@y.test", "d@y.test"], BODY, dsn=DSN)
        assert [r.code for _, r in result.outcomes()] == [250, 250, 250] and result.dsn_passed
        (message,) = sink.messages
        assert message.mail_params == f"SIZE={len(BODY)} RET=HDRS ENVID=batch+207+2Bid+3Dx"
        assert message.rcpt_params == [
            "NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Old+2BB@y.test",
            "NOTIFY=NEVER",
            "",
        ]
        await client.quit()


async def test_dsn_parameters_are_left_out_without_dsn(sink: Sink) -> None:
    client = await connect(sink)  # the sink refuses DSN parameters it does not offer
    result = await client.send("a@x.test", ["b@y.test", "c@y.test"], BODY, dsn=DSN)
    assert [r.code for _, r in result.outcomes()] == [250, 250] and not result.dsn_passed
    assert sink.messages[0].mail_params == f"SIZE={len(BODY)}"
    assert sink.messages[0].rcpt_params == ["", ""]
    await client.quit()


async def test_dsn_envelope_of_a_message() -> None:
    meta = MessageMeta(id="m", sender="a@x.test", recipients=["b@y.test"], received_at=0, size=1)
    assert DsnEnvelope.of(meta) is None
    meta.dsn_notify = {"b@y.test": "DELAY"}
    meta.dsn_envid = "e1"
    assert DsnEnvelope.of(meta) == DsnEnvelope("", "e1", {"b@y.test": "DELAY"}, None)


async def test_message_over_the_remote_size_limit() -> None:
    async with Sink(HOST, max_size=10) as sink:
        client = await connect(sink)
        assert client.max_size == 10
        result = await client.send("a@x.test", ["b@y.test"], BODY)
        assert result.outcomes() == [
            ("b@y.test", Reply(552, "5.3.4", "message size exceeds remote limit"))
        ]
        assert sink.transactions == 0
        await client.quit()


async def test_address_with_a_line_break_is_never_sent(sink: Sink) -> None:
    client = await connect(sink)
    evil = "x@y.test>\r\nRCPT TO:<victim@z.test"
    result = await client.send("a@x.test", ["b@y.test", evil], BODY)
    assert [(r, reply.code) for r, reply in result.outcomes()] == [("b@y.test", 250), (evil, 553)]
    assert sink.messages[0].rcpt_tos == ["b@y.test"]
    result = await client.send(evil, ["b@y.test"], BODY)
    assert result.outcomes()[0][1].enhanced == "5.1.7" and result.round_trips == 0
    await client.quit()


async def test_body_line_ends_and_dots_reach_the_server_intact(sink: Sink) -> None:
    client = await connect(sink)
    await client.send("a@x.test", ["b@y.test"], b"a\n.\n..b\rc")
    assert sink.messages[0].data == b"a\r\n.\r\n..b\r\nc\r\n"
    await client.quit()


# ----------------------------------------------------------------- TLS and AUTH


@pytest.mark.both_loops
async def test_starttls_opportunistic_and_auth_plain(tls_files: tuple[Any, Path]) -> None:
    async with Sink(HOST, tls=tls_files[0], auth={"u": "p"}) as sink:
        client = await connect(sink, auth=ClientAuth("u", "p"))
        assert client.tls_active and "STARTTLS" not in client.extensions
        await client.send("a@x.test", ["b@y.test"], BODY)
        assert sink.messages[0].tls and sink.messages[0].auth_user == "u"
        await client.quit()


@pytest.mark.both_loops
async def test_starttls_required_and_verified(tls_files: tuple[Any, Path]) -> None:
    async with Sink(HOST, tls=tls_files[0]) as sink:
        policy = TlsPolicy("required", verify=True, ca_file=str(tls_files[1]))
        client = await connect(sink, tls=policy)
        assert client.tls_active
        await client.send("a@x.test", ["b@y.test"], BODY)
        assert sink.messages[0].tls
        await client.quit()


async def test_verification_failure_fails_the_connection(tls_files: tuple[Any, Path]) -> None:
    async with Sink(HOST, tls=tls_files[0]) as sink:
        policy = TlsPolicy(verify=True, ca_file=str(tls_files[1]), server_name="other.test")
        with pytest.raises(ConnectionFailed, match="TLS handshake"):
            await connect(sink, tls=policy)


async def test_tls_disabled_ignores_the_offer(tls_files: tuple[Any, Path]) -> None:
    async with Sink(HOST, tls=tls_files[0]) as sink:
        client = await connect(sink, tls=TlsPolicy("disabled"))
        assert not client.tls_active and "STARTTLS" in client.extensions
        await client.quit()


async def test_tls_required_but_not_offered(sink: Sink) -> None:
    with pytest.raises(ConnectionFailed, match="TLS required but not offered") as info:
        await connect(sink, tls=TlsPolicy("required"))
    assert info.value.reply is not None and info.value.reply.code == 421


async def test_auth_login_when_plain_is_not_offered() -> None:
    seen: list[bytes] = []

    async def login_only(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await greet(reader, writer, b"250-s.test\r\n250 AUTH LOGIN\r\n")
        for reply in (b"334 VXNlcm5hbWU6\r\n", b"334 UGFzc3dvcmQ6\r\n", b"235 2.7.0 ok\r\n"):
            seen.append((await reader.readline()).strip())
            writer.write(reply)
        await reader.read()

    async with scripted(login_only) as port:
        client = await connect_to(port, auth=ClientAuth("u", "p"))
        assert seen == [b"AUTH LOGIN", base64.b64encode(b"u"), base64.b64encode(b"p")]
        client.close()


async def test_bad_credentials_fail_the_connection() -> None:
    async with Sink(HOST, auth={"u": "p"}, auth_plaintext=True) as sink:
        with pytest.raises(ConnectionFailed) as info:
            await connect(sink, auth=ClientAuth("u", "wrong"), tls=TlsPolicy("disabled"))
        assert info.value.reply is not None and info.value.reply.code == 535
        assert "wrong" not in repr(ClientAuth("u", "wrong")) + str(info.value)


@pytest.mark.both_loops
async def test_implicit_tls(tls_files: tuple[Any, Path]) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_TlsGreeter, HOST, 0, ssl=tls_files[0])
    port = server.sockets[0].getsockname()[1]
    client = await SmtpClient.connect(
        HOST, port, server_name="sink.test", ehlo_name="c.test", tls=TlsPolicy("implicit")
    )
    assert client.tls_active and client.extensions == {"SIZE": "100"}
    await client.quit()
    server.close()
    await server.wait_closed()


class _TlsGreeter(asyncio.Protocol):
    transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.transport.write(b"220 tls.test ready\r\n")

    def data_received(self, data: bytes) -> None:
        if data.startswith(b"EHLO"):
            self.transport.write(b"250-tls.test\r\n250 SIZE 100\r\n")
        elif data.startswith(b"QUIT"):
            self.transport.write(b"221 bye\r\n")
            self.transport.close()


@pytest.mark.both_loops
async def test_bytes_before_the_tls_handshake_are_discarded(
    tls_files: tuple[Any, Path],
) -> None:
    async def evil(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await greet(reader, writer, b"250-evil.test\r\n250 STARTTLS\r\n")
        await reader.readline()
        # The 220 and an injected reply in one segment, before the handshake.
        writer.write(b"220 go ahead\r\n250 2.0.0 injected\r\n")
        await writer.drain()
        await writer.start_tls(tls_files[0])
        line = await reader.readline()
        writer.write(b"250 evil.test after tls\r\n" if line.startswith(b"EHLO") else b"500 ?\r\n")
        await reader.readline()
        writer.write(b"250 2.1.0 sender ok\r\n250 2.1.5 rcpt ok\r\n354 go\r\n")
        await reader.readuntil(b"\r\n.\r\n")
        writer.write(b"250 2.0.0 queued\r\n")
        await reader.read()

    async with scripted(evil) as port:
        client = await connect_to(port)
        assert client.tls_active and client.extensions == {}
        result = await client.send("a@x.test", ["b@y.test"], BODY)
        assert result.mail == Reply(250, "2.1.0", "sender ok")
        assert result.data == Reply(250, "2.0.0", "queued")
        client.close()


async def test_starttls_refused_goes_on_in_plain_text() -> None:
    async def refuses(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await greet(reader, writer, b"250-s.test\r\n250 STARTTLS\r\n")
        await reader.readline()
        writer.write(b"454 4.7.0 TLS not available\r\n")
        await reader.read()

    async with scripted(refuses) as port:
        client = await connect_to(port)
        assert not client.tls_active and client.is_usable
        client.close()
        with pytest.raises(ConnectionFailed, match="refused STARTTLS") as info:
            await connect_to(port, tls=TlsPolicy("required"))
        assert info.value.reply == Reply(454, "4.7.0", "TLS not available")


# ----------------------------------------------------------------- failures


async def test_421_banner() -> None:
    async with Sink(HOST, greeting=Reply(421, "4.3.2", "busy")) as sink:
        with pytest.raises(ConnectionFailed) as info:
            await connect(sink)
        assert info.value.reply == Reply(421, "4.3.2", "busy")


async def test_helo_when_ehlo_is_refused() -> None:
    async def old(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 old.test\r\n")
        assert (await reader.readline()).startswith(b"EHLO client.test")
        writer.write(b"502 5.5.1 what?\r\n")
        assert (await reader.readline()).startswith(b"HELO client.test")
        writer.write(b"250 old.test\r\n")
        await reader.read()

    async with scripted(old) as port:
        client = await connect_to(port)
        assert client.extensions == {} and client.max_size is None
        client.close()


async def test_phase_timeout_names_the_phase() -> None:
    async with Sink(HOST, slow_delay=2) as sink:
        client = await connect(sink, timeouts=TimeoutSettings(data_end=0.3))
        with pytest.raises(ConnectionFailed, match="timeout waiting for the data-end reply"):
            await client.send("a@x.test", ["slow-b@y.test"], BODY)
        assert not client.is_usable
        await client.quit()


async def test_banner_timeout() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async with scripted(silent) as port:
        with pytest.raises(ConnectionFailed, match="timeout waiting for the banner reply"):
            await connect_to(port, timeouts=TimeoutSettings(banner=0.2))


async def test_connection_dropped_mid_data(sink: Sink) -> None:
    client = await connect(sink)
    with pytest.raises(ProtocolError, match="data-end"):
        await client.send("a@x.test", ["disconnect-in-data-b@y.test"], BODY * 100)
    assert not client.is_usable
    await client.quit()  # never raises
    with pytest.raises(ConnectionFailed, match="not usable"):
        await client.send("a@x.test", ["b@y.test"], BODY)


async def test_421_in_the_middle_ends_the_transaction_without_an_exception() -> None:
    async def closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await greet(reader, writer, b"250-s.test\r\n250 PIPELINING\r\n")
        await reader.readuntil(b"DATA\r\n")
        writer.write(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n421 4.3.2 shutting down\r\n")
        await writer.drain()
        writer.close()

    async with scripted(closing) as port:
        client = await connect_to(port)
        result = await client.send("a@x.test", ["b@y.test", "c@y.test"], BODY)
        closed = Reply(421, "4.3.2", "shutting down")
        assert result.outcomes() == [("b@y.test", closed), ("c@y.test", closed)]
        assert not client.is_usable
        await client.quit()


async def test_354_after_every_rcpt_failed_ends_an_empty_message() -> None:
    got: list[bytes] = []

    async def sloppy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await greet(reader, writer, b"250-s.test\r\n250 PIPELINING\r\n")
        await reader.readuntil(b"DATA\r\n")
        writer.write(b"250 ok\r\n550 5.1.1 no\r\n354 go on\r\n")
        got.append(await reader.readline())
        writer.write(b"554 5.5.1 no valid recipients\r\n")
        await reader.read()

    async with scripted(sloppy) as port:
        client = await connect_to(port)
        result = await client.send("a@x.test", ["b@y.test"], BODY)
        assert got == [b".\r\n"] and result.data is None
        assert result.outcomes() == [("b@y.test", Reply(550, "5.1.1", "no"))]
        assert client.is_usable
        client.close()


async def test_unsolicited_reply_while_idle_makes_the_client_unusable() -> None:
    async def impatient(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await greet(reader, writer, b"250 s.test\r\n")
        writer.write(b"421 4.4.2 idle timeout\r\n")
        await reader.read()

    async with scripted(impatient) as port:
        client = await connect_to(port)
        for _ in range(100):
            if not client.is_usable:
                break
            await asyncio.sleep(0.01)
        assert not client.is_usable
        client.close()


async def test_connection_refused() -> None:
    with pytest.raises(ConnectionFailed, match="cannot connect"):
        await SmtpClient.connect("127.0.0.9", 1, server_name="x", ehlo_name="c.test")


async def test_source_address_binding(sink: Sink) -> None:
    client = await connect(sink, source_address="127.0.0.10")
    await client.send("a@x.test", ["b@y.test"], BODY)
    assert sink.messages[0].peer == "127.0.0.10"
    await client.quit()


async def test_garbage_from_the_server_is_a_protocol_error() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with scripted(garbage) as port:
        with pytest.raises(ProtocolError, match="malformed reply"):
            await connect_to(port)


# ----------------------------------------------------------------- scripted servers

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def scripted(script: Script) -> AsyncIterator[int]:
    """A server on HOST that plays ``script`` to each client; yields its port."""
    writers: list[asyncio.StreamWriter] = []

    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await script(reader, writer)

    server = await asyncio.start_server(run, HOST, 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for writer in writers:
            writer.transport.abort()
        server.close()
        await server.wait_closed()


async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ehlo: bytes) -> None:
    """Send a banner, read EHLO, answer it with ``ehlo``."""
    writer.write(b"220 scripted.test\r\n")
    await reader.readline()
    writer.write(ehlo)


async def connect_to(port: int, **kwargs: Any) -> SmtpClient:
    return await SmtpClient.connect(
        HOST, port, server_name="sink.test", ehlo_name="client.test", **kwargs
    )
