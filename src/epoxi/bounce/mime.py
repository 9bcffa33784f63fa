"""Just enough MIME to read reports quickly: header fields, multipart bodies, leaf parts.

The standard library's parser builds a full object tree and compiles a regular expression
for every new multipart boundary (each bounce has its own, so Python's regex cache never
helps); reading a DSN that way costs about a millisecond. Reports need far less: their
top-level header fields, the content type of each part, and the fields of three kinds of
part. This reads those from the bytes directly. Anything it cannot follow (a boundary that
never appears, nesting deeper than :data:`MAX_DEPTH`) just yields fewer parts.
"""

from __future__ import annotations

import base64
import binascii
import quopri
import re
from collections.abc import Iterator
from dataclasses import dataclass

MAX_DEPTH = 8
_BLANK = re.compile(rb"\r?\n\r?\n")
_FIELD_BLANK = re.compile(r"\r?\n[ \t]*\r?\n")
_PARAM = re.compile(r';\s*([a-zA-Z0-9*_-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]+))')


@dataclass(frozen=True, slots=True)
class Part:
    """One entity: its header fields (names lowercased, first occurrence) and raw body."""

    fields: dict[str, str]
    body: bytes

    @property
    def content_type(self) -> str:
        value = self.fields.get("content-type", "")
        kind = value.split(";", 1)[0].strip().lower()
        return kind if "/" in kind else "text/plain"

    def param(self, name: str) -> str:
        """A parameter of Content-Type, e.g. ``boundary``; "" when absent."""
        for match in _PARAM.finditer(self.fields.get("content-type", "")):
            if match.group(1).lower() == name:
                quoted = match.group(2)
                return quoted.replace("\\", "") if quoted is not None else match.group(3)
        return ""

    def decoded(self) -> bytes:
        """The body with its Content-Transfer-Encoding undone (base64, quoted-printable)."""
        encoding = self.fields.get("content-transfer-encoding", "").strip().lower()
        if encoding == "base64":
            try:
                return base64.b64decode(self.body, validate=False)
            except (binascii.Error, ValueError):
                return self.body
        if encoding == "quoted-printable":
            return quopri.decodestring(self.body)
        return self.body

    def text(self) -> str:
        charset = self.param("charset") or "utf-8"
        try:
            return self.decoded().decode(charset, "replace")
        except LookupError:
            return self.decoded().decode("utf-8", "replace")


def split(data: bytes) -> Part:
    """An entity's header fields and body (everything after the first empty line)."""
    found = _BLANK.search(data)
    if found is None:
        head, body = data, b""
    else:
        head, body = data[: found.start()], data[found.end() :]
    return Part(fields(head.decode("utf-8", "replace")), body)


def fields(text: str) -> dict[str, str]:
    """Header-style fields: unfolded, names lowercased, the first of each name kept."""
    found: dict[str, str] = {}
    name = ""
    value: list[str] = []
    for line in text.splitlines():
        if line[:1] in (" ", "\t"):
            if name:
                value.append(line.strip())
            continue
        if name and name not in found:
            found[name] = " ".join(value)
        key, colon, rest = line.partition(":")
        name, value = (key.strip().lower(), [rest.strip()]) if colon else ("", [])
    if name and name not in found:
        found[name] = " ".join(value)
    return found


def field_blocks(text: str) -> list[dict[str, str]]:
    """Groups of fields separated by empty lines (a delivery-status body)."""
    return [fields(block) for block in _FIELD_BLANK.split(text) if block.strip()]


def children(part: Part) -> list[Part]:
    """The parts of a multipart entity, in order; [] when it has none or is not one."""
    boundary = part.param("boundary").encode("utf-8", "replace")
    if not boundary:
        return []
    delimiter = b"--" + boundary
    pieces = part.body.split(delimiter)
    found = []
    for piece in pieces[1:]:
        if piece.startswith(b"--"):  # the close delimiter
            break
        piece = piece.split(b"\n", 1)[1] if b"\n" in piece else b""  # rest of delimiter line
        if piece.endswith(b"\r\n"):
            piece = piece[:-2]
        elif piece.endswith(b"\n"):
            piece = piece[:-1]
        found.append(_entity(piece))
    return found


def _entity(piece: bytes) -> Part:
    """A body part: fields, an empty line, the body; or only a body when it has no fields."""
    if piece.startswith((b"\r\n", b"\n")):
        return Part({}, piece[2:] if piece.startswith(b"\r\n") else piece[1:])
    return split(piece)


def walk(part: Part, depth: int = 0) -> Iterator[Part]:
    """``part`` and every part inside it, depth first, each before its children; a message
    inside (``message/rfc822``: a returned or forwarded one) is walked into too."""
    yield part
    if depth >= MAX_DEPTH:
        return
    kind = part.content_type
    if kind.startswith("multipart/"):
        for child in children(part):
            yield from walk(child, depth + 1)
    elif kind in ("message/rfc822", "message/global"):
        yield from walk(split(part.decoded()), depth + 1)
