"""One registry of suspensions: by scheduled queue, domain, tenant, campaign, site or source.

The first four hold due jobs in the scheduler; ``site`` and ``source`` stop the ready queues of
that site or egress source (their jobs stay queued). A suspension may be narrowed to one site
(``site``): a source on one site is one path (source x site), a tenant or campaign on one site
holds only its jobs routed there (traffic shaping automation makes these). Whoever acts on
suspensions subscribes and is told after every change, including a timed suspension running
out (``expire``).

:class:`Suspensions` is the port: a cluster shares one through Redis; :class:`SuspensionRegistry`
is the in-memory one each node has.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from epoxi.queue.model import Job

log = logging.getLogger(__name__)

SuspendKind = Literal["queue", "domain", "tenant", "campaign", "site", "source"]
JOB_KINDS: frozenset[str] = frozenset({"queue", "domain", "tenant", "campaign"})
PATH_KINDS: frozenset[str] = frozenset({"site", "source"})


@dataclass(frozen=True)
class Suspension:
    kind: SuspendKind
    value: str
    reason: str = ""
    until: float | None = None  # unix time; None lasts until resumed
    site: str = ""  # only on this site (a source, tenant or campaign); "" everywhere

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.value, self.site)

    def active(self, now: float) -> bool:
        return self.until is None or self.until > now

    def matches(self, job: Job) -> bool:
        """Whether this holds ``job`` in the scheduler (job kinds only)."""
        meta = job.message.meta
        if self.site and job.site != self.site:
            return False
        if self.kind == "queue":
            return job.queue == self.value
        if self.kind == "domain":
            return job.domain == self.value
        if self.kind == "tenant":
            return meta.tenant == self.value
        if self.kind == "campaign":
            return meta.campaign == self.value
        return False


class Suspensions(Protocol):
    """The port every suspension goes through."""

    def suspend(self, suspension: Suspension) -> None: ...

    def resume(self, kind: SuspendKind, value: str, site: str = "") -> bool: ...

    def for_job(self, job: Job) -> Suspension | None: ...

    def for_path(self, source: str, site: str) -> Suspension | None: ...

    def active(self) -> list[Suspension]: ...

    def expire(self) -> bool: ...

    def subscribe(self, listener: Callable[[], None]) -> None: ...


class SuspensionRegistry:
    """Suspensions of one node, in memory."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._items: dict[tuple[str, str, str], Suspension] = {}
        self._listeners: list[Callable[[], None]] = []
        self._has_job_kinds = False

    def subscribe(self, listener: Callable[[], None]) -> None:
        """``listener`` is called after every change."""
        self._listeners.append(listener)

    def suspend(self, suspension: Suspension) -> None:
        """Add or replace the suspension of (kind, value, site)."""
        self._items[suspension.key] = suspension
        log.info(
            "suspended %s %s%s until %s: %s",
            suspension.kind,
            suspension.value,
            f" on {suspension.site}" if suspension.site else "",
            suspension.until or "resumed",
            suspension.reason,
        )
        self._changed()

    def resume(self, kind: SuspendKind, value: str, site: str = "") -> bool:
        """Lift the suspension of (kind, value, site); False when there was none."""
        if self._items.pop((kind, value, site), None) is None:
            return False
        log.info("resumed %s %s%s", kind, value, f" on {site}" if site else "")
        self._changed()
        return True

    def for_job(self, job: Job) -> Suspension | None:
        """The active suspension that holds ``job`` in the scheduler, if any."""
        if not self._has_job_kinds:
            return None  # the common case costs one attribute read
        now = self._clock()
        for suspension in self._items.values():
            if suspension.kind in JOB_KINDS and suspension.active(now) and suspension.matches(job):
                return suspension
        return None

    def for_path(self, source: str, site: str) -> Suspension | None:
        """The active suspension that stops the ready queue of (source, site), if any."""
        now = self._clock()
        for key in (("site", site, ""), ("source", source, ""), ("source", source, site)):
            suspension = self._items.get(key)
            if suspension is not None and suspension.active(now):
                return suspension
        return None

    def active(self) -> list[Suspension]:
        now = self._clock()
        return [s for s in self._items.values() if s.active(now)]

    def expire(self) -> bool:
        """Drop suspensions whose time ran out; True (and listeners told) if any did."""
        now = self._clock()
        ended = [key for key, s in self._items.items() if not s.active(now)]
        for key in ended:
            del self._items[key]
        if ended:
            self._changed()
        return bool(ended)

    def _changed(self) -> None:
        self._has_job_kinds = any(kind in JOB_KINDS for kind, _, _ in self._items)
        for listener in self._listeners:
            listener()
