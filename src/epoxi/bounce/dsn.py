"""Delivery Status Notifications (RFC 3464): failed, expired, delayed and delivered recipients.

Envelope of a DSN, for the caller that spools it: the sender is the null reverse-path ``""``
(``MAIL FROM:<>``) and the one recipient is the original message's envelope sender. The null
sender is what makes a DSN that itself fails never produce another DSN (RFC 5321 4.5.5); call
:func:`should_send_dsn` first so that no DSN is sent about a DSN or an automatic message.

The message is ``multipart/report; report-type=delivery-status`` with three parts: a
``text/plain`` explanation for people, the ``message/delivery-status`` fields for programs,
and the original headers as ``text/rfc822-headers`` or, when the sender asked with
``RET=FULL`` and the DSN reports a failure, the whole original as ``message/rfc822``
(RFC 3461 §4.3). RFC 3461 asks which DSNs the sender wants: :func:`notify_wants` answers it
for one recipient and one event, :func:`success_action` names the Action of a success DSN.
"""

from __future__ import annotations

import re
import textwrap
import time
from dataclasses import dataclass
from email.message import EmailMessage, Message, MIMEPart
from email.parser import BytesHeaderParser
from email.policy import SMTP, SMTPUTF8, Policy
from email.utils import formatdate
from typing import Literal

from epoxi.message import MessageMeta
from epoxi.smtp.downgrade import crlf, downgrade_8bit
from epoxi.smtp.replies import Reply

DsnKind = Literal["failed", "delayed", "delivered", "relayed"]  # RFC 3464 §2.3.3 actions
DsnEvent = Literal["success", "failure", "delay"]  # RFC 3461 §4.1 NOTIFY conditions
RETURN_LIMIT = 1024 * 1024  # octets of an original returned whole (RET=FULL); headers beyond

_AUTOMATIC_SENDERS = frozenset(
    {"mailer-daemon", "mailer_daemon", "mailerdaemon", "postmaster", "double-bounce"}
)
_REPORT_TYPES = ("multipart/report",)
_XTEXT_SPECIALS = frozenset("\\+=")
_PART_POLICY = SMTP.clone(cte_type="7bit")  # parts stay 7-bit clean: no 8BITMIME needed
_FOLD_AT = 78  # the delivery-status fields are folded here, at spaces, by _fold
_MAX_DIAGNOSTIC = 2000  # characters of a remote reply kept in Diagnostic-Code


@dataclass(frozen=True, slots=True)
class RecipientFailure:
    """One recipient in a DSN and why it was not delivered.

    ``reply`` is the remote server's reply, or None when there was none (expiry without a
    reply, a local reason); then ``reason`` explains. ``action`` None follows the DSN's kind.
    ``status`` overrides the RFC 3463 status; by default it comes from the reply's enhanced
    code, else its reply code (``5.0.0`` / ``4.0.0`` / ``2.0.0``), else ``4.4.7`` (delivery
    time expired) for a failed recipient, ``4.0.0`` for a delayed one and ``2.0.0`` for a
    delivered or relayed one. A delayed recipient's status is always of class 4.
    It reports successes too ("delivered", "relayed"): :data:`RecipientReport` is its other name.
    """

    recipient: str
    reply: Reply | None
    remote_mta: str = ""
    reason: str = ""
    action: DsnKind | None = None
    status: str = ""

    def status_code(self, kind: DsnKind | None = None) -> str:
        """The RFC 3463 status for the ``Status:`` field; ``kind`` when ``action`` is None."""
        action = self.action or kind
        status = self._status(action)
        if action == "delayed" and status.startswith("5."):
            return "4" + status[1:]  # RFC 3464 §2.3.4: still being retried, so not permanent
        return status

    def _status(self, action: DsnKind | None) -> str:
        if self.status:
            return self.status
        if self.reply is not None and self.reply.enhanced:
            return self.reply.enhanced
        if self.reply is not None:
            return f"{min(self.reply.code // 100, 5)}.0.0"
        return _DEFAULT_STATUS.get(action or "failed", "4.4.7")

    def explanation(self) -> str:
        """What happened, in one line, for people."""
        if self.reply is not None:
            said = f"{self.remote_mta} said" if self.remote_mta else "the remote server said"
            return f"{said}: {_one_line(str(self.reply))}"
        return _one_line(self.reason) or "no reason recorded"


RecipientReport = RecipientFailure
_DEFAULT_STATUS = {"failed": "4.4.7", "delayed": "4.0.0", "delivered": "2.0.0", "relayed": "2.0.0"}


# ----------------------------------------------------------------------- what the sender asked


def notify_wants(meta: MessageMeta, recipient: str, event: DsnEvent) -> bool:
    """Whether the sender wants a DSN when ``event`` happens to ``recipient`` (RFC 3461 §4.1).

    Without NOTIFY for the recipient: a failure and a delay yes (a delay is the MTA's choice),
    a success no. ``NEVER``: none. Otherwise the events NOTIFY lists. This is only what the
    sender asked; :func:`should_send_dsn` still guards against loops.
    """
    notify = meta.dsn_notify.get(recipient) if meta.dsn_notify else None
    if not notify:
        return event != "success"
    return event.upper() in notify.upper().replace(" ", "").split(",")


def success_action(
    *, dsn_passed: bool, final: bool = False
) -> Literal["delivered", "relayed"] | None:
    """The Action of the DSN for a recipient accepted with NOTIFY=SUCCESS, or None for none.

    ``final``: the message reached the mailbox (a local or LMTP transport): "delivered".
    Otherwise it went to a next hop (RFC 3461 §6.2): when the next hop took the DSN request
    (``TransactionResult.dsn_passed``) it reports, and we send nothing; when it does not
    offer DSN, we report "relayed".
    """
    if final:
        return "delivered"
    return None if dsn_passed else "relayed"


# ------------------------------------------------------------------------------ loop guard


def should_send_dsn(meta: MessageMeta, original_headers: bytes) -> bool:
    """Whether a failure of this message may be reported to its sender.

    False for the null sender, for senders that are mail systems (mailer-daemon,
    postmaster), and for messages that are themselves reports or automatic
    (``Content-Type: multipart/report``, ``Auto-Submitted`` other than ``no``,
    ``X-Failed-Recipients``), so a DSN never answers a DSN.
    """
    if not meta.sender or _is_system_sender(meta.sender):
        return False
    return not _is_automatic(original_headers)


def _is_system_sender(sender: str) -> bool:
    local = sender.rpartition("@")[0] or sender
    return local.lower() in _AUTOMATIC_SENDERS


def _is_automatic(original_headers: bytes) -> bool:
    headers = BytesHeaderParser().parsebytes(original_headers)
    auto = _first_token(headers.get("Auto-Submitted", "no"))
    content_type = _first_token(headers.get("Content-Type", ""))
    return auto != "no" or content_type in _REPORT_TYPES or "X-Failed-Recipients" in headers


def _first_token(value: object) -> str:
    """``auto-replied (comment); x=y`` -> ``auto-replied``."""
    text = re.sub(r"\([^)]*\)", " ", str(value))
    return text.split(";", 1)[0].strip().lower()


# -------------------------------------------------------------------------------- building


def build_dsn(
    *,
    reporting_mta: str,
    original: MessageMeta,
    original_headers: bytes,
    failures: list[RecipientFailure],
    kind: DsnKind = "failed",
    dsn_id: str,
    now: float | None = None,
    original_message: bytes | None = None,
    retry_until: float | None = None,
    return_limit: int = RETURN_LIMIT,
) -> bytes:
    """The DSN as wire bytes with CRLF line ends, 7-bit unless the sender's address is not
    ASCII, ready to spool.

    Send it from ``""`` (the null sender) to ``original.sender``. ``dsn_id`` becomes the
    local part of its Message-ID; ``now`` (unix time) dates it and the last attempts.
    ``kind`` is each recipient's Action unless its ``action`` says otherwise, and picks the
    subject. The original's ENVID and each recipient's ORCPT (from ``original``) become
    ``Original-Envelope-Id`` and ``Original-Recipient`` fields. ``retry_until`` (unix time)
    is the ``Will-Retry-Until`` of delayed recipients, also told in words.

    The third part is the original's headers, unless ``original.dsn_ret`` is ``FULL``, a
    recipient failed, ``original_message`` (the whole message) is given and at most
    ``return_limit`` octets: then it is the message as ``message/rfc822``, 8-bit parts made
    quoted-printable; a message that cannot be made 7-bit goes back as headers only.
    """
    if not failures:
        raise ValueError("a DSN needs at least one recipient")
    now = time.time() if now is None else now
    actions = [failure.action or kind for failure in failures]
    returned = _returned_message(original, original_message, actions, return_limit)
    report = _report_envelope(reporting_mta, original, kind, dsn_id, now)
    story = _Story(actions, retry_until, returned is not None)
    parts: list[Message | str] = [
        _human_part(reporting_mta, original, failures, story),
        _status_part(reporting_mta, original, failures, kind, now, retry_until),
        _headers_part(original_headers) if returned is None else _message_part(returned),
    ]
    report.set_payload(parts)
    return report.as_bytes(policy=_policy_for(original.sender))


def _returned_message(
    original: MessageMeta, message: bytes | None, actions: list[DsnKind], limit: int
) -> bytes | None:
    """The 7-bit original to return whole, or None for headers only."""
    wanted = original.dsn_ret.upper() == "FULL" and "failed" in actions
    if not wanted or message is None or len(message) > limit:
        return None
    seven_bit = downgrade_8bit(message)
    return crlf(seven_bit) if isinstance(seven_bit, bytes) else None


def _message_part(message: bytes) -> MIMEPart:
    part = MIMEPart(policy=_PART_POLICY)
    part["Content-Type"] = "message/rfc822"
    part.set_payload(message.decode("ascii"))  # emitted as it is: the original, byte for byte
    return part


def _policy_for(sender: str) -> Policy:
    """SMTP, or SMTPUTF8 when the address we answer is internationalised (RFC 6531).

    Lines may reach RFC 5322's 998 octets: the delivery-status fields are folded by
    :func:`_fold`, and a reply token too long to fold must not become an RFC 2047 word.
    """
    policy = SMTP if sender.isascii() else SMTPUTF8
    return policy.clone(max_line_length=998)


def _report_envelope(
    mta: str, original: MessageMeta, kind: DsnKind, dsn_id: str, now: float
) -> EmailMessage:
    report = EmailMessage(policy=_policy_for(original.sender))
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{mta}>"
    report["To"] = original.sender
    report["Subject"] = _subject(kind)
    report["Date"] = formatdate(now)
    report["Message-ID"] = f"<{dsn_id}@{mta}>"
    report["Auto-Submitted"] = "auto-replied"
    report["MIME-Version"] = "1.0"
    report["Content-Type"] = "multipart/report"
    report.set_param("report-type", "delivery-status")
    return report


def _subject(kind: DsnKind) -> str:
    return _SUBJECTS[kind]


_SUBJECTS: dict[DsnKind, str] = {
    "failed": "Undelivered Mail Returned to Sender",
    "delayed": "Delayed Mail (still being retried)",
    "delivered": "Successful Mail Delivery Report",
    "relayed": "Successful Mail Delivery Report",
}
_HEADINGS: dict[DsnKind, str] = {
    "failed": "Your message could not be delivered to these recipients:",
    "delayed": "Your message has not been delivered yet to these recipients:",
    "delivered": "Your message was delivered to these recipients:",
    "relayed": (
        "Your message was passed on to the mail servers of these recipients. Those servers "
        "do not send delivery reports, so no further report about it will follow:"
    ),
}


@dataclass(frozen=True, slots=True)
class _Story:
    """What the text for people tells besides the recipients."""

    actions: list[DsnKind]  # one per recipient, in order
    retry_until: float | None
    returned_whole: bool


def _human_part(
    mta: str, original: MessageMeta, failures: list[RecipientFailure], story: _Story
) -> MIMEPart:
    text = _human_text(mta, original, failures, story)
    part = MIMEPart(policy=_PART_POLICY)
    if text.isascii():
        part.set_content(text, charset="us-ascii", cte="7bit")
    else:
        part.set_content(text, charset="utf-8", cte="quoted-printable")
    return part


def _human_text(
    mta: str, original: MessageMeta, failures: list[RecipientFailure], story: _Story
) -> str:
    received = formatdate(original.received_at)
    lines = [f"This is a delivery report from the mail server {mta}.", ""]
    for action in _HEADINGS:
        reported = [f for f, a in zip(failures, story.actions, strict=True) if a == action]
        if reported:
            lines += _section(action, reported, story.retry_until)
    lines.append(f"The message arrived on {received} (queue id {original.id}).")
    lines.append(
        "It is attached below." if story.returned_whole else "Its headers are attached below."
    )
    return "\n".join(lines) + "\n"


def _section(
    action: DsnKind, reported: list[RecipientFailure], retry_until: float | None
) -> list[str]:
    lines = [*textwrap.wrap(_HEADINGS[action], 76), ""]
    for failure in reported:
        lines.append(f"  <{failure.recipient}>")
        lines += _wrap(failure.explanation())
        lines.append("")
    if action == "delayed" and retry_until is not None:
        until = formatdate(retry_until)
        text = f"Delivery is delayed. It will be tried again until {until}; you do not need "
        lines += [*textwrap.wrap(text + "to resend the message yet.", 76), ""]
    elif action == "delayed":
        lines += ["Delivery will be tried again; you do not need to resend it yet.", ""]
    return lines


def _status_part(
    mta: str,
    original: MessageMeta,
    failures: list[RecipientFailure],
    kind: DsnKind,
    now: float,
    retry_until: float | None,
) -> MIMEPart:
    part = MIMEPart(policy=_PART_POLICY)
    part["Content-Type"] = "message/delivery-status"
    orcpts = original.dsn_orcpt or {}
    blocks: list[Message | str] = [_per_message_fields(mta, original)]
    blocks += [
        _per_recipient_fields(failure, kind, now, orcpts.get(failure.recipient), retry_until)
        for failure in failures
    ]
    part.set_payload(blocks)  # one header block each, as RFC 3464 lays them out
    return part


def _per_message_fields(mta: str, original: MessageMeta) -> Message:
    block = Message()  # compat32: stores our pre-folded values as they are
    if original.dsn_envid:
        block["Original-Envelope-Id"] = _printable(original.dsn_envid)
    block["Reporting-MTA"] = f"dns; {mta}"
    block["X-Epoxi-Queue-ID"] = original.id
    block["Arrival-Date"] = formatdate(original.received_at)
    return block


def _per_recipient_fields(
    failure: RecipientFailure,
    kind: DsnKind,
    now: float,
    orcpt: str | None,
    retry_until: float | None,
) -> Message:
    block = Message()  # compat32: stores our pre-folded values as they are
    action = failure.action or kind
    if orcpt and ";" in orcpt:
        block["Original-Recipient"] = _original_recipient(orcpt)
    block["Final-Recipient"] = _address_field(failure.recipient)
    block["Action"] = action
    block["Status"] = failure.status_code(kind)
    if failure.remote_mta:
        block["Remote-MTA"] = f"dns; {_ascii(failure.remote_mta)}"
    if failure.reply is not None:
        block["Diagnostic-Code"] = _diagnostic("smtp", str(failure.reply))
    elif failure.reason:
        block["Diagnostic-Code"] = _diagnostic("X-Epoxi", failure.reason)
    block["Last-Attempt-Date"] = formatdate(now)
    if action == "delayed" and retry_until is not None:
        block["Will-Retry-Until"] = formatdate(retry_until)
    return block


def _original_recipient(orcpt: str) -> str:
    """``rfc822; addr`` from ORCPT's ``type;addr`` (decoded); RFC 6533 form when not ASCII."""
    kind, _, address = orcpt.partition(";")
    address = _one_line(address)
    if address.isascii():
        return f"{_printable(kind.strip())}; {_printable(address)}"
    return _address_field(address)


def _address_field(address: str) -> str:
    """``rfc822; addr``, or RFC 6533 ``utf-8; `` with ``\\x{HEX}`` escapes when not ASCII."""
    if address.isascii():
        return f"rfc822; {address}"
    escaped = "".join(
        f"\\x{{{ord(c):X}}}" if not c.isascii() or c in _XTEXT_SPECIALS else c for c in address
    )
    return f"utf-8; {escaped}"


def _diagnostic(kind: str, text: str) -> str:
    """``smtp; 550 5.1.1 ...``: one line of ASCII, folded at spaces."""
    value = f"{kind}; {_ascii(_one_line(text))[:_MAX_DIAGNOSTIC]}"
    return _fold(value, len("Diagnostic-Code: "))


def _fold(value: str, used: int) -> str:
    """Fold at spaces so lines stay within _FOLD_AT where the words allow (RFC 5322 2.2.3)."""
    lines: list[str] = []
    line = ""
    for word in value.split(" "):
        if line and used + len(line) + 1 + len(word) > _FOLD_AT:
            lines.append(line)
            line, used = word, 1
        else:
            line = f"{line} {word}" if line else word
    lines.append(line)
    return "\n ".join(lines)


def _headers_part(original_headers: bytes) -> MIMEPart:
    """The original headers as ``text/rfc822-headers``: 7bit, or quoted-printable UTF-8.

    Bytes that are not UTF-8 (legacy 8-bit headers) become U+FFFD.
    """
    text = original_headers.replace(b"\r\n", b"\n").decode("utf-8", "replace")
    part = MIMEPart(policy=_PART_POLICY)
    if text.isascii():
        part.set_content(text, subtype="rfc822-headers", charset="us-ascii", cte="7bit")
    else:
        part.set_content(text, subtype="rfc822-headers", cte="quoted-printable")
    return part


def _wrap(text: str) -> list[str]:
    indent = "    "
    return textwrap.wrap(
        text,
        76,
        initial_indent=indent,
        subsequent_indent=indent,
        break_long_words=False,
        break_on_hyphens=False,
    )


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _printable(text: str) -> str:
    """Printable ASCII only (a field value must not break a line): others become ``?``."""
    return "".join(c if " " <= c <= "~" else "?" for c in text)


def _ascii(text: str) -> str:
    """Fields of message/delivery-status are ASCII; replace what is not."""
    return text.encode("ascii", "replace").decode("ascii")
