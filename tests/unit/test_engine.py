"""The middle of the engine on fakes: ingest, dispatcher and ready queues, outcomes.

No sockets, no disk, no sleeping: a MemorySpool, a FakeTransport, a ManualClock and a
Recorder stand in for the spool, SMTP, time and the record log.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest

from epoxi.app import destination_retry, shaping_policy
from epoxi.bounce.classify import Classifier
from epoxi.config import Settings
from epoxi.delivery.client import TlsPolicy
from epoxi.delivery.dispatcher import Dispatcher, with_tls
from epoxi.delivery.pools import Pools
from epoxi.delivery.routing import Destination, Router
from epoxi.dns.resolver import Resolver
from epoxi.errors import ConnectionFailed, DeliveryError, DnsPermanent, MailLoop, MessageRefused
from epoxi.events.records import Record, RecordType
from epoxi.ids import new_message_id
from epoxi.ingest import Ingest
from epoxi.message import MessageMeta
from epoxi.outcomes import Disposition, Synthetic
from epoxi.queue.model import HeldBodies, Job
from epoxi.queue.retry import RetryPolicy
from epoxi.queue.suspensions import Suspension, SuspensionRegistry
from epoxi.shaping.files import ShapingFiles, parse
from epoxi.shaping.policy import Shaping
from epoxi.shaping.slots import ConnectionSlots
from epoxi.smtp.replies import Reply
from epoxi.testing.fakes import FakeTransport, GatedSlots, ManualClock, MemorySpool, Recorder
from tests.conftest import eventually

BODY = b"From: a@sender.test\r\nSubject: hi\r\n\r\nhello\r\n"
DAY = 86400.0


@dataclass
class Engine:
    """Ingest, dispatcher and outcomes wired as app.py wires them, on fakes."""

    settings: Settings
    clock: ManualClock = field(default_factory=ManualClock)
    spool: MemorySpool = field(default_factory=MemorySpool)
    records: Recorder = field(default_factory=Recorder)
    transport: FakeTransport = field(default_factory=FakeTransport)
    rescheduled: list[Job] = field(default_factory=list)
    slots: ConnectionSlots | None = None
    held_bodies: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        delivery = self.settings.delivery
        self.suspensions = SuspensionRegistry(self.clock)
        self.pools = Pools(delivery, self.suspensions, self.clock)
        self.ingest = Ingest(
            spool=self.spool,
            records=self.records,
            schedule=self.submit,
            max_hops=5,
            known_pool=self.pools.known,
            bodies=HeldBodies(self.held_bodies),
        )
        self.outcomes = Disposition(
            classifier=Classifier.from_files([]),
            records=self.records,
            spool=self.spool,
            reschedule=self.rescheduled.append,
            retry=RetryPolicy(
                delivery.retry_interval, delivery.max_retry_interval, delivery.max_age
            ),
            inject=self.ingest.inject,
            hostname="mx.sender.test",
            clock=self.clock,
            bodies=self.ingest.bodies,
        )
        self.dispatcher = Dispatcher(
            router=Router(self.settings, Resolver(nameservers=[("127.0.0.1", 53)])),
            policy=shaping_policy(delivery),
            transport=self.transport,
            outcomes=self.outcomes,
            suspensions=self.suspensions,
            load_body=self.spool.load_body,
            hold_back=self.rescheduled.append,
            pools=self.pools,
            slots=self.slots,
        )

    def submit(self, job: Job) -> None:
        self.dispatcher.submit(job)

    async def send(
        self, *recipients: str, sender: str = "a@sender.test", age: float = 0.0, **meta: Any
    ) -> str:
        """Accept a message received ``age`` seconds ago."""
        message = MessageMeta(
            id=new_message_id(),
            sender=sender,
            recipients=list(recipients),
            received_at=self.clock() - age,
            size=len(BODY),
            **meta,
        )
        await self.ingest.accept(message, BODY, trusted=True)
        return message.id

    async def outcome(self, recipient: str) -> RecordType:
        return await self.records.outcome(recipient)

    def outcome_of(self, recipient: str) -> RecordType:
        """The outcome already recorded for ``recipient``."""
        [record] = [r for r in self.records.records if r.recipient == recipient]
        return record.type

    async def dsns(self, count: int) -> list[Record]:
        return await self.records.wait(lambda r: r.origin == "dsn", count)

    async def close(self) -> None:
        await self.dispatcher.close()
        await self.outcomes.stop()


def settings(**delivery: Any) -> Settings:
    delivery.setdefault("routes", [{"domains": ["*"], "hosts": ["192.0.2.1:25"]}])
    return Settings.model_validate({"hostname": "mx.sender.test", "delivery": delivery})


@pytest.fixture
async def engine() -> Any:
    made = Engine(settings(defaults={"idle_timeout": 0.01}))
    yield made
    await made.close()


async def test_delivered_recipients_leave_the_spool(engine: Engine) -> None:
    message_id = await engine.send("one@a.test", "two@b.test")
    assert await engine.outcome("one@a.test") is RecordType.DELIVERY
    assert await engine.outcome("two@b.test") is RecordType.DELIVERY
    assert message_id not in engine.spool.messages
    assert engine.records.of(RecordType.RECEPTION)[0].origin == "smtp"


async def test_bodies_past_the_held_limit_are_read_from_the_spool_when_sent() -> None:
    spool, loaded = MemorySpool(), []
    load = spool.load_body

    async def load_body(message_id: str) -> bytes:
        loaded.append(message_id)
        return await load(message_id)

    spool.load_body = load_body  # type: ignore[method-assign]
    limit = 2 * len(BODY)
    engine = Engine(settings(defaults={"idle_timeout": 0.01}), spool=spool, held_bodies=limit)
    bodies = engine.ingest.bodies
    ids = [await engine.send(f"r{i}@a.test", "x@b.test") for i in range(3)]
    await engine.records.wait(lambda r: r.type is RecordType.DELIVERY, 6)
    assert loaded == [ids[2], ids[2]]  # each of its two jobs (a.test, b.test) read it
    assert {sent.body for sent in engine.transport.sent} == {BODY}
    assert (bodies.held, bodies.limit) == (0, 2 * len(BODY))  # every kept body let go
    await engine.close()


async def test_one_connection_carries_several_jobs() -> None:
    engine = Engine(settings(defaults={"idle_timeout": 0.01, "connection_limit": 1}))
    for i in range(5):
        await engine.send(f"r{i}@a.test")
    await engine.records.wait(lambda r: r.type is RecordType.DELIVERY, 5)
    assert len(engine.transport.sent) == 5 and engine.transport.connects == 1
    await engine.close()


async def test_transient_failure_is_rescheduled_with_backoff(engine: Engine) -> None:
    message_id = await engine.send("tempfail@a.test")
    assert await engine.outcome("tempfail@a.test") is RecordType.TRANSIENT_FAILURE
    [record] = engine.records.of(RecordType.TRANSIENT_FAILURE)
    [job] = engine.rescheduled
    assert job.attempts == 1 and job.due > engine.clock() and record.next_attempt == job.due
    meta, _ = engine.spool.messages[message_id]
    assert meta.attempts == 1 and meta.last_response.startswith("451 4.2.0")


async def test_bounce_sends_one_dsn_to_the_sender(engine: Engine) -> None:
    message_id = await engine.send("reject@a.test", "ok@a.test")
    assert await engine.outcome("reject@a.test") is RecordType.BOUNCE
    [dsn] = await engine.dsns(1)
    await engine.outcomes.stop()  # the DSN is written, then the original leaves
    assert dsn.recipients == ["a@sender.test"]
    assert engine.outcome_of("ok@a.test") is RecordType.DELIVERY
    assert message_id not in engine.spool.messages


async def test_null_sender_gets_no_dsn(engine: Engine) -> None:
    await engine.send("reject@a.test", sender="")
    assert await engine.outcome("reject@a.test") is RecordType.BOUNCE
    await engine.outcomes.stop()
    assert [r.origin for r in engine.records.of(RecordType.RECEPTION)] == ["smtp"]


async def test_expired_job_is_not_attempted(engine: Engine) -> None:
    await engine.send("late@a.test", age=6 * DAY)  # past the 5-day max_age
    assert await engine.outcome("late@a.test") is RecordType.EXPIRATION
    assert engine.transport.sent == []


async def test_max_age_counts_from_send_at(engine: Engine) -> None:
    """Sent six days ago for a send_at five days later: due now, and not expired (a bug a
    user hit: age counted from the receipt, so it expired before it was ever sent)."""
    now = engine.clock()
    message_id = await engine.send("later@a.test", age=6 * DAY, due=now, not_before=now - DAY)
    assert await engine.outcome("later@a.test") is RecordType.DELIVERY
    assert message_id not in engine.spool.messages


@pytest.mark.parametrize(
    ("error", "kind", "status"),
    [
        (ConnectionFailed("connection refused"), RecordType.TRANSIENT_FAILURE, "4.4.1"),
        # no mail host exists at all: a bounce, as Postfix does
        (DnsPermanent("no address for any mail host"), RecordType.BOUNCE, "5.4.4"),
        # a 5xx banner is the site's trouble, not the message's: retried
        (
            ConnectionFailed("banner", Reply(554, "5.7.1", "go away")),
            RecordType.TRANSIENT_FAILURE,
            "4.4.1",
        ),
        (MailLoop("greeted with our own name"), RecordType.BOUNCE, "5.4.6"),
    ],
)
async def test_connection_failures_have_one_reply_each(
    engine: Engine, error: Exception, kind: RecordType, status: str
) -> None:
    engine.transport.connect_error = error
    await engine.send("x@a.test")
    assert await engine.outcome("x@a.test") is kind
    [record] = engine.records.of(kind)
    assert record.response is not None and record.response.enhanced == status


async def test_lost_connection_defers_the_rest_of_the_transactions() -> None:
    made = Engine(settings(defaults={"max_recipients_per_transaction": 2, "idle_timeout": 0.01}))
    made.transport.drop_after = 1
    await made.send(*(f"r{i}@a.test" for i in range(5)))
    kinds = [await made.outcome(f"r{i}@a.test") for i in range(5)]
    assert kinds[:2] == [RecordType.DELIVERY] * 2
    assert kinds[2:] == [RecordType.TRANSIENT_FAILURE] * 3
    await made.close()


async def test_site_suspension_stops_the_ready_queue_until_resumed(engine: Engine) -> None:
    site = "route:192.0.2.1:25"
    engine.suspensions.suspend(Suspension("site", site, "maintenance"))
    await engine.send("x@a.test")
    [ready] = engine.dispatcher.ready.values()
    assert engine.transport.connects == 0 and len(ready) == 1  # queued, no connection
    [ready] = engine.dispatcher.ready.values()
    assert ready.suspension is not None and ready.suspension.reason == "maintenance"
    engine.suspensions.resume("site", site)
    assert await engine.outcome("x@a.test") is RecordType.DELIVERY


async def test_timed_suspension_runs_out(engine: Engine) -> None:
    engine.suspensions.suspend(Suspension("source", "default", until=engine.clock() + 60))
    await engine.send("x@a.test")
    assert engine.transport.connects == 0
    engine.clock.advance(61)
    assert engine.suspensions.expire()
    assert await engine.outcome("x@a.test") is RecordType.DELIVERY


async def test_a_live_ready_queue_takes_new_limits(engine: Engine) -> None:
    await engine.send("x@a.test")
    assert await engine.outcome("x@a.test") is RecordType.DELIVERY
    [ready] = engine.dispatcher.ready.values()
    assert ready.shaping.connection_limit == 10
    engine.dispatcher.reshape(shaping_policy(settings(defaults={"connection_limit": 3}).delivery))
    assert (
        ready.shaping.connection_limit == 3
        and next(iter(engine.dispatcher.ready.values())) is ready
    )


async def test_a_connection_opens_only_when_the_machine_grants_a_slot() -> None:
    slots = GatedSlots()
    engine = Engine(settings(defaults={"idle_timeout": 0.01}), slots=slots)
    await engine.send("x@a.test")
    await asyncio.sleep(0)  # the connection task starts and asks for its slot
    assert len(slots.waiting) == 1 and engine.transport.connects == 0
    slots.grant()
    assert await engine.outcome("x@a.test") is RecordType.DELIVERY
    await eventually(lambda: slots.released == 1, 5, "the slot given back once idle")
    await engine.close()


async def test_closing_gives_up_a_wait_for_a_slot() -> None:
    slots = GatedSlots()
    engine = Engine(settings(defaults={"idle_timeout": 0.01}), slots=slots)
    await engine.send("x@a.test")
    await asyncio.sleep(0)
    await asyncio.wait_for(engine.close(), 5)  # not the 30 s a connection may take to finish
    [ready] = engine.dispatcher.ready.values()
    assert engine.transport.connects == 0 and ready.connections == 0 and len(ready) == 1


async def test_a_worker_paces_to_its_share_of_the_message_rate() -> None:
    slots = GatedSlots(share=0.5)
    engine = Engine(settings(defaults={"max_message_rate": "10/s"}), slots=slots)
    await engine.send("x@a.test")
    [ready] = engine.dispatcher.ready.values()
    assert ready._message_throttle is not None
    assert ready._message_throttle.interval == pytest.approx(0.2)  # 5/s: half of 10/s
    slots.share = 0.25
    engine.dispatcher.shares_changed([ready.key])
    assert ready._message_throttle.interval == pytest.approx(0.4)
    assert engine.dispatcher.rate_backlogs() == {ready.key: ("10/s", 2)}  # 1 job, 1 opening
    await engine.close()


async def test_a_reload_keeps_the_domain_layer_a_ready_queue_was_made_with() -> None:
    made = Engine(settings(shaping={"a.test": {"connection_limit": 2}}))
    await made.send("x@a.test")
    assert await made.outcome("x@a.test") is RecordType.DELIVERY
    [ready] = made.dispatcher.ready.values()
    assert ready.shaping.connection_limit == 2
    made.dispatcher.reshape(
        shaping_policy(settings(shaping={"a.test": {"connection_limit": 5}}).delivery)
    )
    assert ready.shaping.connection_limit == 5
    await made.close()


async def test_domain_that_requires_tls_gets_it_on_a_shared_route() -> None:
    made = Engine(
        settings(defaults={"idle_timeout": 0.01}, shaping={"secure.test": {"tls": "required"}})
    )
    await made.send("x@plain.test")
    await made.send("y@secure.test")
    assert await made.outcome("x@plain.test") is RecordType.DELIVERY
    assert await made.outcome("y@secure.test") is RecordType.DELIVERY
    assert sorted(made.transport.tls_modes) == ["opportunistic", "required"]
    await made.close()


def test_with_tls_only_makes_routes_stricter() -> None:
    route = Destination(site="route:x", hosts=(("x", 25),), tls=TlsPolicy(mode="disabled"))
    mx = Destination(site="mx.x", hosts=(("mx.x", 25),), tls=TlsPolicy(), via_mx=True)
    required = Shaping(1, 1, 1.0, 1, tls="required", tls_verify=True)
    relaxed = Shaping(1, 1, 1.0, 1, tls="disabled")
    assert with_tls(route, required).tls == TlsPolicy(mode="required", verify=True)
    assert with_tls(route, relaxed) is route
    assert with_tls(mx, relaxed).tls.mode == "disabled"  # MX routes follow the policy


# ----------------------------------------------------------------------------- ingest


async def test_control_headers_from_a_trusted_client_set_tenant_and_campaign() -> None:
    spool, records, jobs = MemorySpool(), Recorder(), []
    ingest = Ingest(spool=spool, records=records, schedule=jobs.append)
    meta = _meta()
    body = b"X-Epoxi-Tenant: shop\r\nX-Epoxi-Campaign:\r\n welcome\r\nSubject: s\r\n\r\nhi\r\n"
    await ingest.accept(meta, body, trusted=True)
    stored = spool.messages[meta.id][1]
    assert (meta.tenant, meta.campaign) == ("shop", "welcome")
    assert stored == b"Subject: s\r\n\r\nhi\r\n" and meta.size == len(stored)
    assert jobs[0].queue == "welcome:shop@a.test"


async def test_control_headers_from_anyone_else_are_removed_unread() -> None:
    spool, jobs = MemorySpool(), []
    ingest = Ingest(spool=spool, records=Recorder(), schedule=jobs.append)
    meta = _meta()
    body = b"X-Epoxi-Tenant: shop\r\n\tcontinued\r\nSubject: s\r\n\r\nhi\r\n"
    await ingest.accept(meta, body, trusted=False)
    assert meta.tenant == "" and jobs[0].queue == "a.test"
    assert spool.messages[meta.id][1] == b"Subject: s\r\n\r\nhi\r\n"  # the fold went too


@pytest.mark.parametrize("value", ["sh\x1bop", "a:b", "a@b", "x" * 900, "\u202eevil"])
async def test_invalid_control_values_are_refused(value: str) -> None:
    spool = MemorySpool()
    ingest = Ingest(spool=spool, records=Recorder(), schedule=lambda job: None)
    body = f"X-Epoxi-Tenant: {value}\r\n\r\nhi\r\n".encode()
    with pytest.raises(MessageRefused) as info:
        await ingest.accept(_meta(), body, trusted=True)
    assert (info.value.reply.code, info.value.reply.enhanced) == (550, "5.6.0")
    assert spool.messages == {}


async def test_too_many_hops_is_refused_before_the_spool() -> None:
    spool = MemorySpool()
    ingest = Ingest(spool=spool, records=Recorder(), schedule=lambda job: None, max_hops=3)
    body = b"Received: from a\r\n" * 4 + b"Subject: loop\r\n\r\nhi\r\n"
    with pytest.raises(MessageRefused) as info:
        await ingest.accept(_meta(), body, trusted=True)
    assert (info.value.reply.code, info.value.reply.enhanced) == (554, "5.4.6")
    assert spool.messages == {}
    await ingest.accept(_meta(), body[len(b"Received: from a\r\n") :], trusted=True)
    assert len(spool.messages) == 1


async def test_a_hook_runs_before_the_commit_and_may_refuse() -> None:
    spool = MemorySpool()
    seen: list[str] = []

    async def sign(meta: MessageMeta, body: bytes) -> bytes:
        seen.append(meta.id)
        if b"refuse" in body:
            raise MessageRefused("policy", Reply(550, "5.7.1", "not today"))
        return b"X-Signed: yes\r\n" + body

    ingest = Ingest(spool=spool, records=Recorder(), schedule=lambda job: None, hooks=[sign])
    meta = _meta()
    await ingest.accept(meta, BODY, trusted=False)
    assert spool.messages[meta.id][1].startswith(b"X-Signed: yes\r\n")
    with pytest.raises(MessageRefused):
        await ingest.accept(_meta(), b"Subject: refuse\r\n\r\n", trusted=False)
    assert len(seen) == 2 and len(spool.messages) == 1


def _meta(*recipients: str) -> MessageMeta:
    return MessageMeta(
        id=new_message_id(),
        sender="a@sender.test",
        recipients=list(recipients) or ["b@a.test"],
        received_at=1.0,
        size=0,
    )


# ----------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize("reason", list(Synthetic))
def test_synthetic_replies_classify_as_their_code_says(reason: Synthetic) -> None:
    verdict = Classifier.from_files([]).classify(reason.reply("detail"))
    assert verdict.permanent == (reason.code >= 500)


def test_transaction_failure_keeps_the_servers_reply() -> None:
    outcomes = Engine(settings()).outcomes
    given = Reply(421, "4.3.2", "shutting down")
    replies = outcomes.transaction_failed(["x@a.test"], DeliveryError("closed", given))
    assert list(replies) == [("x@a.test", given)]
    [(_, lost)] = outcomes.transaction_failed(["x@a.test"], DeliveryError("reset"))
    assert lost.enhanced == "4.4.2"


# ----------------------------------------------------------------------------- NOTIFY


async def test_notify_never_means_no_dsn(engine: Engine) -> None:
    await engine.send("reject@a.test", dsn_notify={"reject@a.test": "NEVER"})
    assert await engine.outcome("reject@a.test") is RecordType.BOUNCE
    await engine.outcomes.stop()
    assert [r.origin for r in engine.records.of(RecordType.RECEPTION)] == ["smtp"]


async def test_notify_delay_sends_one_delayed_dsn(engine: Engine) -> None:
    await engine.send("tempfail@a.test", dsn_notify={"tempfail@a.test": "DELAY,FAILURE"})
    [dsn] = await engine.dsns(1)
    body = engine.spool.messages[dsn.message_id][1]
    assert b"Action: delayed" in body and b"Will-Retry-Until:" in body


async def test_notify_success_reports_relayed_when_the_next_hop_cannot(engine: Engine) -> None:
    await engine.send("ok@a.test", dsn_notify={"ok@a.test": "SUCCESS"}, dsn_envid="env-1")
    [dsn] = await engine.dsns(1)
    body = engine.spool.messages[dsn.message_id][1]
    assert b"Action: relayed" in body and b"Original-Envelope-Id: env-1" in body


async def test_ret_full_returns_the_whole_message(engine: Engine) -> None:
    await engine.send("reject@a.test", dsn_ret="FULL")
    [dsn] = await engine.dsns(1)
    body = engine.spool.messages[dsn.message_id][1]
    assert b"message/rfc822" in body and b"hello" in body


async def test_an_arrival_is_marked_for_the_start_up_load_before_its_commit() -> None:
    """The load reads committed rows in a thread: it must already know to skip this one."""
    seen_at_commit: list[bool] = []

    class Watching(MemorySpool):
        async def store(self, meta: MessageMeta, body: bytes) -> None:
            seen_at_commit.append(meta.id in (ingest.arrived or set()))
            await super().store(meta, body)

    ingest = Ingest(spool=Watching(), records=Recorder(), schedule=lambda job: None)
    ingest.arrived = set()
    await ingest.accept(_meta(), BODY, trusted=True)
    await ingest.inject(_meta(), BODY)
    assert seen_at_commit == [True, True]


async def test_a_sites_longer_max_age_holds_from_the_first_routing(engine: Engine) -> None:
    """Six days old, past [delivery]'s five: the site's seven days keep it, though its site
    is only known once it is routed (as after a restart: the site is not spooled)."""
    files = ShapingFiles([("s.toml", parse('[sites."route:192.0.2.1:25"]\nmax_age = "7d"\n'))])
    engine.dispatcher.policy = shaping_policy(engine.settings.delivery, files)
    engine.outcomes.retry_for = lambda job, configured: destination_retry(
        engine.dispatcher.policy, job, configured
    )
    await engine.send("kept@a.test", age=6 * DAY)
    assert await engine.outcome("kept@a.test") is RecordType.DELIVERY
    await engine.send("late@a.test", age=8 * DAY)
    assert await engine.outcome("late@a.test") is RecordType.EXPIRATION
