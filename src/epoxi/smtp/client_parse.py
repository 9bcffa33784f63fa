"""Pure parsing for the SMTP client: replies from a receive buffer, EHLO keywords, DATA payload."""

from __future__ import annotations

import re

from epoxi.errors import ProtocolError
from epoxi.smtp.replies import Reply

MAX_REPLY_LINE = 4096
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?: |$)")


def parse_reply(buf: bytearray) -> Reply | None:
    """Take one complete reply from the front of ``buf``; None (nothing taken) if incomplete."""
    start = 0
    lines: list[str] = []
    code = ""
    while True:
        end = buf.find(b"\n", start)
        if end < 0:
            if len(buf) - start > MAX_REPLY_LINE:
                raise ProtocolError("reply line too long")
            return None
        line = bytes(buf[start:end]).rstrip(b"\r").decode("utf-8", "replace")
        start = end + 1
        if len(line) < 3 or not line[:3].isdigit() or (len(line) > 3 and line[3] not in " -"):
            raise ProtocolError(f"malformed reply line {line[:80]!r}")
        if code and line[:3] != code:
            raise ProtocolError(f"reply code changed within a reply: {line[:80]!r}")
        code = line[:3]
        lines.append(line[4:])
        if len(line) == 3 or line[3] == " ":
            del buf[:start]
            return _make_reply(int(code), lines)


def _make_reply(code: int, lines: list[str]) -> Reply:
    match = _ENHANCED.match(lines[0])
    if match is None or match.group(1) != str(code)[0]:
        return Reply(code, "", "\n".join(lines))
    enhanced = lines[0][: match.end()].strip()
    prefix = enhanced + " "
    texts = [
        line[len(prefix) :] if line.startswith(prefix) else line.removeprefix(enhanced)
        for line in lines
    ]
    return Reply(code, enhanced, "\n".join(texts))


def parse_ehlo(reply: Reply) -> dict[str, str]:
    """EHLO keywords (upper-cased) and their parameters; the first line is the greeting."""
    extensions: dict[str, str] = {}
    for line in reply.text.split("\n")[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword:
            extensions[keyword.upper()] = params
    return extensions


def dot_stuff(body: bytes) -> bytes:
    """The DATA payload for ``body``: CRLF line ends, leading dots doubled, ``.CRLF`` appended.

    Bare CR and bare LF are made CRLF, so nothing in a stored body can end or split the
    message at the next hop. The common case (no bare line ends) costs two counts.
    """
    crlf = body.count(b"\r\n")
    if body.count(b"\n") != crlf or body.count(b"\r") != crlf:
        body = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if body.startswith(b"."):
        body = b"." + body
    if b"\r\n." in body:
        body = body.replace(b"\r\n.", b"\r\n..")
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    return body + b".\r\n"
