"""Provider webhooks in (``POST /webhooks/{provider}``): what an upstream provider reports.

When Epoxi hands mail to an upstream provider (a smarthost service) or works beside one, the
provider reports later what happened: delivered, opened, clicked, bounced, complained,
unsubscribed. Each call is signed with the provider's secret (``WEBHOOK_SECRET_<PROVIDER>``,
or ``[provider_webhooks.secrets]``): ``Webhook-Signature: t=<unix seconds>,v1=<hex
HMAC-SHA256 of "<t>.<raw body>">``, the scheme of Epoxi's own event webhooks (whose header
name, ``Epoxi-Signature``, is taken too). A call whose signature does not match, or whose
``t`` is further than ``tolerance`` from now, changes nothing and is answered 401.

Each event becomes a record for the message it names, with the message's tenant and campaign
(docs/events.md has the shape and the mapping). A record feeds the status, the suppression
lists, event webhooks and sinks like any other. An event id already applied for the provider
is a duplicate: it changes nothing, and the answer says so. The id is remembered only once
the records are written, so a crash in between applies the event again on the provider's
retry (at least once, never lost).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec

from epoxi.api_types import ProviderOutcome, ProviderReceipt
from epoxi.bounce.classify import Classifier
from epoxi.errors import InvalidField, SignatureRefused, UnknownProvider
from epoxi.events.records import Record, RecordType, Response
from epoxi.events.sink import EventSink
from epoxi.smtp.replies import Reply
from epoxi.store.provider_events import ProviderEventStore
from epoxi.store.status import StatusStore
from epoxi.store.suppressions import Suppressions
from epoxi.webhooks.signing import HEADER as EPOXI_HEADER

log = logging.getLogger(__name__)

HEADER = "Webhook-Signature"
HEADERS = (HEADER, EPOXI_HEADER)  # either is read
PROVIDER_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,39}")
MAX_EVENTS = 1000  # in one call

# The provider's event type -> the record it makes. Mailsystem's names, the usual
# synonyms, and Epoxi's own event types (so one Epoxi's event webhooks can feed another).
_TYPES: dict[str, RecordType] = {
    "delivered": RecordType.REMOTE_DELIVERY,
    "delivery": RecordType.REMOTE_DELIVERY,
    "remote_delivery": RecordType.REMOTE_DELIVERY,
    "opened": RecordType.OPEN,
    "open": RecordType.OPEN,
    "clicked": RecordType.CLICK,
    "click": RecordType.CLICK,
    "bounced": RecordType.OOB,
    "bounce": RecordType.OOB,
    "failed": RecordType.OOB,
    "oob": RecordType.OOB,
    "deferred": RecordType.OOB,  # temporary: see _TEMPORARY
    "delayed": RecordType.OOB,
    "transient_failure": RecordType.OOB,
    "complained": RecordType.FEEDBACK,
    "complaint": RecordType.FEEDBACK,
    "spam_report": RecordType.FEEDBACK,
    "feedback": RecordType.FEEDBACK,
    "unsubscribed": RecordType.UNSUBSCRIBE,
    "unsubscribe": RecordType.UNSUBSCRIBE,
}
_TEMPORARY = frozenset({"deferred", "delayed", "transient_failure"})
_SOFT = frozenset({"soft", "temporary", "transient"})
KNOWN_TYPES = tuple(sorted(_TYPES))


# --------------------------------------------------------------------- events, pure


class ProviderEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One event as the provider sent it, fields under their own names."""

    id: str
    type: str
    message_id: str
    recipient: str
    time: float
    code: int = 0
    enhanced: str = ""
    text: str = ""
    bounce_type: str = ""
    feedback_type: str = ""
    url: str = ""


def parse_events(body: bytes, now: float) -> list[ProviderEvent]:
    """The events of a call: ``{"events": [...]}`` or a single event object.

    Raises InvalidField naming the first wrong field (``events[2].email_id``)."""
    try:
        data = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise InvalidField("body", f"not JSON: {exc}") from exc
    if isinstance(data, dict) and "events" in data:
        items, where = data["events"], "events"
        if not isinstance(items, list) or not items:
            raise InvalidField("events", "must be a non-empty list of events")
    elif isinstance(data, dict):
        items, where = [data], "event"
    else:
        raise InvalidField("body", 'must be an event object or {"events": [...]}')
    if len(items) > MAX_EVENTS:
        raise InvalidField("events", f"{len(items)} events; at most {MAX_EVENTS} in one call")
    return [
        _event(item, f"{where}[{i}]" if where == "events" else where, now)
        for i, item in enumerate(items)
    ]


def _event(item: Any, where: str, now: float) -> ProviderEvent:
    if not isinstance(item, dict):
        raise InvalidField(where, "must be an object")
    recipient = _first(item, ("recipient", "email"))
    if isinstance(recipient, dict):  # Mailsystem's {"email", "name"}
        recipient = recipient.get("email")
    return ProviderEvent(
        id=_text(item, where, ("provider_event_id", "id", "event_id")),
        type=_text(item, where, ("type", "event")).lower(),
        message_id=_text(item, where, ("email_id", "message_id")),
        recipient=_address(recipient, where),
        time=_time(_first(item, ("timestamp", "time")), where, now),
        code=_code(item.get("code"), where),
        enhanced=_optional(item, where, ("enhanced", "status")),
        text=_optional(item, where, ("reason", "diagnostic", "description")),
        bounce_type=_optional(item, where, ("bounce_type",)).lower(),
        feedback_type=_optional(item, where, ("feedback_type",)),
        url=_optional(item, where, ("url",)),
    )


def _first(item: dict[str, Any], names: tuple[str, ...]) -> Any:
    return next((item[name] for name in names if item.get(name) not in (None, "")), None)


def _text(item: dict[str, Any], where: str, names: tuple[str, ...]) -> str:
    value = _first(item, names)
    if value is None:
        raise InvalidField(f"{where}.{names[0]}", f"is required (as {' or '.join(names)})")
    if not isinstance(value, str | int) or len(str(value)) > 500:
        raise InvalidField(f"{where}.{names[0]}", "must be a string of at most 500 characters")
    return str(value)


def _optional(item: dict[str, Any], where: str, names: tuple[str, ...]) -> str:
    value = _first(item, names)
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > 2000:
        raise InvalidField(f"{where}.{names[0]}", "must be a string of at most 2000 characters")
    return value


def _address(value: Any, where: str) -> str:
    if not isinstance(value, str) or "@" not in value or len(value) > 320:
        raise InvalidField(f"{where}.recipient", 'must be a mail address (or {"email": ...})')
    return value.strip()


def _time(value: Any, where: str, now: float) -> float:
    if value is None:
        return now
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    raise InvalidField(f"{where}.timestamp", "must be Unix seconds or an ISO 8601 time")


def _code(value: Any, where: str) -> int:
    if value is None:
        return 0
    if isinstance(value, int) and not isinstance(value, bool) and 200 <= value <= 599:
        return value
    raise InvalidField(f"{where}.code", "must be an SMTP reply code (200-599)")


def record_type(event: ProviderEvent) -> RecordType | None:
    """The record an event makes; None for a type Epoxi does not take (it is ignored)."""
    return _TYPES.get(event.type)


def record_of(
    provider: str,
    event: ProviderEvent,
    kind: RecordType,
    owner: tuple[str, str],
    classifier: Classifier,
) -> Record:
    """The record of one event, for a message of ``owner`` (tenant, campaign)."""
    tenant, campaign = owner
    record = Record(
        type=kind,
        message_id=event.message_id,
        timestamp=event.time,
        recipient=event.recipient,
        tenant=tenant,
        campaign=campaign,
        reporter=provider,
        external_id=event.id,
    )
    if kind is RecordType.OOB:
        reply = _bounce_reply(event)
        verdict = classifier.classify(reply)
        return msgspec.structs.replace(
            record, response=Response.of(reply), classification=verdict.category.value
        )
    if kind is RecordType.FEEDBACK:
        return msgspec.structs.replace(record, feedback_type=event.feedback_type or "abuse")
    if kind is RecordType.CLICK:
        return msgspec.structs.replace(record, url=event.url)
    if kind is RecordType.REMOTE_DELIVERY:
        return msgspec.structs.replace(record, reason=event.text or f"delivered ({provider})")
    return record


def _bounce_reply(event: ProviderEvent) -> Reply:
    """The reply a bounce event stands for: its own code, else 550 (hard) or 450 (soft)."""
    temporary = event.type in _TEMPORARY or event.bounce_type in _SOFT
    code = event.code if event.code >= 400 else (450 if temporary else 550)
    if temporary and code >= 500:
        code = 450
    return Reply(code, event.enhanced, event.text or f"{event.type} ({event.bounce_type})")


# --------------------------------------------------------------------- signatures, pure


def verify(header: str | None, body: bytes, secret: str, now: float, tolerance: float) -> None:
    """Raise SignatureRefused unless ``header`` signs ``body`` with ``secret`` near ``now``."""
    if not header:
        raise SignatureRefused(f"no {HEADER} header: every call must be signed")
    fields = [part.strip().partition("=") for part in header.split(",")]
    stamps = [value for key, _, value in fields if key == "t"]
    digests = [value for key, _, value in fields if key == "v1"]
    if len(stamps) != 1 or not stamps[0].isdigit() or not digests:
        raise SignatureRefused(f"{HEADER} must be t=<unix seconds>,v1=<hex digest>")
    stamp = int(stamps[0])
    if abs(now - stamp) > tolerance:
        raise SignatureRefused(
            f"the signature's time is {abs(now - stamp):.0f} s from now; at most "
            f"{tolerance:.0f} s is taken (a replayed call, or a clock that is off)"
        )
    expected = hmac.new(secret.encode(), f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
    if not any(hmac.compare_digest(expected, digest) for digest in digests):
        raise SignatureRefused("the signature does not match the body with this provider's secret")


def secret_for(provider: str, configured: Mapping[str, str], environ: Mapping[str, str]) -> str:
    """The provider's secret: ``WEBHOOK_SECRET_<PROVIDER>`` (upper case, ``-`` as ``_``) in
    the environment first, then the configuration. Raises UnknownProvider for neither."""
    variable = "WEBHOOK_SECRET_" + provider.upper().replace("-", "_")
    secret = environ.get(variable) or configured.get(provider, "")
    if not secret:
        raise UnknownProvider(
            f"no secret for provider {provider!r}: set {variable} or "
            f'[provider_webhooks.secrets] {provider} = "..."'
        )
    return secret


# --------------------------------------------------------------------- the service


@dataclass
class ProviderEvents:
    """Takes signed provider calls, dedupes their events and records them."""

    store: ProviderEventStore
    status: StatusStore
    suppressions: Suppressions
    records: EventSink
    classifier: Classifier
    secrets: Mapping[str, str]
    tolerance: float
    environ: Mapping[str, str] = field(default_factory=lambda: os.environ)
    clock: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        self._in_flight: set[tuple[str, str]] = set()  # applied by a call not yet remembered

    async def receive(self, provider: str, signature: str | None, body: bytes) -> ProviderReceipt:
        if not PROVIDER_NAME.fullmatch(provider):
            raise UnknownProvider(f"{provider!r} is not a provider name")
        now = self.clock()
        verify(
            signature, body, secret_for(provider, self.secrets, self.environ), now, self.tolerance
        )
        events = parse_events(body, now)
        seen = await self.store.seen(provider, {event.id for event in events})
        await self.status.flush()  # the messages' own records first
        results: list[ProviderOutcome] = []
        applied: list[tuple[str, str, str, str]] = []
        taken: list[tuple[str, str]] = []
        try:
            for event in events:
                key = (provider, event.id)
                if event.id in seen or key in self._in_flight:
                    results.append(
                        ProviderOutcome(event.id, "duplicate", "already applied: no change")
                    )
                    continue
                outcome = await self._apply(provider, event)
                results.append(outcome)
                if outcome.outcome == "applied":
                    self._in_flight.add(key)
                    taken.append(key)
                    applied.append((event.id, event.message_id, event.type, outcome.outcome))
            await self._written()
            await self.store.remember(provider, applied, now)
        finally:
            self._in_flight.difference_update(taken)
        duplicates = sum(1 for r in results if r.outcome == "duplicate")
        log.info(
            "provider %s: %d event(s), %d applied, %d duplicate(s)",
            provider,
            len(events),
            len(applied),
            duplicates,
        )
        return ProviderReceipt(provider, len(applied), duplicates, results)

    async def _apply(self, provider: str, event: ProviderEvent) -> ProviderOutcome:
        kind = record_type(event)
        if kind is None:
            return ProviderOutcome(
                event.id, "ignored", f"type {event.type!r} is not one Epoxi takes"
            )
        found = await self.status.addressees(event.message_id)
        if found is None:
            return ProviderOutcome(
                event.id, "unknown_message", f"no message {event.message_id!r} here"
            )
        tenant, campaign, recipients = found
        if event.recipient.lower() not in recipients:
            detail = f"{event.recipient} is not a recipient of {event.message_id}"
            return ProviderOutcome(event.id, "unknown_recipient", detail)
        record = record_of(provider, event, kind, (tenant, campaign), self.classifier)
        self.records.emit(record)
        return ProviderOutcome(event.id, "applied", record.type.value)

    async def _written(self) -> None:
        """Wait until the records of this call are in the status store and the suppression
        lists, so the events can be remembered as applied."""
        await self.suppressions.settle()
        await self.status.flush()

    async def purge(self, keep: float) -> None:
        await self.store.purge(self.clock() - keep)
