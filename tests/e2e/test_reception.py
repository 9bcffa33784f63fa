"""The SMTP server over real sockets, driven by smtplib, swaks and raw sockets."""

from __future__ import annotations

import asyncio
import smtplib
import socket
import ssl

import pytest

from tests.e2e.conftest import PASSWORD, MakeServer, Running

MESSAGE = b"From: a@remote.test\r\nTo: b@local.test\r\nSubject: test\r\n\r\nHello.\r\n"


def send_smtplib(
    port: int,
    sender: str,
    rcpts: list[str],
    *,
    tls: ssl.SSLContext | None = None,
    login: bool = False,
    implicit: bool = False,
) -> tuple[int, bytes]:
    cls = smtplib.SMTP_SSL if implicit else smtplib.SMTP
    kwargs = {"context": tls} if implicit else {}
    with cls("127.0.0.1", port, timeout=10, **kwargs) as smtp:  # type: ignore[arg-type]
        smtp.ehlo("client.test")
        if tls is not None and not implicit:
            smtp.starttls(context=tls)
            smtp.ehlo("client.test")
        if login:
            smtp.login("alice", PASSWORD)
        code, text = smtp.mail(sender)
        if code != 250:
            raise smtplib.SMTPSenderRefused(code, text, sender)
        for rcpt in rcpts:
            code, text = smtp.rcpt(rcpt)
            if code != 250:
                raise smtplib.SMTPRecipientsRefused({rcpt: (code, text)})
        return smtp.data(MESSAGE)


class RawClient:
    """A line-oriented socket client for exact byte sequences."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")
        self.greeting = self.read_reply()

    def read_reply(self) -> str:
        lines = []
        while True:
            line = self.file.readline().decode()
            if not line:
                raise ConnectionError("closed")
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                return "".join(lines)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def command(self, data: bytes) -> str:
        self.send(data)
        return self.read_reply()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


async def test_smtplib_local_delivery_is_spooled(make_server: MakeServer) -> None:
    server: Running = await make_server()
    code, text = await asyncio.to_thread(
        send_smtplib, server.ports.untrusted, "a@remote.test", ["b@local.test"]
    )
    assert code == 250 and text.startswith(b"2.0.0 Ok: queued as ")
    queue_id = text.split()[-1].decode()
    assert [m.id for m in await server.spooled()] == [queue_id]


async def test_relay_denied_from_untrusted(make_server: MakeServer) -> None:
    server: Running = await make_server()
    with pytest.raises(smtplib.SMTPRecipientsRefused) as info:
        await asyncio.to_thread(send_smtplib, server.ports.untrusted, "a@x.test", ["c@far.test"])
    code, text = info.value.recipients["c@far.test"]
    assert (code, text[:5]) == (550, b"5.7.1")
    assert await server.spooled() == []


async def test_starttls_then_auth_may_relay(make_server: MakeServer) -> None:
    server: Running = await make_server()
    code, _ = await asyncio.to_thread(
        send_smtplib,
        server.ports.untrusted,
        "a@x.test",
        ["c@far.test"],
        tls=server.client_tls(),
        login=True,
    )
    assert code == 250
    spooled = await server.spooled()
    assert len(spooled) == 1, spooled
    (meta,) = spooled
    assert meta.auth_user == "alice" and meta.recipients == ["c@far.test"]


async def test_submission_requires_auth(make_server: MakeServer) -> None:
    server: Running = await make_server()
    with pytest.raises(smtplib.SMTPSenderRefused) as info:
        await asyncio.to_thread(send_smtplib, server.ports.submission, "a@x.test", ["c@far.test"])
    assert info.value.smtp_code == 530
    code, _ = await asyncio.to_thread(
        send_smtplib,
        server.ports.submission,
        "a@x.test",
        ["c@far.test"],
        tls=server.client_tls(),
        login=True,
    )
    assert code == 250


async def test_implicit_tls_listener(make_server: MakeServer) -> None:
    server: Running = await make_server()
    code, _ = await asyncio.to_thread(
        send_smtplib,
        server.ports.implicit,
        "a@x.test",
        ["c@far.test"],
        tls=server.client_tls(),
        login=True,
        implicit=True,
    )
    assert code == 250
    assert b"with ESMTPSA" in await server.app.spool.load_body((await server.spooled())[0].id)


async def swaks(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "swaks",
        "--server",
        "127.0.0.1",
        "--timeout",
        "10",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace")


async def test_swaks_starttls_auth_pipelining(make_server: MakeServer) -> None:
    server: Running = await make_server()
    code, out = await swaks(
        "--port",
        str(server.ports.untrusted),
        "--from",
        "a@x.test",
        "--to",
        "c@far.test,d@far.test",
        "--tls",
        "--auth",
        "PLAIN",
        "--auth-user",
        "alice",
        "--auth-password",
        PASSWORD,
        "--pipeline",
    )
    assert code == 0, out
    assert "<~  250 2.0.0 Ok: queued as" in out
    spooled = await server.spooled()
    assert [m.recipients for m in spooled] == [["c@far.test", "d@far.test"]]


async def test_swaks_auth_login(make_server: MakeServer) -> None:
    server: Running = await make_server()
    code, out = await swaks(
        "--port",
        str(server.ports.submission),
        "--from",
        "a@x.test",
        "--to",
        "c@far.test",
        "--tls",
        "--auth",
        "LOGIN",
        "--auth-user",
        "alice",
        "--auth-password",
        PASSWORD,
    )
    assert code == 0, out


async def test_swaks_relay_denied(make_server: MakeServer) -> None:
    server: Running = await make_server()
    code, out = await swaks(
        "--port", str(server.ports.untrusted), "--from", "a@x.test", "--to", "c@far.test"
    )
    assert code != 0
    assert "<** 550 5.7.1 Relaying denied" in out


async def test_swaks_bad_password(make_server: MakeServer) -> None:
    server: Running = await make_server()
    code, out = await swaks(
        "--port",
        str(server.ports.untrusted),
        "--from",
        "a@x.test",
        "--to",
        "c@far.test",
        "--tls",
        "--auth",
        "PLAIN",
        "--auth-user",
        "alice",
        "--auth-password",
        "wrong",
    )
    assert code != 0
    assert "535 5.7.8" in out


# The raw-socket clients below block, so each runs in a thread while the server runs here.


async def test_every_command_over_the_wire(make_server: MakeServer) -> None:
    server: Running = await make_server()

    def talk() -> None:
        client = RawClient(server.ports.open)
        try:
            assert client.greeting.startswith("220 mx.test ESMTP Epoxi")
            ehlo = client.command(b"EHLO c.test\r\n")
            for ext in (
                "PIPELINING",
                "SIZE",
                "8BITMIME",
                "SMTPUTF8",
                "ENHANCEDSTATUSCODES",
                "CHUNKING",
                "STARTTLS",
            ):
                assert ext in ehlo
            assert client.command(b"HELO c.test\r\n").startswith("250 mx.test")
            assert client.command(b"NOOP\r\n").startswith("250 2.0.0")
            assert client.command(b"VRFY someone\r\n").startswith("252 2.5.0")
            assert client.command(b"HELP\r\n").startswith("214")
            assert client.command(b"MAIL FROM:<a@x.test> BODY=8BITMIME\r\n").startswith("250 2.1.0")
            assert client.command(b"RSET\r\n").startswith("250 2.0.0")
            client.command(b"EHLO c.test\r\n")
            client.command(b"MAIL FROM:<a@x.test>\r\n")
            client.command(b"RCPT TO:<b@local.test>\r\n")
            assert client.command(b"BDAT 6 LAST\r\nhi\r\n\r\n").startswith("250 2.0.0 Ok: queued")
            assert client.command(b"QUIT\r\n").startswith("221 2.0.0")
        finally:
            client.close()

    await asyncio.to_thread(talk)
    assert len(await server.spooled()) == 1


async def test_pipelined_replies_come_back_together(make_server: MakeServer) -> None:
    server: Running = await make_server()

    def talk() -> list[str]:
        client = RawClient(server.ports.open)
        try:
            client.command(b"EHLO c.test\r\n")
            client.send(
                b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@local.test>\r\n"
                b"RCPT TO:<c@local.test>\r\nDATA\r\n"
            )
            replies = [client.read_reply()[:9] for _ in range(4)]
            replies.append(client.command(b"hi\r\n.\r\n")[:9])
            return replies
        finally:
            client.close()

    replies = await asyncio.to_thread(talk)
    assert replies == ["250 2.1.0", "250 2.1.5", "250 2.1.5", "354 End d", "250 2.0.0"]


async def test_client_talking_before_the_greeting_is_cut_off(make_server: MakeServer) -> None:
    server: Running = await make_server()

    def talk() -> tuple[str, str, bytes]:
        sock = socket.create_connection(("127.0.0.1", server.ports.open), timeout=10)
        try:
            sock.sendall(b"EHLO c.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@local.test>\r\n")
            file = sock.makefile("rb")
            greeting = file.readline().decode()
            while file.readline().startswith(b"250-"):  # the EHLO reply
                pass
            return greeting, file.readline().decode(), file.read()
        finally:
            sock.close()

    greeting, refusal, rest = await asyncio.to_thread(talk)
    assert greeting.startswith("220 ")
    assert refusal == "554 5.5.0 Error: SMTP protocol synchronization\r\n"
    assert rest == b""  # and the connection is closed


@pytest.mark.parametrize(
    "smuggle",
    [
        b"\n.\n",
        b"\r.\r",
        b"\r\n.\n",
        b"\n.\r\n",
        b"\r\n\x00.\r\n",
        b"\r\n.\r",
        b"\n.\r",
    ],
)
async def test_smuggling_over_the_wire(make_server: MakeServer, smuggle: bytes) -> None:
    server: Running = await make_server()

    def talk() -> tuple[str, str]:
        client = RawClient(server.ports.open)
        try:
            client.command(b"EHLO c.test\r\n")
            client.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@local.test>\r\nDATA\r\n")
            for _ in range(3):
                client.read_reply()
            client.send(
                b"Subject: one\r\n\r\nhi" + smuggle + b"MAIL FROM:<evil@x.test>\r\n"
                b"RCPT TO:<victim@local.test>\r\nDATA\r\nsmuggled\r\n.\r\n"
            )
            final = client.read_reply()
            return final, client.command(b"NOOP\r\n")  # nothing else was pending
        finally:
            client.close()

    final, noop = await asyncio.to_thread(talk)
    assert noop.startswith("250")
    spooled = await server.spooled()
    assert len(spooled) <= 1 and all(m.sender == "a@x.test" for m in spooled)
    assert final.startswith("554 5.6.0") and not spooled  # bare CR or LF, or NUL


async def test_starttls_discards_injected_commands(make_server: MakeServer) -> None:
    server: Running = await make_server()
    context = server.client_tls()

    def talk() -> tuple[str, str]:
        client = RawClient(server.ports.open)
        try:
            client.command(b"EHLO c.test\r\n")
            reply = client.command(b"STARTTLS\r\nEHLO injected\r\nMAIL FROM:<evil@x.test>\r\n")
            tls = context.wrap_socket(client.sock, server_hostname="mx.test")
            tls.sendall(b"RCPT TO:<b@local.test>\r\n")
            after = tls.recv(4096).decode()
            tls.close()
            return reply, after
        finally:
            client.close()

    reply, after = await asyncio.to_thread(talk)
    assert reply.startswith("220 2.0.0")
    assert after.startswith("503 5.5.1")  # neither the injected EHLO nor MAIL survived


async def test_limits_over_the_wire(make_server: MakeServer) -> None:
    server: Running = await make_server(
        smtp={"max_recipients": 2, "max_message_size": 2000, "max_errors": 4}
    )

    def talk() -> None:
        client = RawClient(server.ports.open)
        try:
            client.command(b"EHLO c.test\r\n")
            assert client.command(b"MAIL FROM:<a@x.test> SIZE=5000\r\n").startswith("552 5.3.4")
            client.command(b"MAIL FROM:<a@x.test>\r\n")
            client.command(b"RCPT TO:<a@local.test>\r\n")
            client.command(b"RCPT TO:<b@local.test>\r\n")
            assert client.command(b"RCPT TO:<c@local.test>\r\n").startswith("452 4.5.3")
            client.command(b"DATA\r\n")
            assert client.command(b"x" * 900 + b"\r\n" + b"y" * 2100 + b"\r\n.\r\n").startswith(
                "552 5.3.4"
            )
            assert client.command(b"NOOP " + b"y" * 1100 + b"\r\n").startswith("500 5.5.6")
            broken = client.command(b"MAIL FROM:<broken\r\n")
            assert broken.startswith("501 5.5.4"), broken
            bogus = client.command(b"BOGUS\r\n")
            assert bogus.startswith("500 5.5.2"), bogus
            assert client.read_reply().startswith("421 4.7.0")
        finally:
            client.close()

    await asyncio.to_thread(talk)


async def test_connection_limit_per_ip(make_server: MakeServer) -> None:
    server: Running = await make_server(smtp={"max_connections_per_ip": 2})

    def talk() -> str:
        clients = [RawClient(server.ports.open) for _ in range(2)]
        extra = RawClient(server.ports.open)
        for client in [*clients, extra]:
            client.close()
        return extra.greeting

    assert (await asyncio.to_thread(talk)).startswith("421 4.7.0")


async def test_connection_limit_overall(make_server: MakeServer) -> None:
    server: Running = await make_server(smtp={"max_connections": 1})

    def talk() -> str:
        first = RawClient(server.ports.open)
        extra = RawClient(server.ports.untrusted)
        first.close()
        extra.close()
        return extra.greeting

    assert (await asyncio.to_thread(talk)).startswith("421 4.7.0")


async def test_idle_timeout_over_the_wire(make_server: MakeServer) -> None:
    server: Running = await make_server(smtp={"idle_timeout": 1})

    def talk() -> str:
        client = RawClient(server.ports.open)
        try:
            return client.read_reply()
        finally:
            client.close()

    assert (await asyncio.to_thread(talk)).startswith("421 4.4.2")


async def test_auth_brute_force_is_throttled(make_server: MakeServer) -> None:
    server: Running = await make_server(smtp={"auth_max_failures": 2})
    context = server.client_tls()

    def attempt() -> str:
        client = RawClient(server.ports.untrusted)
        try:
            client.command(b"EHLO c.test\r\n")
            client.command(b"STARTTLS\r\n")
            tls = context.wrap_socket(client.sock, server_hostname="mx.test")
            tls.sendall(b"EHLO c.test\r\n")
            while not tls.recv(4096).decode().split("\r\n")[-2].startswith("250 "):
                pass
            tls.sendall(b"AUTH PLAIN AGFsaWNlAHdyb25n\r\n")
            reply = tls.recv(4096).decode()
            tls.close()
            return reply
        finally:
            client.close()

    replies = [await asyncio.to_thread(attempt) for _ in range(3)]
    assert [r[:9] for r in replies] == ["535 5.7.8", "535 5.7.8", "421 4.7.0"]


def open_data(port: int) -> RawClient:
    """A client in the middle of DATA: the envelope given, 354 read, part of a message sent."""
    client = RawClient(port)
    client.command(b"EHLO c.test\r\n")
    for command in (b"MAIL FROM:<a@x.test>\r\n", b"RCPT TO:<b@local.test>\r\n", b"DATA\r\n"):
        assert client.command(command)[0] in "23", command
    client.send(b"Subject: half\r\n\r\nhalf a mess")
    return client


async def test_shutdown_in_the_middle_of_data_says_421(make_server: MakeServer) -> None:
    server: Running = await make_server()
    client = await asyncio.to_thread(open_data, server.ports.open)
    try:
        await server.app.smtp.stop(grace=0.1)  # the client never finishes its message
        assert (await asyncio.to_thread(client.read_reply)).startswith("421 4.3.2")
        assert await asyncio.to_thread(client.file.read) == b""  # then closed
    finally:
        client.close()
    assert await server.spooled() == []


async def test_message_finished_within_the_shutdown_grace_is_accepted_then_421(
    make_server: MakeServer,
) -> None:
    server: Running = await make_server()
    client = await asyncio.to_thread(open_data, server.ports.open)
    try:
        stopping = asyncio.create_task(server.app.smtp.stop(grace=30))
        final = await asyncio.to_thread(client.command, b"age\r\n.\r\n")
        after = await asyncio.to_thread(client.read_reply)
        await stopping
    finally:
        client.close()
    assert final.startswith("250 2.0.0 Ok: queued as ") and after.startswith("421 4.3.2")
    assert [m.id for m in await server.spooled()] == [final.split()[-1]]
