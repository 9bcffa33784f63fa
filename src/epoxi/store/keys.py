"""API keys: scopes, an optional tenant, kept as SHA-256 hashes of their secret part.

A key reads ``epx_<id>_<secret>``. The id finds the row; the secret is 192 random bits, so a
plain SHA-256 is enough (no password stretching needed) and is compared in constant time.
Only ``create`` ever sees the whole key.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from epoxi.config import parse_hostport
from epoxi.errors import ConfigError
from epoxi.store.db import connect

PREFIX = "epx_"


class Scope(StrEnum):
    SEND = "send"  # inject mail
    READ = "read"  # message status, metrics
    ADMIN = "admin"  # queues: inspect, suspend, bounce, retry


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    scopes: frozenset[Scope]
    tenant: str  # "" means any tenant
    created_at: float
    revoked_at: float | None = None

    def allows(self, scope: Scope) -> bool:
        return scope in self.scopes


class KeyStore:
    """Keys in the store database; safe to use from the CLI while the server runs."""

    def __init__(self, path: Path) -> None:
        self._conn = connect(path)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> KeyStore:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def create(self, name: str, scopes: set[Scope], tenant: str = "") -> tuple[ApiKey, str]:
        """A new key and its secret text (shown once, never stored)."""
        if not scopes:
            raise ValueError("a key needs at least one scope")
        key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(24)
        key = ApiKey(key_id, name, frozenset(scopes), tenant, time.time())
        self._conn.execute(
            "INSERT INTO api_keys (id, name, secret_hash, scopes, tenant, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (key_id, name, _hash(secret), _scopes_text(key.scopes), tenant, key.created_at),
        )
        return key, f"{PREFIX}{key_id}_{secret}"

    def list(self, *, include_revoked: bool = False) -> list[ApiKey]:
        sql = "SELECT id, name, scopes, tenant, created_at, revoked_at FROM api_keys"
        if not include_revoked:
            sql += " WHERE revoked_at IS NULL"
        return [_key(row) for row in self._conn.execute(sql + " ORDER BY created_at")]

    def revoke(self, key_id: str) -> bool:
        """Revoke a key by id (or by its full text); False if no active key matched."""
        if key_id.startswith(PREFIX):
            key_id = key_id[len(PREFIX) :].split("_", 1)[0]
        cursor = self._conn.execute(
            "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
            (time.time(), key_id),
        )
        return cursor.rowcount > 0

    def any_active(self) -> bool:
        row = self._conn.execute("SELECT 1 FROM api_keys WHERE revoked_at IS NULL LIMIT 1")
        return row.fetchone() is not None

    def authenticate(self, token: str) -> ApiKey | None:
        """The active key ``token`` is, or None."""
        if not token.startswith(PREFIX):
            return None
        key_id, _, secret = token[len(PREFIX) :].partition("_")
        row = self._conn.execute(
            "SELECT id, name, scopes, tenant, created_at, revoked_at, secret_hash "
            "FROM api_keys WHERE id = ?",
            (key_id,),
        ).fetchone()
        if row is None or row[5] is not None:
            return None
        if not hmac.compare_digest(row[6], _hash(secret)):
            return None
        return _key(row[:6])


def _hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def _scopes_text(scopes: frozenset[Scope]) -> str:
    return ",".join(sorted(s.value for s in scopes))


def _key(row: sqlite3.Row | tuple[object, ...]) -> ApiKey:
    key_id, name, scopes, tenant, created_at, revoked_at = row
    return ApiKey(
        id=str(key_id),
        name=str(name),
        scopes=frozenset(Scope(s) for s in str(scopes).split(",") if s),
        tenant=str(tenant),
        created_at=float(created_at),  # type: ignore[arg-type]
        revoked_at=float(revoked_at) if revoked_at is not None else None,  # type: ignore[arg-type]
    )


def check_http_exposure(listen: Iterable[str], keys: KeyStore) -> None:
    """No API keys means loopback only: refuse to listen anywhere else."""
    exposed = [address for address in listen if not _is_loopback(address)]
    if exposed and not keys.any_active():
        raise ConfigError(
            f"http_listen {', '.join(exposed)} is not loopback and no API key exists: "
            "create one with `epoxi keys create`, or listen on 127.0.0.1"
        )


def _is_loopback(address: str) -> bool:
    host, _ = parse_hostport(address, 4000)
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
