"""Records as events for the outside world: webhooks and broker sinks send these.

An event is a record as JSON, with its ``type`` in snake case (``transient_failure``), its
``timestamp`` as ``time``, and an ``id`` that is a digest of the record itself: the same
record always has the same id, so a receiver that gets an event twice (a retry, a replay)
can tell.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import msgspec

from epoxi.events.records import Record, RecordType, encode_record

_CAPITAL = re.compile(r"(?<=[a-z])(?=[A-Z])")  # TransientFailure -> Transient_Failure; OOB stays

EVENT_TYPES: dict[RecordType, str] = {
    kind: _CAPITAL.sub("_", kind.value).lower() for kind in RecordType
}
RECORD_TYPES: dict[str, RecordType] = {name: kind for kind, name in EVENT_TYPES.items()}


def event_id(encoded: bytes) -> str:
    """The id of the event of an encoded record: 32 hex digits of its BLAKE2b digest."""
    return hashlib.blake2b(encoded, digest_size=16).hexdigest()


def event_of(record: Record) -> dict[str, Any]:
    """The event of ``record``: its fields that are set, ``id``, ``type``, ``time``."""
    encoded = encode_record(record)
    fields: dict[str, Any] = msgspec.json.decode(encoded)
    fields.pop("type", None)
    fields.pop("timestamp", None)
    return {
        "id": event_id(encoded),
        "type": EVENT_TYPES[record.type],
        "time": record.timestamp,
        **fields,
    }
