"""Shared fixtures: free ports, and Epoxi itself as a real process."""

from __future__ import annotations

import asyncio
import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, LoopFactory]:
    """End-to-end tests run on uvloop, as production does; ``both_loops`` tests on both."""
    if item.get_closest_marker("both_loops") is not None:
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    if "/e2e/" in str(item.path):
        return {"uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now and not handed out before in this test run."""
    while True:
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def wait_for_port(
    host: str, port: int, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


class EpoxiProcess:
    """``epoxi serve`` in a child process, on a free port, with its own data dir."""

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.relay_port = free_port()  # nothing listens here unless a test starts a sink
        self.http_port = free_port()
        self.extra_env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / "epoxi.log"

    def start(self, config: Path | None = None) -> None:
        env = {
            **os.environ,
            "EPOXI_SMTP_LISTEN": f"127.0.0.1:{self.port}",
            "EPOXI_DATA_DIR": str(self.data_dir),
            "EPOXI_HOSTNAME": "mx.test",
            "EPOXI_LOCAL_DOMAINS": "local.test",
            "EPOXI_SMTP_RELAY": "127.0.0.1",
            "EPOXI_SMTP_PORT": str(self.relay_port),
            "EPOXI_HTTP_LISTEN": f"127.0.0.1:{self.http_port}",
            "EPOXI_WORKERS": "1",  # one process, one spool.db; tests/e2e/test_workers.py runs N
            **self.extra_env,
        }
        args = [sys.executable, "-m", "epoxi", "serve"] + (["-c", str(config)] if config else [])
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                args, env=env, stdout=log, stderr=log, preexec_fn=self.preexec
            )
        wait_for_port("127.0.0.1", self.port, proc=self.proc)

    preexec: Callable[[], None] | None = None  # run in the child before exec (limits ...)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self.proc = None
        return code

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def epoxi_process(tmp_path: Path) -> Iterator[EpoxiProcess]:
    process = EpoxiProcess(tmp_path / "data")
    yield process
    if process.proc is not None:
        process.stop(signal.SIGKILL)


async def eventually(
    predicate: Callable[[], bool], timeout: float = 10.0, what: str = "the condition"
) -> None:
    """Return once ``predicate()`` holds; fail after ``timeout`` seconds. For state that
    changes without an event to await (counters, another thread's progress)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} did not happen within {timeout}s")
        await asyncio.sleep(0.005)


def send_batch(port: int, count: int, body: bytes) -> list[str]:
    """Send ``count`` messages on one connection; return the queue ids from the 250 replies."""
    ids = []
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.ehlo("client.test")
        for _ in range(count):
            smtp.mail("a@x.test")
            smtp.rcpt("b@local.test")
            code, text = smtp.data(body)
            assert code == 250, text
            ids.append(text.split()[-1].decode())
    return ids


def queue_ids(messages: Iterable[Any]) -> set[str]:
    """The Epoxi queue ids of messages at a sink, from the Received: field Epoxi added."""
    return {m.data.split(b" id ", 1)[1][:20].decode() for m in messages}
