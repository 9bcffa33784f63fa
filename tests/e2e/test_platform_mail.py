"""``/send/bulk``, ``/bulk/{id}``, ``/emails/{id}`` and ``/analytics`` over HTTP, on SQLite and
on the machine's PostgreSQL (issue 15): a bulk send of 10,000 recipients delivered to a real
sink, emails followed through delivered, bounced, opened, clicked and complained, and the
hourly rollups counting them."""

from __future__ import annotations

import asyncio
import email
import email.message
import email.policy
import hashlib
import hmac
import json
import re
import time
from typing import Any

import httpx
import msgspec

from epoxi.api_types import BulkSend
from epoxi.events.records import RecordType
from epoxi.store import KeyStore, store_path
from epoxi.store.keys import Scope
from epoxi.store.platform import BulkJob
from tests.e2e.conftest import SEND, Api, World, message_request, seeded

PROVIDER_SECRET = "whsec_platform-test"
PROVIDERS = {"provider_webhooks": {"secrets": {"mock": PROVIDER_SECRET}}}


def _bulk(template_id: str, count: int, **fields: Any) -> dict[str, Any]:
    return {
        "tenant_id": "tenant-1",
        "template_id": template_id,
        "recipients": [
            {"email": f"r{i}@a.test", "variables": {"name": f"R{i}"}} for i in range(count)
        ],
        "shared_variables": {"code": "B1"},
        "metadata": {"campaign": "winter"},
        "idempotency_key": "bulk-001",
        **fields,
    }


async def test_bulk_send_of_10000_recipients_spools_delivers_and_reports(
    platform_api: Api,
) -> None:
    world, client = await platform_api()
    template_id = await seeded(client)
    body = _bulk(template_id, 10_000)
    recipients = body["recipients"]
    recipients[3] = {"email": "not an address", "variables": {"name": "X"}}
    recipients[7] = {"email": "r7@a.test"}  # no name: the template needs one
    recipients[9]["metadata"] = {"row": 9}
    await client.post("/suppressions", json={"address": "r11@a.test", "tenant": "tenant-1"})

    answer = await client.post("/send/bulk", json=body)
    assert answer.status_code == 202, answer.text
    accepted = answer.json()
    assert (accepted["status"], accepted["total"], accepted["idempotency_reused"]) == (
        "done",
        10_000,
        False,
    )
    assert (accepted["queued"], accepted["suppressed"], accepted["failed"]) == (9_997, 1, 2)

    job_id = accepted["bulk_job_id"]
    progress = (await client.get(f"/bulk/{job_id}")).json()
    assert (progress["accepted"], progress["processed"], progress["rendered"]) == (
        10_000,
        10_000,
        9_998,
    )
    assert progress["finished_at"] is not None and progress["errors_next"] is None
    bad_address, no_name = progress["errors"]
    assert (bad_address["index"], bad_address["email"]) == (3, "not an address")
    assert "recipients[3].email" in bad_address["error"]
    assert no_name["index"] == 7 and "name" in no_name["error"]
    paged = (await client.get(f"/bulk/{job_id}", params={"errors_limit": 1})).json()
    assert [e["index"] for e in paged["errors"]] == [3] and paged["errors_next"] == 3

    again = await client.post("/send/bulk", json=body)
    assert again.status_code == 202
    assert (again.json()["bulk_job_id"], again.json()["idempotency_reused"]) == (job_id, True)
    changed = await client.post("/send/bulk", json={**body, "shared_variables": {"code": "B2"}})
    assert changed.status_code == 409 and "different request" in changed.json()["detail"]

    delivered = await world.wait_records(
        RecordType.DELIVERY, 9_997, timeout=120, where=lambda r: r.tenant == "tenant-1"
    )
    assert {r.template for r in delivered} == {template_id}
    assert len({r.recipient for r in delivered}) == 9_997  # each once: the replay sent none
    item = next(
        m for sink in world.sinks.values() for m in sink.messages if m.rcpt_tos == ["r9@a.test"]
    )
    assert b"Subject: Welcome R9" in item.data and b"Your code: B1" in item.data

    r9 = next(r for r in delivered if r.recipient == "r9@a.test")
    shown = (await client.get(f"/emails/{r9.message_id}", params={"tenant_id": "tenant-1"})).json()
    assert (shown["status"], shown["bulk_job_id"], shown["template_id"]) == (
        "delivered",
        job_id,
        template_id,
    )
    assert shown["metadata"] == {"campaign": "winter", "row": 9}
    day = (await client.get("/analytics", params={"tenant_id": "tenant-1"})).json()
    assert (day["totals"]["accepted"], day["totals"]["delivered"]) == (9_997, 9_997)
    assert day["totals"]["suppressed"] == 1 and day["rates"]["delivery"] == 1.0


async def test_a_bulk_job_cut_short_is_picked_up_where_it_stopped(platform_api: Api) -> None:
    world, client = await platform_api(api={"spool_batch": 10})
    template_id = await seeded(client)
    body = _bulk(template_id, 35)
    # the job as a node that died after spooling two groups of ten left it
    request = msgspec.json.decode(json.dumps(body), type=BulkSend)
    now = time.time()
    job = BulkJob(
        id="bulk_cut",
        tenant_id="tenant-1",
        template_id=template_id,
        template_version=1,
        idempotency_key="bulk-001",
        fingerprint=hashlib.sha256(msgspec.json.encode(request)).hexdigest(),
        total=35,
        processed=20,
        rendered=20,
        queued=20,
        created_at=now,
        updated_at=now,
    )
    store = world.app.platform
    await store.create_bulk(job)
    busy = await client.post("/send/bulk", json=body)  # it could still be running
    assert busy.status_code == 409 and "GET /bulk/bulk_cut" in busy.json()["detail"]

    await store.save_progress(msgspec.structs.replace(job, updated_at=now - 60), [], [])
    resumed = await client.post("/send/bulk", json=body)
    assert resumed.status_code == 202, resumed.text
    assert (resumed.json()["bulk_job_id"], resumed.json()["queued"]) == ("bulk_cut", 35)
    # every Reception is recorded before the 202: only the last fifteen were spooled now
    spooled = [r.recipients[0] for r in world.records if r.type is RecordType.RECEPTION]
    assert spooled == [f"r{i}@a.test" for i in range(20, 35)]
    delivered = await world.wait_records(RecordType.DELIVERY, 15)
    assert {r.recipient for r in delivered} == set(spooled)


async def test_emails_follow_their_records_and_analytics_add_them_up(platform_api: Api) -> None:
    world, client = await platform_api(**PROVIDERS)
    template_id = await seeded(client)
    other = await client.post(
        "/templates",
        json={
            "tenant_id": "tenant-1",
            "name": "other",
            "subject_template": "Hi",
            "text_template": "Hi.",
        },
    )
    other_id = other.json()["id"]
    sent = (await client.post("/send", json={**SEND, "template_id": template_id})).json()
    bounced = (
        await client.post(
            "/send",
            json={
                **SEND,
                "template_id": template_id,
                "recipient": {"email": "reject@a.test"},
                "idempotency_key": "mail-002",
            },
        )
    ).json()
    later = (
        await client.post(
            "/send",
            json={
                **SEND,
                "template_id": template_id,
                "idempotency_key": "mail-003",
                "send_at": "2099-01-01T00:00:00Z",
            },
        )
    ).json()
    await world.wait_records(RecordType.DELIVERY, 1, where=lambda r: r.tenant == "tenant-1")
    await world.wait_records(RecordType.BOUNCE, 1, where=lambda r: r.tenant == "tenant-1")

    email_id = sent["email_id"]
    shown = (await client.get(f"/emails/{email_id}", params={"tenant_id": "tenant-1"})).json()
    assert (shown["status"], shown["recipient"], shown["template_version"]) == (
        "delivered",
        {"email": "alice@a.test", "name": "Alice"},
        1,
    )
    assert shown["metadata"] == {"source": "api", "order": 42}  # as given: 42 stays a number
    assert [(e["type"], e.get("status")) for e in shown["events"]] == [
        ("Reception", "queued"),
        ("Delivery", "delivered"),
    ]
    failed = (await client.get(f"/emails/{bounced['email_id']}")).json()
    assert failed["status"] == "bounced" and "550" in failed["last_error"]
    assert (await client.get(f"/emails/{later['email_id']}")).json()["status"] == "scheduled"
    assert (await client.delete(f"/messages/{later['email_id']}")).status_code == 200
    await world.wait_records(RecordType.CANCELLED, 1)
    assert (await client.get(f"/emails/{later['email_id']}")).json()["status"] == "cancelled"

    # the provider reports opens (twice), a click and a complaint: each moves the status on
    events = [
        {"id": "e1", "type": "opened", "email_id": email_id, "recipient": "alice@a.test"},
        {"id": "e2", "type": "opened", "email_id": email_id, "recipient": "alice@a.test"},
        {"id": "e3", "type": "clicked", "email_id": email_id, "recipient": "alice@a.test"},
    ]
    assert (await _provider_post(client, events)).status_code == 200
    assert (await client.get(f"/emails/{email_id}")).json()["status"] == "clicked"
    complaint = [
        {"id": "e4", "type": "complained", "email_id": email_id, "recipient": "alice@a.test"}
    ]
    assert (await _provider_post(client, complaint)).status_code == 200
    shown = (await client.get(f"/emails/{email_id}")).json()
    assert shown["status"] == "complained"
    assert [e["type"] for e in shown["events"]][-4:] == ["Open", "Open", "Click", "Feedback"]

    for group_by in ("hour", "day"):
        report = (
            await client.get(
                "/analytics",
                params={"tenant_id": "tenant-1", "group_by": group_by, "template_id": template_id},
            )
        ).json()
        assert len(report["buckets"]) == 1 and report["group_by"] == group_by
        totals = report["totals"]
        assert {k: totals[k] for k in ("accepted", "delivered", "bounced", "cancelled")} == {
            "accepted": 3,
            "delivered": 1,
            "bounced": 1,
            "cancelled": 1,
        }
        assert (totals["opened"], totals["clicked"], totals["complained"]) == (1, 1, 1)
        assert report["rates"] == {
            "delivery": 0.3333,
            "bounce": 0.3333,
            "complaint": 1.0,
            "open": 1.0,
            "click": 1.0,
        }
        bucket = report["buckets"][0]
        start = bucket["start"]
        assert start.endswith(":00:00Z") and (group_by == "hour" or "T00:00:00" in start)
    none = (
        await client.get("/analytics", params={"tenant_id": "tenant-1", "template_id": other_id})
    ).json()
    assert none["buckets"] == [] and none["totals"]["accepted"] == 0
    past = await client.get(
        "/analytics",
        params={"tenant_id": "tenant-1", "from": "2020-01-02T00:00:00Z", "to": "2020-01-01"},
    )
    assert past.status_code == 422 and past.json()["errors"][0]["field"] == "from"
    assert (await client.get("/analytics")).status_code == 422  # whose?


async def test_one_tenant_never_reads_anothers_emails_jobs_or_analytics(
    platform_node: tuple[World, httpx.AsyncClient],
) -> None:
    world, client = platform_node
    template_id = await seeded(client)
    sent = (await client.post("/send", json={**SEND, "template_id": template_id})).json()
    job = (await client.post("/send/bulk", json=_bulk(template_id, 3))).json()
    await client.post("/tenants", json={"id": "tenant-2", "name": "Tenant 2"})
    keys = KeyStore(store_path(world.app.settings.data_dir))
    _, theirs = keys.create("tenant-2", {Scope.SEND, Scope.READ}, tenant="tenant-2")
    _, admin = keys.create("admin", {Scope.ADMIN, Scope.SEND, Scope.READ})
    client.headers["Authorization"] = f"Bearer {theirs}"
    assert (await client.get(f"/emails/{sent['email_id']}")).status_code == 404
    assert (await client.get(f"/bulk/{job['bulk_job_id']}")).status_code == 404
    asked = await client.get("/analytics", params={"tenant_id": "tenant-1"})
    assert asked.status_code == 403
    own = (await client.get("/analytics")).json()  # its own: nothing sent
    assert own["tenant_id"] == "tenant-2" and own["totals"]["accepted"] == 0
    bulk = await client.post("/send/bulk", json={**_bulk(template_id, 1), "tenant_id": None})
    assert bulk.status_code == 404  # tenant-1's template is not tenant-2's
    client.headers["Authorization"] = f"Bearer {admin}"
    shown = await client.get(f"/emails/{sent['email_id']}", params={"tenant_id": "tenant-2"})
    assert shown.status_code == 404  # named for the wrong tenant: not found
    assert (await client.get(f"/emails/{sent['email_id']}")).status_code == 200


async def _provider_post(client: httpx.AsyncClient, events: list[dict[str, Any]]) -> httpx.Response:
    body = json.dumps({"events": events}).encode()
    stamp = int(time.time())
    digest = hmac.new(
        PROVIDER_SECRET.encode(), f"{stamp}.".encode() + body, hashlib.sha256
    ).hexdigest()
    headers = {"Webhook-Signature": f"t={stamp},v1={digest}", "Content-Type": "application/json"}
    return await client.post("/webhooks/mock", content=body, headers=headers)


async def test_dead_letters_are_kept_listed_and_re_sent_once(platform_api: Api) -> None:
    world, client = await platform_api()
    template_id = await seeded(client)
    body = {**SEND, "template_id": template_id}
    bounced = (
        await client.post("/send", json={**body, "recipient": {"email": "reject@a.test"}})
    ).json()
    later = (
        await client.post(
            "/send",
            json={**body, "idempotency_key": "mail-002", "send_at": "2099-01-01T00:00:00Z"},
        )
    ).json()
    await world.wait_records(RecordType.BOUNCE, 1)
    operator = await client.post(
        "/admin/bounce", json={"id": later["email_id"], "reason": "wrong list"}
    )
    assert operator.json()["bounced"] == 1

    listed = (await client.get("/dead-letters", params={"tenant_id": "tenant-1"})).json()
    assert [(d["email_id"], d["reason"]) for d in listed["dead_letters"]] == [
        (later["email_id"], "failed"),
        (bounced["email_id"], "bounced"),
    ]
    assert "550" in listed["dead_letters"][1]["last_error"]
    assert "wrong list" in listed["dead_letters"][0]["last_error"]
    paged = (await client.get("/dead-letters", params={"limit": 1})).json()
    assert len(paged["dead_letters"]) == 1 and paged["next_before"] is not None
    rest = (await client.get("/dead-letters", params={"before": paged["next_before"]})).json()
    assert [d["email_id"] for d in rest["dead_letters"]] == [bounced["email_id"]]

    again = await client.post(f"/dead-letters/{later['email_id']}/resend", json={})
    assert again.status_code == 202, again.text
    resent = again.json()
    assert (resent["resent_from"], resent["status"], resent["template_version"]) == (
        later["email_id"],
        "queued",
        1,
    )
    await world.wait_records(
        RecordType.DELIVERY, 1, where=lambda r: r.message_id == resent["email_id"]
    )
    shown = (await client.get(f"/dead-letters/{later['email_id']}")).json()
    assert shown["resent_as"] == resent["email_id"]
    twice = await client.post(f"/dead-letters/{later['email_id']}/resend", json={})
    assert twice.status_code == 409 and resent["email_id"] in twice.json()["detail"]
    # a hard bounce put the address on the tenant's suppression list: its re-send is held
    held = (await client.post(f"/dead-letters/{bounced['email_id']}/resend", json={})).json()
    assert held["status"] == "suppressed"
    assert (await client.get("/dead-letters/nope")).status_code == 404

    # mail not made from a template is a dead letter too, but is not re-sent from here
    raw = await client.post(
        "/messages", json={**message_request(to=["reject@b.test"]), "tenant": "tenant-1"}
    )
    raw_id = raw.json()["messages"][0]["id"]
    await world.wait_records(RecordType.BOUNCE, 1, where=lambda r: r.message_id == raw_id)
    plain = (await client.get(f"/dead-letters/{raw_id}")).json()
    assert plain["template_id"] is None and plain["reason"] == "bounced"
    refused = await client.post(f"/dead-letters/{raw_id}/resend", json={})
    assert refused.status_code == 409 and "stored template" in refused.json()["detail"]


async def test_a_tenant_over_its_limits_gets_429_and_nothing_is_queued(
    platform_node: tuple[World, httpx.AsyncClient],
) -> None:
    world, client = platform_node
    template_id = await seeded(client)
    await client.patch("/tenants/tenant-1", json={"recipients_per_day": 3})
    body = {**SEND, "template_id": template_id, "idempotency_key": None}
    bulk = await client.post("/send/bulk", json={**_bulk(template_id, 2), "idempotency_key": None})
    assert bulk.status_code == 202, bulk.text
    assert (await client.post("/send", json=body)).status_code == 202
    over = await client.post("/send", json=body)
    assert over.status_code == 429
    assert "3 recipients a day and has 0 left" in over.json()["detail"]
    assert 0 < int(over.headers["Retry-After"]) <= 86400
    too_many = await client.post(
        "/messages", json={**message_request(to=["x@a.test"]), "tenant": "tenant-1"}
    )
    assert too_many.status_code == 429
    receptions = [r for r in world.records if r.type is RecordType.RECEPTION]
    assert len(receptions) == 3  # the refused sends queued nothing

    await client.patch(
        "/tenants/tenant-1", json={"recipients_per_day": 0, "requests_per_second": 0.01}
    )
    first = await client.post("/send", json={**body, "idempotency_key": "r1"})
    assert first.status_code == 202, first.text
    second = await client.post("/send", json={**body, "idempotency_key": "r2"})
    assert second.status_code == 429 and int(second.headers["Retry-After"]) >= 90
    await client.patch("/tenants/tenant-1", json={"requests_per_second": 0})
    lenient = await client.patch("/tenants/tenant-1", json={"tracking": 0})
    assert lenient.status_code == 422 and lenient.json()["errors"][0]["field"] == "tracking"
    untracked = await client.post("/send", json={**body, "tracking": True})
    assert untracked.status_code == 422  # this node has no [tracking] base_url
    assert untracked.json()["errors"][0]["field"] == "tracking"
    assert "0.01 send requests a second" in second.json()["detail"]


async def test_tracked_mail_records_opens_clicks_and_one_click_unsubscribes(
    platform_api: Api,
) -> None:
    world, client = await platform_api(tracking={"base_url": "https://t.shop.test"})
    await seeded(client)
    assert (await client.patch("/tenants/tenant-1", json={"tracking": True})).status_code == 200
    made = await client.post(
        "/templates",
        json={
            "tenant_id": "tenant-1",
            "name": "offer",
            "subject_template": "For {{ name }}",
            "html_template": '<p>Hi {{ name }}, <a href="https://shop.test/o?a=1&amp;b=2">see</a>'
            "</p></body>",
        },
    )
    offer = made.json()["id"]
    sent = (await client.post("/send", json={**SEND, "template_id": offer})).json()
    await world.wait_records(
        RecordType.DELIVERY, 1, where=lambda r: r.message_id == sent["email_id"]
    )
    message = _delivered(world, "alice@a.test")
    assert message["List-Unsubscribe"] is None  # a transactional send: no unsubscribe link
    html_part = message.get_body(("html",))
    text_part = message.get_body(("plain",))
    assert html_part is not None and text_part is not None
    html = html_part.get_content()
    assert "https://shop.test/o" in text_part.get_content()  # the text keeps the real link
    click, pixel = re.findall(r"https://t\.shop\.test(/t/[A-Za-z0-9_.-]+)", html)
    assert html.index(pixel) < html.index("</body>")

    followed = await client.get(click)
    assert followed.status_code == 302
    assert followed.headers["Location"] == "https://shop.test/o?a=1&b=2"
    opened = await client.get(pixel)
    assert opened.status_code == 200 and opened.headers["Content-Type"] == "image/gif"
    forged = click[:-3] + ("AAA" if not click.endswith("AAA") else "BBB")
    assert (await client.get(forged)).status_code == 404
    assert (await client.get("/t/not-a-token")).status_code == 404
    click_record, open_record = await world.wait_records(
        RecordType.CLICK, 1
    ) + await world.wait_records(RecordType.OPEN, 1)
    assert (click_record.url, click_record.tenant) == ("https://shop.test/o?a=1&b=2", "tenant-1")
    assert open_record.message_id == sent["email_id"]
    shown = (await client.get(f"/emails/{sent['email_id']}")).json()
    assert shown["status"] == "clicked"
    totals = (await client.get("/analytics", params={"tenant_id": "tenant-1"})).json()["totals"]
    assert (totals["opened"], totals["clicked"]) == (1, 1)

    bulk = _bulk(offer, 1, idempotency_key="bulk-track")
    assert (await client.post("/send/bulk", json=bulk)).status_code == 202
    await world.wait_records(RecordType.DELIVERY, 1, where=lambda r: r.recipient == "r0@a.test")
    listed = _delivered(world, "r0@a.test")
    assert listed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    (link,) = re.findall(r"<https://t\.shop\.test(/u/[^>]+)>", str(listed["List-Unsubscribe"]))
    page = await client.get(link)
    assert page.status_code == 200 and "r0@a.test" in page.text and "<form" in page.text
    one_click = await client.post(
        link,
        content=b"List-Unsubscribe=One-Click",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert one_click.status_code == 200, one_click.text
    (unsubscribed,) = await world.wait_records(RecordType.UNSUBSCRIBE, 1)
    assert unsubscribed.recipient == "r0@a.test"
    suppressed = await _wait_suppressed(client, "r0@a.test")
    assert suppressed["reason"] == "unsubscribe"
    assert (await client.post(link[:-2] + "xx", content=b"")).status_code == 404


def _delivered(world: World, recipient: str) -> email.message.EmailMessage:
    item = next(
        m for sink in world.sinks.values() for m in sink.messages if m.rcpt_tos == [recipient]
    )
    parsed = email.message_from_bytes(item.data, policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    return parsed


async def _wait_suppressed(client: httpx.AsyncClient, address: str) -> dict[str, Any]:
    for _ in range(200):
        listed = (await client.get("/suppressions", params={"tenant": "tenant-1"})).json()
        found = [s for s in listed["suppressions"] if s["address"] == address]
        if found:
            return found[0]
        await asyncio.sleep(0.02)
    raise AssertionError(f"{address} was not suppressed")
