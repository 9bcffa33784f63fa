"""Rate limits such as ``"100/s"`` or ``"2000/h"``, enforced with GCRA (a leaky bucket).

GCRA keeps one number per throttle, the theoretical arrival time, so it is cheap to check.
:class:`Throttle` is the port (a cluster keeps its throttles in Redis); :class:`LocalThrottle`
is the one a node keeps in memory.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|m|min|h|hour|d|day)\s*$")
_PERIODS = {
    "s": 1.0,
    "sec": 1.0,
    "m": 60.0,
    "min": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
}


@dataclass(frozen=True)
class Rate:
    """``count`` events per ``period`` seconds."""

    count: float
    period: float

    @classmethod
    def parse(cls, text: str) -> Rate:
        match = _RATE.match(text)
        if not match or float(match.group(1)) <= 0:
            raise ValueError("a rate looks like '100/s', '600/m', '2000/h' or '50000/d'")
        return cls(float(match.group(1)), _PERIODS[match.group(2)])

    @property
    def interval(self) -> float:
        return self.period / self.count

    def __str__(self) -> str:
        unit = {1.0: "s", 60.0: "m", 3600.0: "h", 86400.0: "d"}.get(self.period, "s")
        count = self.count if unit != "s" else self.count / self.period
        return f"{count:g}/{unit}"


class Throttle(Protocol):
    """Paces events to a rate."""

    def acquire(self) -> float:
        """Take one event if allowed (returns 0), else return the seconds to wait."""
        ...

    def set_rate(self, rate: Rate) -> None:
        """Change the rate from now on (a reload of the shaping policy)."""
        ...


class LocalThrottle:
    """GCRA in memory: allows a burst of up to ``burst`` events, then one per interval.

    Without a fixed ``burst``, the burst is what the rate allows in ``window`` seconds (at
    least one event): a window of 10 ms lets a rate of 100,000/s go in groups of 1,000
    without a timer between each two, and leaves a rate of 100/s or less exact."""

    def __init__(
        self,
        rate: Rate,
        burst: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        window: float = 0.0,
    ) -> None:
        self._burst = burst
        self._window = window
        self._clock = clock
        self._tat = 0.0  # theoretical arrival time
        self.set_rate(rate)

    def set_rate(self, rate: Rate) -> None:
        self.interval = rate.interval
        burst = self._burst
        if burst is None:
            burst = max(1, int(self._window * rate.count / rate.period))
        self.tolerance = self.interval * (burst - 1)

    def delay(self) -> float:
        """Seconds to wait before the next event may happen; 0 means it may happen now."""
        return max(0.0, self._tat - self.tolerance - self._clock())

    def acquire(self) -> float:
        """Take one event if allowed (returns 0), else return the seconds to wait."""
        now = self._clock()
        tat = max(self._tat, now)
        wait = tat - self.tolerance - now
        if wait > 0:
            return wait
        self._tat = tat + self.interval
        return 0.0
