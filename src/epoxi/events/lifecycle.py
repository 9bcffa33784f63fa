"""The platform's view of records: an email's status, and the counts analytics adds up.

Pure: :func:`tally` takes a batch of records and what the store knows of their emails, and
returns the emails whose status changed and the counts to add per (tenant, template, hour).
The platform store does the reading and writing around it (``store/platform*.py``).

An email is one message of ``POST /send`` or ``/send/bulk`` (one recipient each). Its status
only moves forward, by rank: ``delivered`` after ``queued``, ``opened`` after ``delivered``,
never back. The mapping is in docs/platform.md; in short:

==================  ==============================  =================
record              status                          counted as
==================  ==============================  =================
Reception           queued (scheduled: send_at)     accepted
TransientFailure    (unchanged)                     deferred
Delivery            delivered                       delivered
RemoteDelivery      delivered                       delivered (once)
Bounce              bounced                         bounced
OOB, 5xx            bounced                         bounced (once)
AdminBounce         failed                          failed
Expiration          failed                          failed
Cancelled           cancelled                       cancelled
Suppression         suppressed                      suppressed
Feedback            complained                      complained (once)
Open                opened                          opened (once)
Click               clicked                         clicked (once)
Unsubscribe         (unchanged)                     unsubscribed
==================  ==============================  =================

"Once" is per email: a second open of the same email is an event in its history, not a
second open in the rates. Mail with a tenant but not made from a template (``POST
/messages``, SMTP) is counted too, under the template ``""``; it has no email row, so each of
its records counts.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

from epoxi.events.records import Record, RecordType

HOUR = 3600


class EmailStatus(enum.StrEnum):
    QUEUED = "queued"
    SCHEDULED = "scheduled"
    PROCESSING = "processing"
    SENT = "sent"
    DELIVERED = "delivered"
    OPENED = "opened"
    CLICKED = "clicked"
    FAILED = "failed"
    BOUNCED = "bounced"
    COMPLAINED = "complained"
    SUPPRESSED = "suppressed"
    CANCELLED = "cancelled"


RANK = {
    EmailStatus.QUEUED: 0,
    EmailStatus.SCHEDULED: 0,
    EmailStatus.PROCESSING: 1,
    EmailStatus.SENT: 2,
    EmailStatus.DELIVERED: 3,
    EmailStatus.FAILED: 4,
    EmailStatus.BOUNCED: 4,
    EmailStatus.SUPPRESSED: 4,
    EmailStatus.CANCELLED: 4,
    EmailStatus.OPENED: 5,
    EmailStatus.CLICKED: 6,
    EmailStatus.COMPLAINED: 7,
}

# The counts analytics keeps per (tenant, template, hour), in the rollup table's order
COUNTERS = (
    "accepted",
    "delivered",
    "deferred",
    "bounced",
    "failed",
    "complained",
    "opened",
    "clicked",
    "suppressed",
    "cancelled",
    "unsubscribed",
)

_STATUS = {
    RecordType.DELIVERY: EmailStatus.DELIVERED,
    RecordType.REMOTE_DELIVERY: EmailStatus.DELIVERED,
    RecordType.BOUNCE: EmailStatus.BOUNCED,
    RecordType.ADMIN_BOUNCE: EmailStatus.FAILED,
    RecordType.EXPIRATION: EmailStatus.FAILED,
    RecordType.CANCELLED: EmailStatus.CANCELLED,
    RecordType.SUPPRESSION: EmailStatus.SUPPRESSED,
    RecordType.FEEDBACK: EmailStatus.COMPLAINED,
    RecordType.OPEN: EmailStatus.OPENED,
    RecordType.CLICK: EmailStatus.CLICKED,
}
_COUNTER = {
    RecordType.RECEPTION: "accepted",
    RecordType.TRANSIENT_FAILURE: "deferred",
    RecordType.DELIVERY: "delivered",
    RecordType.REMOTE_DELIVERY: "delivered",
    RecordType.BOUNCE: "bounced",
    RecordType.OOB: "bounced",
    RecordType.ADMIN_BOUNCE: "failed",
    RecordType.EXPIRATION: "failed",
    RecordType.CANCELLED: "cancelled",
    RecordType.SUPPRESSION: "suppressed",
    RecordType.FEEDBACK: "complained",
    RecordType.OPEN: "opened",
    RecordType.CLICK: "clicked",
    RecordType.UNSUBSCRIBE: "unsubscribed",
}
# Counted once per email: the first of them (a delivery reported by Epoxi and then by the
# provider is one delivery; the second open of a mail is not a second opener)
_ONCE = {
    RecordType.REMOTE_DELIVERY: "delivered",
    RecordType.OOB: "bounced",
    RecordType.FEEDBACK: "complained",
    RecordType.OPEN: "opened",
    RecordType.CLICK: "clicked",
}
# Records that carry no template (made from a report, not from the message): the email row
# says which template the message was made from
REPORTED = frozenset(
    {
        RecordType.OOB,
        RecordType.FEEDBACK,
        RecordType.REMOTE_DELIVERY,
        RecordType.OPEN,
        RecordType.CLICK,
        RecordType.UNSUBSCRIBE,
    }
)


def status_of(record: Record) -> EmailStatus | None:
    """The status a record moves an email to, if it moves it at all."""
    if record.type is RecordType.RECEPTION:
        scheduled = record.next_attempt > record.timestamp
        return EmailStatus.SCHEDULED if scheduled else EmailStatus.QUEUED
    if record.type is RecordType.OOB:
        response = record.response
        return EmailStatus.BOUNCED if response is not None and response.code >= 500 else None
    return _STATUS.get(record.type)


def counter_of(record: Record) -> str | None:
    """The analytics count a record adds to, if any (a 4xx OOB adds to none)."""
    if record.type is RecordType.OOB and status_of(record) is None:
        return None
    return _COUNTER.get(record.type)


def error_of(record: Record) -> str:
    """What went wrong, for an email's ``last_error`` ("" for a record that is no failure)."""
    if record.type not in (
        RecordType.TRANSIENT_FAILURE,
        RecordType.BOUNCE,
        RecordType.OOB,
        RecordType.ADMIN_BOUNCE,
        RecordType.EXPIRATION,
    ):
        return ""
    response = record.response
    if response is None:
        return record.reason
    return " ".join(str(part) for part in (response.code, response.enhanced, response.text) if part)


@dataclass
class EmailState:
    """What the tally needs of an email row, and changes."""

    id: str
    tenant_id: str
    template_id: str
    status: EmailStatus
    counted: set[str] = field(default_factory=set)  # the "once" counts already made
    last_error: str = ""
    updated_at: float = 0.0
    recipient: str = ""
    new: bool = False  # not in the store yet: made from a record with a template


Key = tuple[str, str, int]  # (tenant, template, hour start as unix time)

# The records of a recipient that failed for good: its dead letter
_FOR_GOOD = frozenset(
    {RecordType.BOUNCE, RecordType.OOB, RecordType.EXPIRATION, RecordType.ADMIN_BOUNCE}
)


@dataclass(frozen=True)
class Dead:
    """A recipient that failed for good: a dead letter to keep."""

    email_id: str
    recipient: str
    tenant_id: str
    template_id: str
    reason: str  # the status it ended in: bounced or failed
    last_error: str
    at: float


@dataclass
class Tally:
    """The outcome of a batch: rows to write, counts to add, dead letters to keep."""

    changed: dict[str, EmailState] = field(default_factory=dict)
    counts: dict[Key, dict[str, int]] = field(default_factory=dict)
    dead: list[Dead] = field(default_factory=list)

    def add(self, key: Key, counter: str, amount: int = 1) -> None:
        bucket = self.counts.setdefault(key, {})
        bucket[counter] = bucket.get(counter, 0) + amount


def platform_records(records: Iterable[Record]) -> list[Record]:
    """The records the platform keeps: a tenant's, with something to count or show."""
    return [r for r in records if r.tenant and r.message_id and r.type in _COUNTER]


def tally(records: list[Record], known: dict[str, EmailState]) -> Tally:
    """Apply ``records`` (in order) to the emails in ``known`` (changed in place)."""
    result = Tally()
    for record in records:
        counter = counter_of(record)
        if counter is None and status_of(record) is None:
            continue
        state = known.get(record.message_id)
        if state is None and record.template and record.type is not RecordType.UNSUBSCRIBE:
            state = known[record.message_id] = _new_state(record)
        template = state.template_id if state is not None else record.template
        if counter is not None and _counts(record, state, counter):
            amount = len(record.recipients) if record.type is RecordType.RECEPTION else 1
            result.add((record.tenant, template, _hour(record.timestamp)), counter, amount)
        if state is not None and _apply(record, state):
            result.changed[state.id] = state
        status = status_of(record)
        if record.type in _FOR_GOOD and status is not None:
            error = error_of(record) or record.reason
            result.dead.append(
                Dead(
                    record.message_id,
                    record.recipient,
                    record.tenant,
                    template,
                    status.value,
                    error,
                    record.timestamp,
                )
            )
    return result


def _new_state(record: Record) -> EmailState:
    recipient = record.recipient or (record.recipients[0] if record.recipients else "")
    return EmailState(
        id=record.message_id,
        tenant_id=record.tenant,
        template_id=record.template,
        status=EmailStatus.QUEUED,
        recipient=recipient,
        new=True,
    )


def _counts(record: Record, state: EmailState | None, counter: str) -> bool:
    """Whether the record adds to its count: a "once" count only the first time per email."""
    once = _ONCE.get(record.type)
    if once is None or state is None:
        return True
    if once in state.counted:
        return False
    state.counted.add(once)
    return True


def _apply(record: Record, state: EmailState) -> bool:
    """Move the email's status (forward only) and keep the last error; True if the row is
    to be written."""
    changed = False
    error = error_of(record)
    if error and error != state.last_error:
        state.last_error, changed = error, True
    status = status_of(record)
    if status is not None and status is not state.status and _moves(record, state, status):
        state.status, changed = status, True
    if record.type in (RecordType.DELIVERY, RecordType.REMOTE_DELIVERY):
        state.counted.add("delivered")  # a provider's report of it later is the same one
    if changed or state.new:
        state.updated_at = max(state.updated_at, record.timestamp)
    return changed or state.new


def _moves(record: Record, state: EmailState, status: EmailStatus) -> bool:
    """Forward only; a Reception may say scheduled where the row says queued (same rank)."""
    if record.type is RecordType.RECEPTION:
        return RANK[state.status] == 0
    return RANK[status] > RANK[state.status]


def _hour(timestamp: float) -> int:
    return int(timestamp // HOUR) * HOUR
