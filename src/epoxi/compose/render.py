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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

import jinja2
import jinja2.exceptions
import jinja2.runtime
import jinja2.sandbox
import jinja2.utils

from epoxi.compose.html_text import html_to_text
from epoxi.errors import InvalidField
from epoxi.smtp.parser import CommandError, parse_mailbox


class ComposeError(InvalidField):
    """A request that cannot become a message; ``field`` says which part is wrong."""


class MessageTooLarge(ComposeError):
    """A rendered message over the size limit (``smtp.max_message_size``)."""


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
    text_from_html: bool = False  # no text template: the text part is made from the HTML

    @property
    def has_text(self) -> bool:
        """Whether the mail has a text part: its own, or one made from the HTML."""
        return self.text is not None or (self.text_from_html and self.html is not None)


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
}
_PLAIN_ADDRESS = re.compile(r"[^\s<>()\[\],;:\\\"@]+@[A-Za-z0-9.-]+")
_CONTENT_TYPE = re.compile(r"[A-Za-z0-9][\w.+-]*/[A-Za-z0-9][\w.+-]*")

MAX_SUBJECT = 998  # octets of a header line (RFC 5322 2.1.1), before encoding
MAX_HEADER_NAME = 76
MAX_ITERATIONS = 100_000  # range() items per rendering, over all loops
MAX_PRODUCT = 100_000  # length of a string or list made by * ; digits of a number made by **
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]")  # all but TAB


class _Budget:
    """What one rendering may still spend; templates run on the event loop, so it is small."""

    iterations = 0

    @classmethod
    def reset(cls) -> None:
        cls.iterations = 0


def _budget_range(*args: int) -> Iterator[int]:
    for item in range(*args):
        _Budget.iterations += 1
        if _Budget.iterations > MAX_ITERATIONS:
            raise jinja2.exceptions.SecurityError(
                f"the template loops more than {MAX_ITERATIONS} times"
            )
        yield item


class _Sandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, with budgets: no template may stall the event loop or
    fill the memory (``'x' * 10**9``, nested ranges), and no helper leaks Python reprs."""

    intercepted_binops = frozenset({"*", "**"})

    def __init__(self, *, autoescape: bool) -> None:
        super().__init__(
            undefined=jinja2.StrictUndefined, autoescape=autoescape, keep_trailing_newline=True
        )
        self.globals = {"range": _budget_range, "dict": dict, "namespace": jinja2.utils.Namespace}

    def call_binop(
        self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any
    ) -> Any:
        if operator == "*" and _repeats_too_much(left, right):
            raise jinja2.exceptions.SecurityError("the template repeats too much")
        if operator == "**" and _too_large_power(left, right):
            raise jinja2.exceptions.SecurityError("the template makes too large a number")
        return super().call_binop(context, operator, left, right)


def _repeats_too_much(left: Any, right: Any) -> bool:
    for seq, times in ((left, right), (right, left)):
        if isinstance(seq, str | list | tuple) and isinstance(times, int):
            return len(seq) * times > MAX_PRODUCT
    return False


def _too_large_power(base: Any, exponent: Any) -> bool:
    if not (isinstance(base, int) and isinstance(exponent, int)):
        return False
    return exponent > 0 and abs(base) > 1 and exponent * abs(base).bit_length() > MAX_PRODUCT


_plain_env = _Sandbox(autoescape=False)
_html_env = _Sandbox(autoescape=True)


class Composer:
    """Checks a draft once, then renders it for each recipient."""

    def __init__(self, draft: Draft, hostname: str, max_size: int) -> None:
        self.draft = draft
        self.hostname = hostname
        self.max_size = max_size  # smtp.max_message_size: for one rendered message
        # checked_address checks each value for control characters as well as the address in it
        self.envelope_sender = checked_address("message.from", draft.sender)
        self.recipients = self._recipients()
        if draft.reply_to is not None:
            checked_address("message.reply_to", draft.reply_to)
        for name, value in draft.headers.items():
            _check_custom_header(name, value)
        for index, attachment in enumerate(draft.attachments):
            where = f"message.attachments[{index}]"
            _check_header_value(f"{where}.filename", attachment.filename)
            if not _CONTENT_TYPE.fullmatch(attachment.content_type):
                raise ComposeError(f"{where}.content_type", "expected type/subtype, e.g. text/csv")
            if attachment.content_type.lower().startswith("multipart/"):
                raise ComposeError(f"{where}.content_type", "an attachment cannot be multipart")
        if draft.text is None and draft.html is None:
            raise ComposeError("message", "give text, html or both")
        self._subject = _compile(_plain_env, "message.subject", draft.subject)
        self._text = _compile(_plain_env, "message.text", draft.text)
        self._html = _compile(_html_env, "message.html", draft.html)
        self._cc_header = ", ".join(draft.cc)
        self._skeleton = _Skeleton.for_composer(self)

    def _recipients(self) -> list[tuple[str, str]]:
        """(envelope address, To header) for every copy: each to, then cc, then bcc."""
        copies: list[tuple[str, str]] = []
        first_to = self.draft.to[0] if self.draft.to else ""
        for kind, values in (("to", self.draft.to), ("cc", self.draft.cc), ("bcc", self.draft.bcc)):
            for index, value in enumerate(values):
                address = checked_address(f"message.{kind}[{index}]", value)
                copies.append((address, value if kind == "to" else first_to))
        if not copies:
            raise ComposeError("message.to", "give at least one recipient")
        return copies

    def render(
        self,
        address: str,
        to_header: str,
        values: Mapping[str, Any] | None = None,
        html_filter: Callable[[str], str] | None = None,
    ) -> Rendered:
        """The message for one recipient, with ``values`` (else the draft's data for it);
        ``html_filter`` changes the rendered HTML (tracking), after the text is made from it."""
        if values is None:
            values = self._data_for(address)
        limit = self.max_size
        subject = _render(self._subject, "message.subject", address, values, limit) or ""
        _check_header_value("message.subject", subject, address)
        if len(subject.encode()) > MAX_SUBJECT:
            raise ComposeError(
                "message.subject",
                f"the subject for {address} is over {MAX_SUBJECT} octets",
                address,
            )
        text = _render(self._text, "message.text", address, values, limit)
        html = _render(self._html, "message.html", address, values, limit)
        if text is None and html is not None and self.draft.text_from_html:
            text = html_to_text(html)
        if html is not None and html_filter is not None:
            html = html_filter(html)
        smtputf8 = not (address.isascii() and self.envelope_sender.isascii())
        if not smtputf8:
            body = self._skeleton.fill(to_header, subject, text, html)
        else:
            message = EmailMessage(policy=email.policy.SMTPUTF8)
            self._set_headers(message, to_header, subject)
            _set_body(message, text, html, self.draft.attachments)
            body = message.as_bytes()
        if len(body) > limit:
            raise MessageTooLarge(
                "message", f"the message for {address} is {len(body)} octets; the limit is {limit}"
            )
        return Rendered(address, body, smtputf8)

    def _data_for(self, address: str) -> Mapping[str, Any]:
        data = self.draft.data
        found = data.get(address)
        if found is None:
            lowered = address.lower()
            found = next((v for k, v in data.items() if k.lower() == lowered), {})
        return found

    def _set_headers(self, message: EmailMessage, to_header: str, subject: str) -> None:
        draft = self.draft
        fields = [
            ("From", draft.sender, "message.from"),
            ("To", to_header, "message.to"),
            ("Cc", self._cc_header, "message.cc"),
            ("Reply-To", draft.reply_to or "", "message.reply_to"),
            ("Subject", subject, "message.subject"),
            ("Date", email.utils.formatdate(usegmt=True), "message"),
            ("Message-ID", email.utils.make_msgid(domain=self.hostname), "message"),
            *((name, value, f"message.headers.{name}") for name, value in draft.headers.items()),
        ]
        for name, value, where in fields:
            if not value and name != "Subject":
                continue
            try:
                message[name] = value
            except (ValueError, IndexError, TypeError) as exc:  # the header registry refuses
                raise ComposeError(where, f"{name} cannot be written: {exc}") from exc


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
            draft.has_text,
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
        draft = composer.draft
        message = EmailMessage(policy=email.policy.SMTP)
        first_to = draft.to[0] if draft.to else ""
        composer._set_headers(message, tokens["TO"] if first_to else "", tokens["SUBJECT"])
        del message["Message-ID"]
        del message["Date"]  # each copy gets the time it was made
        message["Message-ID"] = f"<{tokens['MSGID']}@{composer.hostname}>"
        text = tokens["TEXT"] if draft.has_text else None
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
    if _needs_no_encoding(text):  # the common case: quoted-printable would change nothing
        return text[:-1].replace("\n", "\r\n").encode("ascii")
    encoded = binascii.b2a_qp(text.encode("utf-8"), istext=True)
    return encoded[:-1].replace(b"\n", b"\r\n")


def _needs_no_encoding(text: str) -> bool:
    """Printable ASCII in lines of at most 76, no "=", no space or tab before a line end."""
    return (
        text.isascii()
        and "=" not in text
        and " \n" not in text
        and "\t\n" not in text
        and _CONTROL.search(text.replace("\n", "")) is None
        and max(map(len, text.split("\n"))) <= 76
    )


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
    for index, attachment in enumerate(attachments):
        maintype, _, subtype = attachment.content_type.partition("/")
        try:
            message.add_attachment(
                attachment.content, maintype=maintype, subtype=subtype, filename=attachment.filename
            )
        except (ValueError, TypeError, KeyError) as exc:
            where = f"message.attachments[{index}]"
            raise ComposeError(where, f"the attachment cannot be written: {exc}") from exc


def _compile(
    env: jinja2.sandbox.ImmutableSandboxedEnvironment, where: str, source: str | None
) -> jinja2.Template | None:
    if source is None:
        return None
    try:
        return _template(env is _html_env, source)
    except jinja2.TemplateSyntaxError as exc:
        raise ComposeError(where, f"template syntax error at line {exc.lineno}: {exc}") from exc
    except jinja2.exceptions.SecurityError as exc:
        raise ComposeError(where, f"template not allowed: {exc}") from exc
    except (Exception, RecursionError) as exc:  # the compiler folds constants: it may raise
        raise ComposeError(where, f"template cannot be compiled: {exc!r}") from exc


def compile_template(html: bool, where: str, source: str) -> jinja2.Template:
    """``source`` compiled in the HTML (autoescaping) or the plain sandbox; ComposeError
    naming ``where`` when it cannot be."""
    template = _compile(_html_env if html else _plain_env, where, source)
    assert template is not None
    return template


def render_template(
    template: jinja2.Template, where: str, address: str, values: Mapping[str, Any], limit: int
) -> str:
    """``template`` rendered with ``values`` (for ``address``), at most ``limit`` characters."""
    return _render(template, where, address, values, limit) or ""


@functools.lru_cache(maxsize=1024)
def _template(html: bool, source: str) -> jinja2.Template:
    """Compiled once: the same templates come back request after request."""
    return (_html_env if html else _plain_env).from_string(source)


def _render(
    template: jinja2.Template | None,
    where: str,
    address: str,
    values: Mapping[str, Any],
    limit: int,
) -> str | None:
    """The template's text for one recipient, streamed so that it stops at ``limit``."""
    if template is None:
        return None
    _Budget.reset()
    try:
        out, size = [], 0
        for chunk in template.generate(values):
            size += len(chunk)
            if size > limit:
                raise MessageTooLarge(where, f"{where} for {address} is over {limit} octets")
            out.append(chunk)
        return "".join(out)
    except ComposeError:
        raise
    except jinja2.UndefinedError as exc:
        raise ComposeError(
            where, f"template variable missing for {address}: {exc.message}", address
        ) from exc
    except jinja2.exceptions.SecurityError as exc:
        raise ComposeError(where, f"template not allowed: {exc}", address) from exc
    except (Exception, RecursionError) as exc:  # a template may raise anything (1/0, ...)
        raise ComposeError(where, f"template failed for {address}: {exc!r}", address) from exc


def checked_address(where: str, value: str) -> str:
    """The addr-spec in ``value`` ("a@b" or "Name <a@b>"), checked as SMTP would."""
    _check_header_value(where, value)
    if _PLAIN_ADDRESS.fullmatch(value):  # a bare addr-spec: no display name to parse
        address = value
    else:
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
    """No line breaks of any kind (CR, LF, VT, FF, NEL, U+2028 ...) and no control characters."""
    found = _CONTROL.search(value)
    if found is not None:
        raise ComposeError(
            where,
            f"control character {found.group()!r} (CR, LF, NUL and the like) "
            "is not allowed in a header value",
            recipient,
        )


def _check_custom_header(name: str, value: str) -> None:
    where = f"message.headers.{name}"
    if not _HEADER_NAME.fullmatch(name) or len(name) > MAX_HEADER_NAME:
        raise ComposeError(
            where, f"not a valid header name (printable ASCII, at most {MAX_HEADER_NAME})"
        )
    lowered = name.lower()
    if lowered.startswith("content-"):
        raise ComposeError(where, f"{name} cannot be set in headers; Epoxi writes the MIME")
    if lowered in _RESERVED_HEADERS:
        use = _RESERVED_HEADERS[lowered]
        hint = f"; use {use}" if use else "; Epoxi sets it"
        raise ComposeError(where, f"{name} cannot be set in headers{hint}")
    if lowered.startswith("x-epoxi-"):
        raise ComposeError(where, "X-Epoxi- headers are reserved; use tenant and campaign")
    _check_header_value(where, value)
