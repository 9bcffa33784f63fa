"""The platform store on PostgreSQL (``EPOXI_DATABASE_URL``), through an asyncpg pool.

Its tables live in one schema (``database.schema``, ``epoxi`` by default), made on first
start; workers and nodes that start together take an advisory lock for it, so one makes the
tables and the others find them. asyncpg's prepared statements are kept per connection
(statement_cache_size=0 would be needed behind pgbouncer in transaction mode: see the docs).
"""

from __future__ import annotations

import time
from typing import Any

import asyncpg

from epoxi.config import hidden_url
from epoxi.errors import AlreadyExists, DatabaseUnavailable
from epoxi.events.lifecycle import platform_records, tally
from epoxi.events.records import Record
from epoxi.store import platform_sql as sql
from epoxi.store.platform import (
    BulkError,
    BulkJob,
    DeadLetter,
    Email,
    HourCounts,
    TemplateSummary,
    TemplateVersion,
    Tenant,
)

SCHEMA_LOCK = 0x45504F5849  # "EPOXI": the advisory lock the first start makes tables under

_Q = {
    name: sql.numbered(value)
    for name, value in vars(sql).items()
    if name.isupper()
    and isinstance(value, str)
    and value.lstrip().startswith(("SELECT", "INSERT", "UPDATE", "DELETE"))
}
_EMAIL_STATES = (
    f"SELECT {sql.EMAIL_STATE_COLUMNS} FROM emails WHERE id = ANY($1::text[]) FOR UPDATE"
)


class PostgresPlatformStore:
    transient_errors: tuple[type[Exception], ...] = (
        OSError,
        asyncpg.PostgresConnectionError,
        asyncpg.InterfaceError,
        asyncpg.CannotConnectNowError,
        asyncpg.TooManyConnectionsError,
        asyncpg.SerializationError,
        asyncpg.DeadlockDetectedError,
    )

    def __init__(self, url: str, schema: str = "epoxi", pool_size: int = 4) -> None:
        self.url = url
        self.schema = schema
        self.pool_size = pool_size
        self._pool: asyncpg.Pool | None = None

    async def start(self) -> None:
        try:
            await self._make_schema()
            self._pool = await asyncpg.create_pool(
                self.url,
                min_size=1,
                max_size=self.pool_size,
                server_settings={"search_path": self.schema},
            )
        except (OSError, asyncpg.PostgresError) as exc:
            raise DatabaseUnavailable(f"PostgreSQL at {hidden_url(self.url)}: {exc}") from exc

    async def stop(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def _make_schema(self) -> None:
        conn = await asyncpg.connect(self.url)
        try:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
                await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
                await conn.execute(f'SET LOCAL search_path TO "{self.schema}"')
                for statement in sql.POSTGRES_SCHEMA:
                    await conn.execute(statement)
        finally:
            await conn.close()

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("the platform store is not started")
        return self._pool

    # ----------------------------------------------------------------- tenants

    async def create_tenant(self, tenant: Tenant) -> Tenant:
        try:
            await self.pool.execute(_Q["INSERT_TENANT"], *sql.tenant_values(tenant))
        except asyncpg.UniqueViolationError as exc:
            raise AlreadyExists(f"tenant {tenant.id!r} exists") from exc
        return tenant

    async def tenant(self, tenant_id: str) -> Tenant | None:
        row = await self.pool.fetchrow(_Q["SELECT_TENANT"], tenant_id)
        return sql.tenant_of(row) if row else None

    async def tenants(self) -> list[Tenant]:
        return [sql.tenant_of(row) for row in await self.pool.fetch(_Q["SELECT_TENANTS"])]

    async def update_tenant(self, tenant_id: str, changes: dict[str, object]) -> Tenant | None:
        statement, values = sql.update_tenant_sql(changes)
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(sql.numbered(statement), *values, time.time(), tenant_id)
            row = await conn.fetchrow(_Q["SELECT_TENANT"], tenant_id)
        return sql.tenant_of(row) if row else None

    # ----------------------------------------------------------------- templates

    async def create_template(self, first: TemplateVersion) -> TemplateVersion:
        try:
            await self.pool.execute(_Q["INSERT_TEMPLATE"], *sql.template_values(first))
        except asyncpg.UniqueViolationError as exc:
            raise AlreadyExists(
                f"tenant {first.tenant_id!r} has a template named {first.name!r}"
            ) from exc
        return first

    async def add_version(self, version: TemplateVersion, activate: bool) -> TemplateVersion | None:
        async with self.pool.acquire() as conn, conn.transaction():
            # one new version at a time per template: the lock is the template's version 1
            locked = await conn.fetchrow(
                "SELECT 1 FROM templates WHERE id = $1 AND version = 1 FOR UPDATE", version.id
            )
            if locked is None:
                return None
            latest = await conn.fetchval(_Q["LATEST_VERSION"], version.id)
            made = sql.next_version(version, latest, activate)
            if activate:
                await conn.execute(_Q["DEACTIVATE"], version.id)
            await conn.execute(_Q["INSERT_TEMPLATE"], *sql.template_values(made))
        return made

    async def activate(self, template_id: str, version: int) -> TemplateVersion | None:
        async with self.pool.acquire() as conn, conn.transaction():
            found = await conn.fetchrow(_Q["SELECT_VERSION"] + " FOR UPDATE", template_id, version)
            if found is None:
                return None
            await conn.execute(_Q["DEACTIVATE"], template_id)
            await conn.execute(_Q["ACTIVATE"], template_id, version)
        return sql.activated(found)

    async def template(
        self, template_id: str, version: int | None = None
    ) -> TemplateVersion | None:
        if version is None:
            row = await self.pool.fetchrow(_Q["SELECT_ACTIVE"], template_id)
        else:
            row = await self.pool.fetchrow(_Q["SELECT_VERSION"], template_id, version)
        return sql.template_of(row) if row else None

    async def versions(self, template_id: str) -> list[TemplateVersion]:
        rows = await self.pool.fetch(_Q["SELECT_VERSIONS"], template_id)
        return [sql.template_of(row) for row in rows]

    async def templates(self, tenant_id: str | None) -> list[TemplateSummary]:
        rows: list[Any]
        if tenant_id is None:
            rows = await self.pool.fetch(_Q["SELECT_SUMMARIES"])
        else:
            rows = await self.pool.fetch(_Q["SELECT_TENANT_SUMMARIES"], tenant_id)
        return [sql.summary_of(row) for row in rows]

    async def delete_template(self, template_id: str) -> bool:
        status: str = await self.pool.execute(_Q["DELETE_TEMPLATE"], template_id)
        return status != "DELETE 0"

    # ----------------------------------------------------------------- emails

    async def add_emails(self, emails: list[Email]) -> None:
        await self.pool.executemany(_Q["INSERT_EMAIL"], [sql.email_values(e) for e in emails])

    async def email(self, email_id: str) -> Email | None:
        row = await self.pool.fetchrow(_Q["SELECT_EMAIL"], email_id)
        return sql.email_of(row) if row else None

    async def apply_records(self, records: list[Record]) -> None:
        kept = platform_records(records)
        if not kept:
            return
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(_EMAIL_STATES, list({r.message_id for r in kept}))
            known = {row[0]: sql.state_of(row) for row in rows}
            emails, counts, dead = sql.tally_rows(tally(kept, known))
            if emails:
                await conn.executemany(_Q["SAVE_EMAIL_STATE"], emails)
            if counts:
                await conn.executemany(_Q["ADD_COUNTS"], counts)
            if dead:
                await conn.executemany(_Q["ADD_DEAD_LETTER"], dead)

    async def hourly_counts(
        self, tenant_id: str, start: float, end: float, template_id: str | None
    ) -> list[HourCounts]:
        rows: list[Any]
        if template_id is None:
            rows = await self.pool.fetch(_Q["SELECT_HOURLY"], tenant_id, int(start), int(end))
        else:
            rows = await self.pool.fetch(
                _Q["SELECT_TEMPLATE_HOURLY"], tenant_id, int(start), int(end), template_id
            )
        return [sql.hour_counts_of(row) for row in rows]

    async def dead_letters(
        self, tenant_id: str | None, before: float | None, limit: int
    ) -> list[DeadLetter]:
        until = float("inf") if before is None else before
        rows: list[Any]
        if tenant_id is None:
            rows = await self.pool.fetch(_Q["SELECT_DEAD"], until, limit)
        else:
            rows = await self.pool.fetch(_Q["SELECT_TENANT_DEAD"], until, tenant_id, limit)
        return [sql.dead_letter_of(row) for row in rows]

    async def dead_letter(self, email_id: str) -> DeadLetter | None:
        row = await self.pool.fetchrow(_Q["SELECT_DEAD_LETTER"], email_id)
        return sql.dead_letter_of(row) if row else None

    async def mark_resent(self, email_id: str, resent_as: str) -> bool:
        status: str = await self.pool.execute(_Q["MARK_RESENT"], resent_as, email_id)
        return status != "UPDATE 0"

    # ----------------------------------------------------------------- bulk jobs

    async def create_bulk(self, job: BulkJob) -> BulkJob:
        try:
            await self.pool.execute(_Q["INSERT_BULK"], *sql.bulk_values(job))
        except asyncpg.UniqueViolationError as exc:
            raise AlreadyExists(
                f"tenant {job.tenant_id!r} has a bulk job with this idempotency key"
            ) from exc
        return job

    async def bulk(self, job_id: str) -> BulkJob | None:
        row = await self.pool.fetchrow(_Q["SELECT_BULK"], job_id)
        return sql.bulk_of(row) if row else None

    async def bulk_by_key(self, tenant_id: str, key: str) -> BulkJob | None:
        row = await self.pool.fetchrow(_Q["SELECT_BULK_BY_KEY"], tenant_id, key)
        return sql.bulk_of(row) if row else None

    async def save_progress(
        self, job: BulkJob, errors: list[BulkError], emails: list[Email]
    ) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            if emails:
                await conn.executemany(_Q["INSERT_EMAIL"], [sql.email_values(e) for e in emails])
            await conn.execute(_Q["SAVE_PROGRESS"], *sql.progress_values(job))
            if errors:
                await conn.executemany(_Q["INSERT_BULK_ERROR"], sql.error_values(job.id, errors))

    async def bulk_errors(self, job_id: str, after: int, limit: int) -> list[BulkError]:
        rows = await self.pool.fetch(_Q["SELECT_BULK_ERRORS"], job_id, after, limit)
        return [sql.bulk_error_of(row) for row in rows]
