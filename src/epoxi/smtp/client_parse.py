"""Pure parsing for the SMTP client: replies from a receive buffer, EHLO keywords, DATA payload,
and the DSN parameters it sends (RFC 3461 xtext).

No I/O here: the client feeds bytes in and gets values out, so all of it is cheap to test.
"""

from __future__ import annotations

import re
from typing import Final

from epoxi.errors import ProtocolError
from epoxi.smtp.replies import Reply

MAX_REPLY_LINE = 4096  # octets in one reply line, without its line end
MAX_REPLY = 64 * 1024  # octets in one (multi-line) reply, line ends included

# RFC 3463: class.subject.detail, followed by a space or the end of the line.
_ENHANCED = re.compile(r"([245])\.([0-9]{1,3})\.([0-9]{1,3})(?= |$)")
# For dot_stuff: on CPython 3.11 these searches (literal first byte) run 2-3x faster than
# bytes.count or ``in`` with a two-byte needle.
_BARE_CR = re.compile(rb"\r(?!\n)")
_DOT_AFTER_LF = re.compile(rb"\n\.")


def parse_reply(buf: bytearray) -> Reply | None:
    """Take one complete reply from the front of ``buf`` and return it.

    Returns None, consuming nothing, while the reply is incomplete. Lines end in CRLF or a
    bare LF; a line is a code (first digit 2-5) then ``-`` (more lines follow) or a space (the
    last line) and text; a bare code is a last line, as RFC 5321 allows. The enhanced status
    code of the first line, when present, goes to ``Reply.enhanced`` and is removed from every
    line that repeats it. Raises :class:`~epoxi.errors.ProtocolError` for a malformed line, a
    code that changes within a reply, a line over ``MAX_REPLY_LINE`` octets or a reply over
    ``MAX_REPLY`` octets (a server cannot grow the buffer without bound).
    """
    end = buf.find(b"\n")
    if end < 0:
        _check_incomplete(buf, 0)
        return None
    if end > 3 and buf[3] == 32:  # one line, "250 ...": the common case
        line = bytes(buf[: end - 1 if buf[end - 1] == 13 else end])
        reply = _seen.get(line)
        if reply is None:
            _check_line(line, None)
            reply = _reply_from([line])
            if len(_seen) >= _SEEN_MAX:
                _seen.clear()  # full of lines said once (queue ids): start again
            _seen[line] = reply
        del buf[: end + 1]
        return reply
    return _parse_lines(buf, end)


# One-line replies already parsed, by their line: a server says "250 2.1.5 Ok" once per
# recipient. Replies are immutable, so one object serves every time. Bounded: once full of
# lines said once (queue ids and the like), it is emptied and the common lines come back.
_SEEN_MAX: Final = 1024
_seen: dict[bytes, Reply] = {}


def _parse_lines(buf: bytearray, end: int) -> Reply | None:
    lines: list[bytes] = []
    start = 0
    while end >= 0:
        line = bytes(buf[start : end - 1 if end > start and buf[end - 1] == 13 else end])
        _check_line(line, lines[0] if lines else None)
        lines.append(line)
        start = end + 1
        if len(line) == 3 or line[3] == 32:  # b" ": the last line
            del buf[:start]
            return _reply_from(lines)
        end = buf.find(b"\n", start)
    _check_incomplete(buf, start)
    return None


def _check_incomplete(buf: bytearray, start: int) -> None:
    if len(buf) - start > MAX_REPLY_LINE:
        raise ProtocolError(f"reply line longer than {MAX_REPLY_LINE} octets")
    if len(buf) > MAX_REPLY:
        raise ProtocolError(f"reply longer than {MAX_REPLY} octets")


def _check_line(line: bytes, first: bytes | None) -> None:
    head = line[:3]
    if len(line) > MAX_REPLY_LINE:
        raise ProtocolError(f"reply line longer than {MAX_REPLY_LINE} octets")
    # line[3:4] is b"" for a bare code, and b"" is in b" -": a bare code is a last line.
    if not (head.isdigit() and len(head) == 3 and head[0] in b"2345") or line[3:4] not in b" -":
        raise ProtocolError(f"malformed reply line {line[:80]!r}")
    if first is not None and head != first[:3]:
        raise ProtocolError(f"reply code changed within a reply: {line[:80]!r}")


def _reply_from(lines: list[bytes]) -> Reply:
    head = lines[0]
    first = head[4:].decode("utf-8", "replace")
    enhanced = ""
    # An enhanced code counts only if its class is the reply's class (RFC 3463 §2).
    if first[1:2] == "." and ord(first[0]) == head[0] and (match := _ENHANCED.match(first)):
        enhanced = match.group()
        first = first[match.end() + 1 :]
    code = int(head[:3])
    if len(lines) == 1:
        return Reply(code, enhanced, first)
    rest = [line[4:].decode("utf-8", "replace") for line in lines[1:]]
    if enhanced:
        rest = [_without_code(text, enhanced) for text in rest]
    return Reply(code, enhanced, "\n".join([first, *rest]))


def _without_code(text: str, enhanced: str) -> str:
    if text == enhanced:
        return ""
    if text.startswith(enhanced) and text[len(enhanced)] == " ":
        return text[len(enhanced) + 1 :]
    return text


def parse_ehlo(reply: Reply) -> dict[str, str]:
    """The extensions of an EHLO reply: keyword (upper-cased) -> its parameters ("" if none).

    The first line is the server's greeting and is skipped. The obsolete ``AUTH=MECH ...``
    form is read as ``AUTH`` when no plain ``AUTH`` line is present.
    """
    extensions: dict[str, str] = {}
    for line in reply.text.split("\n")[1:]:
        keyword, _, params = line.strip().partition(" ")
        keyword = keyword.upper()
        if keyword.startswith("AUTH="):
            extensions.setdefault("AUTH", f"{keyword[5:]} {params}".strip())
        elif keyword:
            extensions[keyword] = params.strip()
    return extensions


def dot_stuff(body: bytes) -> bytes:
    """The DATA payload for ``body``: CRLF line ends, leading dots doubled, ``.CRLF`` appended.

    Bare CR and bare LF become CRLF, so nothing in a stored body can end or split the message
    at the next hop; a final CRLF is added when missing. The common case (CRLF only, no line
    starting with a dot) costs four scans in C and one copy, about 7 us for 5 KB.
    """
    if body.count(b"\n") != body.count(b"\r") or _BARE_CR.search(body):
        body = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    # Line ends are all CRLF now (as many CR as LF, every CR before an LF), so "\n." is enough.
    if _DOT_AFTER_LF.search(body):
        body = body.replace(b"\r\n.", b"\r\n..")
    if body.startswith(b"."):
        body = b"." + body
    if not body or body.endswith(b"\r\n"):
        return body + b".\r\n"
    return body + b"\r\n.\r\n"


# --------------------------------------------------------------------- DSN parameters (RFC 3461)

_XCHARS = frozenset(range(33, 127)) - {ord("+"), ord("=")}
_NOTIFY_WORDS = frozenset({"SUCCESS", "FAILURE", "DELAY"})
# RFC 6533 §3: utf-8-addr-xtext escapes what is not QCHAR, as \x{HEX}.
_NOT_QCHAR = frozenset("+=\\")


def _qchar(c: str) -> bool:
    return "!" <= c <= "~" and c not in _NOT_QCHAR


def xtext(value: str) -> str:
    """``value`` as RFC 3461 xtext: ``+`` and two upper-case hex digits for each octet outside
    ``!``..``~`` and for ``+`` and ``=``; UTF-8 octets of a non-ASCII value are encoded too."""
    data = value.encode("utf-8")
    return "".join(chr(octet) if octet in _XCHARS else f"+{octet:02X}" for octet in data)


def mail_dsn_params(ret: str, envid: str) -> str:
    """`` RET=... ENVID=...`` for MAIL; a part is left out when empty or not valid."""
    params = f" RET={ret.upper()}" if ret.upper() in ("FULL", "HDRS") else ""
    if envid:
        params += f" ENVID={xtext(envid)}"
    return params


def rcpt_dsn_params(notify: str | None, orcpt: str | None) -> str:
    """`` NOTIFY=... ORCPT=...`` for one RCPT; a part is left out when absent or not valid.

    ``notify`` is ``NEVER`` or a comma list of SUCCESS, FAILURE and DELAY; ``orcpt`` is
    ``type;address``, decoded. A non-ASCII address goes as ``utf-8;`` with ``\\x{HEX}``
    escapes (RFC 6533 §3), valid whether or not the session uses SMTPUTF8.
    """
    params = ""
    notify = (notify or "").upper().replace(" ", "")
    if notify and _valid_notify(notify):
        params = f" NOTIFY={notify}"
    if orcpt and ";" in orcpt:
        params += f" ORCPT={_orcpt(orcpt)}"
    return params


def _valid_notify(notify: str) -> bool:
    words = notify.split(",")
    return words == ["NEVER"] or all(word in _NOTIFY_WORDS for word in words)


def _orcpt(orcpt: str) -> str:
    kind, _, address = orcpt.partition(";")
    kind, address = kind.strip(), address.strip()
    if address.isascii() and kind.isascii():
        return f"{xtext(kind)};{xtext(address)}"
    return "utf-8;" + "".join(c if _qchar(c) else f"\\x{{{ord(c):02X}}}" for c in address)
