"""IP warm-up schedules: the day of a source's warm-up -> the most jobs it may send that day.

A profile maps day numbers to a daily allowance, overall and per shaping provider ("google",
"yahoo", ... as the shaping files name them). Day 1 is the warm-up's start date; days are UTC
dates. A day between two listed ones keeps the figure of the last listed day before it. After
the profile's last listed day the warm-up is over: no cap applies any more. Before the start
date the day-1 figures apply (a source given a warm-up is new: it is never uncapped early).

Pure logic, no clock and no I/O: :mod:`epoxi.delivery.warmup` enforces it.
"""

from __future__ import annotations

import bisect
import datetime
from collections.abc import Mapping
from dataclasses import dataclass, field

DAY = 86400
Ramp = tuple[tuple[int, int], ...]  # (day number, allowance), sorted by day


@dataclass(frozen=True, slots=True)
class Profile:
    """A warm-up schedule: daily allowances overall and per provider, by day number."""

    name: str
    overall: Ramp
    providers: Mapping[str, Ramp] = field(default_factory=dict)

    @property
    def last_day(self) -> int:
        """The last day with a cap; the warm-up is over after it."""
        ramps = [self.overall, *self.providers.values()]
        return max(ramp[-1][0] for ramp in ramps if ramp)

    def allowance(self, day: int, provider: str | None = None) -> tuple[int | None, int | None]:
        """The day's allowance overall and for ``provider`` (None: no cap)."""
        ramp = self.providers.get(provider) if provider is not None else None
        return figure_at(self.overall, day), figure_at(ramp, day) if ramp else None


def figure_at(ramp: Ramp, day: int) -> int | None:
    """The figure of ``day``: the last listed day's at or before it (day 1's before the
    first), None past the ramp's last day."""
    if not ramp or day > ramp[-1][0]:
        return None
    index = bisect.bisect_right(ramp, day, key=_day_of) - 1
    return ramp[max(index, 0)][1]


def _day_of(item: tuple[int, int]) -> int:
    return item[0]


def ramp_of(days: Mapping[int, int]) -> Ramp:
    return tuple(sorted(days.items()))


def epoch_day(timestamp: float) -> int:
    """The UTC day of a timestamp, counted from 1970-01-01."""
    return int(timestamp // DAY)


def day_number(start: datetime.date, timestamp: float) -> int:
    """The warm-up day at ``timestamp``: 1 on the start date (UTC), 2 the day after, ...;
    0 or less before the start."""
    start_day = (start - datetime.date(1970, 1, 1)).days
    return epoch_day(timestamp) - start_day + 1


def next_day_at(timestamp: float) -> float:
    """The next UTC midnight after ``timestamp``."""
    return float((epoch_day(timestamp) + 1) * DAY)


def _two_figures(value: float) -> int:
    """Rounded to two significant figures: schedules read 3,200 or 51,000, not 3,277."""
    whole = max(1, round(value))
    scale: int = 10 ** max(0, len(str(whole)) - 2)
    return round(whole / scale) * scale


def _geometric(first: int, growth: float, days: int) -> Ramp:
    return tuple((day, _two_figures(first * growth ** (day - 1))) for day in range(1, days + 1))


def _share(ramp: Ramp, part: float) -> Ramp:
    return tuple((day, _two_figures(figure * part)) for day, figure in ramp)


# The shipped profiles follow the shape of the warm-up schedules that ESPs and deliverability
# guides publish for a new dedicated IP: start with tens to a few hundred messages on day 1,
# grow the volume by a steady factor each day (most guides double it), over two to six weeks.
# The exact figures are Epoxi's choice within that practice, not any one provider's table.
#
# standard: 200 on day 1, the "few hundred" most guides start from; doubled each day, the
# common growth step; 14 days, the short end of the usual 2-6 weeks (day 14: 1,600,000).
_STANDARD = _geometric(200, 2.0, 14)
# conservative: 50 on day 1, the low end guides give; x1.5 a day, a slower step than the
# usual doubling; 28 days, four weeks, inside the usual 2-6 weeks (day 28: 2,800,000).
_CONSERVATIVE = _geometric(50, 1.5, 28)
# Per provider (the shaping files' names of the largest mailbox providers, who judge a new IP
# by its own traffic to them): no provider takes more than a share of the day's allowance,
# half (standard) or a third (conservative). Not published by the providers; a conservative
# choice of Epoxi's, so that no one of them sees the whole of a new IP's volume at once.
_BIG_PROVIDERS = ("google", "microsoft_consumer", "yahoo")

SHIPPED: dict[str, Profile] = {
    "standard": Profile(
        "standard", _STANDARD, {p: _share(_STANDARD, 1 / 2) for p in _BIG_PROVIDERS}
    ),
    "conservative": Profile(
        "conservative", _CONSERVATIVE, {p: _share(_CONSERVATIVE, 1 / 3) for p in _BIG_PROVIDERS}
    ),
}
