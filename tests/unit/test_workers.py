"""The pieces of ``--workers N`` that need no process: the supervisor's board and shares,
shard merging, answers merged over workers, the worker count setting."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from epoxi.api.peers import merge_health, merge_pipelines, merge_sinks
from epoxi.api_types import (
    Health,
    PipelineHealth,
    Pipelines,
    ReadyQueueInfo,
    ScheduledQueueInfo,
    SinkInfo,
    SinkList,
    SuspensionInfo,
    Totals,
)
from epoxi.config import cpu_count, load_settings
from epoxi.errors import ConfigError
from epoxi.message import MessageMeta
from epoxi.metrics import sum_metrics
from epoxi.spool import Spool
from epoxi.spool.shards import adopt_orphans, orphans, shard_indexes, shard_path
from epoxi.supervisor.board import RateShares, SlotBoard
from epoxi.workers.placement import Placement

# --------------------------------------------------------------------- connection slots


class Board:
    """A SlotBoard with its grants recorded and its timers run by hand."""

    def __init__(self) -> None:
        self.now = 0.0
        self.granted: list[tuple[int, int]] = []
        self.timers: list[tuple[float, Callable[[], None]]] = []
        self.board = SlotBoard(
            lambda worker, ask: self.granted.append((worker, ask)),
            lambda delay, then: self.timers.append((self.now + delay, then)),
            clock=lambda: self.now,
        )

    def advance(self, seconds: float) -> None:
        self.now += seconds
        due = [t for t in self.timers if t[0] <= self.now]
        self.timers = [t for t in self.timers if t[0] > self.now]
        for _, then in due:
            then()


def test_slots_never_exceed_the_limit_over_workers() -> None:
    b = Board()
    for ask in range(3):
        b.board.acquire(1, ask, "q", 2, None)
        b.board.acquire(2, ask, "q", 2, None)
    assert b.granted == [(1, 0), (2, 0)]  # first come, first served, two in all
    assert b.board.open_connections("q") == 2


def test_a_released_slot_goes_to_the_longest_waiting_worker() -> None:
    b = Board()
    b.board.acquire(1, 1, "q", 1, None)
    b.board.acquire(1, 2, "q", 1, None)
    b.board.acquire(2, 1, "q", 1, None)
    b.board.release(1, "q")
    assert b.granted == [(1, 1), (1, 2)]
    b.board.release(1, "q")
    assert b.granted[-1] == (2, 1)


def test_a_dead_workers_slots_and_waits_are_freed() -> None:
    b = Board()
    b.board.acquire(1, 1, "q", 1, None)
    b.board.acquire(1, 2, "q", 1, None)
    b.board.acquire(2, 1, "q", 1, None)
    b.board.forget(1)
    assert b.granted == [(1, 1), (2, 1)]  # worker 1's second wait is void
    assert b.board.open_connections("q") == 1


def test_a_cancel_withdraws_a_wait_or_returns_a_grant() -> None:
    b = Board()
    b.board.acquire(1, 1, "q", 1, None)
    b.board.acquire(2, 1, "q", 1, None)
    b.board.cancel(2, 1, "q")  # still waiting: withdrawn
    b.board.cancel(1, 1, "q")  # granted while the cancel travelled: the slot comes back
    assert b.board.open_connections("q") == 0
    b.board.acquire(2, 2, "q", 1, None)
    assert b.granted == [(1, 1), (2, 2)]


def test_a_release_without_a_slot_changes_nothing() -> None:
    b = Board()
    b.board.acquire(1, 1, "q", 1, None)
    b.board.release(2, "q")
    b.board.acquire(2, 1, "q", 1, None)
    assert b.granted == [(1, 1)]


def test_the_connection_rate_holds_for_the_machine() -> None:
    b = Board()
    for worker in (1, 2):
        b.board.acquire(worker, 1, "q", 10, "1/s")
    assert b.granted == [(1, 1)]  # the second opening waits for the rate
    b.advance(0.5)
    assert b.granted == [(1, 1)]
    b.advance(0.6)
    assert b.granted == [(1, 1), (2, 1)]


# --------------------------------------------------------------------- rate shares


def test_rate_shares_follow_backlogs_and_sum_to_one() -> None:
    shares = RateShares()
    first = shares.report(1, {"q": 9})
    assert first == {1: {"q": 1.0}}
    both = shares.report(2, {"q": 29})
    assert both == {1: {"q": 0.25}, 2: {"q": 0.75}}


def test_a_worker_that_drops_a_queue_gives_its_share_back() -> None:
    shares = RateShares()
    shares.report(1, {"q": 1})
    shares.report(2, {"q": 1})
    assert shares.report(2, {}) == {1: {"q": 1.0}}
    shares.report(2, {"q": 1})
    assert shares.forget(1) == {2: {"q": 1.0}}


# --------------------------------------------------------------------- shards


def _meta(n: int) -> MessageMeta:
    return MessageMeta(
        id=f"{n:020d}", sender="a@x.test", recipients=["b@y.test"], received_at=1.0, size=20
    )


async def _fill(path: Path, ids: range) -> None:
    spool = Spool(path)
    spool.open()
    for n in ids:
        await spool.store(_meta(n), b"Subject: x\r\n\r\nbody\r\n")
    await spool.close()


async def _ids(path: Path) -> set[str]:
    spool = Spool(path)
    spool.open()
    try:
        return {meta.id for batch in spool.iter_meta() for meta in batch}
    finally:
        await spool.close()


async def test_fewer_workers_adopt_the_orphaned_shards(tmp_path: Path) -> None:
    for shard, ids in ((0, range(0, 3)), (1, range(3, 5)), (2, range(5, 9)), (3, range(9, 10))):
        await _fill(shard_path(tmp_path, shard), ids)
    assert shard_indexes(tmp_path) == [0, 1, 2, 3]
    assert orphans(tmp_path, 2) == {2: 0, 3: 1}
    assert await asyncio.to_thread(adopt_orphans, tmp_path, 2) == 5
    assert shard_indexes(tmp_path) == [0, 1]
    assert await _ids(shard_path(tmp_path, 0)) == {_meta(n).id for n in (0, 1, 2, 5, 6, 7, 8)}
    assert await _ids(shard_path(tmp_path, 1)) == {_meta(n).id for n in (3, 4, 9)}


async def test_a_merge_interrupted_before_the_delete_doubles_nothing(tmp_path: Path) -> None:
    await _fill(shard_path(tmp_path, 0), range(0, 2))
    await _fill(shard_path(tmp_path, 1), range(2, 4))
    copy = tmp_path / "copy.db"
    await _fill(copy, range(2, 4))
    await asyncio.to_thread(adopt_orphans, tmp_path, 1)
    copy.rename(shard_path(tmp_path, 1))  # as if the source had survived a crash
    assert await asyncio.to_thread(adopt_orphans, tmp_path, 1) == 2
    assert len(await _ids(shard_path(tmp_path, 0))) == 4


# --------------------------------------------------------------------- merged answers


def _ready(name: str, queued: int, connections: int, error_at: float | None) -> ReadyQueueInfo:
    return ReadyQueueInfo(
        name=name,
        site="s",
        source="default",
        hosts=[],
        queued=queued,
        connections=connections,
        connection_limit=2,
        connects=1,
        deliveries=queued,
        attempts_last_minute=1,
        max_message_rate=None,
        suspended=None,
        suspended_until=None,
        last_error=f"error at {error_at}" if error_at else None,
        last_error_at=error_at,
    )


def _pipelines(queued: int, connections: int, error_at: float | None) -> Pipelines:
    return Pipelines(
        totals=Totals(scheduled=1, held=0, ready=queued, connections=connections),
        scheduled=[
            ScheduledQueueInfo(
                name="d.test", domain="d.test", scheduled=1, held=0, next_due=queued, suspended=None
            )
        ],
        ready=[_ready("default->s", queued, connections, error_at)],
        suspensions=[SuspensionInfo(target="domain", value="x.test", reason="r", until=None)],
    )


def test_pipelines_of_workers_add_up_queue_by_queue() -> None:
    merged = merge_pipelines([_pipelines(3, 1, 5.0), _pipelines(4, 0, 7.0)])
    assert merged.totals == Totals(scheduled=2, held=0, ready=7, connections=1)
    assert [(q.name, q.scheduled, q.next_due) for q in merged.scheduled] == [("d.test", 2, 3)]
    (ready,) = merged.ready
    assert (ready.queued, ready.connections, ready.connects, ready.deliveries) == (7, 1, 2, 7)
    assert ready.last_error_at == 7.0  # the latest error
    assert len(merged.suspensions) == 1  # the same suspension on both workers


def test_sinks_of_workers_add_up_and_the_last_error_is_the_latest() -> None:
    def worker(connected: int, backlog: int, error_at: float | None) -> SinkList:
        sink = SinkInfo(
            name="bus",
            kind="redis",
            url="redis://h/0",
            types=[],
            tenants=[],
            workers=1,
            connected=connected,
            backlog=backlog,
            backlog_limit=100,
            dropped=backlog // 10,
            published=5,
            last_error=f"failed at {error_at}" if error_at else None,
            last_error_at=error_at,
        )
        return SinkList(sinks=[sink])

    (merged,) = merge_sinks([worker(1, 0, 3.0), worker(0, 40, 9.0), worker(1, 20, None)]).sinks
    assert (merged.workers, merged.connected, merged.backlog, merged.backlog_limit) == (
        3,
        2,
        60,
        100,
    )
    assert (merged.dropped, merged.published) == (6, 15)
    assert (merged.last_error, merged.last_error_at) == ("failed at 9.0", 9.0)
    assert merge_sinks([]).sinks == []


def test_a_queue_fails_only_where_no_worker_has_a_connection() -> None:
    def health(status: str, connections: int) -> Health:
        pipe = PipelineHealth(
            name="q",
            status=status,
            queued=1,
            connections=connections,
            detail="x",  # type: ignore[arg-type]
        )
        return Health(status="ok", pipelines=[pipe])

    assert merge_health([health("failing", 0), health("ok", 1)]).status == "ok"
    both_failing = merge_health([health("failing", 0), health("failing", 0)])
    assert both_failing.status == "degraded"
    assert both_failing.pipelines[0].queued == 2
    assert merge_health([health("suspended", 0), health("ok", 1)]).pipelines[0].status == (
        "suspended"
    )


def test_metrics_of_workers_are_summed_and_created_is_the_earliest() -> None:
    one = b'# HELP a_total A\n# TYPE a_total counter\na_total{t="x"} 2.0\na_created{t="x"} 10.0\n'
    two = b'# HELP a_total A\n# TYPE a_total counter\na_total{t="x"} 3.0\na_created{t="x"} 5.0\n'
    assert sum_metrics([one, two]).splitlines() == [
        b"# HELP a_total A",
        b"# TYPE a_total counter",
        b'a_total{t="x"} 5.0',
        b'a_created{t="x"} 5.0',
    ]


# --------------------------------------------------------------------- settings and placement


def test_workers_is_a_count_or_auto(tmp_path: Path) -> None:
    assert load_settings(env={"EPOXI_WORKERS": "3"}).workers == 3
    assert load_settings(env={"EPOXI_WORKERS": "auto"}).workers == cpu_count()
    assert load_settings(env={}).workers == cpu_count()  # auto is the default
    for bad in ("0", "many", "-2"):
        with pytest.raises(ConfigError, match="workers"):
            load_settings(env={"EPOXI_WORKERS": bad})


def test_a_placement_travels_through_the_environment(tmp_path: Path) -> None:
    smtp, control = socket.create_server(("127.0.0.1", 0)), socket.socketpair()
    try:
        text = Placement.describe(
            index=1,
            count=3,
            smtp={"127.0.0.1:25": [smtp.fileno()]},
            http=[],
            control=control[1].fileno(),
            handoff=control[0].fileno(),
            peer_dir=tmp_path,
        )
        placement = Placement.from_env({"EPOXI_WORKER": text})
        assert placement is not None
        assert (placement.index, placement.count, placement.supervised) == (1, 3, True)
        assert placement.smtp_sockets["127.0.0.1:25"][0].fileno() == smtp.fileno()
        assert placement.peer_sockets() == [tmp_path / "worker-0.sock", tmp_path / "worker-2.sock"]
        for socks in placement.smtp_sockets.values():
            for sock in socks:
                sock.detach()  # the same descriptor as ``smtp``: closed once, below
        assert placement.control is not None and placement.handoff is not None
        placement.control.detach()
        placement.handoff.detach()
    finally:
        smtp.close()
        control[0].close()
        control[1].close()
    assert Placement.from_env({}) is None


def test_a_holder_above_its_fair_part_is_asked_once_to_trim() -> None:
    asked: list[tuple[int, str, int]] = []
    board = SlotBoard(
        lambda worker, ask: None,
        lambda delay, then: None,
        wanted=lambda worker, key, keep: asked.append((worker, key, keep)),
    )
    for ask in range(4):
        board.acquire(1, ask, "q", 4, None)  # worker 1 takes all four
    board.acquire(2, 1, "q", 4, None)
    board.acquire(2, 2, "q", 4, None)
    assert asked == [(1, "q", 2)]  # once: four over two workers
    board.release(1, "q")  # worker 2 gets one; worker 1, at 3, was told already
    assert asked == [(1, "q", 2)]
    board.acquire(3, 1, "q", 4, None)  # a third worker waits: the part is one now
    assert asked == [(1, "q", 2), (1, "q", 1)]
    for _ in range(3):
        board.release(1, "q")
    board.release(2, "q")
    board.release(2, "q")
    board.release(3, "q")
    assert board.open_connections("q") == 0
