"""Inbound reports, parsed: bounces (RFC 3464 DSNs and the human text of older formats),
complaints (ARF, RFC 5965) and auto-replies. Pure: bytes in, a :class:`Report` out, no I/O.

A DSN's machine-readable part (``message/delivery-status``) decides where there is one. A
bounce without it (Postfix, Exim, Sendmail, qmail, Microsoft, Yahoo ... in their old forms)
is read from its text: flufl.bounce finds the failed addresses, and the reply code, enhanced
status and wording around each address are taken from the text. Either way each recipient is
classified by the same :class:`~epoxi.bounce.classify.Classifier` as in-session replies.

The returned message (``message/rfc822`` or ``text/rfc822-headers``) is where the original
``Message-ID``, ``Return-Path`` (Epoxi's VERP address) and ``X-Epoxi-*`` headers are found.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace
from email import message_from_bytes
from email.errors import HeaderParseError
from email.header import decode_header, make_header
from email.message import Message
from email.policy import compat32

from flufl.bounce import all_failures

from epoxi.bounce import mime
from epoxi.bounce.classify import BounceCategory, Classification, Classifier
from epoxi.smtp.replies import Reply


class Kind(enum.Enum):
    """What an inbound report is. Values are stable: they are printed and recorded."""

    DSN = "dsn"  # a delivery status notification, standard or not
    ARF = "arf"  # an abuse (complaint) report
    AUTOREPLY = "autoreply"  # a vacation or out-of-office answer: no failure
    NONE = "none"  # none of these


@dataclass(frozen=True, slots=True)
class ReportedRecipient:
    """One recipient of a bounce: what the reporting MTA said and what it means."""

    address: str
    action: str  # RFC 3464 Action: failed, delayed, delivered, relayed, expanded
    status: str  # RFC 3463 status, "5.1.1"
    diagnostic: str  # the remote reply as reported ("550 5.1.1 <a@b>: user unknown")
    category: BounceCategory
    permanent: bool
    remote_mta: str = ""
    original_recipient: str = ""  # RFC 3464 Original-Recipient (the ORCPT), address only

    @property
    def failed(self) -> bool:
        return self.action == "failed"


@dataclass(frozen=True, slots=True)
class Feedback:
    """The machine-readable part of an ARF report (RFC 5965 section 3.1)."""

    feedback_type: str  # abuse, fraud, virus, other, not-spam, auth-failure
    user_agent: str = ""
    original_mail_from: str = ""  # address only
    original_rcpt_to: str = ""  # address only; "" when the reporter redacted it
    source_ip: str = ""
    arrival_date: str = ""
    reported_domain: str = ""


@dataclass(frozen=True, slots=True)
class Original:
    """What the report tells of the message it is about."""

    message_id: str = ""  # the Message-ID header, with its angle brackets
    envelope_id: str = ""  # RFC 3464 Original-Envelope-Id (our ENVID)
    return_path: str = ""  # address only: where the bounce of it should have gone
    recipient: str = ""  # the To header's address (complaints without Original-Rcpt-To)
    epoxi: dict[str, str] = field(default_factory=dict)  # X-Epoxi-* headers, names lowercased


@dataclass(frozen=True, slots=True)
class Report:
    """The result of :func:`parse`. ``recipients`` is empty for ARF, auto-replies and none."""

    kind: Kind
    recipients: tuple[ReportedRecipient, ...] = ()
    original: Original = Original()
    feedback: Feedback | None = None
    reporting_mta: str = ""
    to: str = ""  # the report's To: address; usually the (VERP) address it was sent to

    @property
    def failed(self) -> tuple[ReportedRecipient, ...]:
        return tuple(r for r in self.recipients if r.failed)

    def return_paths(self) -> list[str]:
        """Addresses that may carry a VERP token, most telling first: the report's To:, the
        complaint's Original-Mail-From, the returned message's Return-Path."""
        feedback = self.feedback.original_mail_from if self.feedback is not None else ""
        return [a for a in (self.to, feedback, self.original.return_path) if a]


# ---------------------------------------------------------------------------------- parse


def parse(data: bytes, classifier: Classifier) -> Report:
    """Read one inbound message (as received, headers and body) into a :class:`Report`.

    In order: an ARF report; a DSN's delivery-status part; a bounce in human text; an
    auto-reply (after the bounces: many bounces say ``Auto-Submitted: auto-replied`` too).
    """
    top = mime.split(data)
    report = _read(top, data, classifier)
    to = _bare(_field(top.fields, "to"))
    return replace(report, to=to) if to else report


def _read(top: mime.Part, data: bytes, classifier: Classifier) -> Report:
    parts = list(mime.walk(top))
    original = _original(parts)
    if top.content_type == "multipart/report" and top.param("report-type").lower() == (
        "feedback-report"
    ):
        return _arf(parts, original)
    status = next((p for p in parts if p.content_type == "message/delivery-status"), None)
    if status is not None:
        dsn = _dsn(status, original, classifier, _notice(parts, status))
        if dsn.recipients:
            return dsn
    bounce = _text_bounce(data, original, classifier)
    if bounce.kind is Kind.NONE and _is_autoreply(top.fields):
        return Report(Kind.AUTOREPLY, original=original)
    return bounce


# ------------------------------------------------------------------------------------ DSN


def _notice(parts: list[mime.Part], status: mime.Part) -> str:
    """The human-readable text of a DSN: its first text/plain part before the status."""
    for part in parts:
        if part is status:
            break
        if part.content_type == "text/plain":
            return part.text()
    return ""


def _dsn(part: mime.Part, original: Original, classifier: Classifier, notice: str) -> Report:
    blocks = mime.field_blocks(part.text())
    if not blocks:
        return Report(Kind.NONE)
    per_message, per_recipient = blocks[0], blocks[1:]
    if "final-recipient" in per_message or "original-recipient" in per_message:
        per_message, per_recipient = {}, blocks  # no per-message fields at all
    recipients = tuple(
        r
        for r in (_recipient(block, classifier, notice) for block in per_recipient)
        if r is not None
    )
    envelope_id = _field(per_message, "original-envelope-id")
    return Report(
        Kind.DSN,
        recipients,
        replace(original, envelope_id=envelope_id) if envelope_id else original,
        reporting_mta=_typed(per_message, "reporting-mta"),
    )


def _recipient(
    block: Mapping[str, str], classifier: Classifier, notice: str = ""
) -> ReportedRecipient | None:
    address = _typed(block, "final-recipient") or _typed(block, "original-recipient")
    if not address:
        return None
    action = _action(_field(block, "action"))
    status_field = _field(block, "status")
    status = _status_code(status_field)
    # A Status that is not one ("553 Exceeded maximum inbound message size") says why
    diagnostic = _typed(block, "diagnostic-code") or ("" if status else status_field)
    if not diagnostic and status[1:] in ("", ".0.0") and _named(address, notice):
        diagnostic = _near(_bare(address), notice)  # the reason is only in the human text
    reply = _reply_of(diagnostic, status, action)
    verdict = classify_reported(classifier, reply, action)
    return ReportedRecipient(
        address=_bare(address),
        action=action,
        status=_finer(status, reply.enhanced) or ("4.0.0" if action == "delayed" else "5.0.0"),
        diagnostic=diagnostic,
        category=verdict.category,
        permanent=verdict.permanent,
        remote_mta=_typed(block, "remote-mta"),
        original_recipient=_bare(_typed(block, "original-recipient")),
    )


# What a relay reports when it gave up on a transient failure: its last try's trouble.
_GAVE_UP_ON = frozenset(
    {
        BounceCategory.TransientNetwork,
        BounceCategory.RoutingError,
        BounceCategory.MailSystemError,
        BounceCategory.RateLimited,
        BounceCategory.Other,
        BounceCategory.Expired,
    }
)


def classify_reported(classifier: Classifier, reply: Reply, action: str) -> Classification:
    """The verdict on a reply that a DSN reports with ``action``.

    A relay that reports a reply with Action ``failed`` has given up: the failure is final
    (permanent), even where Epoxi itself would retry (a full mailbox). When the reply was a
    transient (4xx) one about the network, the remote system or volume, the relay gave up
    after its queue lifetime: the reason is that the delivery expired.
    """
    verdict = classifier.classify(reply)
    if action != "failed" or verdict.permanent:
        return verdict
    if reply.code >= 500:  # e.g. a full mailbox: retried by the relay, which gave up now
        return Classification(verdict.category, True, verdict.rule)
    category = BounceCategory.Expired if verdict.category in _GAVE_UP_ON else verdict.category
    return Classification(category, True, f"gave-up:{verdict.rule}")


_ACTIONS = ("failed", "delayed", "delivered", "relayed", "expanded")


def _action(value: str) -> str:
    """RFC 3464's Action, also from the variants seen in the wild ("failure", "failed (...)")."""
    word = (value.lower().split() or [""])[0]
    return next((a for a in _ACTIONS if word[:4] == a[:4]), word)


_STATUS = re.compile(r"(?<![\d.])[245]\.\d{1,3}\.\d{1,3}(?![\d.])")
# A reply code stands alone: not inside an id such as "_NextPart_000_01C276B8".
_REPLY = re.compile(r"(?<![\w.])([245]\d\d)(?:[ -]+([245]\.\d{1,3}\.\d{1,3}))?(?![\w.])")
_CLOSING = re.compile(r"\s*[\])]")


def _status_code(value: str) -> str:
    found = _STATUS.search(value)
    return found.group(0) if found else ""


def _finer(status: str, enhanced: str) -> str:
    """The Status field, unless it is a bare X.0.0 and the diagnostic names the detail."""
    if not status or (status.endswith(".0.0") and enhanced[:1] == status[:1]):
        return enhanced or status
    return status


def _reply_of(diagnostic: str, status: str, action: str) -> Reply:
    """The reply to classify: the diagnostic's code and text, the Status where it has none."""
    found = _REPLY.search(diagnostic)
    code = int(found.group(1)) if found else 0
    enhanced = (found.group(2) if found else None) or _status_code(diagnostic) or status
    if code < 400:
        code = _code_for(enhanced, permanent=action != "delayed")
    if found is None:
        text = diagnostic
    elif _CLOSING.match(diagnostic, found.end()):  # "... mailbox unavailable [Error Code 550]"
        text = diagnostic[: found.start()].strip(" :-[(")
    else:
        text = diagnostic[found.end() :].strip(" :-")
    return Reply(code, enhanced, text)


def _code_for(enhanced: str, *, permanent: bool) -> int:
    if enhanced.startswith("4"):
        return 450
    if enhanced.startswith("5"):
        return 550
    return 550 if permanent else 450


# ------------------------------------------------------------------------------------ ARF


def _arf(parts: list[mime.Part], original: Original) -> Report:
    report = next((p for p in parts if p.content_type == "message/feedback-report"), None)
    fields = mime.fields(report.text()) if report is not None else {}
    feedback = Feedback(
        feedback_type=_field(fields, "feedback-type").lower(),
        user_agent=_field(fields, "user-agent"),
        original_mail_from=_bare(_field(fields, "original-mail-from")),
        original_rcpt_to=_bare(_field(fields, "original-rcpt-to")),
        source_ip=_field(fields, "source-ip"),
        arrival_date=_field(fields, "arrival-date") or _field(fields, "received-date"),
        reported_domain=_field(fields, "reported-domain"),
    )
    return Report(Kind.ARF, original=original, feedback=feedback)


# ------------------------------------------------------------------- the returned message


def _original(parts: list[mime.Part]) -> Original:
    """What the returned message (or its headers) tells, from the first one in ``parts``."""
    headers = _returned_headers(parts[1:])
    if headers is None:
        return Original()
    return Original(
        message_id=_field(headers, "message-id"),
        return_path=_bare(_field(headers, "return-path")),
        recipient=_bare(_field(headers, "to")),
        epoxi={name: value for name, value in headers.items() if name.startswith("x-epoxi-")},
    )


def _returned_headers(parts: list[mime.Part]) -> dict[str, str] | None:
    for part in parts:
        kind = part.content_type
        if kind in ("message/rfc822", "message/global"):
            return mime.split(part.decoded()).fields
        if kind in ("text/rfc822-headers", "message/global-headers"):
            return mime.fields(part.text())
    return None


# ----------------------------------------------------------------------------- autoreplies

_AUTOREPLY_SUBJECT = re.compile(
    r"^(auto(matic)?[ -]?(reply|response|antwort)|out of (the )?office|abwesenheit|"
    r"autoreply|vacation|r[ée]ponse automatique|absence)",
    re.IGNORECASE,
)


def _is_autoreply(fields: Mapping[str, str]) -> bool:
    if _field(fields, "auto-submitted").lower().startswith("auto-replied"):
        return True
    if any(fields.get(h) for h in ("x-autoreply", "x-autorespond", "x-autoresponder")):
        return True
    if _field(fields, "precedence").lower() == "auto_reply":
        return True
    return _AUTOREPLY_SUBJECT.match(_subject(fields)) is not None


def _subject(fields: Mapping[str, str]) -> str:
    subject = _field(fields, "subject")
    if "=?" not in subject:
        return subject
    try:
        return str(make_header(decode_header(subject)))
    except (HeaderParseError, LookupError, UnicodeError):
        return subject


# ----------------------------------------------------------------------- human-text bounces


def _text_bounce(data: bytes, original: Original, classifier: Classifier) -> Report:
    """A bounce without a delivery-status part: flufl.bounce finds the addresses (it needs
    the standard library's message object: the slow path, for the formats that need it)."""
    message = message_from_bytes(data, policy=compat32)
    try:
        temporary, permanent = all_failures(message)
    except Exception:  # a detector tripped over a malformed message: none of its formats
        return Report(Kind.NONE, original=original)
    if not temporary and not permanent:
        return Report(Kind.NONE, original=original)
    text = _body_text(message)
    recipients = [
        _text_recipient(address, text, classifier, permanent=True)
        for address in sorted(_decoded(permanent))
    ]
    recipients += [
        _text_recipient(address, text, classifier, permanent=False)
        for address in sorted(_decoded(temporary - permanent))
    ]
    return Report(Kind.DSN, tuple(recipients), original)


def _decoded(addresses: AbstractSet[bytes]) -> set[str]:
    return {a.decode("utf-8", "replace") for a in addresses}


def _body_text(message: Message) -> str:
    """The human-readable text: every text/plain part before the returned message."""
    texts: list[str] = []
    for part in message.walk():
        kind = part.get_content_type()
        if kind in ("message/rfc822", "text/rfc822-headers"):
            break
        if kind == "text/plain":
            raw = part.get_payload(decode=True)
            if isinstance(raw, bytes):
                texts.append(raw.decode(part.get_content_charset() or "latin-1", "replace"))
    return "\n".join(texts)


_PARAGRAPH_END = re.compile(r"\n[ \t]*\n")
_SPACE = re.compile(r"\s+")
_NEAR = 600  # characters after an address where its reason is looked for


def _text_recipient(
    address: str, text: str, classifier: Classifier, *, permanent: bool
) -> ReportedRecipient:
    diagnostic = _near(address, text)
    reply = _reply_of(diagnostic, "", "failed" if permanent else "delayed")
    if permanent and reply.code < 500:
        reply = Reply(550, reply.enhanced if reply.enhanced.startswith("5") else "", reply.text)
    elif not permanent and reply.code >= 500:
        reply = Reply(450, reply.enhanced if reply.enhanced.startswith("4") else "", reply.text)
    verdict = classifier.classify(reply)
    status = reply.enhanced or ("5.0.0" if permanent else "4.0.0")
    return ReportedRecipient(
        address=address,
        action="failed" if permanent else "delayed",
        status=status,
        diagnostic=diagnostic,
        category=verdict.category,
        permanent=permanent,
    )


def _named(address: str, text: str) -> bool:
    bare = _bare(address).lower()
    return bool(bare) and bare in text.lower()


def _near(address: str, text: str) -> str:
    """The words about ``address``: from where it is named to the paragraph's end."""
    at = text.lower().find(address.lower())
    if at < 0:
        return _SPACE.sub(" ", text[:_NEAR]).strip() if _REPLY.search(text[:_NEAR]) else ""
    start = text.rfind("\n", 0, at) + 1
    window = text[start : at + _NEAR]
    end = _PARAGRAPH_END.search(window, at - start + len(address))
    snippet = window[: end.start()] if end else window
    if _REPLY.search(snippet) is None:  # the reason may be in the paragraph after
        following = _PARAGRAPH_END.split(window[len(snippet) :].lstrip("\n"), maxsplit=1)
        snippet = f"{snippet}\n{following[0]}" if following else snippet
    return _SPACE.sub(" ", snippet).strip()


# -------------------------------------------------------------------------------- helpers


def _field(fields: Mapping[str, str], name: str) -> str:
    """A field's value with runs of white space made one space; ``name`` in lowercase."""
    value = fields.get(name)
    return _SPACE.sub(" ", value).strip() if value else ""


def _typed(fields: Mapping[str, str], name: str) -> str:
    """A typed DSN field (``rfc822; a@b``, ``smtp; 550 ...``, ``dns; mx.example``): its value."""
    value = _field(fields, name)
    kind, semicolon, rest = value.partition(";")
    return rest.strip() if semicolon and " " not in kind.strip() else value


_ANGLE = re.compile(r"<([^<>]*)>")


def _bare(value: str) -> str:
    """The address in ``value``: inside angle brackets when there are some."""
    if not value:
        return ""
    found = _ANGLE.search(value)
    address = found.group(1) if found else value.split()[0] if value.split() else ""
    return address.strip().strip("<>")
