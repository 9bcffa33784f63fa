"""RFC 2920 pipelining: what a client may send ahead, and what an unauthenticated client that
sends ahead where it may not gets (``forbid_unauth_pipelining``, on by default)."""

from __future__ import annotations

import base64

import pytest

from epoxi.config import SmtpSettings
from tests.protocol.conftest import Client, MakeClient, MemoryIngest
from tests.protocol.test_session import codes

TRUSTED = "127.0.0.1"
ENVELOPE = "MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n"
LOST_SYNC = "554 5.5.0"


def strict(make_client: MakeClient, **smtp: object) -> Client:
    return make_client(peer=TRUSTED, forbid_unauth_pipelining=True, **smtp)


def assert_cut_off(client: Client, ingest: MemoryIngest, reply: str) -> None:
    assert codes(reply)[-1] == LOST_SYNC and "SMTP protocol synchronization" in reply
    assert client.transport.closed and not ingest.messages


async def test_a_group_after_ehlo_is_allowed(make_client: MakeClient, ingest: MemoryIngest) -> None:
    client = strict(make_client)
    await client.ehlo()
    reply = await client.send(ENVELOPE + "RCPT TO:<c@y.test>\r\nDATA\r\n")
    assert codes(reply) == ["250 2.1.0", "250 2.1.5", "250 2.1.5", "354"]
    assert codes(await client.send("hi\r\n.\r\n")) == ["250 2.0.0"]
    assert len(ingest.messages) == 1


async def test_bdat_chunks_and_commands_after_them_are_allowed(
    make_client: MakeClient, ingest: MemoryIngest
) -> None:
    client = strict(make_client)
    await client.ehlo()
    reply = await client.send(ENVELOPE + "BDAT 4\r\nhi\r\nBDAT 4 LAST\r\nyo\r\nRSET\r\n")
    assert codes(reply) == ["250 2.1.0", "250 2.1.5", "250 2.0.0", "250 2.0.0", "250 2.0.0"]
    assert len(ingest.messages) == 1 and not client.transport.closed


async def test_commands_before_ehlo_may_not_be_pipelined(
    make_client: MakeClient, ingest: MemoryIngest
) -> None:
    client = strict(make_client)
    assert_cut_off(client, ingest, await client.send(ENVELOPE))


async def test_commands_sent_with_the_first_ehlo_are_refused(
    make_client: MakeClient, ingest: MemoryIngest
) -> None:
    """A client that does not wait for the greeting and the EHLO reply (a spam engine)."""
    client = strict(make_client)
    reply = await client.send("EHLO c.test\r\n" + ENVELOPE)
    assert codes(reply)[0] == "250"
    assert_cut_off(client, ingest, reply)


async def test_helo_client_may_not_pipeline(make_client: MakeClient, ingest: MemoryIngest) -> None:
    client = strict(make_client)
    await client.send("HELO c.test\r\n")
    assert_cut_off(client, ingest, await client.send(ENVELOPE))


@pytest.mark.parametrize("verb", ["NOOP", "VRFY b", "HELP", "EHLO c.test"])
async def test_nothing_may_follow_a_command_that_ends_a_group(
    make_client: MakeClient, ingest: MemoryIngest, verb: str
) -> None:
    client = strict(make_client)
    await client.ehlo()
    assert_cut_off(client, ingest, await client.send(f"{verb}\r\n{ENVELOPE}"))


async def test_message_content_may_not_follow_data_in_its_packet(
    make_client: MakeClient, ingest: MemoryIngest
) -> None:
    client = strict(make_client)
    await client.ehlo()
    reply = await client.send(ENVELOPE + "DATA\r\nSubject: hi\r\n\r\nhi\r\n.\r\n")
    assert codes(reply) == ["250 2.1.0", "250 2.1.5", "354", LOST_SYNC]
    assert_cut_off(client, ingest, reply)


async def test_commands_behind_the_end_of_data_are_refused_with_the_message(
    make_client: MakeClient, ingest: MemoryIngest
) -> None:
    client = strict(make_client)
    await client.ehlo()
    await client.send(ENVELOPE + "DATA\r\n")
    reply = await client.send("hi\r\n.\r\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<v@y.test>\r\n")
    assert codes(reply) == [LOST_SYNC]
    assert_cut_off(client, ingest, reply)


async def test_a_quit_behind_the_end_of_data_is_allowed(
    make_client: MakeClient, ingest: MemoryIngest
) -> None:
    client = strict(make_client)
    await client.ehlo()
    await client.send(ENVELOPE + "DATA\r\n")
    assert codes(await client.send("hi\r\n.\r\nquit\r\n")) == ["250 2.0.0", "221 2.0.0"]
    assert len(ingest.messages) == 1


async def test_authenticated_clients_may_pipeline_anything(
    make_client: MakeClient, ingest: MemoryIngest
) -> None:
    client = strict(make_client)
    await client.ehlo()
    token = base64.b64encode(b"\0alice\0s3cret").decode()
    assert codes(await client.send(f"AUTH PLAIN {token}\r\n")) == ["235 2.7.0"]
    reply = await client.send(ENVELOPE + "DATA\r\nhi\r\n.\r\n" + ENVELOPE + "DATA\r\nyo\r\n.\r\n")
    assert codes(reply) == ["250 2.1.0", "250 2.1.5", "354", "250 2.0.0"] * 2
    assert len(ingest.messages) == 2


async def test_the_rule_can_be_turned_off(make_client: MakeClient, ingest: MemoryIngest) -> None:
    client = make_client(peer=TRUSTED, forbid_unauth_pipelining=False)
    reply = await client.send("EHLO c.test\r\n" + ENVELOPE + "DATA\r\nhi\r\n.\r\nNOOP\r\n")
    assert codes(reply)[1:] == ["250 2.1.0", "250 2.1.5", "354", "250 2.0.0", "250 2.0.0"]
    assert len(ingest.messages) == 1


def test_the_rule_is_on_by_default() -> None:
    assert SmtpSettings().forbid_unauth_pipelining
