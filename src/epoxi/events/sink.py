"""Where records go: the port every producer of records writes to.

:class:`~epoxi.events.log.RecordLog` is the node's sink (the JSONL log, and its subscribers:
the status store, metrics); webhooks and broker sinks subscribe to it.
"""

from __future__ import annotations

from typing import Protocol

from epoxi.events.records import Record


class EventSink(Protocol):
    def emit(self, record: Record) -> None:
        """Take one record; never blocks and never raises for a slow consumer."""
        ...
