"""The platform store on SQLite: ``store.db`` in the data dir, shared by the node's workers."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from epoxi.errors import AlreadyExists
from epoxi.store import platform_sql as sql
from epoxi.store.platform import TemplateSummary, TemplateVersion, Tenant
from epoxi.store.thread import StoreThread, immediate


class SqlitePlatformStore(StoreThread):
    def __init__(self, path: Path) -> None:
        super().__init__(path, "platform")

    # ----------------------------------------------------------------- tenants

    async def create_tenant(self, tenant: Tenant) -> Tenant:
        def run(conn: sqlite3.Connection) -> None:
            try:
                conn.execute(sql.INSERT_TENANT, sql.tenant_values(tenant))
            except sqlite3.IntegrityError as exc:
                raise AlreadyExists(f"tenant {tenant.id!r} exists") from exc

        await self.call(run)
        return tenant

    async def tenant(self, tenant_id: str) -> Tenant | None:
        def run(conn: sqlite3.Connection) -> Tenant | None:
            row = conn.execute(sql.SELECT_TENANT, (tenant_id,)).fetchone()
            return sql.tenant_of(row) if row else None

        return await self.call(run)

    async def tenants(self) -> list[Tenant]:
        return await self.call(
            lambda conn: [sql.tenant_of(row) for row in conn.execute(sql.SELECT_TENANTS)]
        )

    async def update_tenant(self, tenant_id: str, changes: dict[str, object]) -> Tenant | None:
        statement, values = sql.update_tenant_sql(changes)

        def run(conn: sqlite3.Connection) -> Tenant | None:
            with immediate(conn):
                conn.execute(statement, (*values, time.time(), tenant_id))
                row = conn.execute(sql.SELECT_TENANT, (tenant_id,)).fetchone()
            return sql.tenant_of(row) if row else None

        return await self.call(run)

    # ----------------------------------------------------------------- templates

    async def create_template(self, first: TemplateVersion) -> TemplateVersion:
        def run(conn: sqlite3.Connection) -> None:
            try:
                conn.execute(sql.INSERT_TEMPLATE, sql.template_values(first))
            except sqlite3.IntegrityError as exc:
                raise AlreadyExists(
                    f"tenant {first.tenant_id!r} has a template named {first.name!r}"
                ) from exc

        await self.call(run)
        return first

    async def add_version(self, version: TemplateVersion, activate: bool) -> TemplateVersion | None:
        def run(conn: sqlite3.Connection) -> TemplateVersion | None:
            with immediate(conn):
                latest = conn.execute(sql.LATEST_VERSION, (version.id,)).fetchone()[0]
                if latest is None:
                    return None
                made = sql.next_version(version, latest, activate)
                if activate:
                    conn.execute(sql.DEACTIVATE, (version.id,))
                conn.execute(sql.INSERT_TEMPLATE, sql.template_values(made))
            return made

        return await self.call(run)

    async def activate(self, template_id: str, version: int) -> TemplateVersion | None:
        def run(conn: sqlite3.Connection) -> TemplateVersion | None:
            with immediate(conn):
                found = conn.execute(sql.SELECT_VERSION, (template_id, version)).fetchone()
                if found is None:
                    return None
                conn.execute(sql.DEACTIVATE, (template_id,))
                conn.execute(sql.ACTIVATE, (template_id, version))
            return sql.activated(found)

        return await self.call(run)

    async def template(
        self, template_id: str, version: int | None = None
    ) -> TemplateVersion | None:
        def run(conn: sqlite3.Connection) -> TemplateVersion | None:
            if version is None:
                row = conn.execute(sql.SELECT_ACTIVE, (template_id,)).fetchone()
            else:
                row = conn.execute(sql.SELECT_VERSION, (template_id, version)).fetchone()
            return sql.template_of(row) if row else None

        return await self.call(run)

    async def versions(self, template_id: str) -> list[TemplateVersion]:
        return await self.call(
            lambda conn: [
                sql.template_of(row) for row in conn.execute(sql.SELECT_VERSIONS, (template_id,))
            ]
        )

    async def templates(self, tenant_id: str | None) -> list[TemplateSummary]:
        def run(conn: sqlite3.Connection) -> list[TemplateSummary]:
            if tenant_id is None:
                rows = conn.execute(sql.SELECT_SUMMARIES)
            else:
                rows = conn.execute(sql.SELECT_TENANT_SUMMARIES, (tenant_id,))
            return [sql.summary_of(row) for row in rows]

        return await self.call(run)

    async def delete_template(self, template_id: str) -> bool:
        return await self.call(
            lambda conn: conn.execute(sql.DELETE_TEMPLATE, (template_id,)).rowcount > 0
        )
