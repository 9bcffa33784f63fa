"""Turn a send request into one RFC 5322 message per recipient. Pure: no I/O.

Subject, text and HTML are Jinja2 templates, compiled once per request and rendered per
recipient with that recipient's ``data`` in a sandbox where a missing variable is an error.
MIME is built by the stdlib ``email`` package (RFC 2047 for non-ASCII headers, RFC 2231 for
non-ASCII file names). A CR or LF in any header-bound value is refused, never folded in.
"""

from __future__ import annotations

import binascii
import email.policy
import email.utils
import functools
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

import jinja2
import jinja2.exceptions
import jinja2.sandbox

from epoxi.errors import EpoxiError
from epoxi.smtp.parser import CommandError, parse_mailbox


class ComposeError(EpoxiError):
    """A request that cannot become a message; ``field`` says which part is wrong."""

    def __init__(self, field: str, message: str, recipient: str | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.recipient = recipient


@dataclass(frozen=True)
class Attachment:
    filename: str
    content_type: str
    content: bytes


@dataclass(frozen=True)
class Draft:
    """What the request says, before rendering."""

    sender: str  # the From header: "addr" or "Name <addr>"
    to: Sequence[str]
    subject: str
    text: str | None = None
    html: str | None = None
    cc: Sequence[str] = ()
    bcc: Sequence[str] = ()
    reply_to: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    attachments: Sequence[Attachment] = ()
    data: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Rendered:
    recipient: str
    body: bytes
    smtputf8: bool


_HEADER_NAME = re.compile(r"[!-9;-~]+")  # RFC 5322 ftext
_RESERVED_HEADERS = {
    "from": "message.from",
    "to": "message.to",
    "cc": "message.cc",
    "bcc": "message.bcc",
    "reply-to": "message.reply_to",
    "subject": "message.subject",
    "date": None,
    "message-id": None,
    "mime-version": None,
    "content-type": "message.attachments",
    "content-transfer-encoding": None,
}
_CONTENT_TYPE = re.compile(r"[A-Za-z0-9][\w.+-]*/[A-Za-z0-9][\w.+-]*")

_plain_env = jinja2.sandbox.ImmutableSandboxedEnvironment(
    undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True
)
_html_env = jinja2.sandbox.ImmutableSandboxedEnvironment(
    undefined=jinja2.StrictUndefined, autoescape=True, keep_trailing_newline=True
)


class Composer:
    """Checks a draft once, then renders it for each recipient."""

    def __init__(self, draft: Draft, hostname: str) -> None:
        self.draft = draft
        self.hostname = hostname
        self.envelope_sender = _address("message.from", draft.sender)
        _check_header_value("message.from", draft.sender)
        for name, values in (("message.to", draft.to), ("message.cc", draft.cc)):
            for index, value in enumerate(values):
                _check_header_value(f"{name}[{index}]", value)
        if draft.reply_to is not None:
            _check_header_value("message.reply_to", draft.reply_to)
            _address("message.reply_to", draft.reply_to)
        for name, value in draft.headers.items():
            _check_custom_header(name, value)
        for index, attachment in enumerate(draft.attachments):
            where = f"message.attachments[{index}]"
            _check_header_value(f"{where}.filename", attachment.filename)
            if not _CONTENT_TYPE.fullmatch(attachment.content_type):
                raise ComposeError(f"{where}.content_type", "expected type/subtype, e.g. text/csv")
        if draft.text is None and draft.html is None:
            raise ComposeError("message", "give text, html or both")
        self._subject = _compile(_plain_env, "message.subject", draft.subject)
        self._text = _compile(_plain_env, "message.text", draft.text)
        self._html = _compile(_html_env, "message.html", draft.html)
        self._cc_header = ", ".join(draft.cc)
        self.recipients = self._recipients()
        self._skeleton = _Skeleton.for_composer(self)

    def _recipients(self) -> list[tuple[str, str]]:
        """(envelope address, To header) for every copy: each to, then cc, then bcc."""
        copies: list[tuple[str, str]] = []
        first_to = self.draft.to[0] if self.draft.to else ""
        for kind, values in (("to", self.draft.to), ("cc", self.draft.cc), ("bcc", self.draft.bcc)):
            for index, value in enumerate(values):
                address = _address(f"message.{kind}[{index}]", value)
                copies.append((address, value if kind == "to" else first_to))
        if not copies:
            raise ComposeError("message.to", "give at least one recipient")
        return copies

    def render(self, address: str, to_header: str) -> Rendered:
        values = self._data_for(address)
        subject = _render(self._subject, "message.subject", address, values) or ""
        _check_header_value("message.subject", subject, address)
        text = _render(self._text, "message.text", address, values)
        html = _render(self._html, "message.html", address, values)
        if address.isascii() and self.envelope_sender.isascii():
            body = self._skeleton.fill(to_header, subject, text, html)
            return Rendered(address, body, smtputf8=False)
        message = EmailMessage(policy=email.policy.SMTPUTF8)
        self._set_headers(message, to_header, subject)
        _set_body(message, text, html, self.draft.attachments)
        return Rendered(address, message.as_bytes(), smtputf8=True)

    def _data_for(self, address: str) -> Mapping[str, Any]:
        data = self.draft.data
        found = data.get(address)
        if found is None:
            lowered = address.lower()
            found = next((v for k, v in data.items() if k.lower() == lowered), {})
        return found

    def _set_headers(self, message: EmailMessage, to_header: str, subject: str) -> None:
        draft = self.draft
        try:
            message["From"] = draft.sender
            if to_header:
                message["To"] = to_header
            if self._cc_header:
                message["Cc"] = self._cc_header
            if draft.reply_to:
                message["Reply-To"] = draft.reply_to
            message["Subject"] = subject
        except (ValueError, IndexError) as exc:  # the header registry refuses the value
            raise ComposeError("message", f"a header could not be written: {exc}") from exc
        message["Date"] = email.utils.formatdate(usegmt=True)
        message["Message-ID"] = email.utils.make_msgid(domain=self.hostname)
        for name, value in draft.headers.items():
            message[name] = value


class _Skeleton:
    """The message serialised once per request, with tokens where each recipient's values go.

    Building MIME with ``email`` costs about 0.5 ms a message, most of it parsing headers
    that are the same in every copy. So the structure, the fixed headers and the attachments
    are built and encoded once; each copy only encodes its own To, Subject and bodies (quoted-
    printable, by ``binascii``) and is joined from the pieces.
    """

    _NAMES = ("TO", "SUBJECT", "MSGID", "TEXT", "HTML")
    _cache: OrderedDict[tuple[Any, ...], _Skeleton] = OrderedDict()
    _CACHE_SIZE = 256

    @classmethod
    def for_composer(cls, composer: Composer) -> _Skeleton:
        """The skeleton of an equal draft made before (transactional mail repeats), or a new one."""
        draft = composer.draft
        key = (
            composer.hostname,
            draft.sender,
            bool(draft.to),
            tuple(draft.cc),
            draft.reply_to,
            tuple(draft.headers.items()),
            tuple(draft.attachments),
            draft.text is not None,
            draft.html is not None,
        )
        found = cls._cache.get(key)
        if found is not None:
            cls._cache.move_to_end(key)
            return found
        made = cls._cache[key] = cls(composer)
        if len(cls._cache) > cls._CACHE_SIZE:
            cls._cache.popitem(last=False)
        return made

    def __init__(self, composer: Composer) -> None:
        tag = secrets.token_hex(8).upper()
        tokens = {name: f"EPOXI{tag}{name}" for name in self._NAMES}
        self.hostname = composer.hostname
        draft = composer.draft
        message = EmailMessage(policy=email.policy.SMTP)
        first_to = draft.to[0] if draft.to else ""
        composer._set_headers(message, tokens["TO"] if first_to else "", tokens["SUBJECT"])
        del message["Message-ID"]
        del message["Date"]  # each copy gets the time it was made
        message["Message-ID"] = f"<{tokens['MSGID']}@{composer.hostname}>"
        text = tokens["TEXT"] if draft.text is not None else None
        html = tokens["HTML"] if draft.html is not None else None
        _set_body(message, text, html, draft.attachments, cte="quoted-printable")
        self.pieces = re.split(
            b"(" + b"|".join(t.encode() for t in tokens.values()) + b")", message.as_bytes()
        )
        self.slots = {tokens[name].encode(): name for name in self._NAMES}

    def fill(self, to_header: str, subject: str, text: str | None, html: str | None) -> bytes:
        values = {
            "TO": _header_bytes("To", to_header),
            "SUBJECT": _header_bytes("Subject", subject),
            "MSGID": f"{time.time_ns():x}.{secrets.token_hex(6)}".encode(),
            "TEXT": _quoted_printable(text or ""),
            "HTML": _quoted_printable(html or ""),
        }
        slots = self.slots
        date = b"Date: " + _now_header().encode() + b"\r\n"
        return date + b"".join(values[slots[p]] if p in slots else p for p in self.pieces)


def _now_header() -> str:
    """The Date header value for now, made at most once a second."""
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[:] = [now, email.utils.formatdate(now, usegmt=True)]
    return str(_date_cache[1])


_date_cache: list[Any] = [0, ""]


def _header_bytes(name: str, value: str) -> bytes:
    """A header value as it goes on the wire: as it is if plain, else RFC 2047 and folded."""
    if value.isascii() and len(value) < 900:
        return value.encode()
    policy = email.policy.SMTP
    folded: str = policy.header_factory(name, value).fold(policy=policy)  # "Name: ...\r\n"
    return folded[len(name) + 2 : -2].encode("ascii")


def _quoted_printable(text: str) -> bytes:
    """``text`` in quoted-printable UTF-8 with CRLF line ends, without the last line end."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.endswith("\n"):
        text += "\n"
    encoded = binascii.b2a_qp(text.encode("utf-8"), istext=True)
    return encoded[:-1].replace(b"\n", b"\r\n")


def _set_body(
    message: EmailMessage,
    text: str | None,
    html: str | None,
    attachments: Sequence[Attachment],
    cte: str | None = None,
) -> None:
    options: dict[str, Any] = {"charset": "utf-8", "cte": cte} if cte else {}
    if text is not None:
        message.set_content(text, **options)
        if html is not None:
            message.add_alternative(html, subtype="html", **options)
    elif html is not None:
        message.set_content(html, subtype="html", **options)
    for attachment in attachments:
        maintype, _, subtype = attachment.content_type.partition("/")
        message.add_attachment(
            attachment.content, maintype=maintype, subtype=subtype, filename=attachment.filename
        )


def _compile(
    env: jinja2.sandbox.ImmutableSandboxedEnvironment, where: str, source: str | None
) -> jinja2.Template | None:
    if source is None:
        return None
    try:
        return _template(env is _html_env, source)
    except jinja2.TemplateSyntaxError as exc:
        raise ComposeError(where, f"template syntax error at line {exc.lineno}: {exc}") from exc


@functools.lru_cache(maxsize=1024)
def _template(html: bool, source: str) -> jinja2.Template:
    """Compiled once: the same templates come back request after request."""
    return (_html_env if html else _plain_env).from_string(source)


def _render(
    template: jinja2.Template | None, where: str, address: str, values: Mapping[str, Any]
) -> str | None:
    if template is None:
        return None
    try:
        return template.render(values)
    except jinja2.UndefinedError as exc:
        raise ComposeError(
            where, f"template variable missing for {address}: {exc.message}", address
        ) from exc
    except jinja2.exceptions.SecurityError as exc:
        raise ComposeError(where, f"template not allowed: {exc}", address) from exc
    except Exception as exc:  # a template may raise anything (1/0, bad filters ...)
        raise ComposeError(where, f"template failed for {address}: {exc}", address) from exc


def _address(where: str, value: str) -> str:
    """The addr-spec in ``value`` ("a@b" or "Name <a@b>"), checked as SMTP would."""
    _check_header_value(where, value)
    pairs = email.utils.getaddresses([value])
    if len(pairs) != 1 or not pairs[0][1]:
        raise ComposeError(where, f"not one email address: {value!r}")
    address = pairs[0][1]
    try:
        parse_mailbox(address)
    except CommandError as exc:
        raise ComposeError(where, f"not a valid email address: {address!r}") from exc
    return address


def _check_header_value(where: str, value: str, recipient: str | None = None) -> None:
    if "\r" in value or "\n" in value or "\x00" in value:
        raise ComposeError(where, "CR, LF and NUL are not allowed in a header value", recipient)


def _check_custom_header(name: str, value: str) -> None:
    where = f"message.headers.{name}"
    if not _HEADER_NAME.fullmatch(name):
        raise ComposeError(where, f"not a valid header name: {name!r}")
    lowered = name.lower()
    if lowered in _RESERVED_HEADERS:
        use = _RESERVED_HEADERS[lowered]
        hint = f"; use {use}" if use else "; Epoxi sets it"
        raise ComposeError(where, f"{name} cannot be set in headers{hint}")
    if lowered.startswith("x-epoxi-"):
        raise ComposeError(where, "X-Epoxi- headers are reserved; use tenant and campaign")
    _check_header_value(where, value)
