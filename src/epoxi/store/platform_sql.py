"""The platform store's SQL, one text for both backends, and its rows as records.

Statements are written with ``?`` placeholders (SQLite's); :func:`numbered` turns them into
PostgreSQL's ``$1, $2, ...``. The tables are the same on both (``store/db.py`` step 6 for
SQLite, :data:`POSTGRES_SCHEMA` for PostgreSQL).
"""

from __future__ import annotations

import re
from typing import Any, Protocol

import msgspec

from epoxi.events.lifecycle import COUNTERS, EmailState, EmailStatus, Tally
from epoxi.store.db import ACTIVITY_TABLES
from epoxi.store.platform import (
    TENANT_CHANGEABLE,
    BulkError,
    BulkJob,
    BulkState,
    DeadLetter,
    Email,
    HourCounts,
    TemplateSummary,
    TemplateVersion,
    Tenant,
    TenantStatus,
)

TENANT_COLUMNS = (
    "id, name, status, default_pool, dkim_domain, sender, requests_per_second,"
    " recipients_per_day, created_at, updated_at, tracking"
)
TEMPLATE_COLUMNS = (
    "id, version, tenant_id, name, subject_template, html_template, text_template, is_active,"
    " created_at"
)

INSERT_TENANT = f"INSERT INTO tenants ({TENANT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
SELECT_TENANT = f"SELECT {TENANT_COLUMNS} FROM tenants WHERE id = ?"
SELECT_TENANTS = f"SELECT {TENANT_COLUMNS} FROM tenants ORDER BY id"

INSERT_TEMPLATE = f"INSERT INTO templates ({TEMPLATE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
SELECT_VERSION = f"SELECT {TEMPLATE_COLUMNS} FROM templates WHERE id = ? AND version = ?"
SELECT_ACTIVE = f"SELECT {TEMPLATE_COLUMNS} FROM templates WHERE id = ? AND is_active"
SELECT_VERSIONS = f"SELECT {TEMPLATE_COLUMNS} FROM templates WHERE id = ? ORDER BY version"
LATEST_VERSION = "SELECT MAX(version) FROM templates WHERE id = ?"
DEACTIVATE = "UPDATE templates SET is_active = FALSE WHERE id = ? AND is_active"
ACTIVATE = "UPDATE templates SET is_active = TRUE WHERE id = ? AND version = ?"
DELETE_TEMPLATE = "DELETE FROM templates WHERE id = ?"
_SUMMARIES = """
    SELECT id, MIN(tenant_id), MIN(name),
           MAX(CASE WHEN is_active THEN version ELSE 0 END), MAX(version),
           MIN(created_at), MAX(created_at)
    FROM templates {where} GROUP BY id ORDER BY MIN(tenant_id), MIN(name)
"""
SELECT_SUMMARIES = _SUMMARIES.format(where="")
SELECT_TENANT_SUMMARIES = _SUMMARIES.format(where="WHERE tenant_id = ?")

EMAIL_COLUMNS = (
    "id, tenant_id, recipient, recipient_name, template_id, template_version, bulk_job_id,"
    " metadata, status, last_error, counted, created_at, updated_at, variables, resent_from,"
    " sender"
)
_EMAIL_VALUES = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
# at send time: a row the records made first (a quick delivery) keeps its status
INSERT_EMAIL = f"""INSERT INTO emails ({EMAIL_COLUMNS}) VALUES {_EMAIL_VALUES}
    ON CONFLICT (id) DO UPDATE SET recipient_name = excluded.recipient_name,
        template_version = excluded.template_version, bulk_job_id = excluded.bulk_job_id,
        metadata = excluded.metadata, created_at = excluded.created_at,
        variables = excluded.variables, resent_from = excluded.resent_from,
        sender = excluded.sender"""
# from the records: the status, error and counts made; the rest stays as sent
SAVE_EMAIL_STATE = f"""INSERT INTO emails ({EMAIL_COLUMNS}) VALUES {_EMAIL_VALUES}
    ON CONFLICT (id) DO UPDATE SET status = excluded.status, last_error = excluded.last_error,
        counted = excluded.counted, updated_at = excluded.updated_at"""
SELECT_EMAIL = f"SELECT {EMAIL_COLUMNS} FROM emails WHERE id = ?"

DEAD_COLUMNS = (
    "email_id, recipient, tenant_id, template_id, reason, last_error, failed_at, resent_as"
)
# the first failure of a recipient is its dead letter; a later report changes nothing
ADD_DEAD_LETTER = (
    f"INSERT INTO dead_letters ({DEAD_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (email_id, recipient) DO NOTHING"
)
_DEAD = f"SELECT {DEAD_COLUMNS} FROM dead_letters WHERE failed_at < ? {{tenant}}"
SELECT_DEAD = _DEAD.format(tenant="") + " ORDER BY failed_at DESC LIMIT ?"
SELECT_TENANT_DEAD = _DEAD.format(tenant="AND tenant_id = ?") + " ORDER BY failed_at DESC LIMIT ?"
SELECT_DEAD_LETTER = (
    f"SELECT {DEAD_COLUMNS} FROM dead_letters WHERE email_id = ? ORDER BY recipient LIMIT 1"
)
MARK_RESENT = "UPDATE dead_letters SET resent_as = ? WHERE email_id = ? AND resent_as = ''"
EMAIL_STATE_COLUMNS = "id, tenant_id, template_id, status, counted, last_error, updated_at"

_ADDED = ", ".join(f"{c} = analytics_hourly.{c} + excluded.{c}" for c in COUNTERS)
ADD_COUNTS = f"""INSERT INTO analytics_hourly (tenant_id, template_id, hour, {", ".join(COUNTERS)})
    VALUES (?, ?, ?, {", ".join("?" for _ in COUNTERS)})
    ON CONFLICT (tenant_id, hour, template_id) DO UPDATE SET {_ADDED}"""
_HOURLY = f"""SELECT hour, {", ".join(f"SUM({c})" for c in COUNTERS)} FROM analytics_hourly
    WHERE tenant_id = ? AND hour >= ? AND hour < ? {{template}} GROUP BY hour ORDER BY hour"""
SELECT_HOURLY = _HOURLY.format(template="")
SELECT_TEMPLATE_HOURLY = _HOURLY.format(template="AND template_id = ?")

BULK_COLUMNS = (
    "id, tenant_id, template_id, template_version, idempotency_key, fingerprint, total,"
    " processed, rendered, queued, suppressed, failed, state, created_at, updated_at,"
    " finished_at"
)
INSERT_BULK = (
    f"INSERT INTO bulk_jobs ({BULK_COLUMNS})"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
SELECT_BULK = f"SELECT {BULK_COLUMNS} FROM bulk_jobs WHERE id = ?"
SELECT_BULK_BY_KEY = (
    f"SELECT {BULK_COLUMNS} FROM bulk_jobs WHERE tenant_id = ? AND idempotency_key = ?"
)
SAVE_PROGRESS = """UPDATE bulk_jobs SET processed = ?, rendered = ?, queued = ?,
    suppressed = ?, failed = ?, state = ?, updated_at = ?, finished_at = ? WHERE id = ?"""
INSERT_BULK_ERROR = (
    "INSERT INTO bulk_errors (job_id, idx, email, error) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (job_id, idx) DO NOTHING"
)
SELECT_BULK_ERRORS = (
    "SELECT idx, email, error FROM bulk_errors WHERE job_id = ? AND idx > ? ORDER BY idx LIMIT ?"
)

POSTGRES_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS tenants (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        status TEXT NOT NULL,
        default_pool TEXT NOT NULL DEFAULT '',
        dkim_domain TEXT NOT NULL DEFAULT '',
        sender TEXT NOT NULL DEFAULT '',
        requests_per_second DOUBLE PRECISION NOT NULL DEFAULT 0,
        recipients_per_day BIGINT NOT NULL DEFAULT 0,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS templates (
        id TEXT NOT NULL,
        version INTEGER NOT NULL,
        tenant_id TEXT NOT NULL,
        name TEXT NOT NULL,
        subject_template TEXT NOT NULL,
        html_template TEXT NOT NULL,
        text_template TEXT,
        is_active BOOLEAN NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (id, version)
    )""",
    "CREATE UNIQUE INDEX IF NOT EXISTS template_names ON templates (tenant_id, name)"
    " WHERE version = 1",
    "ALTER TABLE tenants ADD COLUMN IF NOT EXISTS tracking BOOLEAN NOT NULL DEFAULT FALSE",
    *ACTIVITY_TABLES,
]


class Row(Protocol):
    """A result row: sqlite3's tuple or asyncpg's Record."""

    def __getitem__(self, index: int, /) -> Any: ...


_PLACEHOLDER = re.compile(r"\?")


def numbered(sql: str) -> str:
    """``?`` placeholders as PostgreSQL's ``$1, $2, ...``."""
    count = iter(range(1, 1000))
    return _PLACEHOLDER.sub(lambda _: f"${next(count)}", sql)


def update_tenant_sql(changes: dict[str, object]) -> tuple[str, list[object]]:
    """The UPDATE for a PATCH; ``changes`` holds only TENANT_CHANGEABLE names (checked)."""
    unknown = set(changes) - TENANT_CHANGEABLE
    if unknown:
        raise ValueError(f"tenant fields {sorted(unknown)} cannot be changed")
    names = sorted(changes)
    sets = ", ".join(f"{name} = ?" for name in [*names, "updated_at"])
    values = [_column_value(changes[name]) for name in names]
    return f"UPDATE tenants SET {sets} WHERE id = ?", values


def _column_value(value: object) -> object:
    return value.value if isinstance(value, TenantStatus) else value


def tenant_values(tenant: Tenant) -> tuple[Any, ...]:
    return (
        tenant.id,
        tenant.name,
        tenant.status.value,
        tenant.default_pool,
        tenant.dkim_domain,
        tenant.sender,
        tenant.requests_per_second,
        tenant.recipients_per_day,
        tenant.created_at,
        tenant.updated_at,
        tenant.tracking,
    )


def tenant_of(row: Row) -> Tenant:
    return Tenant(
        id=row[0],
        name=row[1],
        status=TenantStatus(row[2]),
        default_pool=row[3],
        dkim_domain=row[4],
        sender=row[5],
        requests_per_second=float(row[6]),
        recipients_per_day=int(row[7]),
        created_at=float(row[8]),
        updated_at=float(row[9]),
        tracking=bool(row[10]),
    )


def template_values(version: TemplateVersion) -> tuple[Any, ...]:
    return (
        version.id,
        version.version,
        version.tenant_id,
        version.name,
        version.subject_template,
        version.html_template,
        version.text_template,
        version.is_active,
        version.created_at,
    )


def template_of(row: Row) -> TemplateVersion:
    return TemplateVersion(
        id=row[0],
        version=int(row[1]),
        tenant_id=row[2],
        name=row[3],
        subject_template=row[4],
        html_template=row[5],
        text_template=row[6],
        is_active=bool(row[7]),
        created_at=float(row[8]),
    )


def summary_of(row: Row) -> TemplateSummary:
    return TemplateSummary(
        id=row[0],
        tenant_id=row[1],
        name=row[2],
        active_version=int(row[3]),
        latest_version=int(row[4]),
        created_at=float(row[5]),
        updated_at=float(row[6]),
    )


def next_version(version: TemplateVersion, latest: int, activate: bool) -> TemplateVersion:
    """``version`` as the one after ``latest``."""
    return msgspec.structs.replace(version, version=latest + 1, is_active=activate)


def activated(row: Row) -> TemplateVersion:
    """The version of ``row``, now the active one."""
    return msgspec.structs.replace(template_of(row), is_active=True)


# --------------------------------------------------------------------- emails


def _json(value: dict[str, Any] | None) -> str | None:
    return None if value is None else msgspec.json.encode(value).decode()


def email_values(email: Email) -> tuple[Any, ...]:
    return (
        email.id,
        email.tenant_id,
        email.recipient,
        email.recipient_name,
        email.template_id,
        email.template_version,
        email.bulk_job_id,
        _json(email.metadata),
        email.status,
        email.last_error,
        "",
        email.created_at,
        email.updated_at,
        _json(email.variables),
        email.resent_from,
        email.sender,
    )


def email_of(row: Row) -> Email:
    return Email(
        id=row[0],
        tenant_id=row[1],
        recipient=row[2],
        recipient_name=row[3],
        template_id=row[4],
        template_version=int(row[5]),
        bulk_job_id=row[6],
        metadata=None if row[7] is None else msgspec.json.decode(row[7]),
        status=row[8],
        last_error=row[9],
        created_at=float(row[11]),
        updated_at=float(row[12]),
        variables=None if row[13] is None else msgspec.json.decode(row[13]),
        resent_from=row[14],
        sender=row[15],
    )


def state_of(row: Row) -> EmailState:
    """An email row (EMAIL_STATE_COLUMNS) as the tally takes it."""
    return EmailState(
        id=row[0],
        tenant_id=row[1],
        template_id=row[2],
        status=EmailStatus(row[3]),
        counted=set(filter(None, row[4].split(","))),
        last_error=row[5],
        updated_at=float(row[6]),
    )


def state_values(state: EmailState) -> tuple[Any, ...]:
    """A changed email (SAVE_EMAIL_STATE); a new one gets the send's fields when it comes."""
    return (
        state.id,
        state.tenant_id,
        state.recipient,
        "",
        state.template_id,
        0,
        "",
        None,
        state.status.value,
        state.last_error,
        ",".join(sorted(state.counted)),
        state.updated_at,
        state.updated_at,
        None,
        "",
        "",
    )


TallyRows = tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]]]


def tally_rows(result: Tally) -> TallyRows:
    """The rows a tally writes: (emails, counts, dead letters)."""
    emails = [state_values(state) for state in result.changed.values()]
    counts = [
        (tenant, template, hour, *(bucket.get(c, 0) for c in COUNTERS))
        for (tenant, template, hour), bucket in result.counts.items()
    ]
    dead = [
        (d.email_id, d.recipient, d.tenant_id, d.template_id, d.reason, d.last_error, d.at, "")
        for d in result.dead
    ]
    return emails, counts, dead


def dead_letter_of(row: Row) -> DeadLetter:
    return DeadLetter(
        email_id=row[0],
        recipient=row[1],
        tenant_id=row[2],
        template_id=row[3],
        reason=row[4],
        last_error=row[5],
        failed_at=float(row[6]),
        resent_as=row[7],
    )


def hour_counts_of(row: Row) -> HourCounts:
    return HourCounts(
        hour=float(row[0]), counts={c: int(row[i]) for i, c in enumerate(COUNTERS, 1)}
    )


# --------------------------------------------------------------------- bulk jobs


def bulk_values(job: BulkJob) -> tuple[Any, ...]:
    return (
        job.id,
        job.tenant_id,
        job.template_id,
        job.template_version,
        job.idempotency_key,
        job.fingerprint,
        job.total,
        job.processed,
        job.rendered,
        job.queued,
        job.suppressed,
        job.failed,
        job.state.value,
        job.created_at,
        job.updated_at,
        job.finished_at,
    )


def bulk_of(row: Row) -> BulkJob:
    return BulkJob(
        id=row[0],
        tenant_id=row[1],
        template_id=row[2],
        template_version=int(row[3]),
        idempotency_key=row[4],
        fingerprint=row[5],
        total=int(row[6]),
        processed=int(row[7]),
        rendered=int(row[8]),
        queued=int(row[9]),
        suppressed=int(row[10]),
        failed=int(row[11]),
        state=BulkState(row[12]),
        created_at=float(row[13]),
        updated_at=float(row[14]),
        finished_at=None if row[15] is None else float(row[15]),
    )


def progress_values(job: BulkJob) -> tuple[Any, ...]:
    return (
        job.processed,
        job.rendered,
        job.queued,
        job.suppressed,
        job.failed,
        job.state.value,
        job.updated_at,
        job.finished_at,
        job.id,
    )


def error_values(job_id: str, errors: list[BulkError]) -> list[tuple[Any, ...]]:
    return [(job_id, e.index, e.email, e.error) for e in errors]


def bulk_error_of(row: Row) -> BulkError:
    return BulkError(index=int(row[0]), email=row[1], error=row[2])
