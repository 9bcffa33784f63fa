"""The HTTP API end to end: httpx -> Epoxi -> sinks on 127.0.0.x, DNS on loopback."""

from __future__ import annotations

import asyncio
import base64
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from epoxi.events.records import RecordType
from epoxi.store import KeyStore, Scope, store_path
from epoxi.testing.sink import Sink
from tests.e2e.conftest import Api, World, message_request, parse


def sink_messages(world: World) -> list[Any]:
    return [m for sink in world.sinks.values() for m in sink.messages]


# --------------------------------------------------------------------- sending


async def test_per_recipient_mime_with_attachments(api: Api) -> None:
    world, client = await api()
    pdf = b"%PDF-1.4 not really\x00\xff"
    reply = await client.post(
        "/messages",
        json=message_request(
            to=["ann@a.test", "bob@a.test"],
            subject="Hello {{ name }} — ünïcode",
            text="Dear {{ name }}, you owe {{ amount }}.",
            html="<p>Dear <b>{{ name }}</b></p>",
            attachments=[
                {
                    "filename": "facture é.pdf",
                    "content_type": "application/pdf",
                    "content": base64.b64encode(pdf).decode(),
                }
            ],
            data={
                "ann@a.test": {"name": "Ann", "amount": 3},
                "bob@a.test": {"name": "<Bob>", "amount": 5},
            },
        ),
    )
    assert reply.status_code == 202, reply.text
    body = reply.json()
    assert body["count"] == 2
    assert [m["recipient"] for m in body["messages"]] == ["ann@a.test", "bob@a.test"]
    await world.wait_records(RecordType.DELIVERY, 2)
    by_rcpt = {m.rcpt_tos[0]: parse(m.data) for m in sink_messages(world)}
    ann, bob = by_rcpt["ann@a.test"], by_rcpt["bob@a.test"]
    assert ann["Subject"] == "Hello Ann — ünïcode" and ann["To"] == "ann@a.test"
    assert bob["Subject"] == "Hello <Bob> — ünïcode"
    text = ann.get_body(("plain",))
    html = bob.get_body(("html",))
    assert text is not None and html is not None
    assert text.get_content() == "Dear Ann, you owe 3.\r\n"
    assert html.get_content() == "<p>Dear <b>&lt;Bob&gt;</b></p>\r\n"  # values are escaped
    (attachment,) = list(ann.iter_attachments())
    assert attachment.get_filename() == "facture é.pdf"
    assert attachment.get_content_type() == "application/pdf"
    assert attachment.get_content() == pdf
    assert all(m.mail_from == "s@sender.test" for m in sink_messages(world))


async def test_cc_and_bcc_each_get_a_copy_and_bcc_is_never_shown(api: Api) -> None:
    world, client = await api()
    reply = await client.post(
        "/messages", json=message_request(cc=["c@a.test"], bcc=["hidden@a.test"])
    )
    assert reply.status_code == 202, reply.text
    await world.wait_records(RecordType.DELIVERY, 3)
    received = sink_messages(world)
    assert sorted(m.rcpt_tos[0] for m in received) == ["c@a.test", "hidden@a.test", "x@a.test"]
    for item in received:
        message = parse(item.data)
        assert message["Cc"] == "c@a.test" and message["Bcc"] is None
        assert b"hidden@a.test" not in item.data


async def test_missing_template_variable_is_422_naming_it_and_queues_nothing(api: Api) -> None:
    world, client = await api()
    reply = await client.post(
        "/messages",
        json=message_request(
            to=["ann@a.test", "bob@a.test"],
            text="Hi {{ name }}",
            data={"ann@a.test": {"name": "Ann"}},
        ),
    )
    assert reply.status_code == 422
    assert reply.headers["content-type"] == "application/problem+json"
    problem = reply.json()
    assert "name" in problem["detail"] and "bob@a.test" in problem["detail"]
    assert problem["errors"][0]["field"] == "message.text"
    assert problem["errors"][0]["recipient"] == "bob@a.test"
    assert world.app.spool.count() == 0


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"subject": "Hi\r\nBcc: victim@evil.test"}, "message.subject"),
        (
            {"subject": "{{ s }}", "data": {"x@a.test": {"s": "a\nBcc: v@evil.test"}}},
            "message.subject",
        ),
        ({"headers": {"X-Tag": "a\r\nBcc: v@evil.test"}}, "message.headers.X-Tag"),
        ({"headers": {"Bad Name": "x"}}, "message.headers.Bad Name"),
        ({"headers": {"Content-Type": "text/html"}}, "message.headers.Content-Type"),
        ({"from": "s@sender.test\r\nBcc: v@evil.test"}, "message.from"),
        ({"to": ["x@a.test\nBcc: v@evil.test"]}, "message.to[0]"),
        ({"reply_to": "r@a.test\rX: y"}, "message.reply_to"),
        (
            {"attachments": [{"filename": "a\r\n.txt", "content": "eA=="}]},
            "message.attachments[0].filename",
        ),
        ({"attachments": [{"filename": "a", "content": "!!"}]}, "message.attachments[0].content"),
        ({"to": ["not an address"]}, "message.to[0]"),
        ({"text": None}, "message"),
    ],
)
async def test_header_injection_and_bad_fields_are_422(
    api: Api, change: dict[str, Any], field: str
) -> None:
    world, client = await api()
    reply = await client.post("/messages", json=message_request(**change))
    assert reply.status_code == 422, reply.text
    assert reply.json()["errors"][0]["field"] == field
    assert world.app.spool.count() == 0


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os }}",
        "{{ self._TemplateReference__context }}",
        "{% for c in [].__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
        "{{ range(10**9)|list }}",
    ],
)
async def test_template_sandbox_escapes_are_422(api: Api, template: str) -> None:
    world, client = await api()
    reply = await client.post("/messages", json=message_request(text=template))
    assert reply.status_code == 422, reply.text
    assert world.app.spool.count() == 0


async def test_idempotent_retry_delivers_once(api: Api) -> None:
    world, client = await api()
    headers = {"Idempotency-Key": "order-42"}
    request = message_request(to=["ann@a.test", "bob@a.test"])
    first = await client.post("/messages", json=request, headers=headers)
    second = await client.post("/messages", json=request, headers=headers)
    assert first.status_code == second.status_code == 202
    assert second.json()["messages"] == first.json()["messages"]
    assert second.json()["idempotency_reused"] is True
    assert first.json()["idempotency_reused"] is False
    await world.wait_records(RecordType.DELIVERY, 2)
    different = await client.post(
        "/messages", json=message_request(to=["other@a.test"]), headers=headers
    )
    assert different.status_code == 409
    await client.post("/messages", json=request, headers={"Idempotency-Key": "order-43"})
    await world.wait_records(RecordType.DELIVERY, 4)
    received = sorted(m.rcpt_tos[0] for m in sink_messages(world))
    assert received == ["ann@a.test", "ann@a.test", "bob@a.test", "bob@a.test"]


async def test_send_at_is_honoured(api: Api) -> None:
    world, client = await api()
    send_at = datetime.now(UTC) + timedelta(seconds=1.5)
    reply = await client.post(
        "/messages", json={**message_request(), "send_at": send_at.isoformat()}
    )
    assert reply.status_code == 202
    (queued,) = reply.json()["messages"]
    status = (await client.get(f"/messages/{queued['id']}")).json()
    assert status["state"] == "scheduled"
    (record,) = await world.wait_records(RecordType.DELIVERY, 1, timeout=10)
    assert record.timestamp >= send_at.timestamp()
    status = (await client.get(f"/messages/{queued['id']}")).json()
    assert status["state"] == "delivered"


async def test_raw_message_with_envelope(api: Api) -> None:
    world, client = await api()
    content = "From: s@sender.test\nTo: x@a.test\nSubject: raw\n\nLine one\n.dot line\n"
    reply = await client.post(
        "/messages/raw",
        json={"from": "bounce@sender.test", "to": ["x@a.test", "y@a.test"], "content": content},
    )
    assert reply.status_code == 202, reply.text
    ids = {m["id"] for m in reply.json()["messages"]}
    assert len(ids) == 1  # one message, two recipients, as over SMTP
    await world.wait_records(RecordType.DELIVERY, 2)
    (received,) = sink_messages(world)
    assert received.mail_from == "bounce@sender.test"
    assert sorted(received.rcpt_tos) == ["x@a.test", "y@a.test"]
    assert received.data.endswith(b"Line one\r\n.dot line\r\n")
    assert parse(received.data)["Subject"] == "raw"


async def test_status_shows_state_attempts_and_history(api: Api) -> None:
    world, client = await api()
    reply = await client.post("/messages", json=message_request(to=["reject-me@a.test"]))
    (queued,) = reply.json()["messages"]
    await world.wait_records(RecordType.BOUNCE, 1)
    status = (await client.get(f"/messages/{queued['id']}")).json()
    assert status["state"] == "bounced"
    assert status["attempts"] == 1
    assert status["last_response"].startswith("550")
    assert [e["type"] for e in status["events"]][:2] == ["Reception", "Bounce"]
    assert status["recipients"][0]["state"] == "bounced"
    missing = await client.get("/messages/NOSUCHID")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"


async def test_ten_thousand_recipients_in_one_request(api: Api) -> None:
    world, client = await api()
    # Held, not attempted: failing attempts would rewrite 10,000 metadata rows meanwhile and
    # put the spool behind (a 503 this test is not about).
    world.app.admin.suspend("domain", "a.test", "held for the test")
    recipients = [f"r{i}@a.test" for i in range(10_000)]
    reply = await client.post(
        "/messages",
        json=message_request(
            to=recipients, text="Hi {{ n }}", data={r: {"n": i} for i, r in enumerate(recipients)}
        ),
        timeout=120,
    )
    assert reply.status_code == 202, reply.text
    assert reply.json()["count"] == 10_000
    assert len({m["id"] for m in reply.json()["messages"]}) == 10_000
    assert world.app.spool.count() == 10_000  # every message committed before the 202


# --------------------------------------------------------------------- errors


async def test_malformed_json_is_400_and_wrong_types_are_422(api: Api) -> None:
    _, client = await api()
    bad = await client.post(
        "/messages", content=b'{"message": ', headers={"content-type": "application/json"}
    )
    assert bad.status_code == 400 and bad.json()["status"] == 400
    wrong = await client.post("/messages", json={"message": {"from": 5, "to": []}})
    assert wrong.status_code == 422
    assert wrong.json()["errors"][0]["field"] == "message.from"
    unknown = await client.post("/messages", json={**message_request(), "surprise": 1})
    assert unknown.status_code == 422 and "surprise" in unknown.json()["detail"]


async def test_oversized_body_is_413(api: Api) -> None:
    _, client = await api(api={"max_body_size": 10_000})
    reply = await client.post("/messages", json=message_request(text="x" * 20_000))
    assert reply.status_code == 413
    assert reply.headers["content-type"] == "application/problem+json"


async def test_full_spool_is_503_with_retry_after(api: Api) -> None:
    world, client = await api(spool={"min_free_space": "1000000G"})
    reply = await client.post("/messages", json=message_request())
    assert reply.status_code == 503
    assert int(reply.headers["retry-after"]) > 0
    ready = await client.get("/health/ready")
    assert ready.status_code == 503 and "spool" in ready.json()["detail"]
    assert world.app.spool.count() == 0


# --------------------------------------------------------------------- keys


async def test_api_key_scopes_and_tenants(api: Api) -> None:
    world, client = await api()
    keys = KeyStore(store_path(world.app.settings.data_dir))
    _, sender = keys.create("app", {Scope.SEND})
    _, reader = keys.create("dash", {Scope.READ})
    _, admin = keys.create("ops", {Scope.ADMIN})
    revoked_key, revoked = keys.create("old", {Scope.SEND})
    _, tenant_key = keys.create("acme", {Scope.SEND, Scope.READ}, tenant="acme")
    keys.revoke(revoked_key.id)

    def auth(key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    assert (await client.post("/messages", json=message_request())).status_code == 401
    assert (await client.get("/admin/pipelines")).status_code == 401
    assert (await client.get("/ping")).status_code == 200  # health stays open
    assert (
        await client.post("/messages", json=message_request(), headers=auth(revoked))
    ).status_code == 401
    assert (
        await client.post("/messages", json=message_request(), headers=auth("epx_x_y"))
    ).status_code == 401
    sent = await client.post("/messages", json=message_request(), headers=auth(sender))
    assert sent.status_code == 202
    (queued,) = sent.json()["messages"]
    assert (await client.get(f"/messages/{queued['id']}", headers=auth(sender))).status_code == 403
    assert (await client.get(f"/messages/{queued['id']}", headers=auth(reader))).status_code == 200
    assert (await client.get("/admin/pipelines", headers=auth(reader))).status_code == 403
    assert (await client.get("/admin/pipelines", headers=auth(admin))).status_code == 200
    assert (await client.get("/metrics", headers=auth(reader))).status_code == 200
    # a tenant's key sends as its tenant only, and sees only its tenant's messages
    other = await client.post(
        "/messages", json={**message_request(), "tenant": "other"}, headers=auth(tenant_key)
    )
    assert other.status_code == 403
    mine = await client.post("/messages", json=message_request(), headers=auth(tenant_key))
    (acme,) = mine.json()["messages"]
    assert (await client.get(f"/messages/{acme['id']}", headers=auth(tenant_key))).json()[
        "tenant"
    ] == "acme"
    assert (
        await client.get(f"/messages/{queued['id']}", headers=auth(tenant_key))
    ).status_code == 404
    assert (await client.get("/admin/pipelines", headers=auth(tenant_key))).status_code == 403
    keys.close()


# --------------------------------------------------------------------- admin


async def test_suspend_and_resume_a_domain(api: Api) -> None:
    world, client = await api()
    reply = await client.post("/admin/suspend", json={"domain": "a.test", "reason": "maintenance"})
    assert reply.status_code == 200 and reply.json()["reason"] == "maintenance"
    await client.post("/messages", json=message_request())
    await world.wait_records(RecordType.SUSPENDED, 1)
    pipelines = (await client.get("/admin/pipelines")).json()
    assert pipelines["totals"]["held"] == 1
    assert pipelines["suspensions"][0]["value"] == "a.test"
    assert sink_messages(world) == []
    resumed = await client.delete("/admin/suspend", params={"domain": "a.test"})
    assert resumed.json()["released"] == 1
    await world.wait_records(RecordType.DELIVERY, 1)


async def test_suspend_a_site_for_a_while(api: Api) -> None:
    world, client = await api()
    await client.post("/messages", json=message_request())
    await world.wait_records(RecordType.DELIVERY, 1)
    site = "mx1.a.test,mx2.a.test"
    reply = await client.post("/admin/suspend", json={"site": site, "duration": 1.0})
    assert reply.json()["ready_queues"] == 1 and reply.json()["until"] > time.time()
    health = (await client.get("/admin/pipelines/health")).json()
    assert health["pipelines"][0]["status"] == "suspended"
    await client.post("/messages", json=message_request(to=["later@a.test"]))
    pipeline = (await client.get("/admin/pipelines/a.test")).json()
    assert pipeline["ready"][0]["queued"] == 1 and pipeline["ready"][0]["suspended"]
    assert len(sink_messages(world)) == 1
    await world.wait_records(RecordType.DELIVERY, 2, timeout=10)  # the suspension runs out


async def test_admin_bounce_removes_matching_messages(api: Api) -> None:
    world, client = await api()
    await client.post("/admin/suspend", json={"tenant": "acme"})
    reply = await client.post(
        "/messages", json={**message_request(to=["a@a.test", "b@a.test"]), "tenant": "acme"}
    )
    ids = [m["id"] for m in reply.json()["messages"]]
    await world.wait_records(RecordType.SUSPENDED, 2)
    empty = await client.post("/admin/bounce", json={})
    assert empty.status_code == 422
    bounced = await client.post("/admin/bounce", json={"tenant": "acme", "reason": "spam run"})
    assert bounced.json() == {"bounced": 2}
    records = await world.wait_records(RecordType.ADMIN_BOUNCE, 2)
    assert {r.message_id for r in records} == set(ids) and records[0].reason == "spam run"
    status = (await client.get(f"/messages/{ids[0]}")).json()
    assert status["state"] == "bounced"
    await client.delete("/admin/suspend", params={"tenant": "acme"})
    assert sink_messages(world) == []
    deadline = time.monotonic() + 5
    while world.app.spool.count() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert world.app.spool.count() == 0


async def test_admin_retry_makes_deferred_mail_due_now(api: Api) -> None:
    world, client = await api(delivery={"retry_interval": 3600, "max_retry_interval": 3600})
    reply = await client.post("/messages", json=message_request(to=["x@later.test"]))
    (queued,) = reply.json()["messages"]
    await world.wait_records(RecordType.TRANSIENT_FAILURE, 1)  # 127.0.0.6: nothing listens
    status = (await client.get(f"/messages/{queued['id']}")).json()
    assert status["state"] == "deferred" and status["recipients"][0]["next_attempt"] > time.time()
    details = (await client.get(f"/admin/messages/{queued['id']}")).json()
    assert details["meta"]["recipients"] == ["x@later.test"]
    assert ["Subject", "Hello"] in details["headers"]
    assert details["jobs"][0]["where"] == "scheduled" and details["jobs"][0]["attempts"] == 1
    async with Sink("127.0.0.6", world.sink_port) as late:
        retried = await client.post("/admin/retry", json={"domain": "later.test"})
        assert retried.json() == {"retried": 1}
        await world.wait_records(RecordType.DELIVERY, 1)
        assert late.received == 1


async def test_pipelines_and_unknown_routing_key(api: Api) -> None:
    world, client = await api()
    await client.post("/messages", json=message_request())
    await world.wait_records(RecordType.DELIVERY, 1)
    pipelines = (await client.get("/admin/pipelines")).json()
    (ready,) = pipelines["ready"]
    assert ready["site"] == "mx1.a.test,mx2.a.test" and ready["deliveries"] == 1
    assert ready["attempts_last_minute"] == 1
    assert ready["connection_limit"] == 4
    assert (await client.get("/admin/pipelines/nowhere.test")).status_code == 404
    assert (await client.get("/admin/messages/NOSUCH")).status_code == 404


# --------------------------------------------------------------------- health and metrics


async def test_health_ping_metrics_and_docs(api: Api) -> None:
    world, client = await api()
    assert (await client.get("/ping")).text == "pong"
    assert (await client.get("/health/live")).json() == {"status": "ok"}
    ready = await client.get("/health/ready")
    assert ready.status_code == 200 and ready.json()["checks"]["spool"] == "ok"
    await client.post("/messages", json=message_request())
    await world.wait_records(RecordType.DELIVERY, 1)
    metrics = (await client.get("/metrics")).text
    assert 'epoxi_records_total{type="Delivery"} 1.0' in metrics
    assert "# HELP epoxi_ready_messages" in metrics
    values = dict(line.split() for line in metrics.splitlines() if line.startswith("epoxi_spool"))
    assert (
        1 <= float(values["epoxi_spool_commits"]) <= float(values["epoxi_spool_committed_writes"])
    )
    for line in metrics.splitlines():
        if line.startswith("# TYPE"):
            name = line.split()[2]
            assert f"# HELP {name} " in metrics, f"{name} has no description"
    schema = (await client.get("/docs/openapi.json")).json()
    assert schema["openapi"].startswith("3.1")
    assert "/messages" in schema["paths"] and "/admin/suspend" in schema["paths"]
    assert {"/admin/sinks", "/admin/quarantine", "/admin/quarantine/{name}"} <= set(schema["paths"])
    one = schema["paths"]["/admin/quarantine/{name}"]
    assert "message/rfc822" in one["get"]["responses"]["200"]["content"]
    assert set(one) >= {"get", "delete"}
    assert (await client.get("/docs")).status_code == 200
