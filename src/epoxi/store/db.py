"""The store database: one SQLite file in the data dir, its schema versioned and migrated.

``PRAGMA user_version`` holds the schema version; :func:`connect` applies every step above
it, in one transaction each, so a store written by an older Epoxi opens in a newer one.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from epoxi import schema
from epoxi.events.lifecycle import COUNTERS

SCHEMA_VERSION = 7

_COUNT_COLUMNS = ",\n        ".join(f"{c} BIGINT NOT NULL DEFAULT 0" for c in COUNTERS)
# The platform's emails, analytics and bulk jobs: one text for SQLite (step 7) and PostgreSQL
# (store/platform_sql.py)
ACTIVITY_TABLES = [
    """CREATE TABLE IF NOT EXISTS emails (
        id TEXT PRIMARY KEY,
        tenant_id TEXT NOT NULL,
        recipient TEXT NOT NULL,
        recipient_name TEXT NOT NULL DEFAULT '',
        template_id TEXT NOT NULL DEFAULT '',
        template_version INTEGER NOT NULL DEFAULT 0,
        bulk_job_id TEXT NOT NULL DEFAULT '',
        metadata TEXT,
        status TEXT NOT NULL,
        last_error TEXT NOT NULL DEFAULT '',
        counted TEXT NOT NULL DEFAULT '',
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        variables TEXT,
        resent_from TEXT NOT NULL DEFAULT '',
        sender TEXT NOT NULL DEFAULT ''
    )""",
    """CREATE TABLE IF NOT EXISTS dead_letters (
        email_id TEXT NOT NULL,
        recipient TEXT NOT NULL,
        tenant_id TEXT NOT NULL,
        template_id TEXT NOT NULL,
        reason TEXT NOT NULL,
        last_error TEXT NOT NULL,
        failed_at DOUBLE PRECISION NOT NULL,
        resent_as TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (email_id, recipient)
    )""",
    "CREATE INDEX IF NOT EXISTS dead_letters_by_tenant ON dead_letters (tenant_id, failed_at)",
    f"""CREATE TABLE IF NOT EXISTS analytics_hourly (
        tenant_id TEXT NOT NULL,
        template_id TEXT NOT NULL,
        hour BIGINT NOT NULL,
        {_COUNT_COLUMNS},
        PRIMARY KEY (tenant_id, hour, template_id)
    )""",
    """CREATE TABLE IF NOT EXISTS bulk_jobs (
        id TEXT PRIMARY KEY,
        tenant_id TEXT NOT NULL,
        template_id TEXT NOT NULL,
        template_version INTEGER NOT NULL,
        idempotency_key TEXT NOT NULL DEFAULT '',
        fingerprint TEXT NOT NULL DEFAULT '',
        total BIGINT NOT NULL,
        processed BIGINT NOT NULL DEFAULT 0,
        rendered BIGINT NOT NULL DEFAULT 0,
        queued BIGINT NOT NULL DEFAULT 0,
        suppressed BIGINT NOT NULL DEFAULT 0,
        failed BIGINT NOT NULL DEFAULT 0,
        state TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        finished_at DOUBLE PRECISION
    )""",
    "CREATE UNIQUE INDEX IF NOT EXISTS bulk_keys ON bulk_jobs (tenant_id, idempotency_key)"
    " WHERE idempotency_key <> ''",
    """CREATE TABLE IF NOT EXISTS bulk_errors (
        job_id TEXT NOT NULL,
        idx BIGINT NOT NULL,
        email TEXT NOT NULL,
        error TEXT NOT NULL,
        PRIMARY KEY (job_id, idx)
    )""",
]


_STEPS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE messages (
            id TEXT PRIMARY KEY,
            tenant TEXT NOT NULL DEFAULT '',
            campaign TEXT NOT NULL DEFAULT '',
            sender TEXT NOT NULL DEFAULT '',
            origin TEXT NOT NULL DEFAULT '',
            size INTEGER NOT NULL DEFAULT 0,
            received_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )""",
        """CREATE TABLE recipients (
            message_id TEXT NOT NULL,
            recipient TEXT NOT NULL,
            state TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            last_response TEXT NOT NULL DEFAULT '',
            next_attempt REAL NOT NULL DEFAULT 0,
            updated_at REAL NOT NULL,
            PRIMARY KEY (message_id, recipient)
        ) WITHOUT ROWID""",
        """CREATE TABLE events (
            seq INTEGER PRIMARY KEY,
            message_id TEXT NOT NULL,
            record BLOB NOT NULL
        )""",
        "CREATE INDEX events_by_message ON events (message_id, seq)",
        "CREATE INDEX messages_by_update ON messages (updated_at)",
        """CREATE TABLE idempotency (
            tenant TEXT NOT NULL,
            key TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            response BLOB NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (tenant, key)
        ) WITHOUT ROWID""",
        """CREATE TABLE api_keys (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            secret_hash BLOB NOT NULL,
            scopes TEXT NOT NULL,
            tenant TEXT NOT NULL DEFAULT '',
            created_at REAL NOT NULL,
            revoked_at REAL
        )""",
    ],
    2: [  # traffic shaping automation: active actions, and matches of threshold rules
        """CREATE TABLE automation (
            id TEXT PRIMARY KEY,
            rule TEXT NOT NULL,
            scope TEXT NOT NULL,
            version INTEGER NOT NULL,
            started REAL NOT NULL,
            until REAL NOT NULL,
            ended REAL,
            entry BLOB NOT NULL
        )""",
        "CREATE INDEX automation_by_rule ON automation (rule, scope, ended)",
        """CREATE TABLE automation_hits (
            rule TEXT NOT NULL,
            scope TEXT NOT NULL,
            at REAL NOT NULL
        )""",
        "CREATE INDEX automation_hits_by_rule ON automation_hits (rule, scope, at)",
        # grows with every change of the automation table, never down (a purge included)
        "CREATE TABLE automation_version (version INTEGER NOT NULL)",
        "INSERT INTO automation_version VALUES (0)",
        # IP warm-up (store/warmup.py): jobs sent per UTC day, and paused warm-ups
        """CREATE TABLE warmup_sent (
            day INTEGER NOT NULL,
            source TEXT NOT NULL,
            provider TEXT NOT NULL,
            worker INTEGER NOT NULL,
            sent INTEGER NOT NULL,
            PRIMARY KEY (day, source, provider, worker)
        ) WITHOUT ROWID""",
        """CREATE TABLE warmup_paused (
            source TEXT PRIMARY KEY,
            reason TEXT NOT NULL,
            paused_at REAL NOT NULL
        )""",
    ],
    3: [  # suppression lists (store/suppressions.py): per tenant, "*" the operator's global one
        """CREATE TABLE suppressions (
            tenant TEXT NOT NULL,
            address TEXT NOT NULL,
            reason TEXT NOT NULL,
            detail TEXT NOT NULL DEFAULT '',
            created_at REAL NOT NULL,
            PRIMARY KEY (tenant, address)
        ) WITHOUT ROWID""",
        # each add and removal, so a worker applies what changed to its copy (purged after
        # an hour: a worker further behind reads the whole list again); reason '' = removed
        """CREATE TABLE suppression_changes (
            version INTEGER PRIMARY KEY,
            tenant TEXT NOT NULL,
            address TEXT NOT NULL,
            reason TEXT NOT NULL,
            at REAL NOT NULL
        )""",
        # grows with every change, never down (a purge included)
        "CREATE TABLE suppression_version (version INTEGER NOT NULL)",
        "INSERT INTO suppression_version VALUES (0)",
    ],
    4: [  # event webhooks (store/webhooks.py): endpoints, and the events waiting to be sent
        """CREATE TABLE webhooks (
            id TEXT PRIMARY KEY,
            tenant TEXT NOT NULL,
            url TEXT NOT NULL,
            events TEXT NOT NULL,
            secret TEXT NOT NULL,
            old_secret TEXT NOT NULL DEFAULT '',
            old_secret_until REAL NOT NULL DEFAULT 0,
            created_at REAL NOT NULL
        )""",
        """CREATE TABLE webhook_queue (
            seq INTEGER PRIMARY KEY,
            endpoint TEXT NOT NULL,
            event BLOB NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            next_at REAL NOT NULL,
            created_at REAL NOT NULL
        )""",
        "CREATE INDEX webhook_queue_due ON webhook_queue (endpoint, next_at, seq)",
        """CREATE TABLE webhook_state (
            endpoint TEXT PRIMARY KEY,
            last_error TEXT NOT NULL DEFAULT '',
            last_error_at REAL NOT NULL DEFAULT 0,
            last_success_at REAL NOT NULL DEFAULT 0,
            failures INTEGER NOT NULL DEFAULT 0,
            dropped INTEGER NOT NULL DEFAULT 0
        )""",
        "CREATE TABLE webhooks_version (version INTEGER NOT NULL)",
        "INSERT INTO webhooks_version VALUES (0)",
    ],
    5: [  # provider webhook events taken in (store/provider_events.py): the dedupe key
        """CREATE TABLE provider_events (
            provider TEXT NOT NULL,
            event_id TEXT NOT NULL,
            message_id TEXT NOT NULL,
            type TEXT NOT NULL,
            outcome TEXT NOT NULL,
            received_at REAL NOT NULL,
            PRIMARY KEY (provider, event_id)
        ) WITHOUT ROWID""",
        "CREATE INDEX provider_events_age ON provider_events (received_at)",
    ],
    6: [  # the sending platform (store/platform.py): tenants and stored templates
        """CREATE TABLE tenants (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            status TEXT NOT NULL,
            default_pool TEXT NOT NULL DEFAULT '',
            dkim_domain TEXT NOT NULL DEFAULT '',
            sender TEXT NOT NULL DEFAULT '',
            requests_per_second REAL NOT NULL DEFAULT 0,
            recipients_per_day INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )""",
        """CREATE TABLE templates (
            id TEXT NOT NULL,
            version INTEGER NOT NULL,
            tenant_id TEXT NOT NULL,
            name TEXT NOT NULL,
            subject_template TEXT NOT NULL,
            html_template TEXT NOT NULL,
            text_template TEXT,
            is_active INTEGER NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (id, version)
        )""",
        # a name once per tenant: every template has a version 1 while it exists
        "CREATE UNIQUE INDEX template_names ON templates (tenant_id, name) WHERE version = 1",
    ],
    # the platform's emails, hourly counts, bulk jobs and dead letters; tenants' tracking
    7: [*ACTIVITY_TABLES, "ALTER TABLE tenants ADD COLUMN tracking INTEGER NOT NULL DEFAULT 0"],
}


def store_path(data_dir: Path) -> Path:
    return data_dir / "store.db"


def connect(path: Path, *, check_same_thread: bool = True) -> sqlite3.Connection:
    """Open (creating if needed) and migrate the store at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(
        path, isolation_level=None, timeout=10.0, check_same_thread=check_same_thread
    )
    if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":  # set once, not per worker
        conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")  # history, not mail: the spool holds the mail
    conn.execute("PRAGMA foreign_keys=ON")
    migrate(conn)
    return conn


def migrate(conn: sqlite3.Connection) -> None:
    """A new store runs every step in order; an older one the steps after its version."""
    try:
        schema.migrate(
            conn,
            target=SCHEMA_VERSION,
            create=[sql for step in sorted(_STEPS) for sql in _STEPS[step]],
            upgrades={step - 1: sqls for step, sqls in _STEPS.items()},
        )
    except schema.SchemaTooNew as exc:
        raise sqlite3.DatabaseError(f"store {exc}") from exc
