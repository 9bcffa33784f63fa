"""Epoxi as a real process: kill -9 after 250s loses nothing; SIGTERM exits cleanly; the CLI."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from epoxi.reception.auth import verify_password
from epoxi.spool import Spool
from epoxi.testing.sink import Sink
from tests.conftest import EpoxiProcess, free_port, queue_ids, wait_for_port
from tests.conftest import send_batch as send_messages

BODY = b"Subject: durable\r\n\r\n" + (b"x" * 76 + b"\r\n") * 65


def send_batch(port: int, count: int) -> list[str]:
    return send_messages(port, count, BODY)


def spooled_ids(data_dir: Path) -> set[str]:
    async def read() -> set[str]:
        spool = Spool(data_dir / "spool.db")
        spool.open()
        try:
            return {m.id for batch in spool.iter_meta() for m in batch}
        finally:
            await spool.close()

    return asyncio.run(read())


def test_sigkill_after_250_loses_nothing(epoxi_process: EpoxiProcess) -> None:
    epoxi_process.start()
    with ThreadPoolExecutor(8) as pool:
        batches = list(pool.map(lambda _: send_batch(epoxi_process.port, 50), range(8)))
    epoxi_process.kill()  # at once, right after the last 250
    acknowledged = {queue_id for batch in batches for queue_id in batch}
    assert len(acknowledged) == 400
    assert acknowledged <= spooled_ids(epoxi_process.data_dir)


def test_restart_keeps_the_spool(epoxi_process: EpoxiProcess) -> None:
    epoxi_process.start()
    ids = send_batch(epoxi_process.port, 5)
    epoxi_process.kill()
    epoxi_process.start()
    deadline = time.monotonic() + 10
    while "5 messages queued" not in epoxi_process.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "5 messages queued" in epoxi_process.log()
    epoxi_process.stop()
    assert set(ids) <= spooled_ids(epoxi_process.data_dir)


def test_sigterm_shuts_down_cleanly(epoxi_process: EpoxiProcess) -> None:
    epoxi_process.start()
    send_batch(epoxi_process.port, 3)
    assert epoxi_process.stop() == 0
    assert "SMTP server stopped" in epoxi_process.log()


def run_cli(
    *args: str, stdin: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "epoxi", *args],
        input=stdin,
        env={**os.environ, **(env or {})},
        text=True,
        capture_output=True,
        timeout=60,
    )


def test_config_check_names_bad_key_and_value(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('colour = "blue"\n[smtp]\nmax_recipients = "many"\n')
    result = run_cli("config", "check", "-c", str(config))
    assert result.returncode == 2
    assert "unknown key 'colour' (value 'blue')" in result.stderr
    assert "smtp.max_recipients = 'many'" in result.stderr


def test_config_check_accepts_the_example() -> None:
    result = run_cli(
        "config", "check", "-c", str(Path(__file__).parents[2] / "examples/epoxi.toml")
    )
    assert result.returncode == 0, result.stderr
    assert "configuration OK" in result.stdout


def test_serve_refuses_a_bad_config(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[smtp]\nidle_timeout = "soon"\n')
    result = run_cli("serve", "-c", str(config))
    assert result.returncode == 2 and "smtp.idle_timeout = 'soon'" in result.stderr


def test_serve_refuses_a_public_api_without_keys(tmp_path: Path) -> None:
    env = {"EPOXI_HTTP_LISTEN": f"0.0.0.0:{free_port()}", "EPOXI_DATA_DIR": str(tmp_path)}
    result = run_cli("serve", env=env)
    assert result.returncode == 2
    assert "0.0.0.0" in result.stderr and "epoxi keys create" in result.stderr
    created = run_cli("keys", "create", "--name", "app", "--scope", "send", env=env)
    assert created.returncode == 0 and created.stdout.startswith("epx_")


def test_serve_says_when_a_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {"EPOXI_SMTP_LISTEN": f"127.0.0.1:{port}", "EPOXI_DATA_DIR": str(tmp_path)}
        result = run_cli("serve", env={**env, "EPOXI_HTTP_LISTEN": ""})
    assert result.returncode == 1, result.stderr
    assert "cannot start" in result.stderr and "Traceback" not in result.stderr


def test_users_hash_prints_a_verifiable_hash() -> None:
    result = run_cli("users", "hash", "--password-stdin", stdin="hunter2\n")
    assert result.returncode == 0
    encoded = result.stdout.strip()
    assert verify_password("hunter2", encoded) and not verify_password("hunter3", encoded)


async def test_restart_mid_run_delivers_everything_queued(tmp_path: Path) -> None:
    """Mail queued while the smarthost is down survives a kill -9 and is delivered later."""
    process = EpoxiProcess(tmp_path / "data")
    config = tmp_path / "epoxi.toml"
    config.write_text('[delivery]\nretry_interval = "1s"\nmax_retry_interval = "2s"\n')
    try:
        await asyncio.to_thread(process.start, config)
        ids = await asyncio.to_thread(send_batch, process.port, 20)
        await asyncio.to_thread(process.kill)
        async with Sink("127.0.0.1", process.relay_port) as sink:
            await asyncio.to_thread(process.start, config)
            await sink.wait_for(20, timeout=30)
            assert queue_ids(sink.messages) == set(ids)
    finally:
        if process.proc is not None:
            await asyncio.to_thread(process.kill)


async def test_sink_command_counts_messages() -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "epoxi",
        "sink",
        "--listen",
        f"127.0.0.1:{port}",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        await asyncio.to_thread(wait_for_port, "127.0.0.1", port)
        await asyncio.to_thread(send_batch, port, 3)
        assert proc.stdout is not None
        while b"messages=3" not in await asyncio.wait_for(proc.stdout.readline(), 10):
            pass
    finally:
        proc.terminate()
        await proc.wait()


def _wait_for_log(process: EpoxiProcess, text: str, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while text not in process.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    return process.log()


def test_sighup_reloads_and_says_what_needs_a_restart(epoxi_process: EpoxiProcess) -> None:
    config = epoxi_process.data_dir.parent / "epoxi.toml"
    config.write_text("[delivery.defaults]\nconnection_limit = 3\n")
    epoxi_process.data_dir.mkdir(parents=True, exist_ok=True)
    epoxi_process.start(config)
    config.write_text("[dns]\ntimeout = 3\n[delivery.defaults]\nconnection_limit = 7\n")
    assert epoxi_process.proc is not None
    epoxi_process.proc.send_signal(signal.SIGHUP)
    log = _wait_for_log(epoxi_process, "only applied by a restart")
    assert "configuration reloaded: shaping, routes" in log
    assert "only applied by a restart: dns" in log
    config.write_text("[delivery]\nnot_a_key = 1\n")
    epoxi_process.proc.send_signal(signal.SIGHUP)
    log = _wait_for_log(epoxi_process, "not reloaded")
    assert "the running one is kept" in log and "not_a_key" in log
    assert send_batch(epoxi_process.port, 1)  # still serving
    assert epoxi_process.stop() == 0
