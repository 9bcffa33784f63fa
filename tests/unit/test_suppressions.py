"""Suppression lists: the store, each worker's copy, the automatic adds, and ingest's use."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from epoxi.events.records import Record, RecordType, Response
from epoxi.ids import new_message_id
from epoxi.ingest import Ingest
from epoxi.message import MessageMeta
from epoxi.store.db import connect
from epoxi.store.suppressions import (
    GLOBAL,
    Reason,
    Suppression,
    SuppressionList,
    Suppressions,
    SuppressionStore,
    automatic,
)
from epoxi.testing.fakes import MemorySpool, Recorder


@pytest.fixture
async def two(tmp_path: Path) -> AsyncIterator[tuple[Suppressions, Suppressions]]:
    """Two workers' views of one store file."""
    path = tmp_path / "store.db"
    first, second = Suppressions(SuppressionStore(path)), Suppressions(SuppressionStore(path))
    await first.start()
    await second.start()
    yield first, second
    await first.stop()
    await second.stop()


def _entry(address: str, tenant: str = "shop", reason: Reason = Reason.MANUAL) -> Suppression:
    return Suppression(tenant=tenant, address=address, reason=reason)


# --------------------------------------------------------------------- store and copies


async def test_an_add_is_seen_by_the_other_worker_once_it_refreshes(
    two: tuple[Suppressions, Suppressions],
) -> None:
    first, second = two
    added = await first.add([_entry("Bob@A.test")])
    assert [e.address for e in added] == ["bob@a.test"]
    assert first.list.find("shop", ["BOB@a.test"]) == [("BOB@a.test", Reason.MANUAL)]
    assert second.list.find("shop", ["bob@a.test"]) == []  # not yet read
    await second.refresh()
    assert second.list.find("shop", ["bob@a.test"]) == [("bob@a.test", Reason.MANUAL)]
    assert second.list.find("other", ["bob@a.test"]) == []  # another tenant's list


async def test_a_removal_is_seen_by_the_other_worker(
    two: tuple[Suppressions, Suppressions],
) -> None:
    first, second = two
    await first.add([_entry("a@a.test"), _entry("b@a.test")])
    await second.refresh()
    assert await second.remove("shop", "A@a.test")
    assert not await second.remove("shop", "a@a.test")  # gone already
    await first.refresh()
    assert first.list.find("shop", ["a@a.test", "b@a.test"]) == [("b@a.test", Reason.MANUAL)]
    assert len(first.list) == 1


async def test_an_address_listed_keeps_its_first_reason(
    two: tuple[Suppressions, Suppressions],
) -> None:
    first, _ = two
    await first.add([_entry("a@a.test", reason=Reason.BOUNCE)])
    assert await first.add([_entry("a@a.test", reason=Reason.COMPLAINT)]) == []
    found = await first.store.get("shop", "A@A.TEST")
    assert found is not None and found.reason is Reason.BOUNCE and found.created_at > 0


async def test_a_worker_behind_the_purged_log_reads_the_whole_list(
    two: tuple[Suppressions, Suppressions],
) -> None:
    first, second = two
    await first.add([_entry("a@a.test"), _entry("b@a.test")])
    await first.remove("shop", "a@a.test")
    await first.store.purge(time.time() + 1)  # every change forgotten
    await first.add([_entry("c@a.test")])
    await second.refresh()
    found = second.list.find("shop", ["a@a.test", "b@a.test", "c@a.test"])
    assert [address for address, _ in found] == ["b@a.test", "c@a.test"]


async def test_the_global_list_holds_for_every_tenant(
    two: tuple[Suppressions, Suppressions],
) -> None:
    first, _ = two
    await first.add([_entry("x@a.test", tenant=GLOBAL)])
    assert first.list.find("any", ["x@a.test"]) == [("x@a.test", Reason.MANUAL)]
    assert first.list.find("", ["x@a.test", "y@a.test"]) == [("x@a.test", Reason.MANUAL)]


async def test_pages_follow_tenant_and_address(tmp_path: Path) -> None:
    store = SuppressionStore(tmp_path / "store.db")
    await store.start()
    try:
        await store.add([_entry(f"u{i}@a.test") for i in range(5)] + [_entry("z@a.test", "b")])
        page = await store.page("shop", limit=2)
        assert [e.address for e in page] == ["u0@a.test", "u1@a.test"]
        page = await store.page("shop", after=("shop", "u1@a.test"), limit=10)
        assert [e.address for e in page] == ["u2@a.test", "u3@a.test", "u4@a.test"]
        everything = await store.page(None, limit=10)
        assert [(e.tenant, e.address) for e in everything][:2] == [
            ("b", "z@a.test"),
            ("shop", "u0@a.test"),
        ]
    finally:
        await store.stop()


def test_the_schema_step_makes_the_tables(tmp_path: Path) -> None:
    conn = connect(tmp_path / "store.db")
    names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert {"suppressions", "suppression_changes", "suppression_version"} <= names
    conn.close()


# --------------------------------------------------------------------- automatic adds


def _record(kind: RecordType, classification: str = "", code: int = 550) -> Record:
    return Record(
        type=kind,
        message_id="m1",
        recipient="Gone@A.test",
        tenant="shop",
        classification=classification,
        response=Response(code, f"{code // 100}.1.1", "User unknown"),
    )


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (_record(RecordType.BOUNCE, "InvalidRecipient"), Reason.BOUNCE),
        (_record(RecordType.BOUNCE, "BadDomain"), Reason.BOUNCE),
        (_record(RecordType.OOB, "InvalidRecipient"), Reason.BOUNCE),
        (_record(RecordType.FEEDBACK), Reason.COMPLAINT),
        (_record(RecordType.BOUNCE, "MailboxFull"), None),
        (_record(RecordType.BOUNCE, "SpamBlock"), None),
        (_record(RecordType.BOUNCE, "PolicyRejection"), None),
        (_record(RecordType.OOB, "InvalidRecipient", code=450), None),
        (_record(RecordType.TRANSIENT_FAILURE, "InvalidRecipient", code=450), None),
        (_record(RecordType.DELIVERY, code=250), None),
    ],
)
def test_which_records_add_the_address(record: Record, reason: Reason | None) -> None:
    entry = automatic(record)
    assert (entry.reason if entry else None) is reason
    if entry is not None:
        assert (entry.tenant, entry.address) == ("shop", "Gone@A.test")
        assert "m1" in entry.detail


async def test_a_hard_bounce_record_lists_the_address(
    two: tuple[Suppressions, Suppressions],
) -> None:
    first, _ = two
    first.observe(_record(RecordType.BOUNCE, "InvalidRecipient"))
    await first.settle()
    assert first.list.find("shop", ["gone@a.test"]) == [("gone@a.test", Reason.BOUNCE)]


# --------------------------------------------------------------------- ingest


def _meta(*recipients: str, tenant: str = "shop") -> MessageMeta:
    return MessageMeta(
        id=new_message_id(),
        sender="s@sender.test",
        recipients=list(recipients),
        received_at=1.0,
        size=0,
        tenant=tenant,
    )


def _listed(*addresses: str, tenant: str = "shop") -> SuppressionList:
    copy = SuppressionList()
    copy.replace(1, [(tenant, a, "bounce") for a in addresses])
    return copy


async def test_ingest_takes_suppressed_recipients_off_with_a_record() -> None:
    spool, records, jobs = MemorySpool(), Recorder(), []
    ingest = Ingest(
        spool=spool, records=records, schedule=jobs.append, suppressions=_listed("b@a.test")
    )
    meta = _meta("a@a.test", "B@a.test")
    await ingest.accept(meta, b"Subject: s\r\n\r\nhi\r\n", trusted=False)
    assert meta.recipients == ["a@a.test"] and meta.id in spool.messages
    reception, suppression = records.records  # the message exists first, for the status
    assert reception.type is RecordType.RECEPTION and reception.recipients == ["a@a.test"]
    assert (suppression.type, suppression.recipient, suppression.reason) == (
        RecordType.SUPPRESSION,
        "B@a.test",
        "bounce",
    )
    assert [job.recipients for job in jobs] == [["a@a.test"]]


async def test_a_message_with_every_recipient_suppressed_is_not_spooled() -> None:
    spool, records, jobs = MemorySpool(), Recorder(), []
    ingest = Ingest(
        spool=spool, records=records, schedule=jobs.append, suppressions=_listed("b@a.test")
    )
    smtp = _meta("b@a.test")
    await ingest.accept(smtp, b"Subject: s\r\n\r\nhi\r\n", trusted=False)
    http, kept = _meta("b@a.test"), _meta("c@a.test")
    suppressed = await ingest.inject_many([(http, b"\r\nhi\r\n"), (kept, b"\r\nhi\r\n")])
    assert [(r.message_id, r.recipient) for r in suppressed] == [(http.id, "b@a.test")]
    assert list(spool.messages) == [kept.id] and len(jobs) == 1
    assert [(r.type, r.message_id) for r in records.records] == [
        (RecordType.SUPPRESSION, smtp.id),
        (RecordType.RECEPTION, kept.id),
        (RecordType.SUPPRESSION, http.id),
    ]


async def test_another_tenants_list_does_not_apply() -> None:
    spool = MemorySpool()
    ingest = Ingest(
        spool=spool, records=Recorder(), schedule=lambda job: None, suppressions=_listed("b@a.test")
    )
    meta = _meta("b@a.test", tenant="other")
    assert await ingest.inject_many([(meta, b"\r\nhi\r\n")]) == []
    assert meta.id in spool.messages
