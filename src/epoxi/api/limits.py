"""A tenant's sending limits: API send requests a second and recipients a day.

Over either, a send is a ``429`` problem with ``Retry-After``, and nothing of it is queued.

- ``requests_per_second``: GCRA in memory; each worker process allows its share (the rate
  over the machine's workers), so the machine allows the tenant's rate.
- ``recipients_per_day`` (UTC days): the recipients the platform's hourly rollups counted as
  accepted today, over every worker and across restarts (re-read at most every
  ``REFRESH`` seconds), plus those this worker accepted since it last read them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from litestar.exceptions import HTTPException

from epoxi.events.lifecycle import HOUR
from epoxi.shaping.throttle import LocalThrottle, Rate
from epoxi.store.platform import Tenant

DAY = 24 * HOUR
REFRESH = 5.0  # seconds a worker counts on its own before it reads the day's count again

# (tenant, the day's start, now) -> recipients the store counted as accepted that day
CountToday = Callable[[str, float, float], Awaitable[int]]


@dataclass
class _Day:
    start: float  # the UTC day, unix time of its midnight
    counted: int  # what the store had when read
    read_at: float
    mine: int = 0  # accepted here since


class SendLimits:
    def __init__(
        self,
        workers: int,
        count_today: CountToday,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.workers = max(1, workers)
        self._count_today = count_today
        self._clock, self._wall = clock, wall
        self._throttles: dict[str, tuple[float, LocalThrottle]] = {}
        self._days: dict[str, _Day] = {}

    def check_request(self, tenant: Tenant) -> None:
        """One more send request of the tenant, or a 429 when it is over its rate."""
        rate = tenant.requests_per_second
        if rate <= 0:
            return
        found = self._throttles.get(tenant.id)
        if found is None or found[0] != rate:
            share = Rate(rate / self.workers, 1.0)
            burst = max(1, math.ceil(rate / self.workers))
            found = self._throttles[tenant.id] = (rate, LocalThrottle(share, burst, self._clock))
        wait = found[1].acquire()
        if wait > 0:
            raise _too_many(
                f"tenant {tenant.id!r} is over its {rate:g} send requests a second", wait
            )

    async def check_recipients(self, tenant: Tenant, count: int) -> None:
        """``count`` more recipients today for the tenant, or a 429 when they would take it
        over its daily limit (then they are not counted)."""
        limit = tenant.recipients_per_day
        if limit <= 0:
            return
        day = await self._today(tenant.id)
        sent = day.counted + day.mine
        if sent + count > limit:
            left = max(0, limit - sent)
            raise _too_many(
                f"tenant {tenant.id!r} may send {limit} recipients a day and has {left} left"
                f" today; this send has {count}",
                day.start + DAY - self._wall(),
            )
        day.mine += count

    async def _today(self, tenant_id: str) -> _Day:
        now, wall = self._clock(), self._wall()
        start = wall // DAY * DAY
        day = self._days.get(tenant_id)
        if day is None or day.start != start or now - day.read_at > REFRESH:
            counted = await self._count_today(tenant_id, start, wall + HOUR)
            day = self._days[tenant_id] = _Day(start, counted, now)
        return day


def _too_many(detail: str, wait: float) -> HTTPException:
    seconds = max(1, math.ceil(wait))
    return HTTPException(
        f"{detail}: retry in {seconds} s", status_code=429, headers={"Retry-After": str(seconds)}
    )
