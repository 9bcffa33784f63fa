"""Traffic shaping automation: receivers' replies steer the ready queues.

The engine reads every outcome record (a record-log subscriber). A deferral or bounce whose
reply matches a rule of the shaping files (``[[providers.NAME.automation]]`` and the like) is
counted; when the rule's trigger is met, its action starts for its duration:

* ``suspend`` stops the path (egress source x site) the reply came on; ``suspend_tenant`` and
  ``suspend_campaign`` hold that tenant's (campaign's) mail for the site, from every source;
* ``bounce``, ``bounce_tenant``, ``bounce_campaign`` remove the matching waiting mail with an
  AdminBounce record, and do so to more that comes while the action lasts;
* ``set_config`` changes one shaping setting of the path (e.g. ``connection_limit = 1``).

Actions are kept in the store (:mod:`epoxi.store.automation`), so every worker applies them
(each polls for changes every ``sync_interval``) and a restart keeps them; they end by
themselves, or when an operator lifts one. Each start and end is an Automation record.

Adaptive rates (AIMD, ``adaptive_rate`` in a block) live here too, per path and per worker: a
deferral that says "rate" multiplies the path's message rate by ``decrease``, down to
``floor``; every ``every`` seconds of deliveries without one adds ``increase``, up to
``ceiling``. A path runs at its configured rate until its first such deferral.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass

import msgspec

from epoxi.delivery.dispatcher import Dispatcher
from epoxi.events.records import Record, RecordType, Response
from epoxi.events.sink import EventSink
from epoxi.ids import new_message_id
from epoxi.queue.model import Job, recipient_domain, tenant_campaign
from epoxi.queue.suspensions import Suspension, Suspensions
from epoxi.shaping.automation import BOUNCE_ACTIONS, SUSPEND_ACTIONS, Automated, scoped
from epoxi.shaping.files import AdaptiveRate, AutomationRule
from epoxi.shaping.throttle import Rate
from epoxi.store.automation import AutomationStore

log = logging.getLogger(__name__)

Bounce = Callable[[list[Job], str], int]
Take = Callable[[Callable[[Job], bool]], list[Job]]

_FAILURES = (RecordType.TRANSIENT_FAILURE, RecordType.BOUNCE)
MAX_CACHED = 100_000  # (domain, site) -> rules entries kept
DECREASE_GAP = 1.0  # seconds: rate deferrals closer together than this halve a rate once
SEEN = 1024  # replies remembered, so that the records of one reply's recipients count once
_SUSPEND_KIND = {"suspend": "source", "suspend_tenant": "tenant", "suspend_campaign": "campaign"}


@dataclass
class Aimd:
    """The adaptive message rate of one path, in messages per second. Its top is the lower of
    the ceiling and the path's configured rate: adapting never sends faster than configured."""

    config: AdaptiveRate
    domain: str  # whose layers give the path's configured rate
    current: float
    changed_at: float
    decreased_at: float = float("-inf")

    @classmethod
    def start(cls, config: AdaptiveRate, domain: str, configured: Rate | None, now: float) -> Aimd:
        return cls(config, domain, cls.top(config, configured), now)

    @staticmethod
    def top(config: AdaptiveRate, configured: Rate | None) -> float:
        ceiling = _per_second(config.ceiling)
        return min(ceiling, configured.count / configured.period) if configured else ceiling

    @property
    def rate(self) -> Rate:
        period = Rate.parse(self.config.ceiling).period  # shown in the ceiling's unit
        return Rate(round(self.current * period, 6), period)

    def backed_off(self, now: float) -> bool:
        """A rate deferral: multiply down (not below the floor), at most once per DECREASE_GAP
        (connections that got the same answer at once count once); True if it changed."""
        if now - self.decreased_at < DECREASE_GAP:
            return False
        before = self.current
        self.current = max(_per_second(self.config.floor), self.current * self.config.decrease)
        self.changed_at = self.decreased_at = now
        return self.current != before

    def succeeded(self, now: float, top: float) -> bool:
        """A delivery: after ``every`` seconds since the last change, add the step (not above
        ``top``); True if it changed."""
        if now - self.changed_at < self.config.every:
            return False
        step = _per_second(self.config.increase) if self.config.increase else top / 10
        before = self.current
        self.current = min(top, self.current + step)
        self.changed_at = now
        return self.current != before


def _per_second(text: str) -> float:
    rate = Rate.parse(text)
    return rate.count / rate.period


class Automation:
    """Watches replies, starts and ends actions, applies them to this worker's queues."""

    def __init__(
        self,
        *,
        store: AutomationStore,
        dispatcher: Dispatcher,
        suspensions: Suspensions,
        records: EventSink,
        take: Take,
        bounce: Bounce,
        clock: Callable[[], float] = time.time,
        sync_interval: float = 1.0,
    ) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.suspensions = suspensions
        self.records = records
        self._take = take
        self._bounce = bounce
        self._clock = clock
        self.sync_interval = sync_interval
        self.actions: dict[str, Automated] = {}  # active, by id
        self._bouncing: list[Automated] = []
        self._aimd: dict[tuple[str, str], Aimd] = {}  # (source, site) -> its adaptive rate
        self._rules: dict[tuple[str, str], list[tuple[str, AutomationRule]]] = {}
        self._rules_of = dispatcher.policy.files  # the shaping files the caches were made from
        self._seen: dict[tuple[str, int, str, str, str], None] = {}  # recent failure replies
        self._suspended: set[tuple[str, str, str]] = set()  # suspensions made for actions
        self._version = -1
        self._tasks: set[asyncio.Task[None]] = set()
        dispatcher.steering = self

    # ----------------------------------------------------------------- life cycle

    async def start(self) -> None:
        await self.sync()

    async def run(self) -> None:
        """Poll the store for other workers' changes and for actions that ran out."""
        while True:
            await asyncio.sleep(self.sync_interval)
            try:
                await self.sync()
            except Exception:
                log.exception("automation: reading the store failed")

    async def stop(self) -> None:
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)

    async def sync(self) -> None:
        """End what ran out, then apply the store's actions if they changed."""
        self._check_files()
        now = self._clock()
        for ended in await self.store.expire(now):
            self._record_end(ended)
        version = await self.store.version()
        if version != self._version:
            self._version = version
            self._apply(await self.store.active(now))

    # ----------------------------------------------------------------- replies in

    def observe(self, record: Record) -> None:
        """A record subscriber: outcomes feed the rules and the adaptive rates."""
        if record.type is RecordType.DELIVERY:
            if self._aimd:
                self._delivered(record)
            return
        if record.type not in _FAILURES or record.response is None or not record.site:
            return
        reply = _reply_text(record.response)
        if self._seen_before(record, reply):
            return  # another recipient of the same reply: one reply, one match
        domain = recipient_domain(record.recipient)
        for label, rule in self._rules_for(domain, record.site):
            if rule.pattern.search(reply):
                self._spawn(self._matched(label, rule, record, reply))
        if record.type is RecordType.TRANSIENT_FAILURE:
            self._maybe_back_off(domain, record, reply)

    def _seen_before(self, record: Record, reply: str) -> bool:
        """Whether a record of the same reply (message, attempt, path) came already: each
        recipient has its own record, and a reply at DATA is every recipient's."""
        key = (record.message_id, record.attempt, record.source, record.site, reply)
        if key in self._seen:
            return True
        self._seen[key] = None
        if len(self._seen) > SEEN:
            del self._seen[next(iter(self._seen))]
        return False

    def _check_files(self) -> None:
        """After a reload of the shaping files, rules and adaptive rates start afresh."""
        files = self.dispatcher.policy.files
        if files is self._rules_of:
            return
        self._rules_of, self._rules = files, {}
        paths, self._aimd = list(self._aimd), {}
        for path in paths:
            self.dispatcher.rate_changed(*path)  # back to the configured rate

    def _rules_for(self, domain: str, site: str) -> list[tuple[str, AutomationRule]]:
        self._check_files()
        files = self.dispatcher.policy.files
        key = (domain, site)
        rules = self._rules.get(key)
        if rules is None:
            if len(self._rules) >= MAX_CACHED:
                self._rules.clear()
            rules = self._rules[key] = files.rules(domain, site) if files is not None else []
        return rules

    async def _matched(self, label: str, rule: AutomationRule, record: Record, reply: str) -> None:
        try:
            await self._match(label, rule, record, reply)
        except Exception:  # the store is locked or closed: this match is lost, mail is not
            log.exception("automation: a match of %s could not be counted", label)

    async def _match(self, label: str, rule: AutomationRule, record: Record, reply: str) -> None:
        tenant, campaign = tenant_campaign(record.queue)
        scope = scoped(rule.action, source=record.source, tenant=tenant, campaign=campaign)
        if not scope:
            return  # a tenant rule, a message without a tenant: nothing to act on
        running = {(a.rule, a.scope) for a in self.actions.values()}
        now = self._clock()
        change = rule.change() if rule.action == "set_config" else {}
        candidate = Automated(
            id=new_message_id(),
            action=rule.action,
            rule=label,
            trigger=str(rule.trigger),
            site=record.site,
            setting=rule.name or "",
            value=msgspec.json.encode(next(iter(change.values()))).decode() if change else "",
            reply=reply,
            message_id=record.message_id,
            started=now,
            until=now + rule.duration,
            source=scope.get("source", ""),
            tenant=scope.get("tenant", ""),
            campaign=scope.get("campaign", ""),
        )
        if (candidate.rule, candidate.scope) in running:
            return  # it already acts: a burst of the same reply costs no store write
        started = await self.store.matched(candidate, rule.trigger.count, rule.trigger.period)
        if started is None:
            return
        log.warning("automation: %s for %gs: %s", started.describe(), rule.duration, reply)
        self._record(started, f"started: {started.describe()}; reply: {reply}")
        self._version = -1  # apply it here now, not at the next poll
        await self.sync()

    # ----------------------------------------------------------------- operators

    async def lift(self, action_id: str) -> Automated | None:
        """End an active action now; None when no such action is active."""
        ended = await self.store.end(action_id, "lifted by an operator", self._clock())
        if ended is not None:
            self._record_end(ended)
            await self.sync()
        return ended

    async def active(self) -> list[Automated]:
        return await self.store.active(self._clock())

    # ----------------------------------------------------------------- applying

    def _apply(self, actions: list[Automated]) -> None:
        """Make this worker's suspensions, bounces and overrides those of ``actions``."""
        before, self.actions = self.actions, {a.id: a for a in actions}
        self._suspend([a for a in actions if a.action in SUSPEND_ACTIONS])
        self._bouncing = [a for a in actions if a.action in BOUNCE_ACTIONS]
        for action in self._bouncing:
            if action.id not in before:
                self._bounce_waiting(action)
        self._set_overrides([a for a in actions if a.action == "set_config"])

    def _suspend(self, actions: list[Automated]) -> None:
        """One suspension per target (several actions may want the same one: it lasts as
        long as the longest), lifted once no action wants it. An operator's own suspension
        of the same target is left as it is."""
        wanted: dict[tuple[str, str, str], Suspension] = {}
        for action in actions:
            suspension = _suspension(action)
            other = wanted.get(suspension.key)
            if other is None or (other.until or 0) < (suspension.until or 0):
                wanted[suspension.key] = suspension
        current = {s.key: s for s in self.suspensions.active()}
        for key, suspension in wanted.items():
            have = current.get(key)
            if have is None or (is_automated(have) and have != suspension):
                self.suspensions.suspend(suspension)
        for key in self._suspended - wanted.keys():
            have = current.get(key)
            if have is not None and is_automated(have):
                self.suspensions.resume(have.kind, have.value, have.site)
        self._suspended = set(wanted)

    def _bounce_waiting(self, action: Automated) -> None:
        jobs = self._take(lambda job: action.covers(*_where(job)))
        if jobs:
            count = self._bounce(jobs, _bounce_reason(action))
            log.warning("automation: bounced %d recipients (%s)", count, action.describe())

    def _set_overrides(self, actions: list[Automated]) -> None:
        overrides: dict[tuple[str, str], tuple[str, dict[str, object]]] = {}
        for action in sorted(actions, key=lambda a: a.started):  # a later one wins
            key = (action.source, action.site)
            label, values = overrides.get(key, (f"automation {action.rule}", {}))
            values = {**values, action.setting: msgspec.json.decode(action.value)}
            overrides[key] = (label, values)
        policy = self.dispatcher.policy
        if overrides != policy.overrides:
            self.dispatcher.reshape(policy.with_overrides(overrides))

    # ----------------------------------------------------------------- the dispatcher's questions

    def bounce_reason(self, job: Job) -> str | None:
        """Why a routed job is to be bounced now (a bounce action covers it), or None."""
        if not self._bouncing:
            return None
        where = _where(job)
        for action in self._bouncing:
            if action.covers(*where) and action.until > self._clock():
                return _bounce_reason(action)
        return None

    def rate_override(self, source: str, site: str) -> Rate | None:
        """The adaptive message rate of a path, once it has one."""
        self._check_files()
        aimd = self._aimd.get((source, site))
        return aimd.rate if aimd is not None else None

    def adaptive(self) -> list[tuple[str, str, Aimd]]:
        return [(source, site, aimd) for (source, site), aimd in self._aimd.items()]

    # ----------------------------------------------------------------- adaptive rates

    def _maybe_back_off(self, domain: str, record: Record, reply: str) -> None:
        path = (record.source, record.site)
        aimd = self._aimd.get(path)
        if aimd is None:
            config = self._adaptive_config(domain, record.site)
            if config is None or not config.pattern.search(reply):
                return
            configured = self._configured_rate(domain, *path)
            aimd = self._aimd[path] = Aimd.start(config, domain, configured, self._clock())
        elif not aimd.config.pattern.search(reply):
            return
        if aimd.backed_off(self._clock()):
            log.info("adaptive rate of %s->%s down to %s", *path, aimd.rate)
            self.dispatcher.rate_changed(*path)

    def _adaptive_config(self, domain: str, site: str) -> AdaptiveRate | None:
        files = self.dispatcher.policy.files
        return files.adaptive(domain, site) if files is not None else None

    def _configured_rate(self, domain: str, source: str, site: str) -> Rate | None:
        return self.dispatcher.policy.resolve(domain, site, source).max_message_rate

    def _delivered(self, record: Record) -> None:
        path = (record.source, record.site)
        aimd = self._aimd.get(path)
        if aimd is None:
            return
        top = Aimd.top(aimd.config, self._configured_rate(aimd.domain, *path))
        if not aimd.succeeded(self._clock(), top):
            return
        if aimd.current >= top:  # recovered: the configured rate again
            del self._aimd[path]
            log.info("adaptive rate of %s->%s back to its configured rate", *path)
        else:
            log.info("adaptive rate of %s->%s up to %s", *path, aimd.rate)
        self.dispatcher.rate_changed(*path)

    # ----------------------------------------------------------------- records

    def _record_end(self, action: Automated) -> None:
        log.info("automation ended (%s): %s", action.ended_why, action.describe())
        self._record(action, f"ended ({action.ended_why}): {action.describe()}", started=False)

    def _record(self, action: Automated, reason: str, *, started: bool = True) -> None:
        self.records.emit(
            Record(
                type=RecordType.AUTOMATION,
                message_id=action.message_id if started else "",
                site=action.site,
                source=action.source,
                tenant=action.tenant,
                campaign=action.campaign,
                reason=f"{action.id} {reason}",
            )
        )

    def _spawn(self, coro: Coroutine[None, None, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _reply_text(response: Response) -> str:
    return " ".join(p for p in (str(response.code), response.enhanced, response.text) if p)


def _where(job: Job) -> tuple[str, str, str, str]:
    meta = job.message.meta
    return job.site, job.source, meta.tenant, meta.campaign


def is_automated(suspension: Suspension) -> bool:
    """Whether automation made this suspension (its reason names the action)."""
    return suspension.reason.startswith("automation ")


def _suspension(action: Automated) -> Suspension:
    kind = _SUSPEND_KIND[action.action]
    value = {"source": action.source, "tenant": action.tenant, "campaign": action.campaign}[kind]
    reason = f"automation {action.id}: {action.rule} matched {action.reply!r}"
    return Suspension(kind, value, reason, action.until, site=action.site)  # type: ignore[arg-type]


def _bounce_reason(action: Automated) -> str:
    return f"bounced by automation {action.id} ({action.rule}): {action.reply}"
