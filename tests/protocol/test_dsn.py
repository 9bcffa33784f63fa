"""The DSN extension (RFC 3461) on reception: EHLO, MAIL and RCPT parameters, the envelope."""

from __future__ import annotations

import pytest

from epoxi.smtp import parser
from epoxi.smtp.parser import CommandError
from tests.protocol.conftest import MakeClient, MemoryIngest
from tests.protocol.test_session import codes

TRUSTED = "127.0.0.1"


@pytest.mark.parametrize(
    ("text", "decoded"),
    [("", ""), ("abc", "abc"), ("a+2Bb", "a+b"), ("+3D+20x", "= x"), ("~!", "~!")],
)
def test_xtext_is_decoded(text: str, decoded: str) -> None:
    assert parser.decode_xtext(text) == decoded


@pytest.mark.parametrize("text", ["a+", "a+2", "a+2b", "a+GG", "a=b", "a b", "é", "a\x7f"])
def test_bad_xtext_is_a_syntax_error(text: str) -> None:
    with pytest.raises(CommandError) as info:
        parser.decode_xtext(text)
    assert str(info.value.reply).startswith("501 5.5.4")


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("NEVER", "NEVER"),
        ("never", "NEVER"),
        ("SUCCESS", "SUCCESS"),
        ("DELAY,FAILURE,SUCCESS", "SUCCESS,FAILURE,DELAY"),
        ("failure,delay", "FAILURE,DELAY"),
    ],
)
def test_notify_values(value: str, parsed: str) -> None:
    assert parser.parse_dsn_notify(value) == parsed


@pytest.mark.parametrize(
    "value", [None, "", "NEVER,SUCCESS", "FAILURE,NEVER", "SUCCESS,SUCCESS", "SOMETIMES", "A,,B"]
)
def test_bad_notify_is_a_syntax_error(value: str | None) -> None:
    with pytest.raises(CommandError):
        parser.parse_dsn_notify(value)


def test_ret_envid_and_orcpt() -> None:
    assert parser.parse_dsn_ret("hdrs") == "HDRS"
    assert parser.parse_dsn_envid("id+2B1") == "id+1"
    assert parser.parse_dsn_envid("x" * 100) == "x" * 100
    assert parser.parse_dsn_orcpt("RFC822;b+2Bx@y.test") == "rfc822;b+x@y.test"
    for bad in (
        lambda: parser.parse_dsn_ret("ALL"),
        lambda: parser.parse_dsn_ret(None),
        lambda: parser.parse_dsn_envid("x" * 101),
        lambda: parser.parse_dsn_envid(None),
        lambda: parser.parse_dsn_orcpt("rfc822"),
        lambda: parser.parse_dsn_orcpt("rfc822;"),
        lambda: parser.parse_dsn_orcpt(";a@b.test"),
        lambda: parser.parse_dsn_orcpt("rfc822;a=b"),
    ):
        with pytest.raises(CommandError):
            bad()


def test_duplicate_parameters_are_a_syntax_error() -> None:
    with pytest.raises(CommandError) as info:
        parser.parse_params(" RET=FULL ret=HDRS")
    assert info.value.reply.code == 501


async def test_ehlo_advertises_dsn(make_client: MakeClient) -> None:
    assert "250-DSN\r\n" in await make_client().ehlo()


async def test_dsn_parameters_reach_the_envelope(
    make_client: MakeClient, ingest: MemoryIngest
) -> None:
    client = make_client(peer=TRUSTED)
    await client.ehlo()
    reply = await client.send(
        "MAIL FROM:<a@x.test> RET=HDRS ENVID=QQ+2B1\r\n"
        "RCPT TO:<b@y.test> NOTIFY=FAILURE,DELAY ORCPT=rfc822;B+2Bb@y.test\r\n"
        "RCPT TO:<c@y.test> NOTIFY=NEVER\r\n"
        "RCPT TO:<d@y.test>\r\n"
    )
    assert codes(reply) == ["250 2.1.0", "250 2.1.5", "250 2.1.5", "250 2.1.5"]
    await client.send("BDAT 4 LAST\r\nhi\r\n")
    ((meta, _),) = ingest.messages
    assert (meta.dsn_ret, meta.dsn_envid) == ("HDRS", "QQ+1")
    assert meta.dsn_notify == {"b@y.test": "FAILURE,DELAY", "c@y.test": "NEVER"}
    assert meta.dsn_orcpt == {"b@y.test": "rfc822;B+b@y.test"}


async def test_without_dsn_parameters_the_envelope_keeps_its_defaults(
    make_client: MakeClient, ingest: MemoryIngest
) -> None:
    client = make_client(peer=TRUSTED)
    await client.ehlo()
    await client.send("MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n")
    await client.send("BDAT 4 LAST\r\nhi\r\n")
    ((meta, _),) = ingest.messages
    assert (meta.dsn_ret, meta.dsn_envid, meta.dsn_notify, meta.dsn_orcpt) == ("", "", None, None)


@pytest.mark.parametrize(
    ("command", "status"),
    [
        ("MAIL FROM:<a@x.test> RET=ALL", "501 5.5.4"),
        ("MAIL FROM:<a@x.test> RET", "501 5.5.4"),
        ("MAIL FROM:<a@x.test> RET=FULL RET=HDRS", "501 5.5.4"),
        ("MAIL FROM:<a@x.test> ENVID=" + "x" * 101, "501 5.5.4"),
        ("MAIL FROM:<a@x.test> ENVID=a+zz", "501 5.5.4"),
        ("MAIL FROM:<a@x.test> ENVID=é", "501 5.5.4"),
    ],
)
async def test_bad_mail_dsn_parameters(make_client: MakeClient, command: str, status: str) -> None:
    client = make_client(peer=TRUSTED)
    await client.ehlo()
    assert codes(await client.send(command + "\r\n")) == [status]


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ("NOTIFY=NEVER,SUCCESS", "501 5.5.4"),
        ("NOTIFY=SOMETIMES", "501 5.5.4"),
        ("NOTIFY=DELAY NOTIFY=DELAY", "501 5.5.4"),
        ("ORCPT=rfc822", "501 5.5.4"),
        ("ORCPT=rfc822;a+1", "501 5.5.4"),
        ("RET=FULL", "555 5.5.4"),
    ],
)
async def test_bad_rcpt_dsn_parameters(make_client: MakeClient, params: str, status: str) -> None:
    client = make_client(peer=TRUSTED)
    await client.ehlo()
    await client.send("MAIL FROM:<a@x.test>\r\n")
    assert codes(await client.send(f"RCPT TO:<b@y.test> {params}\r\n")) == [status]
