"""Reply parsing, EHLO keywords and the DATA payload."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from epoxi.errors import ProtocolError
from epoxi.smtp.client_parse import (
    MAX_REPLY_LINE,
    dot_stuff,
    mail_dsn_params,
    parse_ehlo,
    parse_reply,
    rcpt_dsn_params,
    xtext,
)
from epoxi.smtp.replies import Reply

MULTI = b"250-mx.example greets you\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250 STARTTLS\r\n"
STREAM = b"220 2.0.0 ready\r\n" + MULTI + b"550-5.1.1 no such\n550 5.1.1 user\n354 go ahead\r\n"
STREAM_REPLIES = [
    Reply(220, "2.0.0", "ready"),
    Reply(250, "", "mx.example greets you\nPIPELINING\nSIZE 1000\nSTARTTLS"),
    Reply(550, "5.1.1", "no such\nuser"),
    Reply(354, "", "go ahead"),
]


def drain(buf: bytearray) -> list[Reply]:
    replies = []
    while (reply := parse_reply(buf)) is not None:
        replies.append(reply)
    return replies


def test_single_and_enhanced() -> None:
    buf = bytearray(b"550 5.1.1 User unknown\r\n250 OK\r\n")
    assert parse_reply(buf) == Reply(550, "5.1.1", "User unknown")
    assert parse_reply(buf) == Reply(250, "", "OK")
    assert buf == b""


def test_incomplete_consumes_nothing() -> None:
    for partial in (b"", b"25", b"250-first\r\n", b"250-first\r\n250 la", b"250 x\r"):
        buf = bytearray(partial)
        assert parse_reply(buf) is None and bytes(buf) == partial


def test_multiline_split_at_every_byte() -> None:
    for cut in range(len(MULTI) + 1):
        buf = bytearray(MULTI[:cut])
        if cut < len(MULTI):
            assert parse_reply(buf) is None and len(buf) == cut
        buf += MULTI[cut:]
        reply = parse_reply(buf)
        assert reply is not None and reply.code == 250 and buf == b""
        assert parse_ehlo(reply) == {"PIPELINING": "", "SIZE": "1000", "STARTTLS": ""}


def test_stream_split_into_two_packets_anywhere() -> None:
    for cut in range(len(STREAM) + 1):
        buf = bytearray(STREAM[:cut])
        replies = drain(buf)
        buf += STREAM[cut:]
        assert replies + drain(buf) == STREAM_REPLIES and buf == b""


def test_stream_fed_one_byte_at_a_time() -> None:
    buf = bytearray()
    replies: list[Reply] = []
    for byte in STREAM:
        buf.append(byte)
        replies += drain(buf)
    assert replies == STREAM_REPLIES


def test_enhanced_code_stripped_from_every_line() -> None:
    buf = bytearray(b"452-4.2.2 Mailbox full\r\n452-4.2.2\r\n452 4.2.2 try later\r\n")
    assert parse_reply(buf) == Reply(452, "4.2.2", "Mailbox full\n\ntry later")


@pytest.mark.parametrize(
    ("raw", "reply"),
    [
        (b"250 2.0.0\r\n", Reply(250, "2.0.0", "")),
        (b"550 4.1.1 wrong class\r\n", Reply(550, "", "4.1.1 wrong class")),
        (b"250 2.0.0x text\r\n", Reply(250, "", "2.0.0x text")),
        (b"250 2.1000.0 text\r\n", Reply(250, "", "2.1000.0 text")),
        (b"250-2.1.1 a\r\n250 2.1.10 b\r\n", Reply(250, "2.1.1", "a\n2.1.10 b")),
        (b"250 caf\xc3\xa9 \xff\r\n", Reply(250, "", "caf\u00e9 \ufffd")),
    ],
)
def test_enhanced_code_edges(raw: bytes, reply: Reply) -> None:
    assert parse_reply(bytearray(raw)) == reply


def test_code_without_text_and_bare_lf() -> None:
    assert parse_reply(bytearray(b"354\n")) == Reply(354, "", "")
    assert parse_reply(bytearray(b"250-a\n250 b\n")) == Reply(250, "", "a\nb")


@pytest.mark.parametrize(
    "raw",
    [
        b"hello\r\n",
        b"25 x\r\n",
        b"250x\r\n",
        b"250-a\r\n251 b\r\n",
        b"199 too low\r\n",
        b"650 too high\r\n",
        b"\r\n",
        b"\xd9\xa2\xd9\xa5\xd9\xa0 arabic digits\r\n",
    ],
)
def test_malformed(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_reply(bytearray(raw))


def test_line_too_long_complete_or_not() -> None:
    with pytest.raises(ProtocolError, match="longer"):
        parse_reply(bytearray(b"250 " + b"x" * MAX_REPLY_LINE))
    with pytest.raises(ProtocolError, match="longer"):
        parse_reply(bytearray(b"250 " + b"x" * MAX_REPLY_LINE + b"\r\n"))
    longest = b"250 " + b"x" * (MAX_REPLY_LINE - 4) + b"\r\n"
    assert parse_reply(bytearray(longest)) is not None


def test_endless_multiline_reply_is_refused() -> None:
    with pytest.raises(ProtocolError, match="reply longer"):
        parse_reply(bytearray(b"250-more\r\n" * 10_000))


def test_ehlo_keywords() -> None:
    reply = Reply(250, "", "mx hi\nsize 0\nAUTH=PLAIN LOGIN\n8BITMIME\n  \nX-Thing  a b ")
    assert parse_ehlo(reply) == {
        "SIZE": "0",
        "AUTH": "PLAIN LOGIN",
        "8BITMIME": "",
        "X-THING": "a b",
    }
    assert parse_ehlo(Reply(250, "", "AUTH LOGIN\nAUTH=PLAIN")) == {"AUTH": "PLAIN"}
    assert parse_ehlo(Reply(250, "", "x\nAUTH LOGIN\nAUTH=PLAIN")) == {"AUTH": "LOGIN"}
    assert parse_ehlo(Reply(250, "", "only a greeting")) == {}


@pytest.mark.parametrize(
    ("body", "payload"),
    [
        (b"a\r\nb\r\n", b"a\r\nb\r\n.\r\n"),
        (b".lead\r\nx\r\n.\r\n", b"..lead\r\nx\r\n..\r\n.\r\n"),
        (b".", b"..\r\n.\r\n"),
        (b"..\r\n", b"...\r\n.\r\n"),
        (b"a\r\n.\r\nb", b"a\r\n..\r\nb\r\n.\r\n"),
        (b"no final crlf", b"no final crlf\r\n.\r\n"),
        (b"bare\nlf\n.\nend", b"bare\r\nlf\r\n..\r\nend\r\n.\r\n"),
        (b"bare\rcr", b"bare\r\ncr\r\n.\r\n"),
        (b"cr\r\r\nlf", b"cr\r\n\r\nlf\r\n.\r\n"),
        (b"\n.\r.", b"\r\n..\r\n..\r\n.\r\n"),
        (b"\r\n", b"\r\n.\r\n"),
        (b"", b".\r\n"),
    ],
)
def test_dot_stuff(body: bytes, payload: bytes) -> None:
    assert dot_stuff(body) == payload


def test_dot_stuff_never_ends_a_message_early() -> None:
    nasty = b"x\r\n.\r\ny\n.\nz\r.\r" * 3
    payload = dot_stuff(nasty)
    assert payload.endswith(b"\r\n.\r\n") and payload.count(b"\r\n.\r\n") == 1
    assert b"\r" not in payload.replace(b"\r\n", b"") and b"\n" not in payload.replace(b"\r\n", b"")


@given(
    st.binary(max_size=200) | st.lists(st.sampled_from([b"\r", b"\n", b".", b"a"])).map(b"".join)
)
def test_dot_stuff_properties(body: bytes) -> None:
    payload = dot_stuff(body)
    assert payload.endswith(b".\r\n")
    content = payload[:-3]
    assert content.count(b"\r") == content.count(b"\n") == content.count(b"\r\n")
    assert content == b"" or content.endswith(b"\r\n")
    lines = content.split(b"\r\n")
    assert all(line.startswith(b"..") for line in lines if line.startswith(b"."))
    normal = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if normal and not normal.endswith(b"\r\n"):
        normal += b"\r\n"
    assert b"\r\n".join(line[1:] if line[:1] == b"." else line for line in lines) == normal


_TEXT = st.text("abcXYZ019 -", max_size=20).map(str.strip)


@st.composite
def replies(draw: st.DrawFn) -> Reply:
    code = draw(st.integers(200, 599))
    classes = ["", f"{code // 100}.1.0", f"{code // 100}.7.255"] if code // 100 != 3 else [""]
    enhanced = draw(st.sampled_from(classes))  # RFC 3463: classes 2, 4 and 5 only
    lines = draw(st.lists(_TEXT.filter(lambda t: not t[:1].isdigit()), min_size=1, max_size=4))
    return Reply(code, enhanced, "\n".join(lines))


@given(replies(), replies(), st.integers(0, 500))
def test_encoded_replies_parse_back_however_split(first: Reply, second: Reply, cut: int) -> None:
    wire = first.encode() + second.encode()
    buf = bytearray(wire[:cut])
    parsed = drain(buf)
    buf += wire[cut:]
    assert parsed + drain(buf) == [first, second] and buf == b""


@given(
    st.binary(max_size=120)
    | st.lists(st.sampled_from([b"250", b"-", b" ", b"\r\n", b"x"])).map(b"".join)
)
def test_parse_reply_on_any_bytes_parses_waits_or_raises_protocol_error(data: bytes) -> None:
    buf = bytearray(data)
    with contextlib.suppress(ProtocolError):
        while (reply := parse_reply(buf)) is not None:
            assert 200 <= reply.code <= 599
        assert bytes(buf) == data[len(data) - len(buf) :]  # only whole replies were taken


# ----------------------------------------------------------------- DSN parameters


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        ("", ""),
        ("abc-123_~!", "abc-123_~!"),
        ("a+b=c", "a+2Bb+3Dc"),
        ("two words\ttab", "two+20words+09tab"),
        ("line\r\nbreak", "line+0D+0Abreak"),
        ("\x7f", "+7F"),
        ("é", "+C3+A9"),
    ],
)
def test_xtext(value: str, encoded: str) -> None:
    assert xtext(value) == encoded


def xtext_decode(text: str) -> bytes:
    out, i = bytearray(), 0
    while i < len(text):
        if text[i] == "+":
            out.append(int(text[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(ord(text[i]))
            i += 1
    return bytes(out)


@given(st.text())
def test_xtext_is_printable_ascii_and_reversible(value: str) -> None:
    encoded = xtext(value)
    assert all(33 <= ord(c) <= 126 and c != "=" for c in encoded)
    assert xtext_decode(encoded) == value.encode("utf-8")


def test_mail_dsn_params() -> None:
    assert mail_dsn_params("", "") == ""
    assert mail_dsn_params("full", "") == " RET=FULL"
    assert mail_dsn_params("HDRS", "q 1") == " RET=HDRS ENVID=q+201"
    assert mail_dsn_params("BOGUS", "x") == " ENVID=x"


@pytest.mark.parametrize(
    ("notify", "orcpt", "params"),
    [
        (None, None, ""),
        ("NEVER", None, " NOTIFY=NEVER"),
        ("success, delay", None, " NOTIFY=SUCCESS,DELAY"),
        ("NEVER,SUCCESS", None, ""),
        ("SUCCESS\r\nRSET", None, ""),
        (None, "rfc822;a+b@x.test", " ORCPT=rfc822;a+2Bb@x.test"),
        (None, "rfc822;jörg@x.test", " ORCPT=utf-8;j\\x{F6}rg@x.test"),
        (None, "rfc822; a b\\c@x.test", " ORCPT=rfc822;a+20b\\c@x.test"),
        (None, "no-type", ""),
        ("FAILURE", "rfc822;b@x.test", " NOTIFY=FAILURE ORCPT=rfc822;b@x.test"),
    ],
)
def test_rcpt_dsn_params(notify: str | None, orcpt: str | None, params: str) -> None:
    assert rcpt_dsn_params(notify, orcpt) == params


def test_utf8_orcpt_escapes_what_is_not_qchar() -> None:
    assert rcpt_dsn_params(None, "utf-8;ä+b=c\\ d@x.test") == (
        " ORCPT=utf-8;\\x{E4}\\x{2B}b\\x{3D}c\\x{5C}\\x{20}d@x.test"
    )


def test_a_line_seen_before_parses_to_the_same_reply_and_is_still_checked() -> None:
    line = b"250 2.1.5 Ok %d\r\n"
    for n in range(3000):  # fills the cache of seen lines more than once
        assert parse_reply(bytearray(line % n)) == Reply(250, "2.1.5", f"Ok {n}")
    first, again = bytearray(b"250 2.1.5 Ok\r\n"), bytearray(b"250 2.1.5 Ok\r\n")
    assert parse_reply(first) is parse_reply(again) == Reply(250, "2.1.5", "Ok")
    assert not first and not again
    with pytest.raises(ProtocolError):
        parse_reply(bytearray(b"2x0 2.1.5 Ok\r\n"))
