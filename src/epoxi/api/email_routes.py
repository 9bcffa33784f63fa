"""``GET /emails/{email_id}`` and ``GET /analytics``: what became of the platform's mail.

An email's status is the platform's (``events/lifecycle.py``, docs/platform.md); its events
are the message's records, each with the status it set. Analytics adds up the hourly rollups
the records keep current, so a query reads at most one row per template and hour.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from litestar import Request, get
from litestar.exceptions import NotFoundException
from litestar.params import FromPath, QueryParameter

from epoxi.api.auth import acting_tenant
from epoxi.api.context import context
from epoxi.api.problems import problem_responses
from epoxi.api_types import (
    Analytics,
    AnalyticsBucket,
    AnalyticsCounts,
    AnalyticsRates,
    EmailEvent,
    EmailRecipient,
    EmailView,
)
from epoxi.errors import InvalidField
from epoxi.events.lifecycle import COUNTERS, HOUR, error_of, status_of
from epoxi.events.records import Record
from epoxi.store.keys import Scope
from epoxi.store.platform import Email, HourCounts
from epoxi.store.status import MessageStatus

DAY = 24 * HOUR
DEFAULT_SPAN = timedelta(days=7)
MAX_SPAN = timedelta(days=400)

TenantQuery = Annotated[
    str | None,
    QueryParameter(
        max_length=100, description="the tenant (a tenant-bound key's own when not given)"
    ),
]


@get(
    "/emails/{email_id:str}",
    opt={"scope": Scope.READ},
    responses=problem_responses(401, 403, 404, 422),
    summary="An email's status and lifecycle events (Mailsystem's /emails)",
    tags=["messages"],
)
async def email(
    request: Request[Any, Any, Any], email_id: FromPath[str], tenant_id: TenantQuery = None
) -> EmailView:
    ctx = context(request)
    tenant = acting_tenant(request, tenant_id, "reads")
    await ctx.activity.flush()  # its latest records may still wait in the buffer
    row = await ctx.platform.email(email_id)
    message = await ctx.status.message(email_id)
    if message is None and row is not None:  # held by another worker: it flushes first
        message = next(iter(await ctx.peers.ask(request, MessageStatus)), None)
    owner = row.tenant_id if row is not None else message.tenant if message else None
    if owner is None or (tenant and owner != tenant):
        raise NotFoundException(f"tenant {tenant!r} has no email {email_id!r}")
    return _view(email_id, owner, row, message)


@get(
    "/analytics",
    opt={"scope": Scope.READ},
    responses=problem_responses(400, 401, 403, 422),
    summary="Counts and rates per hour or day (Mailsystem's /analytics)",
    tags=["messages"],
)
async def analytics(
    request: Request[Any, Any, Any],
    tenant_id: TenantQuery = None,
    from_: Annotated[
        str | None,
        QueryParameter(
            name="from", max_length=40, description="start, ISO 8601 (7 days before 'to')"
        ),
    ] = None,
    to: Annotated[
        str | None, QueryParameter(max_length=40, description="end, excluded (now)")
    ] = None,
    group_by: Annotated[Literal["hour", "day"], QueryParameter()] = "day",
    template_id: Annotated[str | None, QueryParameter(max_length=100)] = None,
) -> Analytics:
    ctx = context(request)
    tenant = acting_tenant(request, tenant_id, "reads")
    if not tenant:
        raise InvalidField("tenant_id", "name the tenant whose analytics to show")
    end = moment("to", to) if to is not None else datetime.now(UTC)
    start = moment("from", from_) if from_ is not None else end - DEFAULT_SPAN
    if not start < end:
        raise InvalidField("from", "'from' must be before 'to'")
    if end - start > MAX_SPAN:
        raise InvalidField("from", f"at most {MAX_SPAN.days} days at a time")
    await ctx.activity.flush()
    hours = await ctx.platform.hourly_counts(
        tenant, start.timestamp(), end.timestamp(), template_id
    )
    return _analytics(tenant, template_id, group_by, start, end, hours)


# --------------------------------------------------------------------- emails


def _view(
    email_id: str, tenant: str, row: Email | None, message: MessageStatus | None
) -> EmailView:
    records = message.events if message is not None else []
    created = row.created_at if row else message.received_at if message else time.time()
    updated = max(row.updated_at if row else 0.0, message.updated_at if message else 0.0)
    recipient = row.recipient if row else message.recipients[0].recipient if message else ""
    return EmailView(
        email_id=email_id,
        tenant_id=tenant,
        status=row.status if row else _status(records),
        recipient=EmailRecipient(email=recipient, name=row.recipient_name if row else ""),
        template_id=row.template_id if row and row.template_id else None,
        template_version=row.template_version if row and row.template_version else None,
        bulk_job_id=row.bulk_job_id if row and row.bulk_job_id else None,
        metadata=row.metadata if row else None,
        last_error=(row.last_error if row else _last_error(records)) or None,
        created_at=as_datetime(created),
        updated_at=as_datetime(max(updated, created)),
        events=[_event(r) for r in records],
    )


def _event(record: Record) -> EmailEvent:
    status = status_of(record)
    return EmailEvent(
        type=record.type.value,
        status=status.value if status else None,
        at=as_datetime(record.timestamp),
        detail=error_of(record) or record.reason,
        url=record.url,
    )


def _status(records: list[Record]) -> str:
    """The status of mail with no email row (POST /messages, SMTP): its last one set."""
    statuses = [s for r in records if (s := status_of(r)) is not None]
    return statuses[-1].value if statuses else "queued"


def _last_error(records: list[Record]) -> str:
    return next((e for r in reversed(records) if (e := error_of(r))), "")


# --------------------------------------------------------------------- analytics


def _analytics(
    tenant: str,
    template_id: str | None,
    group_by: Literal["hour", "day"],
    start: datetime,
    end: datetime,
    hours: list[HourCounts],
) -> Analytics:
    size = DAY if group_by == "day" else HOUR
    buckets: dict[int, dict[str, int]] = {}
    for hour in hours:
        bucket = buckets.setdefault(int(hour.hour) // size * size, dict.fromkeys(COUNTERS, 0))
        for name, count in hour.counts.items():
            bucket[name] += count
    totals = dict.fromkeys(COUNTERS, 0)
    for bucket in buckets.values():
        for name, count in bucket.items():
            totals[name] += count
    return Analytics(
        tenant_id=tenant,
        template_id=template_id,
        group_by=group_by,
        from_=start,
        to=end,
        totals=AnalyticsCounts(**totals),
        rates=_rates(totals),
        buckets=[
            AnalyticsBucket(
                start=as_datetime(at), counts=AnalyticsCounts(**counts), rates=_rates(counts)
            )
            for at, counts in sorted(buckets.items())
        ],
    )


def _rates(counts: dict[str, int]) -> AnalyticsRates:
    accepted, delivered = counts["accepted"], counts["delivered"]
    return AnalyticsRates(
        delivery=_ratio(delivered, accepted),
        bounce=_ratio(counts["bounced"], accepted),
        complaint=_ratio(counts["complained"], delivered),
        open=_ratio(counts["opened"], delivered),
        click=_ratio(counts["clicked"], delivered),
    )


def _ratio(part: int, whole: int) -> float:
    return round(part / whole, 4) if whole else 0.0


def moment(field: str, value: str) -> datetime:
    """A date ("2026-12-01") or a time ("2026-12-01T10:00:00Z"); UTC unless it says."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as exc:
        raise InvalidField(field, f"not an ISO 8601 date or time: {value!r}") from exc
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def as_datetime(timestamp: float) -> datetime:
    """A unix time as the platform's routes answer it (ISO 8601, UTC)."""
    return datetime.fromtimestamp(timestamp, UTC)
