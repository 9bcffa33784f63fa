"""``POST /webhooks/{provider}`` end to end: an upstream provider's signed events change the
message's status and the suppression lists; a replayed or forged call changes nothing and
says why (issue 14, item 5)."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

import httpx
import pytest

from epoxi.events.records import RecordType
from epoxi.store import KeyStore, store_path
from epoxi.store.keys import Scope
from tests.e2e.conftest import Api, World, message_request

SECRET = "whsec_provider-test"
PROVIDERS = {"provider_webhooks": {"secrets": {"mock": SECRET}}}


def _signed(body: bytes, secret: str = SECRET, t: int | None = None) -> dict[str, str]:
    """Headers signed the way a provider does it, computed here with the stdlib alone."""
    stamp = int(time.time()) if t is None else t
    digest = hmac.new(secret.encode(), f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
    return {"Webhook-Signature": f"t={stamp},v1={digest}", "Content-Type": "application/json"}


async def _post(
    client: httpx.AsyncClient, events: list[dict[str, Any]], provider: str = "mock", **sign: Any
) -> httpx.Response:
    body = json.dumps({"events": events}).encode()
    return await client.post(f"/webhooks/{provider}", content=body, headers=_signed(body, **sign))


async def _sent(world: World, client: httpx.AsyncClient, to: str, tenant: str = "shop") -> str:
    answer = await client.post("/messages", json={**message_request(to=[to]), "tenant": tenant})
    assert answer.status_code == 202, answer.text
    message_id: str = answer.json()["messages"][0]["id"]
    await world.wait_records(RecordType.DELIVERY, 1, where=lambda r: r.message_id == message_id)
    return message_id


def _reported(world: World) -> list[Any]:
    return [r for r in world.records if r.reporter == "mock"]


async def test_delivered_opened_clicked_are_recorded_and_a_replay_changes_nothing(
    api: Api,
) -> None:
    world, client = await api(**PROVIDERS)
    message_id = await _sent(world, client, "x@a.test")
    events = [
        {
            "provider_event_id": "ev-1",
            "type": "delivered",
            "email_id": message_id,
            "recipient": {"email": "x@a.test", "name": "X"},
            "timestamp": "2026-12-01T10:00:00Z",
        },
        {"id": "ev-2", "type": "opened", "email_id": message_id, "recipient": "x@a.test"},
        {
            "id": "ev-3",
            "type": "clicked",
            "message_id": message_id,
            "email": "X@a.test",
            "url": "https://shop.test/offer",
        },
        {"id": "ev-4", "type": "processed", "email_id": message_id, "recipient": "x@a.test"},
    ]
    answer = await _post(client, events)
    assert answer.status_code == 200, answer.text
    receipt = answer.json()
    assert (receipt["applied"], receipt["duplicates"]) == (3, 0)
    assert [r["outcome"] for r in receipt["results"]] == ["applied"] * 3 + ["ignored"]
    delivered, opened, clicked = _reported(world)
    assert [r.type for r in (delivered, opened, clicked)] == [
        RecordType.REMOTE_DELIVERY,
        RecordType.OPEN,
        RecordType.CLICK,
    ]
    assert (delivered.tenant, delivered.external_id, delivered.recipient) == (
        "shop",
        "ev-1",
        "x@a.test",
    )
    assert delivered.timestamp == 1796119200.0  # the provider's time, not the call's
    assert clicked.url == "https://shop.test/offer"

    status = (await client.get(f"/messages/{message_id}")).json()
    assert status["state"] == "delivered"
    kinds = [e["type"] for e in status["events"]]
    assert kinds[-3:] == ["RemoteDelivery", "Open", "Click"]

    again = await _post(client, events)  # a replay, freshly signed: the ids were applied
    assert again.status_code == 200
    replayed = again.json()
    assert (replayed["applied"], replayed["duplicates"]) == (0, 3)
    assert [r["outcome"] for r in replayed["results"]] == ["duplicate"] * 3 + ["ignored"]
    assert "no change" in replayed["results"][0]["detail"]
    assert len(_reported(world)) == 3
    later = (await client.get(f"/messages/{message_id}")).json()
    assert len(later["events"]) == len(status["events"])


async def test_bounced_complained_unsubscribed_suppress_and_the_next_send_is_not_sent(
    api: Api,
) -> None:
    world, client = await api(**PROVIDERS)
    bounced = await _sent(world, client, "gone@a.test")
    complained = await _sent(world, client, "angry@a.test")
    left = await _sent(world, client, "bye@a.test")
    answer = await _post(
        client,
        [
            {
                "provider_event_id": "b-1",
                "type": "bounced",
                "bounce_type": "hard",
                "email_id": bounced,
                "recipient": "gone@a.test",
                "code": 550,
                "enhanced": "5.1.1",
                "reason": "The email account that you tried to reach does not exist",
            },
            {
                "provider_event_id": "c-1",
                "type": "complained",
                "email_id": complained,
                "recipient": "angry@a.test",
            },
            {
                "provider_event_id": "u-1",
                "type": "unsubscribed",
                "email_id": left,
                "recipient": "bye@a.test",
            },
        ],
    )
    assert answer.status_code == 200 and answer.json()["applied"] == 3, answer.text
    oob, feedback, unsubscribe = _reported(world)
    assert oob.type is RecordType.OOB and oob.classification == "InvalidRecipient"
    assert oob.response is not None and (oob.response.code, oob.response.enhanced) == (
        550,
        "5.1.1",
    )
    assert feedback.type is RecordType.FEEDBACK and feedback.feedback_type == "abuse"
    assert unsubscribe.type is RecordType.UNSUBSCRIBE

    status = (await client.get(f"/messages/{bounced}")).json()
    assert status["state"] == "bounced"  # the handover is undone by the provider's bounce
    assert "5.1.1" in status["recipients"][0]["last_response"]

    listed = (await client.get("/suppressions", params={"tenant": "shop"})).json()
    reasons = {e["address"]: e["reason"] for e in listed["suppressions"]}
    assert reasons == {
        "gone@a.test": "bounce",
        "angry@a.test": "complaint",
        "bye@a.test": "unsubscribe",
    }
    again = await client.post(
        "/messages", json={**message_request(to=["gone@a.test"]), "tenant": "shop"}
    )
    assert again.status_code == 202
    assert [s["recipient"] for s in again.json()["suppressed"]] == ["gone@a.test"]


async def test_a_deferral_is_recorded_without_changing_the_state(api: Api) -> None:
    world, client = await api(**PROVIDERS)
    message_id = await _sent(world, client, "slow@a.test")
    event = {
        "provider_event_id": "d-1",
        "type": "deferred",
        "email_id": message_id,
        "recipient": "slow@a.test",
        "reason": "451 4.7.1 try again later",
    }
    assert (await _post(client, [event])).json()["applied"] == 1
    (oob,) = _reported(world)
    assert oob.response is not None and oob.response.code == 450
    status = (await client.get(f"/messages/{message_id}")).json()
    assert status["state"] == "delivered"
    listed = (await client.get("/suppressions", params={"tenant": "shop"})).json()
    assert listed["suppressions"] == []


async def test_forged_stale_and_unsigned_calls_change_nothing_and_say_why(api: Api) -> None:
    world, client = await api(**PROVIDERS)
    message_id = await _sent(world, client, "x@a.test")
    events = [{"id": "f-1", "type": "bounced", "email_id": message_id, "recipient": "x@a.test"}]

    forged = await _post(client, events, secret="not-the-secret")
    assert forged.status_code == 401
    assert forged.headers["content-type"].startswith("application/problem+json")
    assert "does not match" in forged.json()["detail"]
    assert "nothing was applied" in forged.json()["detail"]

    stale = await _post(client, events, t=int(time.time()) - 3600)
    assert stale.status_code == 401 and "from now" in stale.json()["detail"]

    body = json.dumps({"events": events}).encode()
    unsigned = await client.post(
        "/webhooks/mock", content=body, headers={"Content-Type": "application/json"}
    )
    assert unsigned.status_code == 401 and "Webhook-Signature" in unsigned.json()["detail"]

    tampered_headers = _signed(body)
    tampered = body.replace(b"bounced", b"opened!")
    answer = await client.post("/webhooks/mock", content=tampered, headers=tampered_headers)
    assert answer.status_code == 401

    assert _reported(world) == []
    status = (await client.get(f"/messages/{message_id}")).json()
    assert status["state"] == "delivered"
    # the event was never applied, so the real call, signed, still is
    assert (await _post(client, events)).json()["applied"] == 1


async def test_unknown_provider_bad_bodies_and_unknown_messages_are_answered(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    world, client = await api(**PROVIDERS)
    message_id = await _sent(world, client, "x@a.test")

    unknown = await _post(client, [], provider="nope")
    assert unknown.status_code == 404 and "WEBHOOK_SECRET_NOPE" in unknown.json()["detail"]

    missing = await _post(client, [{"id": "m-1", "type": "opened", "recipient": "x@a.test"}])
    assert missing.status_code == 422
    assert missing.json()["errors"][0]["field"] == "events[0].email_id"

    empty = await _post(client, [])
    assert empty.status_code == 422 and "events" in empty.json()["detail"]

    not_json = b"{events"
    answer = await client.post("/webhooks/mock", content=not_json, headers=_signed(not_json))
    assert answer.status_code == 422 and "not JSON" in answer.json()["detail"]

    strangers = await _post(
        client,
        [
            {"id": "s-1", "type": "opened", "email_id": "nosuchid", "recipient": "x@a.test"},
            {"id": "s-2", "type": "opened", "email_id": message_id, "recipient": "y@a.test"},
        ],
    )
    assert [r["outcome"] for r in strangers.json()["results"]] == [
        "unknown_message",
        "unknown_recipient",
    ]
    assert _reported(world) == []

    # a secret from the environment, for a provider the configuration does not name
    monkeypatch.setenv("WEBHOOK_SECRET_UPSTREAM_ESP", "from-env")
    event = {"id": "e-1", "type": "opened", "email_id": message_id, "recipient": "x@a.test"}
    from_env = await _post(client, [event], provider="upstream-esp", secret="from-env")
    assert from_env.status_code == 200 and from_env.json()["applied"] == 1
    (opened,) = [r for r in world.records if r.reporter == "upstream-esp"]
    assert opened.type is RecordType.OPEN


async def test_the_signature_is_the_key_when_api_keys_exist(api: Api) -> None:
    world, client = await api(**PROVIDERS)
    message_id = await _sent(world, client, "x@a.test")
    KeyStore(store_path(world.app.settings.data_dir)).create("app", {Scope.SEND})
    assert (await client.get(f"/messages/{message_id}")).status_code == 401  # keys now rule
    event = {"id": "k-1", "type": "opened", "email_id": message_id, "recipient": "x@a.test"}
    answer = await _post(client, [event])
    assert answer.status_code == 200 and answer.json()["applied"] == 1
    # Epoxi's own event webhooks' header is taken too: one Epoxi can feed another
    body = json.dumps(
        {
            "events": [
                {"id": "k-2", "type": "open", "message_id": message_id, "recipient": "x@a.test"}
            ]
        }
    ).encode()
    headers = _signed(body)
    headers["Epoxi-Signature"] = headers.pop("Webhook-Signature")
    answer = await client.post("/webhooks/mock", content=body, headers=headers)
    assert answer.status_code == 200 and answer.json()["applied"] == 1
