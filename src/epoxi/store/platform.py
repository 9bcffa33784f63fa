"""The sending platform's store: tenants and their stored templates (issue 15).

One port, :class:`PlatformStore`, two backends: SQLite in the data dir's ``store.db`` (the
default: nothing to install) and PostgreSQL when ``EPOXI_DATABASE_URL`` is set (several nodes
then share one). Both keep the same rows and answer the same way; the contract tests run every
case on both (tests/e2e/test_platform_store.py).

A template is a list of versions under one id; one version is active, and is what a send
uses unless it pins another. Its name is unique within its tenant.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Protocol

import msgspec

from epoxi.config import DatabaseSettings
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


class PlatformStore(Protocol):
    """Tenants and templates; every call may raise the backend's error when it is down."""

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


def open_platform_store(data_dir: Path, database: DatabaseSettings) -> PlatformStore:
    """PostgreSQL when a database URL is set, else SQLite in the data dir."""
    if database.url:
        from epoxi.store.platform_pg import PostgresPlatformStore

        return PostgresPlatformStore(database.url, database.schema_name, database.pool_size)
    from epoxi.store.platform_sqlite import SqlitePlatformStore

    return SqlitePlatformStore(store_path(data_dir))
