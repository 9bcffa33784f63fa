"""The SMTP session state machine, fed with bytes."""

from __future__ import annotations

import asyncio
import base64
import threading

import pytest

from epoxi.reception.auth import Credentials
from tests.protocol.conftest import MakeClient, MemoryIngest

TRUSTED = "127.0.0.1"


def codes(text: str) -> list[str]:
    """The final-line codes of each reply in ``text``, with enhanced codes: ``250 2.1.0``."""
    out = []
    for line in text.split("\r\n"):
        if len(line) >= 4 and line[3] == " ":
            parts = line.split(" ")
            out.append(" ".join(parts[:2]) if len(parts) > 1 and "." in parts[1] else parts[0])
    return out


async def test_greeting_and_ehlo_advertises_extensions(make_client: MakeClient) -> None:
    client = make_client()
    reply = await client.ehlo()
    for ext in (
        "PIPELINING",
        "SIZE 10000",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "CHUNKING",
        "AUTH PLAIN LOGIN",
        "HELP",
    ):
        assert f"250-{ext}\r\n" in reply or f"250 {ext}\r\n" in reply, ext


async def test_local_mail_from_anyone_is_spooled_with_received_header(
    make_client: MakeClient, ingest: MemoryIngest
) -> None:
    client = make_client()
    await client.ehlo()
    reply = await client.send(
        "MAIL FROM:<a@remote.test>\r\nRCPT TO:<b@local.test>\r\nDATA\r\n"
        "Subject: hi\r\n\r\n..dotted\r\nbody\r\n.\r\n"
    )
    assert codes(reply) == ["250 2.1.0", "250 2.1.5", "354", "250 2.0.0"]
    ((meta, body),) = ingest.messages
    assert f"queued as {meta.id}" in reply
    assert meta.sender == "a@remote.test" and meta.recipients == ["b@local.test"]
    assert body.startswith(b"Received: from client.example ([192.0.2.7])\r\n\tby mx.test")
    assert b"for <b@local.test>" in body
    assert body.endswith(b"Subject: hi\r\n\r\n.dotted\r\nbody\r\n")


async def test_data_loses_the_first_dot_of_every_line_starting_with_one(
    make_client: MakeClient, ingest: MemoryIngest
) -> None:
    client = make_client()
    await client.ehlo()
    await client.send("MAIL FROM:<a@remote.test>\r\nRCPT TO:<b@local.test>\r\nDATA\r\n")
    reply = await client.send(".foo\r\n..bar\r\n...\r\nbaz.\r\n .x\r\n.\r\n")
    assert codes(reply) == ["250 2.0.0"]
    ((_, body),) = ingest.messages
    assert body.endswith(b"\r\nfoo\r\n.bar\r\n..\r\nbaz.\r\n .x\r\n")


async def test_dot_unstuffing_across_reads(make_client: MakeClient, ingest: MemoryIngest) -> None:
    client = make_client()
    await client.ehlo()
    await client.send("MAIL FROM:<a@remote.test>\r\nRCPT TO:<b@local.test>\r\nDATA\r\n")
    for piece in ("a\r\n", ".b\r\n.", "c\r\n", ".\r\n"):
        await client.send(piece)
    ((_, body),) = ingest.messages
    assert body.endswith(b"\r\na\r\nb\r\nc\r\n")


@pytest.mark.parametrize("reject", [True, False])
async def test_nul_in_data_is_refused_unless_allowed(
    make_client: MakeClient, ingest: MemoryIngest, reject: bool
) -> None:
    client = make_client(reject_nul=reject)
    await client.ehlo()
    await client.send("MAIL FROM:<a@remote.test>\r\nRCPT TO:<b@local.test>\r\nDATA\r\n")
    reply = await client.send("Subject: hi\r\n\r\nnul\x00here\r\n.\r\n")
    assert codes(reply) == (["554 5.6.0"] if reject else ["250 2.0.0"])
    assert len(ingest.messages) == (0 if reject else 1)
    if reject:
        assert "NUL" in reply


@pytest.mark.parametrize("reject", [True, False])
async def test_nul_in_bdat_is_refused_unless_allowed(
    make_client: MakeClient, ingest: MemoryIngest, reject: bool
) -> None:
    client = make_client(reject_nul=reject)
    await client.ehlo()
    await client.send("MAIL FROM:<a@remote.test>\r\nRCPT TO:<b@local.test>\r\n")
    assert codes(await client.send("BDAT 5\r\nab\x00\r\n")) == ["250 2.0.0"]
    reply = await client.send("BDAT 4 LAST\r\nok\r\n")
    assert codes(reply) == (["554 5.6.0"] if reject else ["250 2.0.0"])
    assert len(ingest.messages) == (0 if reject else 1)


async def test_relay_denied_for_untrusted_unauthenticated(
    make_client: MakeClient, ingest: MemoryIngest
) -> None:
    client = make_client()
    await client.ehlo()
    reply = await client.send("MAIL FROM:<a@remote.test>\r\nRCPT TO:<x@elsewhere.test>\r\n")
    assert codes(reply) == ["250 2.1.0", "550 5.7.1"]


@pytest.mark.parametrize(
    "rcpt",
    [
        "<x%elsewhere.test@local.test>",
        "<elsewhere.test!x@local.test>",
        '<"x@elsewhere.test"@local.test>',
        "<@local.test:x@elsewhere.test>",
        "<x@elsewhere.test.>",
        "<x@[192.0.2.1]>",
    ],
)
async def test_relay_address_tricks_are_denied(make_client: MakeClient, rcpt: str) -> None:
    client = make_client()
    await client.ehlo()
    reply = await client.send(f"MAIL FROM:<a@remote.test>\r\nRCPT TO:{rcpt}\r\n")
    assert codes(reply)[1].startswith("5"), reply


async def test_trusted_network_may_relay(make_client: MakeClient, ingest: MemoryIngest) -> None:
    client = make_client(peer=TRUSTED)
    await client.ehlo()
    reply = await client.send("MAIL FROM:<a@x.test>\r\nRCPT TO:<b@elsewhere.test>\r\n")
    assert codes(reply) == ["250 2.1.0", "250 2.1.5"]


async def test_authenticated_user_may_relay_plain(make_client: MakeClient) -> None:
    client = make_client()
    await client.ehlo()
    token = base64.b64encode(b"\0alice\0s3cret").decode()
    assert codes(await client.send(f"AUTH PLAIN {token}\r\n")) == ["235 2.7.0"]
    reply = await client.send("MAIL FROM:<a@x.test>\r\nRCPT TO:<b@elsewhere.test>\r\n")
    assert codes(reply) == ["250 2.1.0", "250 2.1.5"]


@pytest.mark.parametrize("ignore", [False, True])
async def test_auth_plain_as_another_identity_is_refused_unless_ignored(
    make_client: MakeClient, ignore: bool
) -> None:
    client = make_client(auth_ignore_authzid=ignore)
    await client.ehlo()
    token = base64.b64encode(b"bob\0alice\0s3cret").decode()
    reply = await client.send(f"AUTH PLAIN {token}\r\n")
    assert codes(reply) == (["235 2.7.0"] if ignore else ["535 5.7.8"])
    assert client.session.auth_user == ("alice" if ignore else "")
    relayed = await client.send("MAIL FROM:<a@x.test>\r\nRCPT TO:<b@elsewhere.test>\r\n")
    assert codes(relayed) == ["250 2.1.0", "250 2.1.5" if ignore else "550 5.7.1"]


async def test_auth_plain_with_the_user_as_identity_is_accepted(make_client: MakeClient) -> None:
    client = make_client()
    await client.ehlo()
    token = base64.b64encode(b"alice\0alice\0s3cret").decode()
    assert codes(await client.send(f"AUTH PLAIN {token}\r\n")) == ["235 2.7.0"]


async def test_auth_login_in_steps(make_client: MakeClient) -> None:
    client = make_client()
    await client.ehlo()
    assert (await client.send("AUTH LOGIN\r\n")) == "334 VXNlcm5hbWU6\r\n"
    assert (await client.send(base64.b64encode(b"alice") + b"\r\n")) == "334 UGFzc3dvcmQ6\r\n"
    assert codes(await client.send(base64.b64encode(b"s3cret") + b"\r\n")) == ["235 2.7.0"]
    assert codes(await client.send("AUTH PLAIN\r\n")) == ["503 5.5.1"]


async def test_auth_failures_are_throttled_per_ip(make_client: MakeClient) -> None:
    bad = base64.b64encode(b"\0alice\0wrong").decode()
    for _ in range(3):
        client = make_client(peer="198.51.100.9")
        await client.ehlo()
        assert codes(await client.send(f"AUTH PLAIN {bad}\r\n")) == ["535 5.7.8"]
    client = make_client(peer="198.51.100.9")
    await client.ehlo()
    assert codes(await client.send(f"AUTH PLAIN {bad}\r\n")) == ["421 4.7.0"]
    assert client.transport.closed


async def test_auth_needs_tls_unless_plaintext_allowed(make_client: MakeClient) -> None:
    client = make_client(auth_plaintext=False)
    reply = await client.ehlo()
    assert "AUTH" not in reply
    assert codes(await client.send("AUTH PLAIN AGFsaWNlAHMzY3JldA==\r\n")) == ["538 5.7.11"]


async def test_auth_cancel(make_client: MakeClient) -> None:
    client = make_client()
    await client.ehlo()
    await client.send("AUTH PLAIN\r\n")
    assert codes(await client.send("*\r\n")) == ["501 5.0.0"]


async def test_pipelined_commands_answered_in_order_in_one_write(make_client: MakeClient) -> None:
    client = make_client(peer=TRUSTED)
    before = len(client.transport.written)
    reply = await client.send(
        "EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nRCPT TO:<c@y.test>\r\nDATA\r\n"
    )
    assert codes(reply) == ["250", "250 2.1.0", "250 2.1.5", "250 2.1.5", "354"]
    assert len(client.transport.written) > before


async def test_commands_out_of_sequence(make_client: MakeClient) -> None:
    client = make_client()
    assert codes(await client.send("MAIL FROM:<a@x.test>\r\n")) == ["503 5.5.1"]
    await client.ehlo()
    assert codes(await client.send("RCPT TO:<b@local.test>\r\n")) == ["503 5.5.1"]
    assert codes(await client.send("DATA\r\n")) == ["503 5.5.1"]
    await client.send("MAIL FROM:<a@x.test>\r\n")
    assert codes(await client.send("MAIL FROM:<a@x.test>\r\n")) == ["503 5.5.1"]
    assert codes(await client.send("DATA\r\n")) == ["554 5.5.1"]


async def test_syntax_errors(make_client: MakeClient) -> None:
    client = make_client()
    await client.ehlo()
    assert codes(await client.send("MAIL FROM:a@x.test\r\n")) == ["501 5.5.4"]
    assert codes(await client.send("MAIL FROM:<a@x.test> BOGUS=1\r\n")) == ["555 5.5.4"]
    assert codes(await client.send("MAIL FROM:<a@@x>\r\n")) == ["553 5.1.3"]
    assert codes(await client.send("EHLO\r\n")) == ["501 5.5.4"]
    assert codes(await client.send("FROB\r\n")) == ["500 5.5.2"]


async def test_too_many_errors_closes(make_client: MakeClient) -> None:
    client = make_client(max_errors=3)
    reply = await client.send("A\r\nB\r\nC\r\nD\r\n")
    assert codes(reply) == ["500 5.5.2", "500 5.5.2", "500 5.5.2", "421 4.7.0"]
    assert client.transport.closed


async def test_too_many_recipients(make_client: MakeClient) -> None:
    client = make_client()
    await client.ehlo()
    rcpts = "".join(f"RCPT TO:<r{i}@local.test>\r\n" for i in range(6))
    reply = await client.send(f"MAIL FROM:<a@x.test>\r\n{rcpts}")
    assert codes(reply) == ["250 2.1.0"] + ["250 2.1.5"] * 5 + ["452 4.5.3"]


async def test_size_declared_too_big(make_client: MakeClient) -> None:
    client = make_client()
    await client.ehlo()
    assert codes(await client.send("MAIL FROM:<a@x.test> SIZE=10001\r\n")) == ["552 5.3.4"]
    assert codes(await client.send("MAIL FROM:<a@x.test> SIZE=100\r\n")) == ["250 2.1.0"]


async def test_data_over_size_is_refused_and_session_usable(
    make_client: MakeClient, ingest: MemoryIngest
) -> None:
    client = make_client()
    await client.ehlo()
    await client.send("MAIL FROM:<a@x.test>\r\nRCPT TO:<b@local.test>\r\nDATA\r\n")
    for _ in range(30):
        await client.send("x" * 498 + "\r\n")
    assert codes(await client.send(".\r\n")) == ["552 5.3.4"]
    assert not ingest.messages
    assert codes(await client.send("NOOP\r\n")) == ["250 2.0.0"]


async def test_command_line_too_long(make_client: MakeClient) -> None:
    client = make_client()
    await client.ehlo()
    reply = await client.send("NOOP " + "x" * 1200 + "\r\nNOOP\r\n")
    assert codes(reply) == ["500 5.5.6", "250 2.0.0"]


async def test_data_line_too_long(make_client: MakeClient, ingest: MemoryIngest) -> None:
    client = make_client(max_message_size=100_000)
    await client.ehlo()
    await client.send("MAIL FROM:<a@x.test>\r\nRCPT TO:<b@local.test>\r\nDATA\r\n")
    reply = await client.send("a" * 1001 + "\r\n.\r\n")
    assert codes(reply) == ["500 5.5.6"]
    assert not ingest.messages


@pytest.mark.parametrize(
    "smuggle",
    [
        b"\n.\n",
        b"\r.\r",
        b"\r\n.\n",
        b"\n.\r\n",
        b"\r\n.\r",
        b"\r\n\x00.\r\n",
        b"\n.\r",
    ],
)
async def test_smuggling_never_gives_a_second_envelope(
    make_client: MakeClient, ingest: MemoryIngest, smuggle: bytes
) -> None:
    client = make_client(peer=TRUSTED)
    await client.ehlo()
    payload = (
        b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\nSubject: one\r\n\r\nhi"
        + smuggle
        + b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@y.test>\r\nDATA\r\n"
        b"Subject: two\r\n\r\nsmuggled\r\n.\r\n"
    )
    reply = await client.send(payload)
    assert len(ingest.messages) <= 1
    assert all(m.sender == "a@x.test" for m, _ in ingest.messages)
    if b"\x00" not in smuggle:
        assert codes(reply)[-1] == "554 5.6.0"


async def test_bare_lf_allowed_when_configured(
    make_client: MakeClient, ingest: MemoryIngest
) -> None:
    client = make_client(peer=TRUSTED, reject_bare_cr_lf=False)
    await client.ehlo()
    await client.send("MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\nhi\nthere\r\n.\r\n")
    assert len(ingest.messages) == 1


async def test_data_split_across_reads_at_every_point(
    make_client: MakeClient, ingest: MemoryIngest
) -> None:
    message = b"Subject: s\r\n\r\n.leading\r\nline\r\n..\r\n.\r\n"
    for cut in range(1, len(message)):
        client = make_client(peer=TRUSTED)
        await client.ehlo()
        await client.send("MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
        await client.send(message[:cut])
        assert codes(await client.send(message[cut:])) == ["250 2.0.0"], cut
        client.session.connection_lost(None)
    bodies = {body[body.index(b"Subject: s") :] for _, body in ingest.messages}
    assert bodies == {b"Subject: s\r\n\r\nleading\r\nline\r\n.\r\n"}


async def test_empty_message(make_client: MakeClient, ingest: MemoryIngest) -> None:
    client = make_client(peer=TRUSTED)
    await client.ehlo()
    reply = await client.send("MAIL FROM:<>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n.\r\n")
    assert codes(reply)[-1] == "250 2.0.0"
    assert ingest.messages[0][0].sender == ""


async def test_bdat_chunks(make_client: MakeClient, ingest: MemoryIngest) -> None:
    client = make_client(peer=TRUSTED)
    await client.ehlo()
    reply = await client.send(
        b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nBDAT 11\r\nSubject: \r\n"
        b"BDAT 8 LAST\r\n\r\nbody\r\n"
    )
    assert codes(reply) == ["250 2.1.0", "250 2.1.5", "250 2.0.0", "250 2.0.0"]
    assert ingest.messages[0][1].endswith(b"Subject: \r\n\r\nbody\r\n")


async def test_bdat_without_transaction_is_read_and_refused(make_client: MakeClient) -> None:
    client = make_client()
    await client.ehlo()
    reply = await client.send(b"BDAT 5 LAST\r\nhelloNOOP\r\n")
    assert codes(reply) == ["503 5.5.1", "250 2.0.0"]


async def test_bdat_then_data_is_refused(make_client: MakeClient) -> None:
    client = make_client(peer=TRUSTED)
    await client.ehlo()
    reply = await client.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nBDAT 2\r\nhiDATA\r\n")
    assert codes(reply)[-1] == "503 5.5.1"


async def test_bdat_over_size(make_client: MakeClient, ingest: MemoryIngest) -> None:
    client = make_client(peer=TRUSTED)
    await client.ehlo()
    chunk = b"x" * 98 + b"\r\n"
    chunk *= 60
    reply = await client.send(
        b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nBDAT 6000\r\n"
        + chunk
        + b"BDAT 6000 LAST\r\n"
        + chunk
    )
    assert codes(reply)[-2:] == ["250 2.0.0", "552 5.3.4"]
    assert not ingest.messages


async def test_bdat_line_over_the_limit_is_refused_like_data(
    make_client: MakeClient, ingest: MemoryIngest
) -> None:
    client = make_client(peer=TRUSTED)
    await client.ehlo()
    await client.send("MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n")
    line = b"x" * 2000 + b"\r\n"
    assert codes(await client.send(b"BDAT 2002 LAST\r\n" + line)) == ["500 5.5.6"]
    assert codes(await client.send("NOOP\r\n")) == ["250 2.0.0"]  # still in step
    assert not ingest.messages


async def test_bdat_line_over_the_limit_across_chunks_and_reads(
    make_client: MakeClient, ingest: MemoryIngest
) -> None:
    client = make_client(peer=TRUSTED)
    await client.ehlo()
    await client.send("MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n")
    assert codes(await client.send(b"BDAT 600\r\nok\r\n" + b"x" * 300)) == []
    assert codes(await client.send(b"x" * 296)) == ["250 2.0.0"]
    assert codes(await client.send(b"BDAT 500 LAST\r\n" + b"x" * 498 + b"\r\n")) == ["500 5.5.6"]
    assert not ingest.messages


async def test_bdat_line_at_the_limit_is_accepted(
    make_client: MakeClient, ingest: MemoryIngest
) -> None:
    client = make_client(peer=TRUSTED)
    await client.ehlo()
    await client.send("MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n")
    line = b"x" * 998 + b"\r\n"  # 1000 octets with CRLF, the default limit
    assert codes(await client.send(b"BDAT 500\r\n" + line[:500])) == ["250 2.0.0"]
    assert codes(await client.send(b"BDAT 500 LAST\r\n" + line[500:])) == ["250 2.0.0"]
    assert ingest.messages[0][1].endswith(line)


@pytest.mark.parametrize("arg", ["abc", "", "-5", "1e3", "12x LAST", "\u0665"])
async def test_bdat_without_a_size_is_refused_and_the_connection_closed(
    make_client: MakeClient, arg: str
) -> None:
    client = make_client(peer=TRUSTED)
    await client.ehlo()
    await client.send("MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n")
    reply = await client.send(f"BDAT {arg}\r\n12 octets...NOOP\r\n")
    assert codes(reply) == ["501 5.5.4", "421 4.5.0"]
    assert client.transport.closed


async def test_bdat_with_a_bad_end_marker_is_read_and_refused(make_client: MakeClient) -> None:
    client = make_client(peer=TRUSTED)
    await client.ehlo()
    await client.send("MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n")
    reply = await client.send("BDAT 5 FIRST\r\nhelloNOOP\r\n")
    assert codes(reply) == ["501 5.5.4", "250 2.0.0"]


@pytest.mark.parametrize("envelope", [True, False])
async def test_bdat_chunk_over_the_size_limit_is_refused_at_once(
    make_client: MakeClient, ingest: MemoryIngest, envelope: bool
) -> None:
    client = make_client(peer=TRUSTED)
    await client.ehlo()
    if envelope:
        await client.send("MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n")
    reply = await client.send("BDAT 100000000000000000000 LAST\r\n")
    assert codes(reply) == ["552 5.3.4", "421 4.5.0"]
    assert client.transport.closed and not ingest.messages


async def test_bdat_chunk_of_exactly_the_size_limit_is_read(
    make_client: MakeClient, ingest: MemoryIngest
) -> None:
    client = make_client(peer=TRUSTED)
    await client.ehlo()
    await client.send("MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n")
    body = (b"x" * 98 + b"\r\n") * 100  # 10,000 octets: max_message_size in these tests
    assert codes(await client.send(b"BDAT 10000 LAST\r\n" + body)) == ["250 2.0.0"]
    assert len(ingest.messages) == 1


async def test_spool_unavailable_gives_452(make_client: MakeClient, ingest: MemoryIngest) -> None:
    client = make_client(peer=TRUSTED)
    await client.ehlo()
    ingest.unhealthy = "disk nearly full"
    assert codes(await client.send("MAIL FROM:<a@x.test>\r\n")) == ["452 4.3.1"]
    ingest.unhealthy = None
    ingest.fail_store = True
    reply = await client.send("MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\nhi\r\n.\r\n")
    assert codes(reply)[-1] == "452 4.3.1"


async def test_smtputf8_required_for_non_ascii(
    make_client: MakeClient, ingest: MemoryIngest
) -> None:
    client = make_client(peer=TRUSTED)
    await client.ehlo()
    assert codes(await client.send("MAIL FROM:<jösé@x.test>\r\n")) == ["553 5.6.7"]
    reply = await client.send("MAIL FROM:<jösé@x.test> SMTPUTF8\r\nRCPT TO:<ü@ÿ.test>\r\n")
    assert codes(reply) == ["250 2.1.0", "250 2.1.5"]
    await client.send("DATA\r\nhi\r\n.\r\n")
    assert ingest.messages[0][0].smtputf8
    assert b"with UTF8SMTP" in ingest.messages[0][1]


async def test_rset_noop_vrfy_help_quit(make_client: MakeClient) -> None:
    client = make_client()
    await client.ehlo()
    await client.send("MAIL FROM:<a@x.test>\r\n")
    assert codes(await client.send("RSET\r\n")) == ["250 2.0.0"]
    assert codes(await client.send("MAIL FROM:<a@x.test>\r\n")) == ["250 2.1.0"]
    assert codes(await client.send("NOOP\r\n")) == ["250 2.0.0"]
    assert codes(await client.send("VRFY bob\r\n")) == ["252 2.5.0"]
    assert codes(await client.send("HELP\r\n")) == ["214 2.0.0"]
    assert codes(await client.send("QUIT\r\n")) == ["221 2.0.0"]
    assert client.transport.closed


async def test_helo_gives_plain_smtp(make_client: MakeClient, ingest: MemoryIngest) -> None:
    client = make_client(peer=TRUSTED)
    assert (await client.send("HELO old.example\r\n")) == "250 mx.test\r\n"
    await client.send("MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\nhi\r\n.\r\n")
    assert b"with SMTP id" in ingest.messages[0][1]


async def test_starttls_unavailable_without_context(make_client: MakeClient) -> None:
    client = make_client()
    await client.ehlo()
    assert codes(await client.send("STARTTLS\r\n")) == ["454 4.7.0"]


async def test_idle_timeout(make_client: MakeClient) -> None:
    client = make_client(idle_timeout=10)
    client.session.check_timeout(client.session.last_activity + 5)
    assert not client.transport.closed
    client.session.check_timeout(client.session.last_activity + 11)
    assert codes(client.replies()) == ["421 4.4.2"] and client.transport.closed


async def test_data_timeout(make_client: MakeClient) -> None:
    client = make_client(peer=TRUSTED, data_timeout=10, idle_timeout=1000)
    await client.ehlo()
    await client.send("MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\npartial")
    client.session.check_timeout(client.session.last_activity + 11)
    assert codes(client.replies()) == ["421 4.4.2"] and client.transport.closed


async def test_connection_limits(make_client: MakeClient) -> None:
    clients = [make_client(peer="203.0.113.5") for _ in range(10)]
    extra = make_client(peer="203.0.113.5")
    assert codes(extra.transport.written.decode()) == ["421 4.7.0"]
    assert extra.transport.closed
    clients[0].session.connection_lost(None)
    assert not make_client(peer="203.0.113.5").transport.closed


async def test_replies_are_read_after_a_slow_password_check(make_client: MakeClient) -> None:
    """The harness waits for the session to be idle, however long the check takes."""
    client = make_client()
    slow = SlowAuthenticator()
    client.session.ctx.authenticator = slow  # type: ignore[assignment]
    await client.ehlo()
    token = base64.b64encode(b"\0alice\0s3cret").decode()
    assert codes(await client.send(f"AUTH PLAIN {token}\r\n")) == ["235 2.7.0"]
    assert slow.checked == 1


class SlowAuthenticator:
    """Answers from a worker thread that is released only after 50 ms of loop time."""

    enabled = True

    def __init__(self) -> None:
        self.checked = 0

    async def check(self, credentials: Credentials) -> bool:
        release = threading.Event()
        asyncio.get_running_loop().call_later(0.05, release.set)
        await asyncio.to_thread(release.wait)
        self.checked += 1
        return credentials.username == "alice"


async def test_shut_down_in_the_middle_of_data_says_421(
    make_client: MakeClient, ingest: MemoryIngest
) -> None:
    client = make_client()
    await client.ehlo()
    await client.send("MAIL FROM:<a@remote.test>\r\nRCPT TO:<b@local.test>\r\nDATA\r\nhalf")
    client.session.shut_down()
    assert codes(client.replies()) == ["421 4.3.2"]
    assert client.transport.closed and not ingest.messages


async def test_shut_down_in_the_middle_of_a_bdat_chunk_says_421(
    make_client: MakeClient, ingest: MemoryIngest
) -> None:
    client = make_client()
    await client.ehlo()
    await client.send("MAIL FROM:<a@remote.test>\r\nRCPT TO:<b@local.test>\r\nBDAT 10 LAST\r\nhal")
    client.session.shut_down()
    assert codes(client.replies()) == ["421 4.3.2"]
    assert client.transport.closed and not ingest.messages


async def test_shut_down_during_a_commit_replies_to_it_first(
    make_client: MakeClient, ingest: MemoryIngest
) -> None:
    client = make_client()
    await client.ehlo()
    await client.send("MAIL FROM:<a@remote.test>\r\nRCPT TO:<b@local.test>\r\nDATA\r\n")
    client.session.data_received(b"hi\r\n.\r\n")  # the commit is now pending
    client.session.shut_down()
    assert codes(client.replies()) == []
    await client.session.wait_idle()
    assert codes(client.replies()) == ["250 2.0.0", "421 4.3.2"]
    assert client.transport.closed and len(ingest.messages) == 1
