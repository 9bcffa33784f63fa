"""The platform store's SQL, one text for both backends, and its rows as records.

Statements are written with ``?`` placeholders (SQLite's); :func:`numbered` turns them into
PostgreSQL's ``$1, $2, ...``. The tables are the same on both (``store/db.py`` step 6 for
SQLite, :data:`POSTGRES_SCHEMA` for PostgreSQL).
"""

from __future__ import annotations

import re
from typing import Any, Protocol

import msgspec

from epoxi.store.platform import (
    TENANT_CHANGEABLE,
    TemplateSummary,
    TemplateVersion,
    Tenant,
    TenantStatus,
)

TENANT_COLUMNS = (
    "id, name, status, default_pool, dkim_domain, sender, requests_per_second,"
    " recipients_per_day, created_at, updated_at"
)
TEMPLATE_COLUMNS = (
    "id, version, tenant_id, name, subject_template, html_template, text_template, is_active,"
    " created_at"
)

INSERT_TENANT = f"INSERT INTO tenants ({TENANT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
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
