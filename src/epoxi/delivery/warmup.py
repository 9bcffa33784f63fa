"""IP warm-up: each warmed-up source sends at most its profile's allowance a UTC day.

The dispatcher asks :meth:`Warmup.allow` for every job it is about to put in a ready queue
(a job is one message's recipients in one domain; every attempt counts, a retry too: the
receiver sees each one). Over the allowance, overall or for the job's shaping provider, the
job waits for the next UTC day, or, with ``over_limit = "spill"``, leaves through its pool's
fallback pool; it never bounces for it. A paused warm-up lets nothing through.

A warm-up pauses itself when its source's deferrals or bounces over the last ten minutes
(:class:`~epoxi.delivery.pools.SourceHealth`) pass their thresholds with at least
``min_sample`` attempts; an operator resumes it (``POST /admin/warmup/{source}/resume``).
Complaint rates come with feedback loops, in a later issue.

With worker processes each worker has its share of every allowance (the allowance divided
by the workers, the remainder to the first ones) and counts its own jobs. The counts of the
day and the pauses are kept in the store (:mod:`epoxi.store.warmup`), written every
``sync`` (about a second): a restart goes on from today's count.
"""

from __future__ import annotations

import logging
import random
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass

from epoxi.api_types import ProviderAllowance, WarmupInfo
from epoxi.config import DeliverySettings, WarmupSettings, warmup_of
from epoxi.delivery.pools import WINDOW_MINUTES, Pools
from epoxi.events.records import Record, RecordType
from epoxi.shaping.warmup import (
    SHIPPED,
    Profile,
    day_number,
    epoch_day,
    next_day_at,
    ramp_of,
)
from epoxi.store.warmup import WarmupNews, WarmupStore

log = logging.getLogger(__name__)

PAUSED_RECHECK = 300.0  # a paused source's jobs look again this often (a resume is seen)
_JUDGED = (RecordType.TRANSIENT_FAILURE, RecordType.BOUNCE)


@dataclass(frozen=True, slots=True)
class _Plan:
    settings: WarmupSettings
    profile: Profile
    configured_as: str  # the source or pool whose entry it is


class Warmup:
    """The warm-ups of one worker: allowances, today's counts, pauses."""

    def __init__(
        self,
        delivery: DeliverySettings,
        pools: Pools,
        *,
        worker: int = 0,
        workers: int = 1,
        store: WarmupStore | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._pools = pools
        self._worker, self._workers = worker, workers
        self._store = store
        self._clock = clock
        self._day = epoch_day(clock())
        self._sent: dict[str, dict[str, int]] = {}  # source -> provider ("": none) -> today
        self._total: dict[str, int] = {}  # source -> jobs today
        self._paused: dict[str, str] = {}  # source -> why (this worker's and the store's)
        self._judge_from: dict[str, float] = {}  # source -> not judged before (a resume)
        self._told: set[tuple[str, str]] = set()  # (source, provider) told over today
        self._news = WarmupNews()
        self._over = 0  # jobs held back or spilled over an allowance or by a pause, since start
        self._plans: dict[str, _Plan] = {}
        self.active = False
        self.configure(delivery)

    def configure(self, delivery: DeliverySettings) -> None:
        """Take the warm-ups of (new) settings; today's counts and pauses carry over."""
        profiles = dict(SHIPPED)
        for name, custom in delivery.warmup_profiles.items():
            providers = {p: ramp_of(days) for p, days in custom.providers.items()}
            profiles[name] = Profile(name, ramp_of(custom.days), providers)
        self._plans = {
            source: _Plan(settings, profiles[settings.profile], _entry(delivery.warmup, settings))
            for source, settings in warmup_of(delivery).items()
        }
        self.active = bool(self._plans)

    # ----------------------------------------------------------------- the allowance

    def allow(self, source: str, provider: str | None) -> bool:
        """Whether a job of ``source`` to ``provider`` may go now; counts it when it may."""
        plan = self._plans.get(source)
        if plan is None:
            return True
        now = self._clock()
        self._roll(now)
        key = provider or ""
        if not self._room(plan, source, key, day_number(plan.settings.start, now)):
            self._over += 1
            return False
        sent = self._sent.setdefault(source, {})
        sent[key] = sent.get(key, 0) + 1
        self._total[source] = self._total.get(source, 0) + 1
        counted = (self._day, source, key)
        self._news.sent[counted] = self._news.sent.get(counted, 0) + 1
        return True

    def _room(self, plan: _Plan, source: str, provider: str, day: int) -> bool:
        """Whether today's allowance has room for one more job (of this worker's share)."""
        if self.paused(source):
            return False
        overall, own = plan.profile.allowance(max(day, 1), provider or None)
        if overall is not None and self._total.get(source, 0) >= self._part(overall):
            self._tell(source, "", day, overall)
            return False
        if own is not None and self._sent.get(source, {}).get(provider, 0) >= self._part(own):
            self._tell(source, provider, day, own)
            return False
        return True

    def spills(self, source: str) -> bool:
        """Whether a source's mail over its allowance goes to its pool's fallback."""
        plan = self._plans.get(source)
        return plan is not None and plan.settings.over_limit == "spill"

    def wait_until(self, source: str) -> float:
        """When a job held back for ``source`` looks again: the next UTC day (a minute of
        jitter, so that the held mail does not all wake at once), or soon when paused."""
        now = self._clock()
        if self.paused(source):
            return now + PAUSED_RECHECK * random.uniform(1.0, 1.2)
        return next_day_at(now) + random.uniform(0.0, 60.0)

    def why_over(self, source: str) -> str:
        """Why ``source`` lets no more through, for the Rerouted record of a spill."""
        if self.paused(source):
            return f"source {source}: warm-up paused ({self.pause_reason(source)})"
        return f"source {source} is over its warm-up allowance for today"

    def _part(self, allowance: int) -> int:
        """This worker's share of an allowance; the shares add up to it."""
        share, rest = divmod(allowance, self._workers)
        return share + (1 if self._worker < rest else 0)

    def _roll(self, now: float) -> None:
        day = epoch_day(now)
        if day != self._day:
            self._day = day
            self._sent.clear()
            self._total.clear()
            self._told.clear()

    def _tell(self, source: str, provider: str, day: int, allowance: int) -> None:
        if (source, provider) not in self._told:
            self._told.add((source, provider))
            whose = f" for provider {provider}" if provider else ""
            log.info(
                "source %s: warm-up day %d allowance%s of %d reached; more waits for tomorrow%s",
                source,
                day,
                whose,
                allowance,
                " or spills to the fallback pool" if self.spills(source) else "",
            )

    # ----------------------------------------------------------------- pauses

    def paused(self, source: str) -> bool:
        plan = self._plans.get(source)
        return plan is not None and (plan.settings.paused or source in self._paused)

    def pause_reason(self, source: str) -> str:
        plan = self._plans.get(source)
        if plan is not None and plan.settings.paused:
            return "paused in the configuration"
        return self._paused.get(source, "")

    def known(self, source: str) -> bool:
        return source in self._plans

    def pause(self, source: str, reason: str) -> None:
        if source in self._paused:
            return
        self._paused[source] = reason
        self._news.resumed.discard(source)
        self._news.paused[source] = (reason, self._clock())
        log.warning("source %s: warm-up paused: %s", source, reason)

    def resume(self, source: str) -> bool:
        """Lift a pause (not one of the configuration); True when there was one."""
        if self._paused.pop(source, None) is None:
            return False
        self._news.paused.pop(source, None)
        self._news.resumed.add(source)
        self._judge_from[source] = self._clock() + WINDOW_MINUTES * 60  # a fresh window
        log.info("source %s: warm-up resumed", source)
        return True

    def observe(self, record: Record) -> None:
        """A record subscriber, after the pools': a deferral or bounce may pause a warm-up."""
        if record.type in _JUDGED and record.source in self._plans:
            self._judge(record.source)

    def _judge(self, source: str) -> None:
        plan = self._plans[source]
        if self.paused(source) or self._clock() < self._judge_from.get(source, 0.0):
            return
        delivered, deferred, bounced, _, _ = self._pools.health[source].counts()
        attempts = delivered + deferred + bounced
        if attempts < plan.settings.min_sample:
            return
        for what, count, limit in (
            ("deferral", deferred, plan.settings.pause_deferral_rate),
            ("bounce", bounced, plan.settings.pause_bounce_rate),
        ):
            if count / attempts > limit:
                self.pause(
                    source,
                    f"{what} rate {count / attempts:.0%} over {limit:.0%} in the last "
                    f"{WINDOW_MINUTES} minutes ({count} of {attempts} attempts)",
                )
                return

    # ----------------------------------------------------------------- the store

    async def start(self) -> None:
        """Today's counts of this worker and the pauses, from the store."""
        if self._store is None:
            return
        counts, pauses = await self._store.open(self._day)
        for (source, provider), sent in counts.items():
            by_provider = self._sent.setdefault(source, {})
            by_provider[provider] = by_provider.get(provider, 0) + sent
            self._total[source] = self._total.get(source, 0) + sent
        self._paused.update(pauses)

    async def sync(self) -> None:
        """Write the news to the store; take the pauses other workers made or lifted."""
        if self._store is None or not self._store.started or not (self.active or self._news):
            return
        news, self._news = self._news, WarmupNews()
        try:
            pauses = await self._store.sync(news, keep_from=self._day - 1)
        except sqlite3.Error as exc:
            log.warning("warm-up counts: cannot write the store (%s); will retry", exc)
            self._put_back(news)
            return
        if not self._news.paused and not self._news.resumed:  # nothing newer meanwhile
            for source in set(pauses) - set(self._paused):
                log.warning("source %s: warm-up paused: %s", source, pauses[source])
            self._paused = pauses

    async def stop(self) -> None:
        if self._store is not None:
            await self.sync()
            await self._store.stop()

    def _put_back(self, news: WarmupNews) -> None:
        for key, sent in news.sent.items():
            self._news.sent[key] = self._news.sent.get(key, 0) + sent
        for source, paused in news.paused.items():
            if source not in self._news.resumed:
                self._news.paused.setdefault(source, paused)
        self._news.resumed |= news.resumed - set(self._news.paused)

    # ----------------------------------------------------------------- visibility

    def gauges(self) -> dict[str, tuple[str, float]]:
        """Figures for the metrics: name -> (description, value)."""
        return {
            "warmup_sources": ("Egress sources with an IP warm-up", len(self._plans)),
            "warmup_paused_sources": (
                "Egress sources whose IP warm-up is paused",
                sum(1 for source in self._plans if self.paused(source)),
            ),
            "warmup_sent_today": (
                "Jobs let through today (UTC) by sources warming up",
                sum(self._total.get(source, 0) for source in self._plans),
            ),
            "warmup_over_allowance": (
                "Jobs held back or spilled by an IP warm-up (allowance or pause) since start",
                self._over,
            ),
        }

    def info(self, source: str) -> WarmupInfo | None:
        """A source's warm-up today (this worker's share), for /admin/pools."""
        plan = self._plans.get(source)
        if plan is None:
            return None
        now = self._clock()
        self._roll(now)
        day = day_number(plan.settings.start, now)
        overall, _ = plan.profile.allowance(max(day, 1))
        sent = self._sent.get(source, {})
        shown = sorted({*plan.profile.providers, *(p for p in sent if p)})
        delivered, deferred, bounced, _, _ = self._pools.health[source].counts()
        attempts = max(1, delivered + deferred + bounced)
        return WarmupInfo(
            profile=plan.profile.name,
            configured_as=plan.configured_as,
            start=plan.settings.start.isoformat(),
            day=day,
            last_day=plan.profile.last_day,
            over=day > plan.profile.last_day,
            over_limit=plan.settings.over_limit,
            sent_today=self._total.get(source, 0),
            allowed_today=self._part(overall) if overall is not None else None,
            providers=[self._provider(plan, day, name, sent.get(name, 0)) for name in shown],
            deferral_rate=deferred / attempts,
            bounce_rate=bounced / attempts,
            paused=self.paused(source),
            paused_reason=self.pause_reason(source) or None,
        )

    def _provider(self, plan: _Plan, day: int, name: str, sent: int) -> ProviderAllowance:
        _, allowed = plan.profile.allowance(max(day, 1), name)
        return ProviderAllowance(
            name=name, sent=sent, allowed=self._part(allowed) if allowed is not None else None
        )


def _entry(named: dict[str, WarmupSettings], settings: WarmupSettings) -> str:
    """The name of the [delivery.warmup] entry ``settings`` are (a source's or a pool's)."""
    return next(name for name, found in named.items() if found is settings)
