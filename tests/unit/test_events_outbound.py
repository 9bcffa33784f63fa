"""Records as the outside world sees them: webhook and broker events."""

from __future__ import annotations

from epoxi.events.outbound import EVENT_TYPES, RECORD_TYPES, event_of
from epoxi.events.records import Record, RecordType, Response


def test_event_types_are_the_record_types_in_snake_case() -> None:
    assert EVENT_TYPES[RecordType.TRANSIENT_FAILURE] == "transient_failure"
    assert EVENT_TYPES[RecordType.ADMIN_BOUNCE] == "admin_bounce"
    assert EVENT_TYPES[RecordType.OOB] == "oob"
    assert {RECORD_TYPES[name] for name in EVENT_TYPES.values()} == set(RecordType)


def test_an_event_has_a_stable_id_its_type_and_time_and_the_fields_set() -> None:
    record = Record(
        type=RecordType.BOUNCE,
        message_id="m1",
        recipient="a@x.test",
        timestamp=1700000000.5,
        response=Response(550, "5.1.1", "no such user"),
    )
    event = event_of(record)
    assert event["type"] == "bounce" and event["time"] == 1700000000.5
    assert event["message_id"] == "m1" and event["response"]["enhanced"] == "5.1.1"
    assert "timestamp" not in event and "size" not in event  # defaults are left out
    assert event["id"] == event_of(record)["id"] and len(event["id"]) == 32
    other = Record(type=RecordType.BOUNCE, message_id="m1", recipient="b@x.test")
    assert event_of(other)["id"] != event["id"]
