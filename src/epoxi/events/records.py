"""Typed records: one per state change of a message, the source of truth for tests and tools.

Written as JSON lines (msgspec) to ``<data_dir>/logs/records.jsonl`` (``records-<i>.jsonl``
for worker i of several) by :mod:`epoxi.events.log`.
"""

from __future__ import annotations

import enum
import time

import msgspec

from epoxi.smtp.replies import Reply


class RecordType(enum.Enum):
    RECEPTION = "Reception"
    DELIVERY = "Delivery"
    TRANSIENT_FAILURE = "TransientFailure"
    BOUNCE = "Bounce"
    EXPIRATION = "Expiration"
    ADMIN_BOUNCE = "AdminBounce"
    CANCELLED = "Cancelled"  # the sender took it back before it was sent
    SUSPENDED = "Suspended"
    REROUTED = "Rerouted"  # sent through another pool or source than its own: ``reason`` says why
    # Traffic shaping automation started or ended an action (``reason`` says which and why;
    # ``message_id`` is the message whose reply started it, "" when it ended)
    AUTOMATION = "Automation"
    # Feedback that came back later, by mail (bounce/inbound parsing, issue 14)
    OOB = "OOB"  # an out-of-band bounce: a DSN for a message Epoxi had handed over
    FEEDBACK = "Feedback"  # a complaint (ARF, RFC 5965) about a message Epoxi sent
    SUPPRESSION = "Suppression"  # a recipient not sent to: on the tenant's suppression list
    # Reported by an upstream provider's webhook (``POST /webhooks/{provider}``), or later by
    # Epoxi's own tracking: what happened after the message left Epoxi
    REMOTE_DELIVERY = "RemoteDelivery"  # the provider says it reached the recipient's mailbox
    OPEN = "Open"
    CLICK = "Click"  # ``url`` is the link
    UNSUBSCRIBE = "Unsubscribe"  # the recipient asked for no more mail: suppressed


class Response(msgspec.Struct, frozen=True, gc=False):
    code: int
    enhanced: str = ""
    text: str = ""

    @classmethod
    def of(cls, reply: Reply) -> Response:
        return cls(reply.code, reply.enhanced, reply.text)


class Record(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """One state change. Fields that do not apply are left at their defaults.

    ``gc=False`` (as ``MessageMeta``): strings, numbers, a list of strings and a Response
    cannot form a reference cycle, and the collector need not visit the thousands of records
    waiting in the buffers for their next write.
    """

    type: RecordType
    message_id: str
    timestamp: float = msgspec.field(default_factory=time.time)
    queue: str = ""  # scheduled queue name: campaign:tenant@domain
    site: str = ""  # ready queue site (the MX host set) where known
    source: str = ""  # egress source name
    pool: str = ""  # the egress pool the source was picked from
    sender: str = ""
    recipient: str = ""  # one record per recipient for outcomes
    recipients: list[str] = msgspec.field(default_factory=list)  # Reception: all of them
    response: Response | None = None
    peer_address: str = ""  # the remote server (or the client, for Reception)
    attempt: int = 0
    classification: str = ""  # bounce category for failures
    size: int = 0
    reason: str = ""  # free text where no reply exists (expiry, admin action, DNS)
    next_attempt: float = 0.0  # TransientFailure, and Reception of mail sent later: when due
    tenant: str = ""
    campaign: str = ""
    template: str = ""  # the stored template the message was made from, if any
    origin: str = ""  # Reception: how the message came in (smtp, http, dsn)
    dkim: str = ""  # Reception: the DKIM signatures added, or why none ("unsigned: ...")
    tls: str = ""  # an attempt's TLS: "TLSv1.3 <cipher> verified policy=..." or "plaintext ..."
    # OOB and Feedback (docs/events.md): a report that came back by mail. ``message_id`` is
    # the message its VERP token names, ``recipient`` the one reported, ``sender`` the VERP
    # address. OOB: ``response`` is (550 permanent | 450 not, the RFC 3463 status, the remote
    # reply as reported), ``classification`` its bounce category, ``peer_address`` the remote
    # MTA; ``reason`` is set when the token named another recipient than the one reported.
    feedback_type: str = ""  # Feedback: ARF Feedback-Type (abuse, fraud, virus, not-spam, ...)
    reporter: str = ""  # OOB: the Reporting-MTA; Feedback: the report's User-Agent; provider
    # A record made from a provider's webhook event: ``reporter`` is the provider's name and
    # ``external_id`` its id for the event (timestamp and all fields come from the event, so a
    # redelivered event makes the same record, with the same event id)
    external_id: str = ""
    url: str = ""  # Click: the link followed


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Record)


def encode_record(record: Record) -> bytes:
    return _encoder.encode(record)


def decode_record(line: bytes) -> Record:
    return _decoder.decode(line)
