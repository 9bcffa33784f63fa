"""The ``epoxi`` CLI over the HTTP API of a running ``epoxi serve``, relaying to a sink."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from epoxi.testing.sink import Sink
from tests.conftest import EpoxiProcess, wait_for_port


@dataclass
class Cli:
    process: EpoxiProcess
    sink: Sink

    async def run(
        self, *args: str, key: str | None = None, ok: bool = True
    ) -> tuple[int, str, str]:
        env = {
            **os.environ,
            "EPOXI_URL": f"http://127.0.0.1:{self.process.http_port}",
            "EPOXI_DATA_DIR": str(self.process.data_dir),
            "COLUMNS": "200",
        }
        env.pop("EPOXI_API_KEY", None)
        if key:
            env["EPOXI_API_KEY"] = key
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "epoxi",
            *args,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        code = proc.returncode or 0
        if ok:
            assert code == 0, (args, out.decode(), err.decode())
        return code, out.decode(), err.decode()

    async def json(self, *args: str, key: str | None = None) -> Any:
        _, out, _ = await self.run(*args, "--json", key=key)
        return json.loads(out)

    async def wait_state(self, message_id: str, state: str, key: str | None = None) -> Any:
        deadline = time.monotonic() + 15
        while True:
            found = await self.json("status", message_id, key=key)
            if found["state"] == state or time.monotonic() > deadline:
                assert found["state"] == state, found
                return found
            await asyncio.sleep(0.2)


@pytest.fixture
async def cli(epoxi_process: EpoxiProcess) -> AsyncIterator[Cli]:
    async with Sink("127.0.0.1", epoxi_process.relay_port) as sink:
        epoxi_process.start()
        wait_for_port("127.0.0.1", epoxi_process.http_port, proc=epoxi_process.proc)
        yield Cli(epoxi_process, sink)


async def test_send_and_status(cli: Cli) -> None:
    sent = await cli.json(
        "send",
        "--from",
        "me@local.test",
        "--to",
        "you@remote.test",
        "--subject",
        "Hi",
        "--text",
        "Hello",
    )
    (queued,) = sent["messages"]
    await cli.sink.wait_for(1)
    status = await cli.wait_state(queued["id"], "delivered")
    assert [e["type"] for e in status["events"]][:2] == ["Reception", "Delivery"]
    _, table, _ = await cli.run("status", queued["id"])
    assert "delivered" in table and "Delivery" in table


async def test_send_a_csv_of_recipients_with_their_variables(cli: Cli, tmp_path: Path) -> None:
    csv = tmp_path / "list.csv"
    csv.write_text("email,name\nann@remote.test,Ann\nbob@remote.test,Bob\ncy@remote.test,Cy\n")
    sent = await cli.json(
        "send",
        "--from",
        "me@local.test",
        "--recipients",
        str(csv),
        "--batch",
        "2",
        "--subject",
        "Hi {{ name }}",
        "--text",
        "Dear {{ name }}",
    )
    assert sent["count"] == 3
    await cli.sink.wait_for(3)
    subjects = sorted(m.data.split(b"Subject: ")[1].split(b"\r\n")[0] for m in cli.sink.messages)
    assert subjects == [b"Hi Ann", b"Hi Bob", b"Hi Cy"]


async def test_send_an_eml_file(cli: Cli, tmp_path: Path) -> None:
    eml = tmp_path / "m.eml"
    eml.write_bytes(
        b"From: me@local.test\nTo: a@remote.test, b@remote.test\nSubject: eml\n\nBody\n"
    )
    sent = await cli.json("send", "--eml", str(eml))
    assert sorted(m["recipient"] for m in sent["messages"]) == ["a@remote.test", "b@remote.test"]
    await cli.sink.wait_for(1)
    (received,) = cli.sink.messages
    assert received.mail_from == "me@local.test" and received.data.endswith(b"Body\r\n")


async def test_queue_suspend_ls_resume_retry_and_bounce(cli: Cli) -> None:
    await cli.run(
        "queue", "suspend", "--domain", "held.test", "--reason", "incident", "--duration", "1h"
    )
    sent = await cli.json(
        "send",
        "--from",
        "me@local.test",
        "--to",
        "a@held.test",
        "--to",
        "b@held.test",
        "--text",
        "x",
    )
    ids = [m["id"] for m in sent["messages"]]
    deadline = time.monotonic() + 10
    while (listing := await cli.json("queue", "ls"))["totals"]["held"] < 2:
        assert time.monotonic() < deadline, listing
        await asyncio.sleep(0.2)
    assert listing["suspensions"][0]["reason"] == "incident"
    _, table, _ = await cli.run("queue", "ls")
    assert "held.test" in table and "incident" in table
    shown = await cli.json("queue", "show", "held.test")
    assert shown["scheduled"][0]["held"] == 2
    detail = await cli.json("queue", "message", ids[0])
    assert detail["jobs"][0]["where"] == "held"
    bounced = await cli.json("queue", "bounce", "--id", ids[0], "--reason", "unwanted")
    assert bounced == {"bounced": 1}
    await cli.wait_state(ids[0], "bounced")
    resumed = await cli.json("queue", "resume", "--domain", "held.test")
    assert resumed["released"] == 1
    await cli.sink.wait_for(1)
    assert cli.sink.messages[0].rcpt_tos == ["b@held.test"]
    assert await cli.json("queue", "retry") == {"retried": 0}


async def test_keys_create_list_use_and_revoke(cli: Cli) -> None:
    _, out, err = await cli.run(
        "keys", "create", "--name", "app", "--scope", "send", "--scope", "read"
    )
    key = out.strip()
    assert key.startswith("epx_") and "cannot be shown again" in err
    listed = await cli.json("keys", "list")
    assert [(k["name"], k["scopes"]) for k in listed] == [("app", ["read", "send"])]
    code, _, err = await cli.run(
        "send", "--from", "me@local.test", "--to", "a@remote.test", "--text", "x", ok=False
    )
    assert code == 1 and "401" in err and "--key" in err
    sent = await cli.json(
        "send", "--from", "me@local.test", "--to", "a@remote.test", "--text", "x", key=key
    )
    assert sent["count"] == 1
    code, _, err = await cli.run("queue", "ls", key=key, ok=False)
    assert code == 1 and "403" in err and "admin" in err
    await cli.run("keys", "revoke", listed[0]["id"])
    code, _, err = await cli.run("status", sent["messages"][0]["id"], key=key, ok=False)
    assert code == 1 and "revoked" in err


async def test_suppressions_add_ls_rm_import_export(cli: Cli, tmp_path: Path) -> None:
    await cli.run("suppressions", "add", "A@a.test", "b@a.test", "--tenant", "shop")
    listed = await cli.json("suppressions", "ls", "--tenant", "shop")
    assert [(e["address"], e["reason"]) for e in listed] == [
        ("a@a.test", "manual"),
        ("b@a.test", "manual"),
    ]
    _, out, _ = await cli.run("suppressions", "rm", "b@a.test", "--tenant", "shop")
    assert "removed b@a.test" in out
    code, _, err = await cli.run("suppressions", "rm", "b@a.test", "--tenant", "shop", ok=False)
    assert code == 1 and "not on the suppression list" in err
    source = tmp_path / "in.csv"
    source.write_text("".join(f"u{i}@a.test,complaint\n" for i in range(12000)))
    imported = await cli.json("suppressions", "import", str(source), "--tenant", "shop")
    assert (imported["added"], imported["already"]) == (12000, 0)
    exported = tmp_path / "out.csv"
    await cli.run("suppressions", "export", str(exported), "--tenant", "shop")
    lines = exported.read_text().splitlines()
    assert lines[0] == "tenant,address,reason,detail,created_at" and len(lines) == 12002
    again = await cli.json("suppressions", "import", str(exported), "--tenant", "copy")
    assert again["added"] == 12001
    _, out, _ = await cli.run("suppressions", "export", "--tenant", "copy")
    assert "shop" not in out and out.count("\n") == 12002


async def test_unreachable_server_says_what_to_do(cli: Cli) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "epoxi",
        "queue",
        "ls",
        "--url",
        "http://127.0.0.1:9",
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    assert proc.returncode == 1 and b"is `epoxi serve` running?" in err


@pytest.mark.parametrize(
    "command",
    [
        ["send"],
        ["status"],
        ["keys", "create"],
        ["keys", "list"],
        ["keys", "revoke"],
        ["queue", "ls"],
        ["queue", "show"],
        ["queue", "suspend"],
        ["queue", "resume"],
        ["queue", "bounce"],
        ["queue", "retry"],
        ["queue", "message"],
        ["suppressions", "ls"],
        ["suppressions", "add"],
        ["suppressions", "rm"],
        ["suppressions", "import"],
        ["suppressions", "export"],
        ["sinks", "ls"],
        ["bounce", "quarantine", "ls"],
        ["bounce", "quarantine", "show"],
        ["bounce", "quarantine", "rm"],
    ],
)
async def test_every_command_explains_itself(command: list[str]) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "epoxi", *command, "--help", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    text = out.decode()
    assert "Usage: epoxi" in text and "--help" in text
    assert len([line for line in text.splitlines() if line.strip()]) > 4
