"""A tenant's send limits (api/limits.py): requests a second shared over the workers, and
recipients a day from the store's count plus this worker's own since it read it."""

from __future__ import annotations

import pytest
from litestar.exceptions import HTTPException

from epoxi.api.limits import DAY, REFRESH, SendLimits
from epoxi.store.platform import Tenant

MIDNIGHT = 1_764_547_200.0  # 2025-12-01 00:00 UTC


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _tenant(**limits: float) -> Tenant:
    return Tenant(id="shop", name="Shop", **limits)  # type: ignore[arg-type]


async def test_requests_a_second_are_shared_over_the_workers() -> None:
    clock = Clock(100.0)
    limits = SendLimits(2, _never_counted, clock=clock)
    tenant = _tenant(requests_per_second=4)
    limits.check_request(tenant)  # this worker's share: 2 a second, in a burst of 2
    limits.check_request(tenant)
    with pytest.raises(HTTPException) as refused:
        limits.check_request(tenant)
    assert refused.value.status_code == 429
    assert refused.value.headers == {"Retry-After": "1"}
    clock.now += 0.5
    limits.check_request(tenant)
    limits.check_request(_tenant(requests_per_second=0))  # no limit


async def test_recipients_a_day_count_the_store_and_this_workers_own() -> None:
    clock, wall = Clock(0.0), Clock(MIDNIGHT + 3600)
    counted = {"shop": 7}
    reads: list[float] = []

    async def count_today(tenant_id: str, start: float, end: float) -> int:
        reads.append(start)
        return counted[tenant_id]

    limits = SendLimits(1, count_today, clock=clock, wall=wall)
    tenant = _tenant(recipients_per_day=10)
    await limits.check_recipients(tenant, 2)  # 7 + 2
    with pytest.raises(HTTPException) as refused:
        await limits.check_recipients(tenant, 2)  # 9 + 2 > 10
    assert "has 1 left today; this send has 2" in str(refused.value.detail)
    assert refused.value.headers == {"Retry-After": str(int(DAY - 3600))}
    await limits.check_recipients(tenant, 1)  # the refused ones were not counted
    assert reads == [MIDNIGHT]

    counted["shop"] = 3  # read again after REFRESH: the store's count replaces the guess
    clock.now += REFRESH + 1
    await limits.check_recipients(tenant, 7)
    wall.now += DAY  # a new day starts from the store's count of that day
    counted["shop"] = 0
    await limits.check_recipients(tenant, 10)
    assert reads == [MIDNIGHT, MIDNIGHT, MIDNIGHT + DAY]


async def _never_counted(tenant_id: str, start: float, end: float) -> int:
    raise AssertionError("no daily limit: the count is never read")
