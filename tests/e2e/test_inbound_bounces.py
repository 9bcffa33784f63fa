"""Real DSNs from a real Postfix: Epoxi sends with VERP return paths through a private Postfix
instance that bounces (unknown user, mailbox full, relay denied) and sends its DSNs back to
Epoxi's bounce domain; Epoxi reads each into an OOB record for the right message and
recipient, and keeps the DSN in its quarantine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from epoxi.events.records import Record, RecordType
from tests.conftest import eventually
from tests.e2e.conftest import MakeWorld, World, send
from tests.e2e.postfix import Postfix

pytestmark = pytest.mark.skipif(not Postfix.available(), reason="needs Postfix and root")


@pytest.fixture
async def postfix() -> AsyncIterator[Postfix]:
    instance = Postfix(relay_port=0)
    yield instance
    await asyncio.to_thread(instance.stop)


async def bouncing_world(make_world: MakeWorld, postfix: Postfix) -> World:
    world = await make_world(
        bounce_domain="bounce.test",
        relay={"host": "127.0.0.1", "port": postfix.port, "tls": "disabled"},
    )
    postfix.relay_port = world.port
    await asyncio.to_thread(postfix.start)
    return world


def oob(world: World) -> list[Record]:
    return [r for r in world.records if r.type is RecordType.OOB]


@pytest.mark.timeout(120)
async def test_postfix_dsns_become_oob_records(make_world: MakeWorld, postfix: Postfix) -> None:
    world = await bouncing_world(make_world, postfix)
    cases = {
        "nosuchuser@pf.test": ("5.1.1", "InvalidRecipient"),
        "nobody@pf.test": ("5.2.2", "MailboxFull"),
        "anyone@far.test": ("5.7.1", "RelayDenied"),
    }
    ids = {}
    for recipient in cases:
        (ids[recipient],) = await send(world, [recipient])
    try:
        await eventually(lambda: len(oob(world)) >= len(cases), timeout=90, what="3 OOB records")
    except AssertionError:
        raise AssertionError(postfix.log()) from None
    by_recipient = {r.recipient: r for r in oob(world)}
    for recipient, (status, category) in cases.items():
        record = by_recipient[recipient]
        assert record.message_id == ids[recipient]
        assert record.response is not None and record.response.enhanced == status, record
        assert record.response.code == 550
        assert record.classification == category, record
        assert record.sender.startswith("b+") and record.sender.endswith("@bounce.test")
        assert record.reporter == "pf.test" and record.reason == ""
    kept = sorted((world.app.settings.data_dir / "bounces").iterdir())
    assert len(kept) == 3 and all("-dsn-" in p.name for p in kept)
    assert b"Postfix" in kept[0].read_bytes()
