"""When to try again: exponential backoff with jitter, capped; and when to give up."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    retry_interval: float  # delay after the first failure
    max_retry_interval: float  # the delay never grows beyond this
    max_age: float  # a message older than this expires

    def delay(self, attempts: int, rng: random.Random | None = None) -> float:
        """Delay after the ``attempts``-th failed attempt: interval * 2^(n-1), ±20 % jitter."""
        base = min(self.retry_interval * 2.0 ** max(0, attempts - 1), self.max_retry_interval)
        jitter: float = (rng or random).uniform(0.8, 1.2)
        return min(base * jitter, self.max_retry_interval)

    def expired(self, received_at: float, now: float) -> bool:
        return now - received_at >= self.max_age
