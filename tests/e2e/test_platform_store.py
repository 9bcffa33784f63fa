"""The platform store's contract, every case on SQLite and on the machine's real PostgreSQL
(issue 15): tenants and versioned templates answer the same on both."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from epoxi.config import DatabaseSettings
from epoxi.errors import AlreadyExists, DatabaseUnavailable
from epoxi.store.platform import (
    PlatformStore,
    TemplateVersion,
    Tenant,
    TenantStatus,
    open_platform_store,
)
from epoxi.store.platform_pg import PostgresPlatformStore
from tests.e2e.conftest import DATABASE_URL


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[PlatformStore]:
    schema = f"t_{uuid.uuid4().hex[:12]}"
    url = DATABASE_URL if request.param == "postgres" else ""
    made = open_platform_store(tmp_path, DatabaseSettings(url=url, schema=schema))
    await made.start()
    yield made
    await made.stop()
    if request.param == "postgres":
        conn = await asyncpg.connect(DATABASE_URL)
        await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await conn.close()


def _tenant(tenant_id: str = "tenant-1") -> Tenant:
    return Tenant(id=tenant_id, name="Tenant 1", created_at=1.0, updated_at=1.0)


def _template(
    template_id: str = "tpl-1", tenant_id: str = "tenant-1", name: str = "welcome"
) -> TemplateVersion:
    return TemplateVersion(
        id=template_id,
        tenant_id=tenant_id,
        name=name,
        version=1,
        subject_template="Welcome {{name}}",
        html_template="<h1>Hello {{name}}</h1>",
        is_active=True,
        created_at=2.0,
    )


async def test_tenants_are_created_read_listed_and_updated(store: PlatformStore) -> None:
    await store.create_tenant(_tenant("b"))
    await store.create_tenant(_tenant("a"))
    assert await store.tenant("a") == _tenant("a")
    assert await store.tenant("nope") is None
    assert [t.id for t in await store.tenants()] == ["a", "b"]
    with pytest.raises(AlreadyExists, match="'a' exists"):
        await store.create_tenant(_tenant("a"))

    changed = await store.update_tenant(
        "a", {"status": TenantStatus.SUSPENDED, "recipients_per_day": 1000}
    )
    assert changed is not None
    assert (changed.status, changed.recipients_per_day, changed.name) == (
        TenantStatus.SUSPENDED,
        1000,
        "Tenant 1",
    )
    assert changed.updated_at > changed.created_at
    assert await store.tenant("a") == changed
    assert await store.update_tenant("nope", {"name": "x"}) is None
    with pytest.raises(ValueError, match="cannot be changed"):
        await store.update_tenant("a", {"id": "c"})


async def test_template_versions_one_active_at_a_time(store: PlatformStore) -> None:
    first = await store.create_template(_template())
    assert (first.version, first.is_active) == (1, True)
    second = await store.add_version(_template(), activate=False)  # a draft: 1 stays active
    assert second is not None and (second.version, second.is_active) == (2, False)
    active = await store.template("tpl-1")
    assert active is not None and active.version == 1
    pinned = await store.template("tpl-1", 2)
    assert pinned is not None and pinned.version == 2

    third = await store.add_version(_template(), activate=True)
    assert third is not None and (third.version, third.is_active) == (3, True)
    assert [(v.version, v.is_active) for v in await store.versions("tpl-1")] == [
        (1, False),
        (2, False),
        (3, True),
    ]
    back = await store.activate("tpl-1", 1)
    assert back is not None and (back.version, back.is_active) == (1, True)
    assert [v.is_active for v in await store.versions("tpl-1")] == [True, False, False]
    assert await store.activate("tpl-1", 9) is None
    assert await store.add_version(_template("nope"), activate=True) is None


async def test_concurrent_new_versions_get_distinct_numbers(store: PlatformStore) -> None:
    await store.create_template(_template())
    made = await asyncio.gather(*[store.add_version(_template(), activate=True) for _ in range(8)])
    assert sorted(v.version for v in made if v is not None) == list(range(2, 10))
    assert [v.version for v in await store.versions("tpl-1") if v.is_active] == [9]


async def test_a_name_is_once_per_tenant_and_lists_are_per_tenant(store: PlatformStore) -> None:
    await store.create_template(_template("tpl-1", "t1", "welcome"))
    await store.create_template(_template("tpl-2", "t2", "welcome"))  # another tenant: fine
    await store.create_template(_template("tpl-3", "t1", "receipt"))
    with pytest.raises(AlreadyExists, match="named 'welcome'"):
        await store.create_template(_template("tpl-4", "t1", "welcome"))
    await store.add_version(_template("tpl-1", "t1", "welcome"), activate=False)

    mine = await store.templates("t1")
    assert [(s.id, s.name, s.active_version, s.latest_version) for s in mine] == [
        ("tpl-3", "receipt", 1, 1),
        ("tpl-1", "welcome", 1, 2),
    ]
    assert {s.id for s in await store.templates(None)} == {"tpl-1", "tpl-2", "tpl-3"}
    assert await store.delete_template("tpl-1") is True
    assert await store.delete_template("tpl-1") is False
    assert await store.template("tpl-1") is None
    # the name is free again
    await store.create_template(_template("tpl-5", "t1", "welcome"))


async def test_an_unreachable_database_is_a_clear_error(tmp_path: Path) -> None:
    store = PostgresPlatformStore("postgresql://postgres@127.0.0.1:1/test")
    with pytest.raises(
        DatabaseUnavailable, match=r"PostgreSQL at postgresql://postgres@127\.0\.0\.1:1"
    ):
        await store.start()
