"""``epoxi serve --workers N``: one supervisor, N worker processes, one set of ports.

Each test runs the real thing: ``epoxi serve`` in a child process, mail over smtplib, the API
over HTTP, a sink on a real socket, and SIGKILL for a dying worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import smtplib
import sqlite3
import ssl
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import httpx

from epoxi.smtp.replies import Reply
from epoxi.store import KeyStore, Scope, store_path
from epoxi.testing.sink import Sink
from tests.conftest import EpoxiProcess, eventually, free_port, queue_ids, send_batch

BODY = b"Subject: workers\r\n\r\n" + (b"x" * 76 + b"\r\n") * 20
FAST_RETRY = '[delivery]\nretry_interval = "1s"\nmax_retry_interval = "2s"\n'


def send_concurrently(port: int, sessions: int, each: int = 1) -> list[str]:
    """``sessions`` connections open at once (so the kernel spreads them over the workers)."""
    with ThreadPoolExecutor(sessions) as pool:
        batches = list(pool.map(lambda _: send_batch(port, each, BODY), range(sessions)))
    return [queue_id for batch in batches for queue_id in batch]


async def send_to_every_worker(process: EpoxiProcess, workers: int, sessions: int) -> list[str]:
    """Batches of ``sessions`` concurrent sessions until each worker has taken some mail: the
    kernel spreads connections, but a short burst may all land on one worker."""
    ids: list[str] = []
    for _ in range(20):
        ids += await asyncio.to_thread(send_concurrently, process.port, sessions)
        with contextlib.suppress(AssertionError):
            await eventually(lambda: workers_with_mail(process, workers) == workers, 2, "")
            return ids
    raise AssertionError(f"20 batches of {sessions} sessions never reached all {workers} workers")


async def send_evenly(process: EpoxiProcess) -> int:
    """At least 30 messages, each of two workers holding 40 % or more of them."""
    sent = 0

    def counts() -> list[int]:
        return [len(record_types(worker_log(process, i)).get("Reception", ())) for i in (0, 1)]

    for _ in range(30):
        sent += len(await asyncio.to_thread(send_concurrently, process.port, 10))
        await eventually(partial(_all_logged, counts, sent), 5, "the receptions in the logs")
        if sent >= 30 and min(counts()) >= 0.4 * sent:
            return sent
    raise AssertionError(f"the mail never split evenly between the workers: {counts()}")


def _all_logged(counts: Callable[[], list[int]], sent: int) -> bool:
    return sum(counts()) == sent


def workers_with_mail(process: EpoxiProcess, workers: int) -> int:
    return sum("Reception" in record_types(worker_log(process, i)) for i in range(workers))


def record_types(path: Path) -> dict[str, set[str]]:
    """Record type -> message ids, from one worker's record log (a last line still being
    written, without its newline yet, is left for the next read)."""
    found: dict[str, set[str]] = {}
    if path.exists():
        for line in path.read_text().split("\n")[:-1]:
            record = json.loads(line)
            found.setdefault(record["type"], set()).add(record["message_id"])
    return found


def worker_log(process: EpoxiProcess, index: int) -> Path:
    name = "records.jsonl" if index == 0 else f"records-{index}.jsonl"
    return process.data_dir / "logs" / name


def worker_pids(process: EpoxiProcess) -> list[int]:
    assert process.proc is not None
    pid = process.proc.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return sorted(int(child) for child in children)


async def wait_for_log(process: EpoxiProcess, text: str, count: int = 1) -> None:
    await eventually(lambda: process.log().count(text) >= count, 30, f"{text!r} in the log")


async def start(
    tmp_path: Path, workers: int, config: str = "", env: dict[str, str] | None = None
) -> EpoxiProcess:
    process = EpoxiProcess(tmp_path / "data", env={"EPOXI_WORKERS": str(workers), **(env or {})})
    path = tmp_path / "epoxi.toml"
    path.write_text(config)
    await asyncio.to_thread(process.start, path)
    if workers > 1:
        await wait_for_log(process, f"ready: {workers} workers")
    return process


async def stop(process: EpoxiProcess) -> None:
    if process.proc is not None:
        await asyncio.to_thread(process.kill)


def api(process: EpoxiProcess, method: str, path: str, **kwargs: object) -> httpx.Response:
    """One call on a fresh connection: it may reach either worker."""
    url = f"http://127.0.0.1:{process.http_port}{path}"
    with httpx.Client(timeout=30) as client:
        return client.request(method, url, **kwargs)  # type: ignore[arg-type]


async def test_two_workers_take_connections_and_answer_for_each_other(tmp_path: Path) -> None:
    process = await start(tmp_path, workers=2)
    try:
        ids = await send_to_every_worker(process, 2, sessions=40)
        first = record_types(worker_log(process, 1))["Reception"]
        for message_id in sorted(first)[:5]:  # accepted by worker 1, asked of any worker
            for _ in range(4):
                reply = await asyncio.to_thread(api, process, "GET", f"/messages/{message_id}")
                assert reply.status_code == 200, reply.text
                assert reply.json()["id"] == message_id
        pipelines = (await asyncio.to_thread(api, process, "GET", "/admin/pipelines")).json()
        waiting = pipelines["totals"]["scheduled"] + pipelines["totals"]["ready"]
        assert waiting + pipelines["totals"]["connections"] == len(ids)  # both workers, summed
        metrics = (await asyncio.to_thread(api, process, "GET", "/metrics")).text
        assert f'epoxi_records_total{{type="Reception"}} {len(ids)}.0' in metrics
    finally:
        await stop(process)


async def test_sigkill_of_one_worker_loses_nothing(tmp_path: Path) -> None:
    process = await start(tmp_path, workers=2, config=FAST_RETRY)
    try:
        ids = await send_to_every_worker(process, 2, sessions=20)
        pids = worker_pids(process)
        victim = pids[1] if _index_of(process, pids[1]) == 1 else pids[0]
        os.kill(victim, signal.SIGKILL)
        await wait_for_log(process, "died (killed by SIGKILL)")
        await wait_for_log(process, "worker 1 ready", 2)  # restarted on its shard
        async with Sink("127.0.0.1", process.relay_port) as sink:
            await sink.wait_for(len(ids), timeout=60)
        assert set(ids) <= queue_ids(sink.messages)
    finally:
        await stop(process)


async def test_restart_with_fewer_workers_delivers_every_shard(tmp_path: Path) -> None:
    process = await start(tmp_path, workers=3, config=FAST_RETRY)
    try:
        ids = await send_to_every_worker(process, 3, sessions=30)
        assert await asyncio.to_thread(process.stop) == 0
        assert _spooled(process.data_dir, 1) and _spooled(process.data_dir, 2)
        async with Sink("127.0.0.1", process.relay_port) as sink:
            process.extra_env["EPOXI_WORKERS"] = "1"
            await asyncio.to_thread(process.start, tmp_path / "epoxi.toml")
            await sink.wait_for(len(ids), timeout=60)
        assert queue_ids(sink.messages) == set(ids)
        assert not (process.data_dir / "spool-1.db").exists()
        assert not (process.data_dir / "spool-2.db").exists()
    finally:
        await stop(process)


async def test_a_suspension_holds_mail_on_every_worker(tmp_path: Path) -> None:
    async with Sink("127.0.0.1") as sink:
        process = await start(tmp_path, workers=2, env={"EPOXI_SMTP_PORT": str(sink.port)})
        try:
            reply = await asyncio.to_thread(
                api, process, "POST", "/admin/suspend", json={"domain": "local.test"}
            )
            assert reply.status_code == 200, reply.text
            sent = len(await send_to_every_worker(process, 2, sessions=20))

            def held() -> int:
                totals = api(process, "GET", "/admin/pipelines").json()["totals"]
                return int(totals["held"])

            await eventually(lambda: held() == sent, 15, "the messages held by the suspension")
            assert sink.received == 0
            victim = worker_pids(process)[0]
            os.kill(victim, signal.SIGKILL)  # its replacement must hold its mail too
            await wait_for_log(process, f"(pid {victim}) died")
            await wait_for_log(process, "ready (pid", 3)
            await eventually(lambda: held() == sent, 15, "the restarted worker's mail held")
            assert sink.received == 0
            reply = await asyncio.to_thread(
                api, process, "DELETE", "/admin/suspend", params={"domain": "local.test"}
            )
            assert reply.json()["released"] == sent
            await sink.wait_for(sent, timeout=30)
        finally:
            await stop(process)


async def test_connection_limit_holds_for_the_whole_machine(tmp_path: Path) -> None:
    config = "[delivery.defaults]\nconnection_limit = 2\nidle_timeout = 0.2\n"
    async with Sink("127.0.0.1", reply_delay=0.002) as sink:
        process = await start(
            tmp_path, workers=2, config=config, env={"EPOXI_SMTP_PORT": str(sink.port)}
        )
        try:
            first = await send_to_every_worker(process, 2, sessions=20)
            more = await asyncio.to_thread(send_concurrently, process.port, 20, 10)
            await sink.wait_for(len(first) + len(more), timeout=60)
            assert sink.max_concurrent_connections <= 2
            await eventually(
                lambda: all("Delivery" in record_types(worker_log(process, i)) for i in (0, 1)),
                10,
                "deliveries by both workers (through two connections between them)",
            )
        finally:
            await stop(process)


def _index_of(process: EpoxiProcess, pid: int) -> int:
    """Which worker a pid is, from the supervisor's log."""
    for line in process.log().splitlines():
        if f"(pid {pid})" in line and "ready" in line:
            return int(line.split("worker ")[1].split()[0])
    raise AssertionError(f"pid {pid} is not a worker")


def _spooled(data_dir: Path, shard: int) -> int:
    path = data_dir / f"spool-{shard}.db"
    if not path.exists():
        return 0
    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT count(*) FROM messages").fetchone()[0])


async def test_with_api_keys_each_worker_checks_the_key_it_is_forwarded(tmp_path: Path) -> None:
    with KeyStore(store_path(tmp_path / "data")) as keys:
        _, admin = keys.create("ops", {Scope.ADMIN, Scope.READ, Scope.SEND})
        _, tenant = keys.create("acme", {Scope.READ}, tenant="acme")
    process = await start(tmp_path, workers=2)
    try:
        ids = await asyncio.to_thread(send_concurrently, process.port, 20)
        as_admin = {"Authorization": f"Bearer {admin}"}
        as_tenant = {"Authorization": f"Bearer {tenant}"}
        assert (await asyncio.to_thread(api, process, "GET", "/admin/pipelines")).status_code == 401

        def waiting() -> int:
            reply = api(process, "GET", "/admin/pipelines", headers=as_admin)
            assert reply.status_code == 200, reply.text
            totals = reply.json()["totals"]
            return int(totals["scheduled"] + totals["ready"] + totals["connections"])

        await eventually(lambda: waiting() == 20, 15, "all 20 messages counted over both")
        for message_id in ids[:4]:  # another tenant's message: unknown on every worker
            reply = await asyncio.to_thread(
                api, process, "GET", f"/messages/{message_id}", headers=as_tenant
            )
            assert reply.status_code == 404, reply.text
    finally:
        await stop(process)


async def test_sighup_reaches_every_worker_and_a_bad_file_none(tmp_path: Path) -> None:
    process = await start(tmp_path, workers=2, config="[delivery.defaults]\nconnection_limit = 3\n")
    try:
        config = tmp_path / "epoxi.toml"
        config.write_text("[delivery.defaults]\nconnection_limit = 7\n")
        assert process.proc is not None
        process.proc.send_signal(signal.SIGHUP)
        await wait_for_log(process, "configuration reloaded: shaping", 2)
        assert "[worker 0]" in process.log() and "[worker 1]" in process.log()
        config.write_text("[delivery]\nnot_a_key = 1\n")
        process.proc.send_signal(signal.SIGHUP)
        await wait_for_log(process, "the running one is kept")
        assert "[supervisor]" in process.log().split("the running one is kept")[0].splitlines()[-1]
        assert process.log().count("configuration reloaded") == 2  # the workers never saw it
        assert len(await asyncio.to_thread(send_concurrently, process.port, 4)) == 4
        assert await asyncio.to_thread(process.stop) == 0
    finally:
        await stop(process)


def test_a_worker_that_cannot_start_stops_the_supervisor_with_its_code(tmp_path: Path) -> None:
    (tmp_path / "spool-1.db").mkdir()  # worker 1 cannot open its shard
    env = {
        **os.environ,
        "EPOXI_WORKERS": "2",
        "EPOXI_DATA_DIR": str(tmp_path),
        "EPOXI_SMTP_LISTEN": f"127.0.0.1:{free_port()}",
        "EPOXI_HTTP_LISTEN": f"127.0.0.1:{free_port()}",
    }
    result = subprocess.run(
        [sys.executable, "-m", "epoxi", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert "spool-1.db" in result.stderr and "worker 1 could not start" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_dkim_key_that_cannot_be_read_stops_serve_before_any_worker(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "s2026.pem"
    config = tmp_path / "epoxi.toml"
    config.write_text(
        f'[[dkim.keys]]\ndomain = "example.com"\nselector = "s2026"\nkey_file = "{missing}"\n'
    )
    env = {
        **os.environ,
        "EPOXI_WORKERS": "2",
        "EPOXI_DATA_DIR": str(tmp_path / "data"),
        "EPOXI_SMTP_LISTEN": f"127.0.0.1:{free_port()}",
        "EPOXI_HTTP_LISTEN": f"127.0.0.1:{free_port()}",
    }
    result = subprocess.run(
        [sys.executable, "-m", "epoxi", "serve", "-c", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert f"dkim key {missing}: cannot read it" in result.stderr
    assert "worker" not in result.stderr and "Traceback" not in result.stderr


async def test_pool_weights_hold_and_pool_counts_add_up_over_workers(tmp_path: Path) -> None:
    config = "".join(
        f'[[delivery.sources]]\nname = "ip{n}"\nbind = "127.0.0.{n}"\nehlo = "mta{n}.test"\n'
        for n in (10, 11)
    )  # no pools: one pool "default" of both, weight 1 each
    async with Sink("127.0.0.1") as sink:
        process = await start(tmp_path, 2, config, env={"EPOXI_SMTP_PORT": str(sink.port)})
        try:
            sent = len(await send_to_every_worker(process, 2, sessions=20))
            await sink.wait_for(sent, timeout=30)
            by_peer = Counter(message.peer for message in sink.messages)
            assert by_peer.keys() == {"127.0.0.10", "127.0.0.11"}
            # Rendezvous hashing: half each on average; the difference has sd sqrt(sent).
            spread = abs(by_peer["127.0.0.10"] - by_peer["127.0.0.11"])
            assert spread <= 4 * sent**0.5, by_peer

            def delivered() -> dict[str, int]:
                [pool] = api(process, "GET", "/admin/pools").json()["pools"]
                return {source["bind"]: source["delivered"] for source in pool["sources"]}

            await eventually(
                lambda: delivered() == dict(by_peer), 15, "/admin/pools counting both workers"
            )
        finally:
            await stop(process)


async def test_a_cancel_reaches_the_worker_that_holds_the_message(tmp_path: Path) -> None:
    process = await start(tmp_path, workers=2)  # nothing listens at the relay: all deferred
    try:
        ids = await asyncio.to_thread(send_concurrently, process.port, 12)

        def deferred() -> int:
            return int(api(process, "GET", "/admin/pipelines").json()["totals"]["scheduled"])

        await eventually(lambda: deferred() == 12, 15, "12 messages deferred")
        for message_id in ids:  # each call may land on either worker
            reply = await asyncio.to_thread(api, process, "DELETE", f"/messages/{message_id}")
            assert reply.status_code == 200, reply.text
            assert reply.json()["cancelled"] == 1
        again = await asyncio.to_thread(api, process, "DELETE", f"/messages/{ids[0]}")
        assert again.status_code == 409, again.text
        unknown = await asyncio.to_thread(api, process, "DELETE", "/messages/0000000000000000000Z")
        assert unknown.status_code == 404, unknown.text
        assert deferred() == 0
    finally:
        await stop(process)


async def test_message_rate_holds_for_the_whole_machine(tmp_path: Path) -> None:
    config = '[delivery.defaults]\nmax_message_rate = "20/s"\nidle_timeout = 2\n'
    async with Sink("127.0.0.1") as sink:
        process = await start(
            tmp_path, workers=2, config=config, env={"EPOXI_SMTP_PORT": str(sink.port)}
        )
        try:
            reply = await asyncio.to_thread(
                api, process, "POST", "/admin/suspend", json={"domain": "local.test"}
            )
            assert reply.status_code == 200, reply.text
            sent = await send_evenly(process)  # alone, either worker would take 20/s
            await asyncio.to_thread(api, process, "DELETE", "/admin/suspend?domain=local.test")
            await sink.wait_for(sent, timeout=60)  # both workers send at once from here
            times = sorted(m.received_at for m in sink.messages)
            assert times[-1] - times[0] >= 0.8 * (sent - 1) / 20  # 20/s for the machine
        finally:
            await stop(process)


async def test_implicit_tls_sessions_are_handed_to_every_worker(tmp_path: Path) -> None:
    config = '[smtp]\nlisteners = [{ address = "127.0.0.1:1", tls = "implicit" }]\n'
    process = await start(tmp_path, workers=2, config=config)
    try:

        def send_over_tls(_: int) -> dict[str, tuple[int, bytes]]:
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            with smtplib.SMTP_SSL("127.0.0.1", process.port, context=context, timeout=30) as smtp:
                return smtp.sendmail("a@x.test", ["b@local.test"], BODY)

        def send_eight() -> list[dict[str, tuple[int, bytes]]]:
            with ThreadPoolExecutor(8) as pool:
                return list(pool.map(send_over_tls, range(8)))

        assert await asyncio.to_thread(send_eight) == [{}] * 8  # nobody refused
        await eventually(lambda: workers_with_mail(process, 2) == 2, 10, "mail on both workers")
    finally:
        await stop(process)


async def test_an_automation_action_one_worker_starts_holds_in_every_worker(
    tmp_path: Path,
) -> None:
    rules = tmp_path / "shaping.toml"
    rules.write_text(
        '[domains."local.test"]\n[[domains."local.test".automation]]\n'
        'regex = \'\\[TS04\\]\'\naction = "suspend"\nduration = "1h"\n'
    )
    throttled = {"on": True}

    def answer(client: str, recipient: str) -> Reply | None:
        return Reply(421, "4.7.0", "[TS04] deferred") if throttled["on"] else None

    async with Sink("127.0.0.1", rcpt_answer=answer) as sink:
        config = f"shaping_files = [{json.dumps(str(rules))}]\n{FAST_RETRY}"
        process = await start(
            tmp_path, workers=2, config=config, env={"EPOXI_SMTP_PORT": str(sink.port)}
        )
        try:
            sent = len(await send_to_every_worker(process, 2, sessions=20))
            # one worker saw the reply first and started the action; both apply it
            await wait_for_log(process, "suspended source default on route:", 2)
            started = [
                worker_log(process, i).read_text().count('"type":"Automation"') for i in (0, 1)
            ]
            assert sum(started) == 1, started
            throttled["on"] = False
            active = (await asyncio.to_thread(api, process, "GET", "/admin/shaping")).json()
            [action] = active["active"]
            url = f"http://127.0.0.1:{process.http_port}"
            lifted = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "epoxi", "shaping", "lift", action["id"], "--url", url],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert lifted.returncode == 0, lifted.stderr
            await wait_for_log(process, "resumed source default on route:", 2)
            await sink.wait_for(sent, timeout=30)
        finally:
            await stop(process)
