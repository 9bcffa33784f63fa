"""``/tenants`` and ``/templates`` over HTTP, on SQLite and on the machine's PostgreSQL
(issue 15): the seed's tenant and template, versions, previews, and tenants kept apart."""

from __future__ import annotations

import email
import email.policy
import json
from pathlib import Path

import httpx
import pytest

from epoxi.events.records import RecordType
from epoxi.store import KeyStore, store_path
from epoxi.store.keys import Scope
from tests.e2e.conftest import (
    SEED_TEMPLATE,
    SEND,
    World,
    message_request,
    run_cli,
    seeded,
    send,
)


@pytest.fixture
def client(platform_node: tuple[World, httpx.AsyncClient]) -> httpx.AsyncClient:
    return platform_node[1]


async def test_tenants_are_created_listed_and_changed(client: httpx.AsyncClient) -> None:
    made = await client.post("/tenants", json={"id": "tenant-1", "name": "Tenant 1"})
    assert made.status_code == 201, made.text
    assert made.json()["status"] == "active"
    again = await client.post("/tenants", json={"id": "tenant-1", "name": "Other"})
    assert again.status_code == 409 and "exists" in again.json()["detail"]
    bad = await client.post("/tenants", json={"id": "no spaces", "name": "x"})
    assert bad.status_code == 400 or bad.status_code == 422

    listed = (await client.get("/tenants")).json()["tenants"]
    assert [t["id"] for t in listed] == ["tenant-1"]
    changed = await client.patch(
        "/tenants/tenant-1", json={"status": "suspended", "recipients_per_day": 5000}
    )
    assert changed.status_code == 200, changed.text
    shown = (await client.get("/tenants/tenant-1")).json()
    assert (shown["status"], shown["recipients_per_day"], shown["name"]) == (
        "suspended",
        5000,
        "Tenant 1",
    )
    assert (await client.patch("/tenants/tenant-1", json={})).status_code == 422
    assert (await client.patch("/tenants/nope", json={"name": "x"})).status_code == 404
    assert (await client.get("/tenants/nope")).status_code == 404


async def test_the_seed_template_versions_activation_and_preview(
    client: httpx.AsyncClient,
) -> None:
    await client.post("/tenants", json={"id": "tenant-1", "name": "Tenant 1"})
    made = await client.post("/templates", json=SEED_TEMPLATE)
    assert made.status_code == 201, made.text
    first = made.json()
    assert (first["version"], first["is_active"], first["tenant_id"]) == (1, True, "tenant-1")
    template_id = first["id"]

    twice = await client.post("/templates", json=SEED_TEMPLATE)
    assert twice.status_code == 409 and "welcome" in twice.json()["detail"]
    broken = await client.post(
        "/templates", json={**SEED_TEMPLATE, "name": "broken", "html_template": "{% if %}"}
    )
    assert broken.status_code == 422
    assert broken.json()["errors"][0]["field"] == "html_template"
    orphan = await client.post("/templates", json={**SEED_TEMPLATE, "tenant_id": "nobody"})
    assert orphan.status_code == 422 and "POST /tenants" in orphan.json()["detail"]

    draft = await client.post(
        f"/templates/{template_id}/versions",
        json={"subject_template": "Hi {{name}}", "html_template": "<p>v2 {{name}}</p>"},
    )
    assert draft.status_code == 201 and draft.json()["version"] == 2
    assert draft.json()["is_active"] is False
    active = (await client.get(f"/templates/{template_id}")).json()
    assert active["version"] == 1
    activated = await client.post(f"/templates/{template_id}/activate", json={"version": 2})
    assert activated.status_code == 200 and activated.json()["is_active"] is True
    assert (await client.get(f"/templates/{template_id}")).json()["version"] == 2
    missing = await client.post(f"/templates/{template_id}/activate", json={"version": 7})
    assert missing.status_code == 404

    preview = await client.post(
        f"/templates/{template_id}/render", json={"variables": {"name": "Alice"}, "version": 1}
    )
    assert preview.status_code == 200, preview.text
    shown = preview.json()
    assert shown["subject"] == "Welcome Alice"
    assert shown["html"] == "<h1>Hello Alice</h1><p>Your code: {{ code }}</p>"
    assert shown["text"] == "Hello Alice\n\nYour code: {{ code }}\n"
    assert (shown["text_from_html"], shown["missing"]) == (True, ["code"])
    escaped = await client.post(
        f"/templates/{template_id}/render", json={"variables": {"name": "<b>x</b>"}}
    )
    assert escaped.json()["html"] == "<p>v2 &lt;b&gt;x&lt;/b&gt;</p>"

    versions = (await client.get(f"/templates/{template_id}/versions")).json()["versions"]
    assert [(v["version"], v["is_active"]) for v in versions] == [(1, False), (2, True)]
    listed = (await client.get("/templates", params={"tenant_id": "tenant-1"})).json()
    (summary,) = listed["templates"]
    assert (summary["active_version"], summary["latest_version"]) == (2, 2)

    gone = await client.delete(f"/templates/{template_id}")
    assert gone.status_code == 200 and gone.json()["versions"] == 2
    assert (await client.get(f"/templates/{template_id}")).status_code == 404


async def test_one_tenant_never_sees_or_changes_anothers(
    platform_node: tuple[World, httpx.AsyncClient],
) -> None:
    world, client = platform_node
    for tenant in ("tenant-1", "tenant-2"):
        await client.post("/tenants", json={"id": tenant, "name": tenant})
    theirs = (
        await client.post("/templates", json={**SEED_TEMPLATE, "tenant_id": "tenant-2"})
    ).json()["id"]
    keys = KeyStore(store_path(world.app.settings.data_dir))
    _, mine = keys.create("t1", {Scope.SEND, Scope.READ}, tenant="tenant-1")
    _, ops = keys.create("ops", {Scope.SEND, Scope.READ, Scope.ADMIN})
    as_t1 = {"Authorization": f"Bearer {mine}"}

    assert [t["id"] for t in (await client.get("/tenants", headers=as_t1)).json()["tenants"]] == [
        "tenant-1"
    ]
    assert (await client.get("/tenants/tenant-2", headers=as_t1)).status_code == 404
    made = await client.post("/tenants", json={"id": "t3", "name": "x"}, headers=as_t1)
    assert made.status_code == 403
    patched = await client.patch("/tenants/tenant-1", json={"name": "x"}, headers=as_t1)
    assert patched.status_code == 403

    for path in (f"/templates/{theirs}", f"/templates/{theirs}/versions"):
        assert (await client.get(path, headers=as_t1)).status_code == 404
    for path, body in (
        (f"/templates/{theirs}/render", {}),
        (f"/templates/{theirs}/activate", {"version": 1}),
        (f"/templates/{theirs}/versions", {"subject_template": "x", "html_template": "y"}),
    ):
        assert (await client.post(path, json=body, headers=as_t1)).status_code == 404
    assert (await client.delete(f"/templates/{theirs}", headers=as_t1)).status_code == 404
    other = await client.post(
        "/templates", json={**SEED_TEMPLATE, "tenant_id": "tenant-2"}, headers=as_t1
    )
    assert other.status_code == 403
    own = await client.post("/templates", json={**SEED_TEMPLATE, "tenant_id": None}, headers=as_t1)
    assert own.status_code == 201 and own.json()["tenant_id"] == "tenant-1"
    listed = (await client.get("/templates", headers=as_t1)).json()["templates"]
    assert [t["tenant_id"] for t in listed] == ["tenant-1"]
    everyone = (await client.get("/templates", headers={"Authorization": f"Bearer {ops}"})).json()
    assert {t["tenant_id"] for t in everyone["templates"]} == {"tenant-1", "tenant-2"}


async def test_send_renders_the_active_template_and_delivers_it(
    platform_node: tuple[World, httpx.AsyncClient],
) -> None:
    world, client = platform_node
    template_id = await seeded(client)
    answer = await client.post("/send", json={**SEND, "template_id": template_id})
    assert answer.status_code == 202, answer.text
    sent = answer.json()
    assert (sent["status"], sent["idempotency_reused"], sent["template_version"]) == (
        "queued",
        False,
        1,
    )
    (delivered,) = await world.wait_records(
        RecordType.DELIVERY, 1, where=lambda r: r.message_id == sent["email_id"]
    )
    assert (delivered.recipient, delivered.tenant) == ("alice@a.test", "tenant-1")
    (item,) = [m for sink in world.sinks.values() for m in sink.messages]
    message = email.message_from_bytes(item.data, policy=email.policy.default)
    assert message["Subject"] == "Welcome Alice"
    assert message["From"] == "Shop <shop@sender.test>"
    assert message["To"] == "Alice <alice@a.test>"
    html = message.get_body(("html",))
    text = message.get_body(("plain",))
    assert html is not None and "<h1>Hello Alice</h1>" in html.get_content()
    assert text is not None
    assert text.get_content().replace("\r\n", "\n") == "Hello Alice\n\nYour code: X7\n"

    status = (await client.get(f"/messages/{sent['email_id']}")).json()
    assert status["tenant"] == "tenant-1"


async def test_send_idempotency_suspension_and_errors(
    platform_node: tuple[World, httpx.AsyncClient],
) -> None:
    _, client = platform_node
    template_id = await seeded(client)
    body = {**SEND, "template_id": template_id}
    first = (await client.post("/send", json=body)).json()
    again = await client.post("/send", json=body)
    assert again.status_code == 202
    assert (again.json()["email_id"], again.json()["idempotency_reused"]) == (
        first["email_id"],
        True,
    )
    changed = await client.post("/send", json={**body, "variables": {"name": "Bob", "code": 1}})
    assert changed.status_code == 409 and "different request" in changed.json()["detail"]

    missing = await client.post(
        "/send", json={**body, "idempotency_key": "k2", "variables": {"name": "A"}}
    )
    assert missing.status_code == 422
    assert missing.json()["errors"][0]["field"] == "variables"
    assert "code" in missing.json()["detail"]

    later = await client.post(
        "/send", json={**body, "idempotency_key": "k3", "send_at": "2099-01-01T00:00:00Z"}
    )
    assert later.status_code == 202 and later.json()["status"] == "scheduled"

    unknown = await client.post(
        "/send", json={**body, "idempotency_key": "k4", "template_id": "tpl_x"}
    )
    assert unknown.status_code == 404
    pinned = await client.post(
        "/send", json={**body, "idempotency_key": "k5", "template_version": 3}
    )
    assert pinned.status_code == 404 and "version 3" in pinned.json()["detail"]
    nobody = await client.post("/send", json={**body, "idempotency_key": "k6", "tenant_id": "zz"})
    assert nobody.status_code == 422 and nobody.json()["errors"][0]["field"] == "tenant_id"

    await client.post("/tenants", json={"id": "tenant-2", "name": "No sender"})
    theirs = await client.post("/templates", json={**SEED_TEMPLATE, "tenant_id": "tenant-2"})
    cross = await client.post(
        "/send", json={**body, "idempotency_key": "k7", "tenant_id": "tenant-2"}
    )
    assert cross.status_code == 404  # tenant-1's template is not tenant-2's
    no_sender = await client.post(
        "/send",
        json={
            **body,
            "idempotency_key": "k8",
            "tenant_id": "tenant-2",
            "template_id": theirs.json()["id"],
        },
    )
    assert no_sender.status_code == 422 and no_sender.json()["errors"][0]["field"] == "from"

    await client.patch("/tenants/tenant-1", json={"status": "suspended"})
    refused = await client.post("/send", json={**body, "idempotency_key": "k9"})
    assert refused.status_code == 403 and "suspended" in refused.json()["detail"]
    await client.patch("/tenants/tenant-1", json={"status": "active"})
    assert (await client.post("/send", json={**body, "idempotency_key": "k9"})).status_code == 202


async def test_a_suspended_tenants_mail_is_held_across_a_restart_and_goes_when_active(
    platform_node: tuple[World, httpx.AsyncClient],
) -> None:
    world, client = platform_node
    await seeded(client)
    assert (await client.patch("/tenants/tenant-1", json={"status": "suspended"})).is_success
    refused = await client.post(
        "/messages", json={**message_request(to=["x@a.test"]), "tenant": "tenant-1"}
    )
    assert refused.status_code == 403 and "suspended" in refused.json()["detail"]

    # SMTP mail tagged for the tenant is taken (250) and held, never sent
    body = b"X-Epoxi-Tenant: tenant-1\r\nSubject: held\r\nFrom: s@sender.test\r\n\r\nHi.\r\n"
    (message_id,) = await send(world, ["x@a.test"], body=body)
    (held,) = await world.wait_records(
        RecordType.SUSPENDED, 1, where=lambda r: r.message_id == message_id
    )
    assert "tenant-1 is suspended" in held.reason

    await world.restart()  # the status is in the platform store: held again from the start
    await world.wait_records(RecordType.SUSPENDED, 2, where=lambda r: r.message_id == message_id)
    assert not [r for r in world.records if r.type is RecordType.DELIVERY]

    assert world.app.http is not None
    host, port = world.app.http.addresses[0]
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as again:
        active = await again.patch("/tenants/tenant-1", json={"status": "active"})
        assert active.is_success and active.json()["status"] == "active"
    await world.wait_records(RecordType.DELIVERY, 1, where=lambda r: r.message_id == message_id)


async def test_the_cli_manages_tenants_and_templates(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    made = await run_cli(
        client, "tenants", "add", "tenant-1", "--name", "Tenant 1", "--sender", "s@sender.test"
    )
    assert made.returncode == 0, made.stderr
    assert b"tenant-1  active  Tenant 1" in made.stdout
    assert b"sender: s@sender.test" in made.stdout
    html = tmp_path / "welcome.html"
    html.write_text("<h1>Hello {{ name }}</h1>")
    stored = await run_cli(
        client, "templates", "add", "welcome", "--subject", "Hi {{ name }}", "--html", str(html),
        "--tenant", "tenant-1", "--json",
    )  # fmt: skip
    assert stored.returncode == 0, stored.stderr
    template_id = json.loads(stored.stdout)["id"]

    listed = await run_cli(client, "templates", "ls", "--tenant", "tenant-1")
    assert f"{template_id}  tenant-1  welcome  active v1  latest v1".encode() in listed.stdout
    shown = await run_cli(client, "templates", "render", template_id, "--vars", '{"name": "Al"}')
    assert shown.returncode == 0, shown.stderr
    assert b"Subject: Hi Al" in shown.stdout and b"Hello Al" in shown.stdout
    assert b"(made from the HTML)" in shown.stdout and b"missing" not in shown.stdout
    bad = await run_cli(client, "templates", "render", template_id, "--vars", "{nope")
    assert bad.returncode != 0 and b"not JSON" in bad.stderr

    suspended = await run_cli(client, "tenants", "suspend", "tenant-1")
    assert suspended.returncode == 0 and b"tenant-1  suspended" in suspended.stdout
    again = await run_cli(client, "tenants", "reactivate", "tenant-1", "--json")
    assert json.loads(again.stdout)["status"] == "active"
    missing = await run_cli(client, "tenants", "show", "nope")
    assert missing.returncode != 0 and b"no tenant 'nope'" in missing.stderr
    gone = await run_cli(client, "templates", "rm", template_id)
    assert gone.returncode == 0 and b"(1 version)" in gone.stdout
