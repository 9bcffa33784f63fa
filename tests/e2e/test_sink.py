"""The scriptable sink over real sockets: smtplib, aiosmtplib and raw pipelined bytes."""

from __future__ import annotations

import asyncio
import contextlib
import io
import smtplib
import ssl
import time
from collections.abc import AsyncIterator, Callable
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import pytest

from epoxi.smtp.replies import Reply
from epoxi.testing.certs import client_tls_context, make_test_tls_context
from epoxi.testing.sink import Sink, run_sink
from tests.conftest import eventually

HOST = "127.0.0.2"
BODY = b"Subject: t\r\n\r\n.dot line\r\n..two dots\r\nbody\r\n"
STUFFED = b"Subject: t\r\n\r\n..dot line\r\n...two dots\r\nbody\r\n"


class Raw:
    """A bare SMTP client over asyncio streams, to send exactly the bytes a test wants."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.greeting = (0, "")

    @classmethod
    async def open(cls, sink: Sink, ehlo: bool = True) -> Raw:
        reader, writer = await asyncio.open_connection(sink.host, sink.port)
        raw = cls(reader, writer)
        raw.greeting = await raw.reply()
        if ehlo:
            assert (await raw.command("EHLO client.test"))[0] == 250
        return raw

    async def reply(self) -> tuple[int, str]:
        """One reply: its code and its lines joined by newlines."""
        lines: list[str] = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), 5)
            assert line, f"connection closed after {lines}"
            lines.append(line.decode().rstrip("\r\n"))
            if line[3:4] != b"-":
                return int(lines[0][:3]), "\n".join(item[4:] for item in lines)

    async def codes(self, count: int) -> list[int]:
        return [(await self.reply())[0] for _ in range(count)]

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def command(self, line: str) -> tuple[int, str]:
        self.send(line.encode() + b"\r\n")
        return await self.reply()

    async def at_eof(self) -> bool:
        """True if the server closed the connection (FIN or reset) without another reply."""
        try:
            data = await asyncio.wait_for(self.reader.read(), 5)
        except ConnectionResetError:
            return True
        return data == b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    async with Sink(HOST) as running:
        yield running


def smtplib_send(sink: Sink, sender: str, recipients: list[str], body: bytes) -> dict[str, object]:
    with smtplib.SMTP(sink.host, sink.port, local_hostname="client.test", timeout=5) as client:
        return dict(client.sendmail(sender, recipients, body))


async def send_as_its_own_read(sink: Sink, raw: Raw, data: bytes) -> None:
    """Send ``data`` and wait until the sink has read it (this connection's next read)."""
    record = sink.connection_records[-1]
    before = record.reads
    raw.send(data)
    await eventually(lambda: record.reads > before, what="the sink's read")


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


# ---------------------------------------------------------------- delivery and records


async def test_smtplib_delivery_is_recorded(sink: Sink) -> None:
    refused = await asyncio.to_thread(
        smtplib_send, sink, "a@x.test", ["b@y.test", "c@y.test"], BODY
    )
    assert refused == {}
    (message,) = sink.messages
    assert (message.mail_from, message.rcpt_tos) == ("a@x.test", ["b@y.test", "c@y.test"])
    assert message.data == BODY
    assert (message.peer, message.local) == ("127.0.0.1", HOST)
    assert (message.tls, message.auth_user, message.reply_lost) == (False, "", False)
    assert (message.connection, message.transaction) == (1, 1)
    assert message.mail_params.lower() == f"size={len(BODY)}"
    assert message.rcpt_params == ["", ""]
    assert message.envelope_flights == 4  # smtplib waits for every reply: MAIL, RCPT x2, DATA
    assert (sink.connections, sink.transactions, sink.received, sink.rejections) == (1, 1, 1, 0)
    assert sink.message_times == [message.received_at]
    await until(lambda: sink.current_connections == 0)
    (record,) = sink.connection_records
    assert (record.messages, record.transactions, record.closed_at is not None) == (1, 1, True)


async def test_aiosmtplib_delivery_and_transaction_numbers(sink: Sink) -> None:
    message = EmailMessage()
    message["Subject"] = "hi"
    message.set_content(".starts with a dot\n")
    async with aiosmtplib.SMTP(hostname=sink.host, port=sink.port, start_tls=False) as client:
        await client.send_message(message, sender="a@x.test", recipients=["b@y.test"])
        await client.sendmail("a@x.test", ["c@y.test"], BODY)
    assert [m.transaction for m in sink.messages] == [1, 2]
    assert {m.connection for m in sink.messages} == {1}
    assert b"\r\n.starts with a dot\r\n" in sink.messages[0].data
    assert sink.messages[1].data == BODY


async def test_pipelined_envelope_is_one_flight(sink: Sink) -> None:
    raw = await Raw.open(sink)
    raw.send(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nRCPT TO:<c@y>\r\nDATA\r\n")
    assert await raw.codes(4) == [250, 250, 250, 354]
    # The end of the data and the next envelope in one flight too (RFC 2920).
    raw.send(STUFFED + b".\r\nMAIL FROM:<a@x>\r\nRCPT TO:<d@y>\r\nDATA\r\n")
    assert await raw.codes(4) == [250, 250, 250, 354]
    raw.send(b"second\r\n.\r\n")
    assert await raw.codes(1) == [250]
    assert (await raw.command("QUIT"))[0] == 221
    await raw.close()
    first, second = sink.messages
    assert (first.rcpt_tos, first.data, first.envelope_flights) == (["b@y", "c@y"], BODY, 1)
    assert (second.rcpt_tos, second.data, second.envelope_flights) == (["d@y"], b"second\r\n", 1)
    assert second.transaction == 2
    # EHLO, first envelope, data end + second envelope, QUIT; the data-only read is no command.
    assert sink.connection_records[0].command_reads == 4


async def test_one_command_at_a_time_is_one_flight_each(sink: Sink) -> None:
    raw = await Raw.open(sink)
    for line in ("MAIL FROM:<a@x>", "RCPT TO:<b@y>", "RCPT TO:<reject-c@y>", "DATA"):
        await raw.command(line)
    raw.send(b"x\r\n.\r\n")
    assert await raw.codes(1) == [250]
    await raw.close()
    assert sink.messages[0].envelope_flights == 4


async def test_a_read_ending_inside_a_line_makes_no_flight(sink: Sink) -> None:
    raw = await Raw.open(sink)
    await send_as_its_own_read(sink, raw, b"MAIL FROM:<a")
    raw.send(b"@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n")
    assert await raw.codes(3) == [250, 250, 354]
    raw.send(b"x\r\n.\r\n")
    await raw.codes(1)
    await raw.close()
    assert sink.messages[0].envelope_flights == 1


async def test_data_ends_only_at_crlf_dot_crlf_even_split_across_reads(sink: Sink) -> None:
    raw = await Raw.open(sink)
    raw.send(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n")
    await raw.codes(3)
    for part in (b"bare\n.\nlf\r\n", b"..stuffed\r\n", b"end\r\n", b".", b"\r\n"):
        await send_as_its_own_read(sink, raw, part)
    assert await raw.codes(1) == [250]
    await raw.close()
    assert sink.messages[0].data == b"bare\n.\nlf\r\n.stuffed\r\nend\r\n"


async def test_empty_message(sink: Sink) -> None:
    raw = await Raw.open(sink)
    raw.send(b"MAIL FROM:<>\r\nRCPT TO:<b@y>\r\nDATA\r\n")
    assert await raw.codes(3) == [250, 250, 354]
    raw.send(b".\r\n")
    assert await raw.codes(1) == [250]
    await raw.close()
    assert (sink.messages[0].mail_from, sink.messages[0].data) == ("", b"")


# ---------------------------------------------------------------- misbehaviour


@pytest.mark.parametrize(
    ("recipient", "code", "enhanced"),
    [
        ("tempfail-1@y.test", 450, "4.2.0"),
        ("reject-1@y.test", 550, "5.1.1"),
        ("Reject@y.test", 550, "5.1.1"),
        ("QUOTA-q@y.test", 552, "5.2.2"),
    ],
)
async def test_rcpt_faults(sink: Sink, recipient: str, code: int, enhanced: str) -> None:
    recipients = ["ok@y.test", recipient]
    refused = await asyncio.to_thread(smtplib_send, sink, "a@x.test", recipients, BODY)
    assert refused[recipient][0] == code  # type: ignore[index]
    assert refused[recipient][1].startswith(enhanced.encode())  # type: ignore[index]
    assert sink.messages[0].rcpt_tos == ["ok@y.test"]
    assert sink.rejections == 1


@pytest.mark.parametrize(
    ("recipient", "code"),
    [("tempfail-data-1@y.test", 451), ("reject-data-1@y.test", 554), ("quota-data@y.test", 552)],
)
async def test_data_end_faults(sink: Sink, recipient: str, code: int) -> None:
    def send_twice() -> int:
        with smtplib.SMTP(sink.host, sink.port, timeout=5) as client:
            with pytest.raises(smtplib.SMTPDataError) as info:
                client.sendmail("a@x.test", ["b@y.test", recipient], BODY)
            client.sendmail("a@x.test", ["b@y.test"], BODY)  # the connection is still usable
        return int(info.value.smtp_code)

    assert await asyncio.to_thread(send_twice) == code
    assert [m.rcpt_tos for m in sink.messages] == [["b@y.test"]]
    assert sink.rejections == 1


async def test_unrelated_names_starting_like_a_fault_are_delivered(sink: Sink) -> None:
    recipients = ["slowly@y.test", "rejected@y.test", "tempfail-database@y.test"]
    refused = await asyncio.to_thread(smtplib_send, sink, "a@x.test", recipients, BODY)
    assert list(refused) == ["tempfail-database@y.test"]  # a tempfail- address, not -data
    assert sink.messages[0].rcpt_tos == recipients[:2]


async def test_disconnect_in_data(sink: Sink) -> None:
    raw = await Raw.open(sink)
    raw.send(b"MAIL FROM:<a@x>\r\nRCPT TO:<disconnect-in-data-b@y>\r\nDATA\r\n")
    assert await raw.codes(3) == [250, 250, 354]
    raw.send(b"Subject: part of a message\r\n")
    assert await raw.at_eof()
    await raw.close()
    assert sink.messages == [] and sink.received == 0


async def test_disconnect_in_data_with_smtplib(sink: Sink) -> None:
    with pytest.raises(smtplib.SMTPServerDisconnected):
        await asyncio.to_thread(smtplib_send, sink, "a@x", ["disconnect-in-data@y"], BODY * 1000)
    assert sink.messages == []


async def test_reset_after_data_loses_the_reply_but_keeps_the_message(sink: Sink) -> None:
    raw = await Raw.open(sink)
    raw.send(b"MAIL FROM:<a@x>\r\nRCPT TO:<reset-after-data-b@y>\r\nDATA\r\n")
    assert await raw.codes(3) == [250, 250, 354]
    raw.send(STUFFED + b".\r\n")
    assert await raw.at_eof()
    await raw.close()
    (message,) = sink.messages
    assert message.reply_lost and message.data == BODY


async def test_slow_delays_the_data_end_reply_and_keeps_order() -> None:
    async with Sink(HOST, slow_delay=0.3) as sink:
        raw = await Raw.open(sink)
        raw.send(b"MAIL FROM:<a@x>\r\nRCPT TO:<slow-b@y>\r\nDATA\r\n")
        assert await raw.codes(3) == [250, 250, 354]
        started = time.monotonic()
        raw.send(b"x\r\n.\r\nNOOP\r\n")
        (code, text), noop = await raw.reply(), await raw.reply()
        assert time.monotonic() - started >= 0.25
        assert code == 250 and "queued" in text and noop[0] == 250
        await raw.close()
        assert len(sink.messages) == 1


# ---------------------------------------------------------------- TLS and AUTH


@pytest.mark.both_loops
async def test_starttls_and_auth_plain_with_smtplib(tmp_path: Path) -> None:
    context, cert, _ = make_test_tls_context("sink.test", addresses=[HOST], directory=tmp_path)
    options = {"tls": context, "auth": {"user": "pw"}, "require_tls": True, "require_auth": True}
    async with Sink(HOST, **options) as sink:  # type: ignore[arg-type]

        def session() -> tuple[bool, bool]:
            with smtplib.SMTP(HOST, sink.port, local_hostname="client.test", timeout=5) as client:
                client.ehlo()
                auth_before = client.has_extn("auth")
                client.starttls(context=client_tls_context(cert))  # verifies the certificate
                client.ehlo()
                auth_after = "PLAIN" in client.esmtp_features["auth"]
                client.login("user", "pw")
                client.sendmail("a@x.test", ["b@y.test"], BODY)
            return auth_before, auth_after

        assert await asyncio.to_thread(session) == (False, True)
        (message,) = sink.messages
        assert message.tls and message.auth_user == "user"
        assert sink.connection_records[0].tls


async def test_auth_login_in_plain_text_and_failures() -> None:
    async with Sink(HOST, auth={"user": "pw"}, auth_plaintext=True) as sink:
        async with aiosmtplib.SMTP(hostname=HOST, port=sink.port, start_tls=False) as client:
            await client.ehlo()
            with pytest.raises(aiosmtplib.SMTPAuthenticationError):
                await client.auth_login("user", "wrong")
            await client.auth_login("user", "pw")
            await client.sendmail("a@x.test", ["b@y.test"], BODY)
        assert sink.messages[0].auth_user == "user"
        assert sink.auth_failures == 1


async def test_auth_plain_with_initial_response_and_cancel() -> None:
    async with Sink(HOST, auth={"u": "p"}, auth_plaintext=True) as sink:
        raw = await Raw.open(sink)
        assert (await raw.command("AUTH PLAIN"))[0] == 334
        assert (await raw.command("*"))[0] == 501
        assert (await raw.command("AUTH PLAIN AHUAcA=="))[0] == 235  # \0u\0p
        assert (await raw.command("AUTH PLAIN AHUAcA=="))[0] == 503
        await raw.close()


async def test_auth_not_offered_before_tls() -> None:
    context, _, _ = make_test_tls_context("sink.test")
    async with Sink(HOST, tls=context, auth={"u": "p"}) as sink:
        raw = await Raw.open(sink, ehlo=False)
        _, text = await raw.command("EHLO client.test")
        assert "STARTTLS" in text.split("\n") and "AUTH" not in text
        assert (await raw.command("AUTH PLAIN AHUAcA=="))[0] == 538
        await raw.close()


async def test_required_tls_and_auth_refuse_mail() -> None:
    context, _, _ = make_test_tls_context("sink.test")
    async with Sink(HOST, tls=context, auth={"u": "p"}, require_tls=True) as sink:
        raw = await Raw.open(sink)
        assert (await raw.command("MAIL FROM:<a@x>"))[0] == 530
        await raw.close()
    async with Sink(HOST, auth={"u": "p"}, auth_plaintext=True, require_auth=True) as sink:
        raw = await Raw.open(sink)
        assert (await raw.command("MAIL FROM:<a@x>"))[0] == 530
        await raw.close()
        assert sink.protocol_errors == 1


@pytest.mark.both_loops
async def test_starttls_discards_what_was_pipelined_after_it(tmp_path: Path) -> None:
    context, cert, _ = make_test_tls_context("sink.test", directory=tmp_path)
    async with Sink(HOST, tls=context) as sink:
        raw = await Raw.open(sink)
        raw.send(b"STARTTLS\r\nMAIL FROM:<injected@x>\r\n")
        assert (await raw.reply())[0] == 220
        client = ssl.create_default_context(cafile=str(cert))
        await raw.writer.start_tls(client, server_hostname="sink.test")
        code, text = await raw.command("EHLO client.test")
        assert code == 250 and "greets client.test" in text and "STARTTLS" not in text
        assert (await raw.command("MAIL FROM:<a@x>"))[0] == 250  # no MAIL was pending
        await raw.close()
        assert sink.transactions == 1


@pytest.mark.both_loops
async def test_starttls_with_aiosmtplib(tmp_path: Path) -> None:
    context, cert, _ = make_test_tls_context("sink.test", addresses=[HOST], directory=tmp_path)
    async with Sink(HOST, tls=context) as sink:
        client = aiosmtplib.SMTP(
            hostname=HOST, port=sink.port, tls_context=client_tls_context(cert), start_tls=True
        )
        async with client:
            await client.sendmail("a@x.test", ["b@y.test"], BODY)
        assert sink.messages[0].tls


# ---------------------------------------------------------------- greeting and connections


async def test_421_greeting() -> None:
    async with Sink(HOST, greeting=Reply(421, "4.3.2", "busy")) as sink:
        with pytest.raises(smtplib.SMTPConnectError) as info:
            await asyncio.to_thread(smtplib.SMTP, HOST, sink.port, timeout=5)
        assert info.value.smtp_code == 421 and info.value.smtp_error == b"4.3.2 busy"
        assert sink.connections == 1


async def test_fail_connections_fails_only_the_first_ones() -> None:
    async with Sink(HOST, fail_connections=2) as sink:
        for _ in range(2):
            with pytest.raises(smtplib.SMTPConnectError):
                await asyncio.to_thread(smtplib.SMTP, HOST, sink.port, timeout=5)
        await asyncio.to_thread(smtplib_send, sink, "a@x", ["b@y"], BODY)
        assert [m.connection for m in sink.messages] == [3]


async def test_connection_counters_and_reset(sink: Sink) -> None:
    clients = [await Raw.open(sink, ehlo=False) for _ in range(3)]
    assert (sink.current_connections, sink.max_concurrent_connections) == (3, 3)
    for client in clients:
        await client.close()
    await until(lambda: sink.current_connections == 0)
    assert sink.connections == 3 and sink.max_concurrent_connections == 3
    assert len(sink.connection_times) == 3 and sink.connection_times == sorted(
        sink.connection_times
    )
    assert [record.index for record in sink.connection_records] == [1, 2, 3]
    sink.reset()
    assert (sink.connections, sink.max_concurrent_connections, sink.connection_times) == (0, 0, [])
    await asyncio.to_thread(smtplib_send, sink, "a@x", ["b@y"], BODY)
    assert sink.messages[0].connection == 1


async def test_stop_drops_open_connections() -> None:
    sink = Sink(HOST)
    await sink.start()
    raw = await Raw.open(sink)
    await sink.stop()
    assert await raw.at_eof()
    await raw.close()
    assert sink.current_connections == 0


# ---------------------------------------------------------------- protocol details


async def test_size_is_advertised_and_enforced() -> None:
    async with Sink(HOST, max_size=1000) as sink:
        raw = await Raw.open(sink, ehlo=False)
        assert "SIZE 1000" in (await raw.command("EHLO c.test"))[1].split("\n")
        code, text = await raw.command("MAIL FROM:<a@x> SIZE=2000")
        assert (code, text[:5]) == (552, "5.3.4")
        raw.send(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n")
        assert await raw.codes(3) == [250, 250, 354]
        raw.send(b"x" * 2000 + b"\r\n.\r\n")
        assert (await raw.reply())[:1] == (552,)
        await raw.close()
        assert sink.messages == [] and sink.rejections == 2


async def test_big_message_over_the_size_limit_is_not_kept_in_memory() -> None:
    async with Sink(HOST, max_size=100_000) as sink:
        raw = await Raw.open(sink)
        raw.send(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n")
        await raw.codes(3)
        line = b"y" * 998 + b"\r\n"
        for _ in range(300):
            raw.send(line)
        raw.send(b".\r\n")
        assert (await raw.reply())[0] == 552
        await raw.close()


async def test_extensions_can_be_turned_off() -> None:
    async with Sink(HOST, advertise={"8BITMIME", "SIZE"}) as sink:
        raw = await Raw.open(sink, ehlo=False)
        _, text = await raw.command("EHLO c.test")
        assert text.split("\n")[1:] == ["8BITMIME", "SIZE 52428800"]
        assert await raw.command("MAIL FROM:<a@x> SMTPUTF8") == (555, "Parameter not recognized")
        assert (await raw.command("MAIL FROM:<jösé@x>"))[0] == 553
        assert (await raw.command("MAIL FROM:<a@x> BODY=8BITMIME"))[0] == 250
        await raw.close()
        assert sink.protocol_errors == 2


async def test_smtputf8_when_advertised(sink: Sink) -> None:
    raw = await Raw.open(sink)
    raw.send("MAIL FROM:<jösé@x> SMTPUTF8\r\nRCPT TO:<ü@y>\r\nDATA\r\n".encode())
    assert await raw.codes(3) == [250, 250, 354]
    raw.send(b"x\r\n.\r\n")
    await raw.codes(1)
    await raw.close()
    assert (sink.messages[0].mail_from, sink.messages[0].rcpt_tos) == ("jösé@x", ["ü@y"])


async def test_sequence_errors(sink: Sink) -> None:
    raw = await Raw.open(sink, ehlo=False)
    assert (await raw.command("MAIL FROM:<a@x>"))[0] == 503  # before EHLO
    await raw.command("HELO c.test")
    assert (await raw.command("RCPT TO:<b@y>"))[0] == 503
    assert (await raw.command("DATA"))[0] == 503
    assert (await raw.command("FROB"))[0] == 500
    raw.send(b"MAIL FROM:<a@x>\r\nRCPT TO:<reject-b@y>\r\nDATA\r\nRSET\r\n")
    assert await raw.codes(4) == [250, 550, 554, 250]
    await raw.close()
    assert sink.protocol_errors == 5 and sink.rejections == 1


async def test_bdat_when_chunking_is_advertised() -> None:
    async with Sink(HOST, advertise={"PIPELINING", "CHUNKING"}) as sink:
        raw = await Raw.open(sink)
        raw.send(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nBDAT 5\r\nhelloBDAT 8 LAST\r\n world\r\n")
        assert await raw.codes(4) == [250, 250, 250, 250]
        raw.send(b"BDAT 3 LAST\r\nabc")  # no transaction: the chunk is read and refused
        assert await raw.codes(1) == [503]
        await raw.close()
        (message,) = sink.messages
        assert message.data == b"hello world\r\n" and message.envelope_flights == 1


async def test_reply_delay_keeps_replies_in_order() -> None:
    async with Sink(HOST, reply_delay=0.05) as sink:
        started = time.monotonic()
        raw = await Raw.open(sink, ehlo=False)
        raw.send(b"EHLO c\r\nNOOP\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n")
        assert await raw.codes(5) == [250, 250, 250, 250, 354]
        raw.send(b"x\r\n.\r\nQUIT\r\n")
        assert await raw.codes(2) == [250, 221]
        assert await raw.at_eof()
        assert time.monotonic() - started >= 0.15  # greeting, envelope, data end
        await raw.close()


async def test_without_enhanced_status_codes() -> None:
    async with Sink(HOST, advertise={"PIPELINING"}) as sink:
        raw = await Raw.open(sink)
        assert await raw.command("NOOP") == (250, "OK")
        await raw.close()


# ---------------------------------------------------------------- counting only


async def test_store_false_keeps_only_counters() -> None:
    async with Sink(HOST, store=False) as sink:
        await asyncio.to_thread(smtplib_send, sink, "a@x", ["b@y", "reject-c@y"], BODY * 50_000)
        await asyncio.to_thread(smtplib_send, sink, "a@x", ["b@y"], BODY)
        await sink.wait_for(2, timeout=1)
        assert (sink.received, sink.transactions, sink.rejections, sink.connections) == (2, 2, 1, 2)
        assert sink.messages == [] and sink.connection_records == [] and sink.message_times == []


async def test_wait_for(sink: Sink) -> None:
    with pytest.raises(TimeoutError):
        await sink.wait_for(1, timeout=0.05)
    waiting = asyncio.create_task(sink.wait_for(2, timeout=5))
    for _ in range(2):
        await asyncio.to_thread(smtplib_send, sink, "a@x", ["b@y"], BODY)
    await waiting
    assert len(sink.messages) == 2


async def test_run_sink_reports_counts() -> None:
    out = io.StringIO()
    task = asyncio.create_task(run_sink(HOST, 0, report_every=0.05, file=out, name="cli"))
    await until(lambda: "listening" in out.getvalue())
    port = int(out.getvalue().split("\n")[0].rsplit(":", 1)[1])

    def send() -> None:
        with smtplib.SMTP(HOST, port, timeout=5) as client:
            client.sendmail("a@x", ["b@y"], BODY)

    await asyncio.to_thread(send)
    await until(lambda: "messages=1" in out.getvalue())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert "messages=1 transactions=1 rejections=0 connections=1" in out.getvalue()


@pytest.mark.both_loops
async def test_failed_tls_handshake_drops_only_that_connection() -> None:
    context, _, _ = make_test_tls_context("sink.test")
    async with Sink(HOST, tls=context) as sink:
        raw = await Raw.open(sink)
        assert (await raw.command("STARTTLS"))[0] == 220
        raw.send(b"this is not a TLS client hello\r\n" * 4)
        assert await raw.at_eof()
        await raw.close()
        await asyncio.to_thread(smtplib_send, sink, "a@x", ["b@y"], BODY)
        assert len(sink.messages) == 1 and not sink.messages[0].tls
