"""Parsing of SMTP command lines, paths and ESMTP parameters (RFC 5321, 6531, 1870, 6152, 3461).

Pure functions over ``bytes``/``str``: no I/O, cheap to test and fuzz. Every failure is a
:class:`CommandError` carrying the exact reply to send.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from epoxi.smtp import replies
from epoxi.smtp.replies import Reply

MAX_COMMAND_LINE = 512  # RFC 5321 §4.5.3.1.4, including CRLF; we allow more for AUTH
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256
MAX_ENVID = 100  # RFC 3461 §4.4, octets of the xtext as sent


class CommandError(Exception):
    """A command could not be parsed; ``reply`` is what the client gets."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


@dataclass(frozen=True, slots=True)
class Command:
    verb: str  # upper-case, e.g. "MAIL"
    arg: str  # the rest of the line, leading spaces removed


@dataclass(frozen=True, slots=True)
class Mailbox:
    local: str
    domain: str  # as given (lower-cased); an address literal keeps its brackets

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"

    @property
    def is_ascii(self) -> bool:
        return self.local.isascii() and self.domain.isascii()


@dataclass(frozen=True, slots=True)
class MailArgs:
    sender: Mailbox | None  # None is the null reverse-path <>
    params: dict[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RcptArgs:
    recipient: Mailbox
    params: dict[str, str | None] = field(default_factory=dict)


def parse_command(line: bytes) -> Command:
    """Split a command line (without CRLF) into verb and argument."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CommandError(replies.SYNTAX_ERROR) from exc
    verb, _, arg = text.partition(" ")
    return Command(verb.translate(_ASCII_UPPER), arg.lstrip(" "))


# Case is folded for ASCII letters only: "MA\u0131L".upper() is "MAIL", and "\u212a".lower()
# (KELVIN SIGN) is "k", which would turn a UTF-8 domain into an ASCII one.
_ASCII_UPPER = str.maketrans("abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


_ATEXT = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~\u0080-\U0010ffff]+")
_DOT_STRING = re.compile(rf"{_ATEXT.pattern}(?:\.{_ATEXT.pattern})*")
_QUOTED_STRING = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"')
_LABEL = re.compile(
    r"(?:[A-Za-z0-9\u0080-\U0010ffff](?:[A-Za-z0-9\-\u0080-\U0010ffff]*"
    r"[A-Za-z0-9\u0080-\U0010ffff])?)"
)
_DOMAIN = re.compile(rf"{_LABEL.pattern}(?:\.{_LABEL.pattern})*")
_PARAM_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-]*")
_PARAM_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e\u0080-\U0010ffff]+")


def parse_mail(arg: str) -> MailArgs:
    """Parse the argument of MAIL: ``FROM:<path> [params]``."""
    path, params = _split_path_arg(arg, "FROM:")
    if path == "<>":
        return MailArgs(None, params)
    return MailArgs(parse_path(path), params)


def parse_rcpt(arg: str) -> RcptArgs:
    """Parse the argument of RCPT: ``TO:<path> [params]``."""
    path, params = _split_path_arg(arg, "TO:")
    if path.lower() == "<postmaster>":
        return RcptArgs(Mailbox("postmaster", ""), params)
    return RcptArgs(parse_path(path), params)


def _split_path_arg(arg: str, keyword: str) -> tuple[str, dict[str, str | None]]:
    if arg[: len(keyword)].upper() != keyword:
        raise CommandError(replies.SYNTAX_ERROR)
    rest = arg[len(keyword) :].lstrip(" ")
    if not rest.startswith("<"):
        raise CommandError(replies.SYNTAX_ERROR)
    end = _find_path_end(rest)
    if end < 0:
        raise CommandError(replies.SYNTAX_ERROR)
    path, tail = rest[: end + 1], rest[end + 1 :]
    if tail and not tail.startswith(" "):
        raise CommandError(replies.SYNTAX_ERROR)
    return path, parse_params(tail)


def _find_path_end(text: str) -> int:
    """Index of the ``>`` closing the path, skipping quoted strings; -1 if none."""
    quoted = escaped = False
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            return i
    return -1


def parse_params(text: str) -> dict[str, str | None]:
    """Parse ESMTP parameters ``KEY[=VALUE] ...``; keywords are upper-cased."""
    params: dict[str, str | None] = {}
    for token in text.split(" "):
        if not token:
            continue
        key, eq, value = token.partition("=")
        if not _PARAM_KEYWORD.fullmatch(key) or (eq and not _PARAM_VALUE.fullmatch(value)):
            raise CommandError(replies.SYNTAX_ERROR)
        key = key.upper()
        if key in params:  # RFC 3461 §4 says it of its own; no parameter means two things
            raise CommandError(replies.SYNTAX_ERROR)
        params[key] = value if eq else None
    return params


# ----------------------------------------------------------------- DSN (RFC 3461)

_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")
_XTEXT_HEX = re.compile(r"\+([0-9A-F]{2})")
_ADDR_TYPE = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+")  # an RFC 5322 atom
_NOTIFY_ORDER = ("SUCCESS", "FAILURE", "DELAY")


def decode_xtext(text: str) -> str:
    """RFC 3461 §4: printable ASCII but "+" and "=", with ``+XX`` (upper-case hex) for others."""
    if not _XTEXT.fullmatch(text):
        raise CommandError(replies.SYNTAX_ERROR)
    if "+" not in text:
        return text
    return _XTEXT_HEX.sub(lambda m: chr(int(m.group(1), 16)), text)


def parse_dsn_ret(value: str | None) -> str:
    """MAIL's ``RET=FULL|HDRS``, upper-cased."""
    ret = (value or "").upper()
    if ret not in ("FULL", "HDRS"):
        raise CommandError(replies.SYNTAX_ERROR)
    return ret


def parse_dsn_envid(value: str | None) -> str:
    """MAIL's ``ENVID=xtext``, decoded; at most 100 characters as sent."""
    if not value or len(value) > MAX_ENVID:
        raise CommandError(replies.SYNTAX_ERROR)
    return decode_xtext(value)


def parse_dsn_notify(value: str | None) -> str:
    """RCPT's ``NOTIFY=NEVER`` or a list of SUCCESS, FAILURE, DELAY, each once: returned
    upper-cased, the list in that order (``"SUCCESS,FAILURE"``)."""
    items = (value or "").upper().split(",")
    if items == ["NEVER"]:
        return "NEVER"
    chosen = set(items)
    if len(chosen) != len(items) or not chosen <= set(_NOTIFY_ORDER):
        raise CommandError(replies.SYNTAX_ERROR)  # NEVER with others, unknown, repeated, empty
    return ",".join(n for n in _NOTIFY_ORDER if n in chosen)


def parse_dsn_orcpt(value: str | None) -> str:
    """RCPT's ``ORCPT=addr-type;xtext``, decoded: ``"rfc822;user@example.com"``."""
    addr_type, semicolon, address = (value or "").partition(";")
    if not semicolon or not _ADDR_TYPE.fullmatch(addr_type) or not address:
        raise CommandError(replies.SYNTAX_ERROR)
    return f"{addr_type.translate(_ASCII_LOWER)};{decode_xtext(address)}"


def parse_rcpt_dsn(params: dict[str, str | None]) -> tuple[str | None, str | None]:
    """NOTIFY and ORCPT of RCPT (None when not given); any other parameter is refused."""
    notify = orcpt = None
    for key, value in params.items():
        if key == "NOTIFY":
            notify = parse_dsn_notify(value)
        elif key == "ORCPT":
            orcpt = parse_dsn_orcpt(value)
        else:
            raise CommandError(replies.PARAM_NOT_RECOGNIZED)
    return notify, orcpt


def parse_path(path: str) -> Mailbox:
    """Parse ``<[@route,...:]local@domain>``; a source route is accepted and ignored."""
    if len(path) > MAX_PATH + 2 or not (path.startswith("<") and path.endswith(">")):
        raise CommandError(replies.BAD_ADDRESS)
    inner = path[1:-1]
    if inner.startswith("@"):
        inner = _strip_source_route(inner)
    return parse_mailbox(inner)


def _strip_source_route(inner: str) -> str:
    route, colon, mailbox = inner.partition(":")
    if not colon:
        raise CommandError(replies.BAD_ADDRESS)
    for hop in route.split(","):
        if not hop.startswith("@") or not _is_domain(hop[1:]):
            raise CommandError(replies.BAD_ADDRESS)
    return mailbox


def parse_mailbox(text: str) -> Mailbox:
    """Parse ``local@domain`` where local is a dot-string or quoted string."""
    at = text.rfind("@")
    if at <= 0:
        raise CommandError(replies.BAD_ADDRESS)
    local, domain = text[:at], text[at + 1 :]
    try:
        local_octets = len(local.encode())
        domain.encode()
    except UnicodeEncodeError as exc:  # lone surrogates, from undecodable input
        raise CommandError(replies.BAD_ADDRESS) from exc
    if local_octets > MAX_LOCAL_PART:
        raise CommandError(replies.BAD_ADDRESS)
    if not (_DOT_STRING.fullmatch(local) or _QUOTED_STRING.fullmatch(local)):
        raise CommandError(replies.BAD_ADDRESS)
    if not (_is_domain(domain) or _is_address_literal(domain)):
        raise CommandError(replies.BAD_ADDRESS)
    return Mailbox(local, domain.translate(_ASCII_LOWER))


def _is_domain(text: str) -> bool:
    return 0 < len(text.encode()) <= MAX_DOMAIN and _DOMAIN.fullmatch(text) is not None


def _is_address_literal(text: str) -> bool:
    if not (text.startswith("[") and text.endswith("]")):
        return False
    inner = text[1:-1]
    try:
        if inner[:5].upper() == "IPV6:":
            ipaddress.IPv6Address(inner[5:])
        else:
            ipaddress.IPv4Address(inner)
    except ValueError:
        return False
    return True


def is_ascii_number(text: str) -> bool:
    """Digits 0-9 only (``str.isdigit`` also takes "²" and Arabic-Indic digits)."""
    return text.isascii() and text.isdigit()


def parse_size_param(value: str | None) -> int:
    """The value of MAIL's ``SIZE=`` parameter (RFC 1870)."""
    if value is None or not is_ascii_number(value) or len(value) > 20:
        raise CommandError(replies.SYNTAX_ERROR)
    return int(value)


def normalize_domain(domain: str) -> str:
    """Lower-case, strip one trailing dot, and convert IDN labels to A-labels (punycode)."""
    domain = domain.rstrip(".").lower()
    if domain.isascii() or domain.startswith("["):
        return domain
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain
