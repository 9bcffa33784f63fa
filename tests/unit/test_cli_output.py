"""The CLI prints what the API returns escaped: no raw ESC, bidi control or Rich markup.

The API here is a stub HTTP server in a thread answering the CLI's calls with fields that
hold an ESC sequence, a U+202E and Rich markup, as an address or reply from a stranger can.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import msgspec
import pytest
from typer.testing import CliRunner

from epoxi.api_types import (
    Pipelines,
    PoolInfo,
    PoolList,
    ReadyQueueInfo,
    ScheduledQueueInfo,
    SinkInfo,
    SinkList,
    SourceInfo,
    SuspensionInfo,
    Totals,
)
from epoxi.cli import app
from epoxi.events.records import Record, RecordType
from epoxi.store.status import MessageStatus, RecipientStatus, State

EVIL = "evil\x1b[31m\u202e[bold]x@a.test"
SHOWN = "evil\\x1b[31m\\u202e[bold]x@a.test"

# Built from the daemon's own types, so the stub answers exactly what the API would.
PIPELINES = Pipelines(
    totals=Totals(scheduled=1, held=0, ready=1, connections=0),
    scheduled=[
        ScheduledQueueInfo(
            name=EVIL, domain=EVIL, scheduled=1, held=0, next_due=None, suspended=EVIL
        )
    ],
    ready=[
        ReadyQueueInfo(
            name=EVIL,
            site=EVIL,
            source="default",
            hosts=[EVIL],
            queued=1,
            connections=0,
            connection_limit=4,
            connects=0,
            deliveries=0,
            attempts_last_minute=0,
            max_message_rate=None,
            suspended=None,
            suspended_until=None,
            last_error=EVIL,
            last_error_at=None,
        )
    ],
    suspensions=[SuspensionInfo(target="domain", value=EVIL, reason=EVIL, until=None)],
)
STATUS = MessageStatus(
    id="m1",
    state=State.DEFERRED,
    tenant="",
    campaign="",
    sender=EVIL,
    origin="smtp",
    size=10,
    received_at=1.0,
    updated_at=1.0,
    attempts=1,
    last_response=EVIL,
    recipients=[
        RecipientStatus(
            recipient=EVIL,
            state=State.DEFERRED,
            attempts=1,
            last_response=EVIL,
            next_attempt=None,
        )
    ],
    events=[
        Record(
            type=RecordType.TRANSIENT_FAILURE,
            message_id="m1",
            timestamp=1.0,
            recipient=EVIL,
            reason=EVIL,
            source="ip10",
            pool="bulk",
            peer_address="192.0.2.1",
            tls="TLSv1.3 TLS_AES_256_GCM_SHA384 verified policy=mta-sts enforce",
        )
    ],
)
POOLS = PoolList(
    pools=[
        PoolInfo(
            name="bulk",
            fallback=None,
            default=True,
            tenants=[],
            sources=[
                SourceInfo(
                    name="ip10",
                    weight=3,
                    bind="192.0.2.10",
                    ehlo="out1.example.com",
                    state="failing",
                    delivered=7,
                    deferred=1,
                    bounced=0,
                    connections=4,
                    connection_failures=2,
                    last_error=EVIL,
                    last_error_at=None,
                )
            ],
        )
    ]
)
SINKS = SinkList(
    sinks=[
        SinkInfo(
            name="bus",
            kind="redis",
            url="redis://127.0.0.1:6379/0",
            types=["delivery", "bounce"],
            tenants=["acme"],
            workers=2,
            connected=1,
            backlog=12,
            backlog_limit=100_000,
            dropped=3,
            published=40,
            last_error=EVIL,
            last_error_at=1764584830.0,
        )
    ]
)
ANSWERS = {
    "/admin/pipelines": PIPELINES,
    "/messages/m1": STATUS,
    "/admin/pools": POOLS,
    "/admin/sinks": SINKS,
}


class Api(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = msgspec.json.encode(ANSWERS[self.path])
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Api)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def run(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), prog_name="epoxi", env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    return result.output


def assert_escaped(output: str, times: int) -> None:
    assert "\x1b" not in output and "\u202e" not in output, repr(output)
    assert output.count(SHOWN) == times, output


def test_queue_ls_prints_fields_escaped(url: str) -> None:
    assert_escaped(run("queue", "ls", "--url", url), 6)


def test_status_prints_fields_escaped(url: str) -> None:
    output = run("status", "m1", "--url", url)
    assert_escaped(output, 6)
    assert "from ip10 (pool bulk) to 192.0.2.1" in output
    assert "TLS: TLSv1.3 TLS_AES_256_GCM_SHA384 verified policy=mta-sts enforce" in output


def test_pool_ls_prints_each_source_with_its_counts(url: str) -> None:
    output = run("pool", "ls", "--url", url)
    assert_escaped(output, 1)
    assert "bulk (default)" in output
    row = next(line for line in output.splitlines() if "ip10" in line)
    for shown in ("3", "192.0.2.10 out1.example.com", "failing", "7/1/0", "4/2"):
        assert shown in row, (shown, row)


@pytest.mark.parametrize("args", [("queue", "ls"), ("status", "m1")])
def test_json_output_escapes_and_parses(url: str, args: tuple[str, ...]) -> None:
    output = run(*args, "--url", url, "--json")
    assert "\x1b" not in output and "\u202e" not in output
    assert "\\u001b[31m\\u202e[bold]" in output
    answer = ANSWERS["/admin/pipelines" if args[0] == "queue" else "/messages/m1"]
    assert json.loads(output) == json.loads(msgspec.json.encode(answer))


def test_sinks_ls_prints_each_sink_with_its_counts(url: str) -> None:
    output = run("sinks", "ls", "--url", url)
    assert_escaped(output, 1)
    row = next(line for line in output.splitlines() if "bus" in line)
    shown = ("redis://127.0.0.1:6379/0", "delivery, bounce; tenants acme", "1/2", "12/100000")
    for part in (*shown, "2025-12-01 10:27:10"):
        assert part in row, (part, row)
