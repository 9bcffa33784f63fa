"""The one door every message comes in by: hooks, control headers, spool, record, schedule."""

from epoxi.ingest.door import Ingest, IngestHook

__all__ = ["Ingest", "IngestHook"]
