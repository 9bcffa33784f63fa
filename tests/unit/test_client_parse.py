"""Reply parsing, EHLO keywords and the DATA payload."""

from __future__ import annotations

import pytest

from epoxi.errors import ProtocolError
from epoxi.smtp.client_parse import dot_stuff, parse_ehlo, parse_reply
from epoxi.smtp.replies import Reply

MULTI = b"250-mx.example greets you\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250 STARTTLS\r\n"


def test_single_and_enhanced() -> None:
    buf = bytearray(b"550 5.1.1 User unknown\r\n250 OK\r\n")
    assert parse_reply(buf) == Reply(550, "5.1.1", "User unknown")
    assert parse_reply(buf) == Reply(250, "", "OK")
    assert buf == b""


def test_multiline_split_at_every_byte() -> None:
    for cut in range(len(MULTI)):
        buf = bytearray(MULTI[:cut])
        assert parse_reply(buf) is None and len(buf) == cut
        buf += MULTI[cut:]
        reply = parse_reply(buf)
        assert reply is not None and reply.code == 250 and buf == b""
        assert parse_ehlo(reply) == {"PIPELINING": "", "SIZE": "1000", "STARTTLS": ""}


def test_enhanced_code_stripped_from_every_line() -> None:
    buf = bytearray(b"452-4.2.2 Mailbox full\r\n452 4.2.2 try later\r\n")
    assert parse_reply(buf) == Reply(452, "4.2.2", "Mailbox full\ntry later")


def test_code_without_text_and_bare_lf() -> None:
    assert parse_reply(bytearray(b"354\n")) == Reply(354, "", "")


@pytest.mark.parametrize("raw", [b"hello\r\n", b"25 x\r\n", b"250x\r\n", b"250-a\r\n251 b\r\n"])
def test_malformed(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_reply(bytearray(raw))


def test_line_too_long() -> None:
    with pytest.raises(ProtocolError):
        parse_reply(bytearray(b"250 " + b"x" * 5000))


@pytest.mark.parametrize(
    ("body", "payload"),
    [
        (b"a\r\nb\r\n", b"a\r\nb\r\n.\r\n"),
        (b".lead\r\nx\r\n.\r\n", b"..lead\r\nx\r\n..\r\n.\r\n"),
        (b"no final crlf", b"no final crlf\r\n.\r\n"),
        (b"bare\nlf\n.\nend", b"bare\r\nlf\r\n..\r\nend\r\n.\r\n"),
        (b"bare\rcr", b"bare\r\ncr\r\n.\r\n"),
        (b"", b".\r\n"),
    ],
)
def test_dot_stuff(body: bytes, payload: bytes) -> None:
    assert dot_stuff(body) == payload
