"""The sending platform's store: tenants, stored templates, emails, bulk jobs, analytics.

One port, :class:`PlatformStore`, two backends: SQLite in the data dir's ``store.db`` (the
default: nothing to install) and PostgreSQL when ``EPOXI_DATABASE_URL`` is set (several nodes
then share one). Both keep the same rows and answer the same way; the contract tests run every
case on both (tests/e2e/test_platform_store.py).

A template is a list of versions under one id; one version is active, and is what a send
uses unless it pins another. Its name is unique within its tenant.

An email is a message of ``POST /send`` or ``/send/bulk``: its row is written when it is
spooled, and its status moves as its records arrive (``apply_records``, with the rules of
``events/lifecycle.py``), which also adds them up per tenant, template and hour for
``GET /analytics``. A bulk job is the progress of one ``/send/bulk`` and its per-recipient
errors; its idempotency key is unique per tenant.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any, Protocol

import msgspec

from epoxi.config import DatabaseSettings
from epoxi.events.buffer import BufferedWriter
from epoxi.events.records import Record
from epoxi.store.db import store_path


class TenantStatus(enum.StrEnum):
    ACTIVE = "active"
    SUSPENDED = "suspended"  # its sends are refused (403) and its queued mail is held


class Tenant(msgspec.Struct, kw_only=True, frozen=True):
    id: str
    name: str
    status: TenantStatus = TenantStatus.ACTIVE
    default_pool: str = ""  # the egress pool of its mail when a message names none
    dkim_domain: str = ""  # the d= its mail is signed with when From's domain has no key
    sender: str = ""  # the From of its /send mail when a request names none
    requests_per_second: float = 0.0  # API calls; 0: no limit
    recipients_per_day: int = 0  # 0: no limit
    tracking: bool = False  # opens, clicks and one-click unsubscribe on its mail by default
    created_at: float = 0.0
    updated_at: float = 0.0


# The fields of a tenant PATCH may change (id and the times may not)
TENANT_CHANGEABLE = frozenset(
    {
        "name",
        "status",
        "default_pool",
        "dkim_domain",
        "sender",
        "requests_per_second",
        "recipients_per_day",
        "tracking",
    }
)


class TemplateVersion(msgspec.Struct, kw_only=True, frozen=True):
    id: str
    tenant_id: str
    name: str
    version: int
    subject_template: str
    html_template: str = ""
    text_template: str | None = None  # None: made from the HTML when rendered
    is_active: bool = False
    created_at: float = 0.0


class TemplateSummary(msgspec.Struct, kw_only=True, frozen=True):
    id: str
    tenant_id: str
    name: str
    active_version: int
    latest_version: int
    created_at: float
    updated_at: float


class Email(msgspec.Struct, kw_only=True, frozen=True):
    """A message of /send or /send/bulk, as the platform keeps it."""

    id: str  # the message id: GET /emails/{id}
    tenant_id: str
    recipient: str
    recipient_name: str = ""
    template_id: str = ""
    template_version: int = 0
    bulk_job_id: str = ""
    metadata: dict[str, Any] | None = None  # as the request gave it
    variables: dict[str, Any] | None = None  # what it was rendered with: a re-send's again
    resent_from: str = ""  # the dead letter this email re-sends
    sender: str = ""  # its From, as the request or the tenant gave it
    status: str = "queued"  # an EmailStatus (events/lifecycle.py)
    last_error: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0


class DeadLetter(msgspec.Struct, kw_only=True, frozen=True):
    """A recipient of a tenant's message that failed for good (bounced, expired, or bounced
    by an operator), with its last error; ``resent_as`` once it was sent again."""

    email_id: str
    recipient: str
    tenant_id: str
    template_id: str = ""  # "" for mail not made from a template (it cannot be re-sent)
    reason: str  # the email status it ended in: bounced or failed
    last_error: str
    failed_at: float
    resent_as: str = ""


class BulkState(enum.StrEnum):
    RUNNING = "running"
    DONE = "done"


class BulkJob(msgspec.Struct, kw_only=True, frozen=True):
    """One /send/bulk: its counts move as its recipients are spooled, in groups."""

    id: str
    tenant_id: str
    template_id: str
    template_version: int
    idempotency_key: str = ""
    fingerprint: str = ""  # of the request: the same key with another body is a 409
    total: int = 0  # recipients in the request (accepted for processing)
    processed: int = 0  # recipients handled so far, in request order
    rendered: int = 0
    queued: int = 0  # spooled: committed to disk
    suppressed: int = 0  # on the tenant's suppression list: not sent
    failed: int = 0  # not sent: bad address or a rendering error (see the errors)
    state: BulkState = BulkState.RUNNING
    created_at: float = 0.0
    updated_at: float = 0.0
    finished_at: float | None = None


class BulkError(msgspec.Struct, kw_only=True, frozen=True):
    index: int  # the recipient's position in the request, from 0
    email: str
    error: str


class HourCounts(msgspec.Struct, kw_only=True, frozen=True):
    hour: float  # its start, unix time
    counts: dict[str, int]  # events.lifecycle.COUNTERS


class PlatformStore(Protocol):
    """Tenants, templates, emails, bulk jobs and analytics; every call may raise the
    backend's error when it is down (one of ``transient_errors``)."""

    transient_errors: tuple[type[Exception], ...]  # the database is down or busy: try again

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    # ----------------------------------------------------------------- tenants

    async def create_tenant(self, tenant: Tenant) -> Tenant:
        """Raises AlreadyExists when the id is taken."""
        ...

    async def tenant(self, tenant_id: str) -> Tenant | None: ...

    async def tenants(self) -> list[Tenant]: ...

    async def update_tenant(self, tenant_id: str, changes: dict[str, object]) -> Tenant | None:
        """Set the fields named in ``changes`` (of TENANT_CHANGEABLE); None: no such tenant."""
        ...

    # ----------------------------------------------------------------- templates

    async def create_template(self, first: TemplateVersion) -> TemplateVersion:
        """Store version 1, active. Raises AlreadyExists when the tenant has the name."""
        ...

    async def add_version(self, version: TemplateVersion, activate: bool) -> TemplateVersion | None:
        """Store ``version`` as the template's next one (its ``version`` field is ignored);
        None: no such template."""
        ...

    async def activate(self, template_id: str, version: int) -> TemplateVersion | None: ...

    async def template(
        self, template_id: str, version: int | None = None
    ) -> TemplateVersion | None:
        """The version asked for, or the active one."""
        ...

    async def versions(self, template_id: str) -> list[TemplateVersion]: ...

    async def templates(self, tenant_id: str | None) -> list[TemplateSummary]:
        """Every template of a tenant (None: of every tenant), by name."""
        ...

    async def delete_template(self, template_id: str) -> bool: ...

    # ----------------------------------------------------------------- emails

    async def add_emails(self, emails: list[Email]) -> None:
        """Rows for messages just spooled. A row its records made first keeps its status."""
        ...

    async def email(self, email_id: str) -> Email | None: ...

    async def apply_records(self, records: list[Record]) -> None:
        """Move the emails' statuses and add the records to the hourly counts, in one
        transaction (records of no tenant are ignored)."""
        ...

    async def hourly_counts(
        self, tenant_id: str, start: float, end: float, template_id: str | None
    ) -> list[HourCounts]:
        """The counts of the hours in [start, end), oldest first; hours with none left out."""
        ...

    async def dead_letters(
        self, tenant_id: str | None, before: float | None, limit: int
    ) -> list[DeadLetter]:
        """A tenant's dead letters (None: every tenant's), newest first, failed before
        ``before``."""
        ...

    async def dead_letter(self, email_id: str) -> DeadLetter | None: ...

    async def mark_resent(self, email_id: str, resent_as: str) -> bool:
        """Link the dead letter to its re-send; False when it was re-sent already."""
        ...

    # ----------------------------------------------------------------- bulk jobs

    async def create_bulk(self, job: BulkJob) -> BulkJob:
        """Raises AlreadyExists when the tenant has a job with the idempotency key."""
        ...

    async def bulk(self, job_id: str) -> BulkJob | None: ...

    async def bulk_by_key(self, tenant_id: str, key: str) -> BulkJob | None: ...

    async def save_progress(
        self, job: BulkJob, errors: list[BulkError], emails: list[Email]
    ) -> None:
        """The job's counts and state as they are now, with the errors and the emails (as
        :meth:`add_emails`) since the last save, in one transaction."""
        ...

    async def bulk_errors(self, job_id: str, after: int, limit: int) -> list[BulkError]:
        """The job's errors of recipients after index ``after``, by index."""
        ...


class ActivityFeed:
    """A record-log subscriber: tenants' records, written to the platform store in batches
    (off the hot path, as the status store's); a batch the database refuses waits for the
    next turn, in order."""

    def __init__(self, store: PlatformStore, *, interval: float = 0.25) -> None:
        self._buffer: BufferedWriter[Record] = BufferedWriter(
            store.apply_records,
            interval=interval,
            name="platform activity",
            retry_on=store.transient_errors,
        )

    def feed(self, record: Record) -> None:
        if record.tenant:
            self._buffer.add(record)

    def start(self) -> None:
        self._buffer.start()

    async def flush(self) -> None:
        await self._buffer.flush()

    async def stop(self) -> None:
        await self._buffer.stop()


def open_platform_store(data_dir: Path, database: DatabaseSettings) -> PlatformStore:
    """PostgreSQL when a database URL is set, else SQLite in the data dir."""
    if database.url:
        from epoxi.store.platform_pg import PostgresPlatformStore

        return PostgresPlatformStore(database.url, database.schema_name, database.pool_size)
    from epoxi.store.platform_sqlite import SqlitePlatformStore

    return SqlitePlatformStore(store_path(data_dir))
