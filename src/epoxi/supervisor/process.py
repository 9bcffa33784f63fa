"""The supervisor: starts the workers, restarts the ones that die, keeps the machine's shaping."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgspec

from epoxi.app import dkim_signer, shaping_files
from epoxi.config import Settings, parse_hostport
from epoxi.errors import ConfigError
from epoxi.reception.tls import ensure_self_signed
from epoxi.spool.shards import adopt_orphans
from epoxi.store import KeyStore, check_http_exposure, store_path
from epoxi.supervisor.board import RateShares, SlotBoard
from epoxi.workers import wire
from epoxi.workers.placement import ENV, Placement

log = logging.getLogger(__name__)

_STOP_GRACE: Final = 60.0  # seconds a worker has to stop (SMTP grace, delivery) before SIGKILL
_QUICK_DEATH: Final = 10.0  # a worker dying sooner than this after its start is crash-looping
_MAX_BACKOFF: Final = 30.0
# On the HTTP socket, which the workers share: libuv (under uvloop) accepts every pending
# connection in one go, so the worker that wakes first takes a whole burst; with this it takes
# one, then yields. SMTP connections are handed over by the supervisor instead (_accept).
_BALANCED_ACCEPT: Final = {"UV_TCP_SINGLE_ACCEPT": "1"}
_ACCEPTS_PER_WAKE: Final = 64


@dataclass(eq=False)
class _Worker:
    index: int
    incarnation: int  # one per start: the board's name for it, so a dead one's words are void
    process: asyncio.subprocess.Process
    writer: asyncio.StreamWriter
    handoff: socket.socket  # SMTP connections accepted for it go down this one
    started_at: float
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def takes_connections(self) -> bool:
        return self.ready.is_set() and self.process.returncode is None


class Supervisor:
    """Runs ``count`` workers with ``command`` (``epoxi worker``) until SIGTERM or SIGINT."""

    def __init__(
        self,
        settings: Settings,
        count: int,
        command: Sequence[str],
        load: Callable[[], Settings],
    ) -> None:
        self.settings = settings
        self.count = count
        self.command = list(command)
        self._load = load
        self._workers: dict[int, _Worker] = {}  # index -> the live one
        self._incarnations = itertools.count(1)
        self._next_turn = 0  # round robin over the workers for SMTP connections
        self._quick_deaths: dict[int, int] = {}  # index -> deaths in a row soon after start
        self._smtp: dict[str, list[socket.socket]] = {}
        self._http: list[socket.socket] = []
        self._peer_dir: Path | None = None
        self._stopping = asyncio.Event()
        self._failed: int | None = None  # exit code of a worker that could not start
        self._started = False  # every worker has served once: from now on, deaths restart
        self._tasks: set[asyncio.Task[None]] = set()
        self.board = SlotBoard(
            self._grant,
            lambda delay, then: _later(delay, then),
            wanted=lambda worker, key, keep: self._send(worker, wire.Wanted(key, keep)),
        )
        self.shares = RateShares()

    # ----------------------------------------------------------------- life cycle

    async def run(self) -> int:
        """Serve until told to stop; the exit code (a worker's, if one could not start)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        await asyncio.to_thread(self._prepare_data_dir)
        try:
            self._bind()
            self._peer_dir = Path(tempfile.mkdtemp(prefix="epoxi-"))
            for index in range(self.count):
                await self._spawn(index)
            self._started = await self._all_ready()
            if self._started:
                self._accept_smtp()
                log.info(
                    "Epoxi %s ready: %d workers (pids %s)",
                    self.settings.hostname,
                    self.count,
                    " ".join(str(w.process.pid) for w in self._workers.values()),
                )
                await self._stopping.wait()
        finally:
            await self._stop_workers()
            self._close()
        return self._failed or 0

    def _prepare_data_dir(self) -> None:
        """Before any worker runs: orphaned shards merged; the store and the TLS certificate
        made once. DKIM keys and shaping files are read here too, so a bad one stops
        ``serve`` with its file named before any worker starts."""
        dkim_signer(self.settings.dkim)
        shaping_files(self.settings)
        data_dir = self.settings.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        adopt_orphans(data_dir, self.count)
        with KeyStore(store_path(data_dir)) as keys:  # made and migrated once, not N at a time
            check_http_exposure(self.settings.http_listen, keys)  # before binding anything
        smtp = self.settings.smtp
        wants_tls = any(listener.tls != "none" for listener in smtp.listeners)
        if wants_tls and not (smtp.tls_cert and smtp.tls_key):
            ensure_self_signed(data_dir, self.settings.hostname)  # not once per worker, racing

    def _bind(self) -> None:
        for listener in self.settings.smtp.listeners:
            self._smtp[listener.address] = _listening(listener.address, 25)
            log.info("SMTP listening on %s (tls=%s)", listener.address, listener.tls)
        for address in self.settings.http_listen:
            self._http += _listening(address, 4000)

    def _close(self) -> None:
        for sock in [*itertools.chain(*self._smtp.values()), *self._http]:
            sock.close()
        if self._peer_dir is not None:
            shutil.rmtree(self._peer_dir, ignore_errors=True)

    async def _all_ready(self) -> bool:
        """True once every worker serves; False if one failed to start or we were stopped."""
        ready = asyncio.ensure_future(self._every_ready())
        stopped = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
        for waiter in (ready, stopped):
            waiter.cancel()
        return ready.done() and not ready.cancelled() and not self._stopping.is_set()

    async def _every_ready(self) -> None:
        for worker in list(self._workers.values()):
            await worker.ready.wait()

    async def _stop_workers(self) -> None:
        self._stopping.set()
        self._stop_accepting()
        live = [w for w in self._workers.values() if w.process.returncode is None]
        for worker in live:
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGTERM)
        if live:
            waits = [asyncio.ensure_future(w.process.wait()) for w in live]
            _, late = await asyncio.wait(waits, timeout=_STOP_GRACE)
            if late:
                log.error("%d workers did not stop within %.0fs: killed", len(late), _STOP_GRACE)
                for worker in live:
                    with contextlib.suppress(ProcessLookupError):
                        worker.process.kill()
                await asyncio.wait(waits)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        log.info("all workers stopped")

    def _reload(self) -> None:
        """SIGHUP: check the new configuration here, then let every worker apply it."""
        try:
            new = self._load()
        except ConfigError as exc:
            log.error("SIGHUP: configuration not reloaded, the running one is kept: %s", exc)
            return
        if new.workers != self.settings.workers:
            log.warning("changed, but only applied by a restart: workers")
        for worker in self._workers.values():
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGHUP)

    # ----------------------------------------------------------------- workers

    async def _spawn(self, index: int) -> None:
        assert self._peer_dir is not None
        ours, theirs = socket.socketpair()
        handoff, their_handoff = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        handoff.setblocking(False)
        inherited = [s.fileno() for s in itertools.chain(*self._smtp.values(), self._http)]
        placement = Placement.describe(
            index=index,
            count=self.count,
            smtp={a: [s.fileno() for s in socks] for a, socks in self._smtp.items()},
            http=[s.fileno() for s in self._http],
            control=theirs.fileno(),
            handoff=their_handoff.fileno(),
            peer_dir=self._peer_dir,
        )
        try:
            process = await asyncio.create_subprocess_exec(
                *self.command,
                env={**os.environ, ENV: placement, **_BALANCED_ACCEPT},
                pass_fds=[*inherited, theirs.fileno(), their_handoff.fileno()],
                stdin=asyncio.subprocess.DEVNULL,
            )
        except BaseException:
            handoff.close()
            raise
        finally:
            theirs.close()
            their_handoff.close()
        reader, writer = await asyncio.open_unix_connection(sock=ours, limit=wire.MAX_LINE)
        worker = _Worker(
            index, next(self._incarnations), process, writer, handoff, time.monotonic()
        )
        self._workers[index] = worker
        self._track(self._listen(worker, reader))
        self._track(self._watch(worker))

    def _track(self, job: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(job)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch(self, worker: _Worker) -> None:
        code = await worker.process.wait()
        if self._stopping.is_set():
            return
        if not self._started:
            log.error("worker %d could not start (exit status %d)", worker.index, code)
            self._failed = code if code > 0 else 1
            self._stopping.set()
            return
        delay = self._restart_delay(worker)
        log.error(
            "worker %d (pid %d) died (%s); restarting it on its spool shard%s",
            worker.index,
            worker.process.pid,
            _exit_text(code),
            f" in {delay:.1f}s" if delay else "",
        )
        if delay:
            await asyncio.sleep(delay)
        if not self._stopping.is_set():
            await self._spawn(worker.index)

    def _restart_delay(self, worker: _Worker) -> float:
        """0 (at once) after a long life; backing off while it keeps dying young."""
        if time.monotonic() - worker.started_at >= _QUICK_DEATH:
            self._quick_deaths[worker.index] = 0
            return 0.0
        deaths = self._quick_deaths[worker.index] = self._quick_deaths.get(worker.index, 0) + 1
        return min(_MAX_BACKOFF, 0.5 * 2.0 ** (deaths - 1))

    async def _listen(self, worker: _Worker, reader: asyncio.StreamReader) -> None:
        """What a worker says, until its channel closes; then its slots and shares are freed."""
        try:
            while data := await reader.readline():
                self._on_message(worker, wire.from_worker(data))
        except (OSError, ValueError, msgspec.DecodeError) as exc:
            log.error("worker %d: control channel broke: %s", worker.index, exc)
        finally:
            worker.writer.close()
            worker.handoff.close()
            self.board.forget(worker.incarnation)
            self._send_shares(self.shares.forget(worker.incarnation))

    def _on_message(self, worker: _Worker, message: wire.ToSupervisor) -> None:
        me = worker.incarnation
        match message:
            case wire.Acquire(ask, key, limit, rate):
                self.board.acquire(me, ask, key, limit, rate)
            case wire.Release(key):
                self.board.release(me, key)
            case wire.Cancel(ask, key):
                self.board.cancel(me, ask, key)
            case wire.Backlog(queues):
                backlogs = {key: backlog for key, (_, backlog) in queues.items()}
                self._send_shares(self.shares.report(me, backlogs))
            case wire.Ready():
                worker.ready.set()
                log.info("worker %d ready (pid %d)", worker.index, worker.process.pid)

    # ----------------------------------------------------------------- SMTP connections

    def _accept_smtp(self) -> None:
        """Accept SMTP connections here and hand them to the workers in turn: the kernel,
        left to choose, gave a burst of sessions to whichever worker woke first."""
        loop = asyncio.get_running_loop()
        for index, listener in enumerate(self.settings.smtp.listeners):
            for sock in self._smtp[listener.address]:
                sock.setblocking(False)
                loop.add_reader(sock.fileno(), self._accept, index, sock)

    def _stop_accepting(self) -> None:
        loop = asyncio.get_running_loop()
        for sock in itertools.chain(*self._smtp.values()):
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(sock.fileno())

    def _accept(self, listener: int, sock: socket.socket) -> None:
        for _ in range(_ACCEPTS_PER_WAKE):
            try:
                connection, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors, say: the kernel keeps the backlog
                log.error("cannot accept an SMTP connection: %s", exc)
                return
            with connection:
                self._hand_over(listener, connection)

    def _hand_over(self, listener: int, connection: socket.socket) -> None:
        """To the next worker that takes connections; one that cannot (its buffer is full,
        it just died) is passed over."""
        workers = [self._workers[i] for i in sorted(self._workers)]
        for _ in range(len(workers)):
            worker = workers[self._next_turn % len(workers)]
            self._next_turn += 1
            if not worker.takes_connections:
                continue
            try:
                socket.send_fds(worker.handoff, [bytes([listener])], [connection.fileno()])
                return
            except OSError:
                continue
        log.error("no worker could take an SMTP connection: closed")

    def _grant(self, incarnation: int, ask: int) -> None:
        self._send(incarnation, wire.Granted(ask))

    def _send_shares(self, shares: dict[int, dict[str, float]]) -> None:
        for incarnation, parts in shares.items():
            self._send(incarnation, wire.Shares(parts))

    def _send(self, incarnation: int, message: wire.ToWorker) -> None:
        worker = next((w for w in self._workers.values() if w.incarnation == incarnation), None)
        if worker is not None and not worker.writer.is_closing():  # a dead one's is closed
            worker.writer.write(wire.line(message))


def _listening(address: str, default_port: int) -> list[socket.socket]:
    """Bound, listening sockets for ``host:port``: one per address the host resolves to."""
    host, port = parse_hostport(address, default_port)
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, where in dict.fromkeys((info[0], info[4]) for info in found):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(where)
            sock.listen(1024)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _later(delay: float, then: Callable[[], None]) -> asyncio.TimerHandle:
    return asyncio.get_running_loop().call_later(delay, then)


def _exit_text(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"
