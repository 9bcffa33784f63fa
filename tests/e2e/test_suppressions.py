"""Suppression lists end to end: a hard bounce lists the address, the next send to it is not
sent, and the API manages each tenant's list (issue 14)."""

from __future__ import annotations

import csv
import io

from epoxi.events.records import Record, RecordType, Response
from epoxi.store import KeyStore, store_path
from epoxi.store.keys import Scope
from epoxi.store.suppressions import Reason, Suppression, SuppressionStore
from tests.conftest import eventually
from tests.e2e.conftest import Api, message_request, send


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_a_hard_bounce_then_a_second_send_is_suppressed(api: Api) -> None:
    world, client = await api()
    first = await client.post(
        "/messages", json={**message_request(to=["reject@a.test"]), "tenant": "shop"}
    )
    assert first.status_code == 202 and first.json()["suppressed"] == []
    await world.wait_records(RecordType.BOUNCE, 1)
    await world.app.suppressions.settle()  # the bounce's add is written
    listed = (await client.get("/suppressions", params={"tenant": "shop"})).json()
    (entry,) = listed["suppressions"]
    assert (entry["address"], entry["reason"]) == ("reject@a.test", "bounce")
    assert "5.1.1" in entry["detail"]

    second = await client.post(
        "/messages",
        json={**message_request(to=["Reject@a.test", "x@a.test"]), "tenant": "shop"},
    )
    assert second.status_code == 202
    answer = second.json()
    assert answer["count"] == 1 and [m["recipient"] for m in answer["messages"]] == ["x@a.test"]
    (suppressed,) = answer["suppressed"]
    assert (suppressed["recipient"], suppressed["reason"]) == ("Reject@a.test", "bounce")
    (record,) = [r for r in world.records if r.type is RecordType.SUPPRESSION]
    assert (record.message_id, record.recipient, record.tenant) == (
        suppressed["id"],
        "Reject@a.test",
        "shop",
    )
    await world.wait_records(RecordType.DELIVERY, 1, where=lambda r: r.recipient == "x@a.test")
    assert len([r for r in world.records if r.type is RecordType.BOUNCE]) == 1  # the first only
    # POST /messages makes a message per recipient: that one was not spooled at all
    kinds = [r.type for r in world.records if r.message_id == suppressed["id"]]
    assert kinds == [RecordType.SUPPRESSION]
    status = (await client.get(f"/messages/{suppressed['id']}")).json()
    assert status["state"] == "suppressed" and status["tenant"] == "shop"
    assert [(r["recipient"], r["state"]) for r in status["recipients"]] == [
        ("Reject@a.test", "suppressed")
    ]

    # another tenant's mail to the same address goes out (as an attempt: the sink says 550)
    other = await client.post(
        "/messages", json={**message_request(to=["reject@a.test"]), "tenant": "other"}
    )
    assert other.json()["suppressed"] == [] and other.json()["count"] == 1


async def test_smtp_mail_to_a_suppressed_address_is_answered_but_not_sent(api: Api) -> None:
    world, client = await api()
    added = await client.post("/suppressions", json={"address": "gone@a.test"})
    assert added.status_code == 201 and added.json()["added"] == 1
    (message_id,) = await send(world, ["gone@a.test"])  # the 250 still comes
    (record,) = await world.wait_records(RecordType.SUPPRESSION, 1)
    assert (record.message_id, record.recipient, record.reason) == (
        message_id,
        "gone@a.test",
        "manual",
    )
    assert not [r for r in world.records if r.type is RecordType.RECEPTION]


async def test_a_message_partly_suppressed_shows_it_in_its_status(api: Api) -> None:
    world, client = await api()
    await client.post("/suppressions", json={"address": "gone@a.test", "tenant": "shop"})
    sent = await client.post(
        "/messages/raw",
        json={
            "from": "s@sender.test",
            "to": ["gone@a.test", "x@a.test"],
            "content": "Subject: hi\r\n\r\nHi.\r\n",
            "tenant": "shop",
        },
    )
    answer = sent.json()
    assert answer["count"] == 1 and answer["messages"][0]["recipient"] == "x@a.test"
    assert answer["suppressed"] == [
        {"id": answer["messages"][0]["id"], "recipient": "gone@a.test", "reason": "manual"}
    ]
    await world.wait_records(RecordType.DELIVERY, 1)
    status = (await client.get(f"/messages/{answer['messages'][0]['id']}")).json()
    states = {r["recipient"]: r["state"] for r in status["recipients"]}
    assert states == {"gone@a.test": "suppressed", "x@a.test": "delivered"}


async def test_add_remove_import_export_round_trip(api: Api) -> None:
    _, client = await api()
    one = await client.post(
        "/suppressions", json={"tenant": "shop", "address": "A@a.test", "reason": "unsubscribe"}
    )
    assert one.status_code == 201
    many = await client.post(
        "/suppressions",
        json=[{"tenant": "shop", "address": "a@a.test"}, {"tenant": "shop", "address": "b@a.test"}],
    )
    assert (many.json()["added"], many.json()["already"]) == (1, 1)
    bad = await client.post("/suppressions", json={"tenant": "shop", "address": "not an address"})
    assert bad.status_code == 422 and bad.headers["content-type"].startswith("application/problem")

    body = "address,reason\r\nc@a.test,complaint\r\nd@a.test\r\n"
    imported = await client.post(
        "/suppressions/import",
        params={"tenant": "shop"},
        content=body,
        headers={"Content-Type": "text/csv"},
    )
    assert imported.status_code == 200 and imported.json()["added"] == 2
    refused = await client.post(
        "/suppressions/import",
        params={"tenant": "shop"},
        content="e@a.test\r\nnope\r\n",
        headers={"Content-Type": "text/csv"},
    )
    assert refused.status_code == 422 and "row 2" in refused.text

    exported = await client.get("/suppressions/export", params={"tenant": "shop"})
    assert exported.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert [(r["address"], r["reason"]) for r in rows] == [
        ("a@a.test", "unsubscribe"),
        ("b@a.test", "manual"),
        ("c@a.test", "complaint"),
        ("d@a.test", "manual"),
    ]
    removed = await client.delete("/suppressions/B@a.test", params={"tenant": "shop"})
    assert removed.status_code == 200 and removed.json()["address"] == "b@a.test"
    gone = await client.delete("/suppressions/b@a.test", params={"tenant": "shop"})
    assert gone.status_code == 404
    # the export imports into another list as it is
    again = await client.post(
        "/suppressions/import",
        params={"tenant": "copy"},
        content=exported.text,
        headers={"Content-Type": "text/csv"},
    )
    assert again.json()["added"] == 4

    page = (await client.get("/suppressions", params={"tenant": "shop", "limit": 2})).json()
    assert [e["address"] for e in page["suppressions"]] == ["a@a.test", "c@a.test"]
    rest = await client.get(
        "/suppressions", params={"tenant": "shop", "limit": 2, "after": page["next"]}
    )
    assert [e["address"] for e in rest.json()["suppressions"]] == ["d@a.test"]
    assert rest.json()["next"] is None


async def test_a_tenant_key_sees_and_changes_its_own_list_only(api: Api) -> None:
    world, client = await api()
    keys = KeyStore(store_path(world.app.settings.data_dir))
    _, acme = keys.create("acme", {Scope.SEND, Scope.READ}, tenant="acme")
    _, admin = keys.create("ops", {Scope.SEND, Scope.READ, Scope.ADMIN})
    _, sender = keys.create("app", {Scope.SEND, Scope.READ})
    other = {"tenant": "other", "address": "o@a.test"}
    assert (await client.post("/suppressions", json=other, headers=_auth(admin))).is_success
    own = await client.post("/suppressions", json={"address": "m@a.test"}, headers=_auth(acme))
    assert own.json()["suppressions"][0]["tenant"] == "acme"

    for params in ({"tenant": "other"}, {"tenant": "*"}):
        read = await client.get("/suppressions", params=params, headers=_auth(acme))
        assert read.status_code == 403, params
        export = await client.get("/suppressions/export", params=params, headers=_auth(acme))
        assert export.status_code == 403
    assert (await client.post("/suppressions", json=other, headers=_auth(acme))).status_code == 403
    deleted = await client.delete(
        "/suppressions/o@a.test", params={"tenant": "other"}, headers=_auth(acme)
    )
    assert deleted.status_code == 403
    mine = (await client.get("/suppressions", headers=_auth(acme))).json()["suppressions"]
    assert [(e["tenant"], e["address"]) for e in mine] == [("acme", "m@a.test")]
    everything = (await client.get("/suppressions", headers=_auth(admin))).json()
    assert {e["tenant"] for e in everything["suppressions"]} == {"acme", "other"}
    glob = {"tenant": "*", "address": "g@a.test"}
    assert (await client.post("/suppressions", json=glob, headers=_auth(sender))).status_code == 403


async def test_the_global_list_stops_every_tenants_mail(api: Api) -> None:
    world, client = await api()
    added = await client.post("/suppressions", json={"tenant": "*", "address": "all@a.test"})
    assert added.status_code == 201
    for tenant in ("one", "two"):
        answer = await client.post(
            "/messages", json={**message_request(to=["all@a.test"]), "tenant": tenant}
        )
        assert answer.json()["count"] == 0
        assert answer.json()["suppressed"][0]["recipient"] == "all@a.test"
    assert len([r for r in world.records if r.type is RecordType.SUPPRESSION]) == 2


async def test_another_workers_change_holds_here_within_a_second(api: Api) -> None:
    """Workers share the store: one's add (here a second store on the same file) reaches
    this node's copy by its poll, and its mail to the address stops."""
    world, client = await api()
    other = SuppressionStore(store_path(world.app.settings.data_dir))
    await other.start()
    try:
        await other.add([Suppression(tenant="", address="late@a.test", reason=Reason.COMPLAINT)])
    finally:
        await other.stop()
    copy = world.app.suppressions.list
    await eventually(lambda: bool(copy.find("", ["late@a.test"])), what="the poll")
    answer = await client.post("/messages", json=message_request(to=["late@a.test"]))
    assert answer.json()["suppressed"][0]["reason"] == "complaint"


async def test_a_complaint_and_an_out_of_band_hard_bounce_list_the_address(api: Api) -> None:
    """The Feedback and OOB records inbound parsing emits add to the sender tenant's list."""
    world, client = await api()
    world.app.records.emit(
        Record(type=RecordType.FEEDBACK, message_id="m1", recipient="c@a.test", tenant="shop")
    )
    world.app.records.emit(
        Record(
            type=RecordType.OOB,
            message_id="m2",
            recipient="o@a.test",
            tenant="shop",
            classification="InvalidRecipient",
            response=Response(550, "5.1.1", "no such user"),
        )
    )
    await world.app.suppressions.settle()
    listed = (await client.get("/suppressions", params={"tenant": "shop"})).json()
    reasons = {e["address"]: e["reason"] for e in listed["suppressions"]}
    assert reasons == {"c@a.test": "complaint", "o@a.test": "bounce"}
    answer = await client.post(
        "/messages", json={**message_request(to=["c@a.test", "o@a.test"]), "tenant": "shop"}
    )
    assert answer.json()["count"] == 0 and len(answer.json()["suppressed"]) == 2
