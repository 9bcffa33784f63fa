"""The start-up load: what the spool held at start is queued again, a page at a time.

The listeners are open meanwhile. A message spooled since start is queued by its own way in
and skipped here (``Ingest.arrived``), so nothing is queued twice. Bodies stay on disk until
their attempt.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time

from epoxi.ingest.door import Ingest
from epoxi.message import MessageMeta
from epoxi.spool import Spool

log = logging.getLogger(__name__)


class SpoolLoader:
    def __init__(self, spool: Spool, ingest: Ingest) -> None:
        self.spool = spool
        self.ingest = ingest
        self._stop = False
        self._arrived: set[str] = set()
        ingest.arrived = self._arrived  # before the listeners open: not loaded again

    def stop(self) -> None:
        """End the load after its current page (shutdown)."""
        self._stop = True

    async def run(self) -> int:
        """Queue every spooled message; returns how many."""
        started = time.monotonic()
        pages = self.spool.iter_meta()
        count = 0
        try:
            while not self._stop and (page := await asyncio.to_thread(next, pages, None)):
                for meta in page:
                    if meta.id not in self._arrived:
                        _share_strings(meta)
                        self.ingest.enqueue(meta, None)
                        count += 1
        finally:
            pages.close()
            self.ingest.arrived = None
        log.info(
            "spool %s: %d messages queued in %.1fs",
            self.spool.path,
            count,
            time.monotonic() - started,
        )
        return count


def _share_strings(meta: MessageMeta) -> None:
    """Loaded messages repeat the same senders, clients, tenants and replies: one copy each."""
    meta.sender = sys.intern(meta.sender)
    meta.origin = sys.intern(meta.origin)
    meta.peer = sys.intern(meta.peer)
    meta.helo = sys.intern(meta.helo)
    meta.auth_user = sys.intern(meta.auth_user)
    meta.tenant = sys.intern(meta.tenant)
    meta.campaign = sys.intern(meta.campaign)
    meta.last_response = sys.intern(meta.last_response)
