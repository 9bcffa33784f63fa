"""8-bit MIME content made 7-bit for a next hop without 8BITMIME (RFC 6152 §3).

Only what must change is changed. Each MIME leaf whose body holds 8-bit octets is re-encoded
(quoted-printable; base64 for a ``binary`` leaf) and gets a Content-Transfer-Encoding field
saying so; a multipart or message/rfc822 entity that held such a leaf, and was labelled
``8bit`` or ``binary``, is labelled ``7bit``. Every other octet, headers included, stays as it
was. Line ends become CRLF throughout.

It cannot be done, and :func:`downgrade_8bit` says why, for 8-bit octets in a header (of the
message, a part or an attached message), for a message that is not MIME (no MIME-Version),
for 8-bit octets in a base64 or quoted-printable part, in a multipart preamble or epilogue,
in a multipart without parts or in a ``message/*`` type that must not be encoded (RFC 2046
§5.2), and for parts nested deeper than ``MAX_DEPTH``.

Pure: bytes in, bytes or the reason out. A DKIM signature over a converted part no longer
verifies, as with every MTA that converts (RFC 6376 §5.3).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32

MAX_DEPTH = 32  # MIME nesting levels converted; deeper is refused

_CTE_FIELD = re.compile(rb"^content-transfer-encoding[ \t]*:.*\r\n(?:[ \t].*\r\n)*", re.I | re.M)
_BARE_CR = re.compile(rb"\r(?!\n)")
# RFC 6532 §3.5: unlike message/rfc822, these may be encoded.
_ENCODABLE_MESSAGES = frozenset(
    {
        "message/global",
        "message/global-headers",
        "message/global-delivery-status",
        "message/global-disposition-notification",
    }
)
_IDENTITY = frozenset({"7bit", "8bit", "binary"})


@dataclass(frozen=True, slots=True)
class Unconvertible:
    """Why a message cannot be made 7-bit; ``reason`` is one line for a reply text."""

    reason: str


class _Refused(Exception):
    """Unwinds the walk through the MIME tree with the reason."""


def downgrade_8bit(message: bytes) -> bytes | Unconvertible:
    """``message`` with every 8-bit MIME part made 7-bit, or why that is not possible.

    A message that is 7-bit already comes back as it is (the same object).
    """
    if message.isascii():
        return message
    head, body = _split_entity(crlf(message))
    try:
        if head.isascii() and _parse_head(head, "text/plain").get("MIME-Version") is None:
            raise _Refused("message is not MIME")
        return _entity(head, body, 0, "text/plain")
    except _Refused as refused:
        return Unconvertible(str(refused))


def crlf(data: bytes) -> bytes:
    """``data`` with every bare CR and bare LF made CRLF."""
    if data.count(b"\n") == data.count(b"\r") and not _BARE_CR.search(data):
        return data
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def _split_entity(raw: bytes) -> tuple[bytes, bytes]:
    """(header block with its blank line, body); no blank line means headers only."""
    if raw.startswith(b"\r\n"):
        return b"\r\n", raw[2:]
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        return raw, b""
    return raw[: end + 4], raw[end + 4 :]


def _parse_head(head: bytes, default_type: str) -> Message:
    fields = BytesHeaderParser(policy=compat32).parsebytes(head)
    fields.set_default_type(default_type)
    return fields


def _entity(head: bytes, body: bytes, depth: int, default_type: str) -> bytes:
    """One entity (message, part or attached message), its 8-bit content made 7-bit."""
    if not head.isascii():
        raise _Refused("8-bit data in a header")
    if body.isascii():
        return head + body
    if depth > MAX_DEPTH:
        raise _Refused(f"MIME parts nested deeper than {MAX_DEPTH} levels")
    fields = _parse_head(head, default_type)
    content_type = fields.get_content_type()
    encoding = str(fields.get("Content-Transfer-Encoding", "7bit")).strip().lower()
    if content_type.startswith("multipart/") or content_type == "message/rfc822":
        return _composite(head, body, fields, encoding, depth)
    return _leaf(head, body, content_type, encoding)


def _composite(head: bytes, body: bytes, fields: Message, encoding: str, depth: int) -> bytes:
    if encoding not in _IDENTITY:
        raise _Refused(f"8-bit data in a {encoding} encoded {fields.get_content_type()}")
    if fields.get_content_maintype() == "message":
        inner_head, inner_body = _split_entity(body)
        body = _entity(inner_head, inner_body, depth + 1, "text/plain")
    else:
        body = _multipart(body, fields, depth)
    if "Content-Transfer-Encoding" in fields and encoding != "7bit":
        head = _set_encoding(head, b"7bit")
    return head + body


def _leaf(head: bytes, body: bytes, content_type: str, encoding: str) -> bytes:
    if encoding not in _IDENTITY:
        raise _Refused(f"8-bit data in a {encoding} part")
    if content_type.startswith("message/") and content_type not in _ENCODABLE_MESSAGES:
        raise _Refused(f"8-bit data in a {content_type} part")
    if encoding == "binary":
        encoded = base64.encodebytes(body).replace(b"\n", b"\r\n")
        return _set_encoding(head, b"base64") + encoded
    encoded = crlf(binascii.b2a_qp(body, istext=True))
    return _set_encoding(head, b"quoted-printable") + encoded


def _set_encoding(head: bytes, value: bytes) -> bytes:
    """The header block with one Content-Transfer-Encoding field, where the first one was."""
    field = b"Content-Transfer-Encoding: " + value + b"\r\n"
    first = _CTE_FIELD.search(head)
    if first is not None:
        rest = _CTE_FIELD.sub(b"", head[first.end() :])
        return head[: first.start()] + field + rest
    if head.endswith(b"\r\n\r\n"):
        return head[:-2] + field + b"\r\n"
    if head == b"\r\n":
        return field + b"\r\n"
    return head + field  # a part of headers only has no body to convert: not reached


def _multipart(body: bytes, fields: Message, depth: int) -> bytes:
    boundary = fields.get_boundary()
    if not boundary or not boundary.isascii():
        raise _Refused("8-bit data in a multipart without a boundary")
    delimiters = _delimiter_pattern(boundary).finditer(body)
    first = next(delimiters, None)
    if first is None:
        raise _Refused("8-bit data in a multipart without parts")
    out = [_outside(body[: first.start()], "preamble")]
    default_type = "message/rfc822" if fields.get_content_subtype() == "digest" else "text/plain"
    current: re.Match[bytes] | None = first
    while current is not None:
        out.append(current.group())
        if current.group(1):  # the close delimiter: the rest is the epilogue
            out.append(_outside(body[current.end() :], "epilogue"))
            break
        following = next(delimiters, None)
        end = following.start() if following is not None else len(body)
        out.append(_part(body[current.end() : end], depth, default_type))
        current = following
    return b"".join(out)


def _delimiter_pattern(boundary: str) -> re.Pattern[bytes]:
    """A delimiter line with the CRLF before it (RFC 2046 §5.1.1); group 1 marks the close."""
    escaped = re.escape(boundary.encode("ascii"))
    return re.compile(rb"(?:\A|\r\n)--" + escaped + rb"(--)?[ \t]*(?=\r\n|\Z)")


def _outside(text: bytes, where: str) -> bytes:
    if not text.isascii():
        raise _Refused(f"8-bit data in a multipart {where}")
    return text


def _part(segment: bytes, depth: int, default_type: str) -> bytes:
    """What follows a delimiter: the rest of its line (CRLF), then the part."""
    if segment.isascii():
        return segment
    line_end = b"\r\n" if segment.startswith(b"\r\n") else b""
    head, body = _split_entity(segment[len(line_end) :])
    return line_end + _entity(head, body, depth + 1, default_type)
