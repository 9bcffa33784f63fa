"""8-bit MIME to 7-bit for a next hop without 8BITMIME (RFC 6152 §3)."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage

import pytest
from hypothesis import given
from hypothesis import strategies as st

from epoxi.smtp.downgrade import MAX_DEPTH, Unconvertible, downgrade_8bit

MIME = b"MIME-Version: 1.0\r\n"
TEXT_8BIT = "Grüße aus Köln = ok \r\n.line\r\n".encode()


def converted(message: bytes) -> bytes:
    result = downgrade_8bit(message)
    assert isinstance(result, bytes), result
    assert result.isascii()
    return result


def parse(message: bytes) -> EmailMessage:
    parsed = email.message_from_bytes(message, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def refusal(message: bytes) -> str:
    result = downgrade_8bit(message)
    assert isinstance(result, Unconvertible), result
    return result.reason


def test_7bit_message_is_returned_as_it_is() -> None:
    message = MIME + b"Subject: x\r\n\r\nplain\r\n"
    assert downgrade_8bit(message) is message


def test_single_part_becomes_quoted_printable() -> None:
    message = MIME + b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + TEXT_8BIT
    out = converted(message)
    assert out.startswith(
        MIME + b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
    )
    assert parse(out).get_payload(decode=True) == TEXT_8BIT


def test_existing_encoding_field_is_replaced_where_it_was() -> None:
    message = (
        MIME + b"Content-Transfer-Encoding:\r\n 8bit\r\nSubject: s\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n" + TEXT_8BIT
    )
    head = converted(message).split(b"\r\n\r\n")[0]
    assert head == MIME + b"Content-Transfer-Encoding: quoted-printable\r\nSubject: s"


MULTIPART = (
    MIME + b'Content-Type: multipart/mixed; boundary="b1"\r\nContent-Transfer-Encoding: 8bit\r\n'
    b"\r\npreamble\r\n"
    b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
    b"\r\n" + TEXT_8BIT + b"\r\n"
    b"--b1\r\nContent-Type: text/plain\r\n\r\nascii part\r\n"
    b"--b1 \r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    b"Subject: inner\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + "Köln".encode() + b"\r\n"
    b"--b1\r\n\r\n" + "no headers: ä".encode() + b"\r\n"
    b"--b1--\r\nepilogue\r\n"
)


def test_only_8bit_parts_change() -> None:
    out = converted(MULTIPART)
    assert b"\r\n--b1\r\nContent-Type: text/plain\r\n\r\nascii part\r\n--b1 \r\n" in out
    assert out.startswith(
        MIME + b'Content-Type: multipart/mixed; boundary="b1"\r\n'
        b"Content-Transfer-Encoding: 7bit\r\n\r\npreamble\r\n"
    )
    assert out.endswith(b"\r\n--b1--\r\nepilogue\r\n")


def test_converted_parts_decode_to_the_original_content() -> None:
    text, ascii_part, attached, bare = parse(converted(MULTIPART)).iter_parts()
    assert text.get_payload(decode=True) == TEXT_8BIT
    assert text["Content-Transfer-Encoding"] == "quoted-printable"
    assert ascii_part.get_content() == "ascii part"
    assert attached["Content-Transfer-Encoding"] == "7bit"
    (inner,) = attached.iter_parts()
    assert inner["Subject"] == "inner" and inner.get_content() == "Köln"
    assert bare["Content-Transfer-Encoding"] == "quoted-printable"
    assert bare.get_payload(decode=True) == "no headers: ä".encode()


def test_binary_part_becomes_base64() -> None:
    data = bytes(b for b in range(256) if b not in b"\r\n") * 3 + b"\r\nend"  # lines as DATA has
    message = MIME + b"Content-Type: application/octet-stream\r\n"
    message += b"Content-Transfer-Encoding: binary\r\n\r\n" + data
    out = converted(message)
    assert b"Content-Transfer-Encoding: base64\r\n" in out
    assert parse(out).get_payload(decode=True) == data


def test_digest_parts_default_to_message_rfc822() -> None:
    message = (
        MIME + b"Content-Type: multipart/digest; boundary=d\r\n\r\n"
        b"--d\r\n\r\nSubject: one\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        + "é".encode()
        + b"\r\n--d--\r\n"
    )
    out = converted(message)
    assert b"--d\r\n\r\nSubject: one\r\nContent-Type: text/plain; charset=utf-8\r\n" in out
    assert b"Content-Transfer-Encoding: quoted-printable\r\n\r\n=C3=A9\r\n--d--" in out


def test_bare_line_ends_become_crlf() -> None:
    out = converted(MIME.replace(b"\r\n", b"\n") + b"\n" + "ä\nb\r".encode())
    assert out == MIME + b"Content-Transfer-Encoding: quoted-printable\r\n\r\n=C3=A4\r\nb\r\n"


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (b"Subject: x\r\n\r\n" + TEXT_8BIT, "message is not MIME"),
        (MIME + "Subject: ä\r\n\r\nx\r\n".encode(), "8-bit data in a header"),
        (MIME + b"Content-Transfer-Encoding: base64\r\n\r\n" + TEXT_8BIT, "in a base64 part"),
        (
            MIME + b"Content-Type: message/partial; id=x\r\n\r\n" + TEXT_8BIT,
            "in a message/partial part",
        ),
        (
            MIME + b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + TEXT_8BIT,
            "multipart without parts",
        ),
        (
            MIME + b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
            b"\xc3\xa4\r\n--b\r\n\r\nx\r\n--b--\r\n",
            "multipart preamble",
        ),
        (
            MIME + b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
            b"--b\r\n\r\nx\r\n--b--\r\n\xc3\xa4\r\n",
            "multipart epilogue",
        ),
        (
            MIME + b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
            b"--b\r\nSubject: \xc3\xa4\r\n\r\nx\r\n--b--\r\n",
            "8-bit data in a header",
        ),
        (
            MIME + b"Content-Type: message/rfc822\r\n\r\nSubject: \xc3\xa4\r\n\r\nx\r\n",
            "8-bit data in a header",
        ),
    ],
)
def test_what_cannot_be_converted_says_why(message: bytes, reason: str) -> None:
    assert reason in refusal(message)


def test_nesting_is_bounded() -> None:
    message = "é\r\n".encode()
    for _ in range(MAX_DEPTH + 2):
        message = b"Content-Type: message/rfc822\r\n\r\n" + message
    assert "nested deeper" in refusal(MIME + message)


@given(
    st.lists(
        st.text(st.characters(codec="utf-8", exclude_characters="\r\n")), min_size=1, max_size=5
    )
)
def test_any_text_round_trips(lines: list[str]) -> None:
    body = "\r\n".join(lines).encode()
    message = MIME + b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + body
    result = downgrade_8bit(message)
    assert isinstance(result, bytes) and result.isascii()
    assert all(len(line) <= 78 for line in result.split(b"\r\n\r\n", 1)[1].split(b"\r\n"))
    assert parse(result).get_payload(decode=True) == body
