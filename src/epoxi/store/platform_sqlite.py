"""The platform store on SQLite: ``store.db`` in the data dir, shared by the node's workers."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from epoxi.errors import AlreadyExists
from epoxi.events.lifecycle import EmailState, platform_records, tally
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
from epoxi.store.thread import StoreThread, immediate

_IDS_PER_SELECT = 500  # below SQLite's limit of bound parameters


class SqlitePlatformStore(StoreThread):
    transient_errors: tuple[type[Exception], ...] = (sqlite3.OperationalError,)

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

    # ----------------------------------------------------------------- emails

    async def add_emails(self, emails: list[Email]) -> None:
        rows = [sql.email_values(email) for email in emails]

        def run(conn: sqlite3.Connection) -> None:
            with immediate(conn):
                conn.executemany(sql.INSERT_EMAIL, rows)

        await self.call(run)

    async def email(self, email_id: str) -> Email | None:
        def run(conn: sqlite3.Connection) -> Email | None:
            row = conn.execute(sql.SELECT_EMAIL, (email_id,)).fetchone()
            return sql.email_of(row) if row else None

        return await self.call(run)

    async def apply_records(self, records: list[Record]) -> None:
        kept = platform_records(records)
        if not kept:
            return

        def run(conn: sqlite3.Connection) -> None:
            with immediate(conn):
                known = _known_emails(conn, list({r.message_id for r in kept}))
                emails, counts, dead = sql.tally_rows(tally(kept, known))
                conn.executemany(sql.SAVE_EMAIL_STATE, emails)
                conn.executemany(sql.ADD_COUNTS, counts)
                conn.executemany(sql.ADD_DEAD_LETTER, dead)

        await self.call(run)

    async def hourly_counts(
        self, tenant_id: str, start: float, end: float, template_id: str | None
    ) -> list[HourCounts]:
        def run(conn: sqlite3.Connection) -> list[HourCounts]:
            if template_id is None:
                rows = conn.execute(sql.SELECT_HOURLY, (tenant_id, start, end))
            else:
                rows = conn.execute(
                    sql.SELECT_TEMPLATE_HOURLY, (tenant_id, start, end, template_id)
                )
            return [sql.hour_counts_of(row) for row in rows]

        return await self.call(run)

    async def dead_letters(
        self, tenant_id: str | None, before: float | None, limit: int
    ) -> list[DeadLetter]:
        until = float("inf") if before is None else before

        def run(conn: sqlite3.Connection) -> list[DeadLetter]:
            if tenant_id is None:
                rows = conn.execute(sql.SELECT_DEAD, (until, limit))
            else:
                rows = conn.execute(sql.SELECT_TENANT_DEAD, (until, tenant_id, limit))
            return [sql.dead_letter_of(row) for row in rows]

        return await self.call(run)

    async def dead_letter(self, email_id: str) -> DeadLetter | None:
        def run(conn: sqlite3.Connection) -> DeadLetter | None:
            row = conn.execute(sql.SELECT_DEAD_LETTER, (email_id,)).fetchone()
            return sql.dead_letter_of(row) if row else None

        return await self.call(run)

    async def mark_resent(self, email_id: str, resent_as: str) -> bool:
        return await self.call(
            lambda conn: conn.execute(sql.MARK_RESENT, (resent_as, email_id)).rowcount > 0
        )

    # ----------------------------------------------------------------- bulk jobs

    async def create_bulk(self, job: BulkJob) -> BulkJob:
        def run(conn: sqlite3.Connection) -> None:
            try:
                conn.execute(sql.INSERT_BULK, sql.bulk_values(job))
            except sqlite3.IntegrityError as exc:
                raise AlreadyExists(
                    f"tenant {job.tenant_id!r} has a bulk job with this idempotency key"
                ) from exc

        await self.call(run)
        return job

    async def bulk(self, job_id: str) -> BulkJob | None:
        def run(conn: sqlite3.Connection) -> BulkJob | None:
            row = conn.execute(sql.SELECT_BULK, (job_id,)).fetchone()
            return sql.bulk_of(row) if row else None

        return await self.call(run)

    async def bulk_by_key(self, tenant_id: str, key: str) -> BulkJob | None:
        def run(conn: sqlite3.Connection) -> BulkJob | None:
            row = conn.execute(sql.SELECT_BULK_BY_KEY, (tenant_id, key)).fetchone()
            return sql.bulk_of(row) if row else None

        return await self.call(run)

    async def save_progress(
        self, job: BulkJob, errors: list[BulkError], emails: list[Email]
    ) -> None:
        rows = [sql.email_values(email) for email in emails]

        def run(conn: sqlite3.Connection) -> None:
            with immediate(conn):
                conn.executemany(sql.INSERT_EMAIL, rows)
                conn.execute(sql.SAVE_PROGRESS, sql.progress_values(job))
                conn.executemany(sql.INSERT_BULK_ERROR, sql.error_values(job.id, errors))

        await self.call(run)

    async def bulk_errors(self, job_id: str, after: int, limit: int) -> list[BulkError]:
        def run(conn: sqlite3.Connection) -> list[BulkError]:
            rows = conn.execute(sql.SELECT_BULK_ERRORS, (job_id, after, limit))
            return [sql.bulk_error_of(row) for row in rows]

        return await self.call(run)


def _known_emails(conn: sqlite3.Connection, ids: list[str]) -> dict[str, EmailState]:
    known: dict[str, EmailState] = {}
    for start in range(0, len(ids), _IDS_PER_SELECT):
        part = ids[start : start + _IDS_PER_SELECT]
        marks = ", ".join("?" for _ in part)
        query = f"SELECT {sql.EMAIL_STATE_COLUMNS} FROM emails WHERE id IN ({marks})"
        known.update((row[0], sql.state_of(row)) for row in conn.execute(query, part))
    return known
