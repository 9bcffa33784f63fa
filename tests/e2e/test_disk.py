"""The spool on a small tmpfs (mounted by the test; CI runs as root): as it fills, new mail
gets 4xx, nothing accepted is lost or corrupted, and mail flows again once space returns."""

from __future__ import annotations

import asyncio
import os
import smtplib
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import MakeServer, Running

MESSAGE = b"Subject: filler\r\n\r\n" + (b"z" * 98 + b"\r\n") * 5000  # about 500 KB


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 40 MiB tmpfs at tmp_path/data, where the servers of make_server keep their data."""
    if os.geteuid() != 0:
        pytest.fail("mounting a tmpfs needs root (CI runs as root)")
    mount = tmp_path / "data"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave_mib: int) -> Path:
    """A file that takes all but ``leave_mib`` MiB of the disk."""
    stat = os.statvfs(disk)
    free = stat.f_bavail * stat.f_frsize
    filler = disk / "filler"
    with filler.open("wb") as f:
        f.write(b"\0" * max(0, free - leave_mib * 2**20))
    return filler


def send_until_refused(port: int, limit: int = 200) -> tuple[list[str], tuple[int, bytes]]:
    """Send until the server refuses; the queue ids acknowledged and the refusal."""
    acked: list[str] = []
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.ehlo("client.test")
        for _ in range(limit):
            code, text = smtp.mail("a@x.test")
            if code == 250:
                code, text = smtp.rcpt("b@local.test")
            if code == 250:
                try:
                    code, text = smtp.data(MESSAGE)
                except smtplib.SMTPDataError as exc:
                    code, text = exc.smtp_code, exc.smtp_error
            if code != 250:
                smtp.rset()
                return acked, (code, text)
            acked.append(text.split()[-1].decode())
    raise AssertionError(f"never refused after {limit} messages")


async def assert_intact(server: Running, acked: list[str]) -> None:
    for queue_id in acked:
        body = await server.app.spool.load_body(queue_id)
        assert body.startswith(b"Received: ") and body.endswith(MESSAGE)
    check = sqlite3.connect(server.data_dir / "spool.db").execute("PRAGMA integrity_check")
    assert check.fetchone()[0] == "ok"


def try_one(port: int) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.ehlo("client.test")
        smtp.mail("a@x.test")
        smtp.rcpt("b@local.test")
        try:
            code, _ = smtp.data(b"Subject: again\r\n\r\nroom again\r\n")
        except smtplib.SMTPDataError as exc:
            code = exc.smtp_code
    return code


async def wait_accepting(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while True:
        code = await asyncio.to_thread(try_one, port)
        if code == 250:
            return
        assert time.monotonic() < deadline, (
            f"still refused ({code}) {timeout}s after space returned"
        )
        await asyncio.sleep(0.5)


@pytest.mark.slow
async def test_nearly_full_disk_refuses_with_4xx_and_recovers(
    small_disk: Path, make_server: MakeServer
) -> None:
    filler = fill(small_disk, leave_mib=30)
    server: Running = await make_server(spool={"min_free_space": "12MiB"})
    acked, (code, text) = await asyncio.to_thread(send_until_refused, server.ports.open)
    assert acked, "some mail should have fitted"
    assert code == 452 and b"4.3.1" in text, (code, text)
    await assert_intact(server, acked)
    filler.unlink()
    await wait_accepting(server.ports.open)
    assert {m.id for m in await server.spooled()} >= set(acked)


@pytest.mark.slow
async def test_disk_full_during_commit_loses_nothing_and_recovers(
    small_disk: Path, make_server: MakeServer
) -> None:
    server: Running = await make_server(spool={"min_free_space": 0})
    filler = fill(small_disk, leave_mib=6)  # the database must hit ENOSPC itself
    acked, (code, text) = await asyncio.to_thread(send_until_refused, server.ports.open)
    assert 400 <= code < 500, (code, text)  # never a 5xx: the client should try again
    await assert_intact(server, acked)
    filler.unlink()
    await wait_accepting(server.ports.open)
    assert {m.id for m in await server.spooled()} >= set(acked)
