"""Delivery Status Notifications (RFC 3464) for bounced and expired recipients.

A DSN is sent with the null reverse-path ``<>`` to the original sender, so a DSN that fails
is never answered with another one.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from email.message import Message
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import SMTP
from email.utils import formatdate
from typing import Literal

from epoxi.smtp.replies import Reply
from epoxi.spool.records import MessageMeta

_NO_DSN_SENDERS = re.compile(r"^(mailer-daemon|postmaster|double-bounce)@", re.IGNORECASE)
_REPORT_HEADER = re.compile(rb"^content-type:\s*multipart/report", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class RecipientFailure:
    recipient: str
    reply: Reply | None
    remote_mta: str = ""
    reason: str = ""  # for failures without a remote reply (expiry, DNS)
    action: Literal["failed", "delayed"] = "failed"

    @property
    def status(self) -> str:
        if self.reply is not None and self.reply.enhanced:
            return self.reply.enhanced
        if self.reply is not None:
            return f"{self.reply.code // 100}.0.0"
        return "5.0.0" if self.action == "failed" else "4.0.0"


def should_send_dsn(meta: MessageMeta, original_headers: bytes) -> bool:
    """False for the null sender, for DSNs, and for mailer-daemon senders (no loops)."""
    if not meta.sender or _NO_DSN_SENDERS.match(meta.sender):
        return False
    return _REPORT_HEADER.search(original_headers) is None


def build_dsn(
    *,
    reporting_mta: str,
    original: MessageMeta,
    original_headers: bytes,
    failures: list[RecipientFailure],
    dsn_id: str,
    now: float | None = None,
) -> bytes:
    """The DSN as wire bytes (CRLF line ends), ready to spool."""
    now = time.time() if now is None else now
    report = MIMEMultipart("report", report_type="delivery-status")
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{reporting_mta}>"
    report["To"] = original.sender
    report["Subject"] = _subject(failures)
    report["Date"] = formatdate(now)
    report["Message-ID"] = f"<{dsn_id}@{reporting_mta}>"
    report["Auto-Submitted"] = "auto-replied"
    report.attach(MIMEText(_human_text(reporting_mta, original, failures), "plain", "utf-8"))
    report.attach(_status_part(reporting_mta, original, failures, now))
    report.attach(_headers_part(original_headers))
    return report.as_bytes(policy=SMTP)


def _subject(failures: list[RecipientFailure]) -> str:
    if all(f.action == "delayed" for f in failures):
        return "Delayed Mail (still being retried)"
    return "Undelivered Mail Returned to Sender"


def _human_text(mta: str, original: MessageMeta, failures: list[RecipientFailure]) -> str:
    lines = [
        f"This is the mail system at {mta}.",
        "",
        "Your message could not be delivered to the following recipients:",
        "",
    ]
    for failure in failures:
        why = str(failure.reply) if failure.reply else failure.reason
        lines.append(f"<{failure.recipient}>: {why}")
    lines += [
        "",
        f"The message was received on {formatdate(original.received_at)} "
        f"with id {original.id}. Its headers are attached.",
    ]
    return "\r\n".join(lines) + "\r\n"


def _status_part(
    mta: str, original: MessageMeta, failures: list[RecipientFailure], now: float
) -> MIMEBase:
    per_message = Message()
    per_message["Reporting-MTA"] = f"dns; {mta}"
    per_message["X-Epoxi-Queue-ID"] = original.id
    per_message["Arrival-Date"] = formatdate(original.received_at)
    blocks: list[Message] = [per_message] + [_recipient_block(f, now) for f in failures]
    part = MIMEBase("message", "delivery-status")
    part.set_payload(blocks)  # type: ignore[arg-type]  # written as blocks by the generator
    return part


def _recipient_block(failure: RecipientFailure, now: float) -> Message:
    block = Message()
    block["Final-Recipient"] = f"rfc822; {failure.recipient}"
    block["Action"] = failure.action
    block["Status"] = failure.status
    if failure.remote_mta:
        block["Remote-MTA"] = f"dns; {failure.remote_mta}"
    if failure.reply is not None:
        block["Diagnostic-Code"] = f"smtp; {failure.reply}"
    elif failure.reason:
        block["Diagnostic-Code"] = f"X-Epoxi; {failure.reason}"
    block["Last-Attempt-Date"] = formatdate(now)
    return block


def _headers_part(original_headers: bytes) -> MIMEText:
    text = original_headers.decode("utf-8", "replace")
    charset = "us-ascii" if text.isascii() else "utf-8"
    return MIMEText(text, "rfc822-headers", charset)
