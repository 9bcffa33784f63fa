"""Command, path and parameter parsing."""

from __future__ import annotations

import pytest

from epoxi.smtp.parser import (
    CommandError,
    Mailbox,
    normalize_domain,
    parse_command,
    parse_mail,
    parse_rcpt,
)
from epoxi.smtp.replies import Reply


def test_command_split_and_case() -> None:
    command = parse_command(b"mail FROM:<a@b.c>")
    assert (command.verb, command.arg) == ("MAIL", "FROM:<a@b.c>")


def test_invalid_utf8_is_a_syntax_error() -> None:
    with pytest.raises(CommandError) as info:
        parse_command(b"MAIL \xff\xfe")
    assert info.value.reply.code == 501


def test_mail_with_params() -> None:
    args = parse_mail("FROM:<a@b.example> SIZE=10 BODY=8BITMIME SMTPUTF8")
    assert args.sender == Mailbox("a", "b.example")
    assert args.params == {"SIZE": "10", "BODY": "8BITMIME", "SMTPUTF8": None}


def test_null_sender_and_postmaster() -> None:
    assert parse_mail("FROM:<>").sender is None
    assert parse_rcpt("TO:<Postmaster>").recipient == Mailbox("postmaster", "")


def test_source_route_is_ignored() -> None:
    assert parse_rcpt("TO:<@a.example,@b.example:u@c.example>").recipient == Mailbox(
        "u", "c.example"
    )


def test_quoted_local_part_and_literal() -> None:
    assert parse_rcpt('TO:<"a b"@x.example>').recipient.local == '"a b"'
    assert parse_rcpt("TO:<u@[192.0.2.1]>").recipient.domain == "[192.0.2.1]"
    assert parse_rcpt("TO:<u@[IPv6:2001:db8::1]>").recipient.domain == "[ipv6:2001:db8::1]"


@pytest.mark.parametrize(
    "arg",
    [
        "TO:<a@b@c>",
        "TO:<@a:>",
        "TO:<a@-b.example>",
        "TO:<a@b_c.example>",
        "TO:<a.@b.example>",
        "TO:<a@[300.1.1.1]>",
        "TO:<" + "x" * 65 + "@b.example>",
        "TO:<a@b.example>junk",
        "TO:<>",
    ],
)
def test_bad_paths(arg: str) -> None:
    with pytest.raises(CommandError) as info:
        parse_rcpt(arg)
    assert isinstance(info.value.reply, Reply) and info.value.reply.code in (501, 553)


def test_bad_param_syntax() -> None:
    with pytest.raises(CommandError):
        parse_mail("FROM:<a@b.example> =x")


def test_domain_normalisation() -> None:
    assert normalize_domain("Example.COM.") == "example.com"
    assert normalize_domain("bücher.example") == "xn--bcher-kva.example"
