"""The HTTP API under attack (issue 6, item 9): every hostile request is a clear 4xx, never a 5xx.

Malformed JSON, wrong types, unknown fields, huge bodies, CR/LF and other line breaks in every
header-bound field, template sandbox escapes and template bombs, bad or wrong-scope keys and odd
path parameters. After each hostile request the server must still answer ``/ping`` and must not
have logged a traceback; a rejected send must queue nothing.

Template bombs that burn CPU or memory run against ``epoxi serve`` in a child process with its
address space capped: in the test's own event loop a hang would hang the test run, and a memory
bomb would take the test machine with it.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import resource
import signal
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from epoxi.events.records import RecordType
from epoxi.store import KeyStore, Scope, store_path
from tests.conftest import EpoxiProcess, free_port, wait_for_port
from tests.e2e.conftest import Api, World, message_request, parse

PROBLEM = "application/problem+json"
JSON = {"content-type": "application/json"}
SEND_ROUTES = ("/messages", "/messages/raw")
ADMIN_POSTS = ("/admin/suspend", "/admin/bounce", "/admin/retry")
POST_ROUTES = SEND_ROUTES + ADMIN_POSTS


@pytest.fixture
def server_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog, also fed by uvicorn's loggers (uvicorn stops them propagating to the root)."""
    caplog.set_level(logging.WARNING)
    uvicorn = logging.getLogger("uvicorn")
    uvicorn.addHandler(caplog.handler)
    yield caplog
    uvicorn.removeHandler(caplog.handler)


# --------------------------------------------------------------------- helpers


RAW = {"from": "bounce@sender.test", "to": ["x@a.test"], "content": "Subject: raw\n\nHi.\n"}


def good_body(route: str) -> dict[str, Any]:
    """A body that ``route`` accepts, to be spoiled one field at a time."""
    if route == "/messages":
        return message_request()
    if route == "/messages/raw":
        return dict(RAW)
    return {"domain": "nowhere.test"}


def assert_problem(
    reply: httpx.Response,
    status: int,
    field: str | None = None,
    *,
    useful: bool = True,
    mentions: tuple[str, ...] = (),
) -> dict[str, Any]:
    """``reply`` is an RFC 9457 problem with ``status``, a detail that says something, and
    ``errors[0].field == field`` when a field is named."""
    where = f"{reply.request.method} {reply.request.url.path[:80]}"
    assert reply.status_code == status, f"{where}: {reply.status_code} {reply.text[:600]}"
    assert reply.headers["content-type"] == PROBLEM, f"{where}: {reply.headers}"
    problem: dict[str, Any] = reply.json()
    assert problem["status"] == status
    detail = problem.get("detail", "")
    assert detail, f"{where}: no detail in {problem}"
    if useful:
        assert detail != problem["title"], f"{where}: the detail only repeats the title: {problem}"
        assert len(detail) >= 8 and detail.strip("'\"") not in ("data", "body"), problem
    for word in mentions:
        assert word in detail, f"{where}: {word!r} not in detail {detail!r}"
    if field is not None:
        assert problem.get("errors"), f"{where}: no errors in {problem}"
        assert problem["errors"][0]["field"] == field, f"{where}: {problem}"
    return problem


async def assert_alive(client: httpx.AsyncClient, log: pytest.LogCaptureFixture) -> None:
    """The server still answers, and logged no traceback (no 500 slipped through)."""
    ping = await asyncio.wait_for(client.get("/ping"), 5)
    assert ping.status_code == 200 and ping.text == "pong"
    tracebacks = [r for r in log.records if r.exc_info or "Traceback" in r.getMessage()]
    assert not tracebacks, f"the server logged a traceback: {log.text[-3000:]}"


def assert_nothing_queued(world: World) -> None:
    assert world.app.spool.count() == 0, "a rejected request queued mail"


def set_path(body: dict[str, Any], path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    """A deep copy of ``body`` with ``value`` at ``path`` (keys and list indexes)."""
    copy: Any = msg_copy(body)
    target = copy
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return dict(copy)


def msg_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: msg_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [msg_copy(v) for v in value]
    return value


def delivered_to(world: World, recipient: str) -> list[bytes]:
    return [
        m.data for sink in world.sinks.values() for m in sink.messages if recipient in m.rcpt_tos
    ]


async def wait_delivered(world: World, recipient: str, timeout: float = 10.0) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = delivered_to(world, recipient)
        if found:
            return found[0]
        await asyncio.sleep(0.02)
    raise AssertionError(f"nothing delivered to {recipient}")


_HEADER_LINE = re.compile(rb"[\t\x20-\x7e]*")


def assert_clean_header(data: bytes, injected: str = "X-Injected") -> None:
    """No header line holds a raw control or non-ASCII byte (RFC 5322 for a message sent
    without SMTPUTF8), none is longer than 998 octets, and no ``injected`` field appeared."""
    head = data.split(b"\r\n\r\n", 1)[0]
    names = []
    for line in head.split(b"\r\n"):
        assert _HEADER_LINE.fullmatch(line), f"raw control/non-ASCII byte in {line[:200]!r}"
        assert len(line) <= 998, f"a header line of {len(line)} octets"
        if line[:1] not in (b" ", b"\t"):
            names.append(line.split(b":", 1)[0].strip().lower())
    assert injected.lower().encode() not in names, head
    # and no reader that splits lines the way Python's str.splitlines() does finds it either
    for line in head.decode("utf-8", "replace").splitlines():
        assert not line.lower().startswith(injected.lower() + ":"), head
    assert parse(data)[injected] is None


# --------------------------------------------------------------------- malformed JSON

DEEP_ARRAYS = b"[" * 10_000 + b"]" * 10_000
DEEP_IN_DATA = (
    b'{"message": {"from": "s@sender.test", "to": ["x@a.test"], "text": "hi", '
    b'"data": {"x@a.test": {"v": ' + b'{"a": ' * 10_000 + b"1" + b"}" * 10_000 + b"}}}}"
)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"message": ', id="truncated"),
        pytest.param(b'{"domain": "a.test"} trailing', id="trailing-garbage"),
        pytest.param(b'{"domain": NaN}', id="NaN"),
        pytest.param(b'{"domain": Infinity}', id="Infinity"),
        pytest.param(b'{"domain": "\xff\xfe"}', id="invalid-utf8"),
        pytest.param(b'{"domain": "\\ud800"}', id="lone-surrogate"),
        pytest.param(b'\xef\xbb\xbf{"domain": "a.test"}', id="utf8-bom"),
        pytest.param(b"{'domain': 'a.test'}", id="single-quotes"),
        pytest.param(b'{"domain": "a.test",}', id="trailing-comma"),
        pytest.param(b"message=x&to=y", id="form-encoded-body"),
        pytest.param(
            DEEP_ARRAYS,
            id="arrays-10000-deep",
        ),
    ],
)
async def test_malformed_json_is_400_on_every_route(
    api: Api, server_log: pytest.LogCaptureFixture, body: bytes
) -> None:
    world, client = await api()
    for route in POST_ROUTES:
        reply = await client.post(route, content=body, headers=JSON)
        assert_problem(reply, 400)
        await assert_alive(client, server_log)
    assert_nothing_queued(world)


async def test_deeply_nested_template_data_is_400(
    api: Api, server_log: pytest.LogCaptureFixture
) -> None:
    world, client = await api()
    reply = await client.post("/messages", content=DEEP_IN_DATA, headers=JSON)
    assert_problem(reply, 400)
    await assert_alive(client, server_log)
    assert_nothing_queued(world)


@pytest.mark.parametrize("route", POST_ROUTES)
async def test_empty_body_is_400_with_a_useful_detail(
    api: Api, server_log: pytest.LogCaptureFixture, route: str
) -> None:
    world, client = await api()
    reply = await client.post(route, content=b"", headers=JSON)
    if route == "/admin/retry" and reply.status_code == 200:
        pass  # its summary says "an empty body: all of them"
    else:
        assert_problem(reply, 400)
    await assert_alive(client, server_log)
    assert_nothing_queued(world)


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        (b"[]", "array"),
        (b'[{"domain": "a.test"}]', "array"),
        (b'"a string"', "str"),
        (b"null", "null"),
        (b"42", "int"),
        (b"true", "bool"),
    ],
)
async def test_json_that_is_not_an_object_is_422(
    api: Api, server_log: pytest.LogCaptureFixture, body: bytes, kind: str
) -> None:
    world, client = await api()
    for route in POST_ROUTES:
        reply = await client.post(route, content=body, headers=JSON)
        assert_problem(reply, 422, mentions=("object", kind))
        await assert_alive(client, server_log)
    assert_nothing_queued(world)


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"],
)
async def test_json_under_another_content_type_is_refused(
    api: Api, server_log: pytest.LogCaptureFixture, content_type: str
) -> None:
    world, client = await api()
    body = httpx.Request("POST", "/", json=message_request()).read()
    reply = await client.post("/messages", content=body, headers={"content-type": content_type})
    assert 400 <= reply.status_code < 500, reply.text
    assert reply.headers["content-type"] == PROBLEM
    await assert_alive(client, server_log)
    assert_nothing_queued(world)


async def test_real_form_data_is_415(api: Api, server_log: pytest.LogCaptureFixture) -> None:
    world, client = await api()
    for reply in (
        await client.post("/messages", data={"message": "x", "to": "x@a.test"}),
        await client.post("/messages", files={"message": ("m.json", b"{}", "application/json")}),
    ):
        assert_problem(reply, 415)
        await assert_alive(client, server_log)
    assert_nothing_queued(world)


# --------------------------------------------------------------------- wrong types

M = "message"
WRONG_TYPES: list[tuple[str, tuple[str | int, ...], list[Any], str]] = [
    ("/messages", (M, "from"), [5, None, ["s@sender.test"], {"a": 1}, True], "message.from"),
    ("/messages", (M, "to"), ["x@a.test", 5, None, {"x@a.test": {}}, True], "message.to"),
    ("/messages", (M, "to"), [[5], [None], [["x@a.test"]], [{"a": "x@a.test"}]], "message.to[0]"),
    ("/messages", (M, "cc"), ["c@a.test", 1, {"c": 1}], "message.cc"),
    ("/messages", (M, "cc"), [[1], [None]], "message.cc[0]"),
    ("/messages", (M, "bcc"), ["b@a.test", 1.5], "message.bcc"),
    ("/messages", (M, "bcc"), [[{}], [False]], "message.bcc[0]"),
    ("/messages", (M, "reply_to"), [5, ["r@a.test"], {}, False], "message.reply_to"),
    ("/messages", (M, "subject"), [5, None, ["s"], {"a": 1}], "message.subject"),
    ("/messages", (M, "text"), [5, ["t"], {"a": 1}, True], "message.text"),
    ("/messages", (M, "html"), [5, ["h"], {}], "message.html"),
    ("/messages", (M, "headers"), [["X-A: b"], "X-A: b", 5, None], "message.headers"),
    ("/messages", (M, "headers"), [{"X-A": 5}, {"X-A": None}, {"X-A": ["b"]}], "message.headers"),
    (
        "/messages",
        (M, "attachments"),
        [{"filename": "a", "content": "eA=="}, "x", 5],
        "message.attachments",
    ),
    ("/messages", (M, "attachments"), [[5], ["a"], [None]], "message.attachments[0]"),
    (
        "/messages",
        (M, "attachments"),
        [[{"filename": 5, "content": "eA=="}]],
        "message.attachments[0].filename",
    ),
    (
        "/messages",
        (M, "attachments"),
        [[{"filename": "a", "content": 5}]],
        "message.attachments[0].content",
    ),
    (
        "/messages",
        (M, "attachments"),
        [[{"filename": "a", "content": "eA==", "content_type": 5}]],
        "message.attachments[0].content_type",
    ),
    ("/messages", (M, "data"), [[], "x", 5, None], "message.data"),
    (
        "/messages",
        (M, "data"),
        [{"x@a.test": "s"}, {"x@a.test": [1]}, {"x@a.test": None}],
        "message.data",
    ),
    ("/messages", ("message",), [None, "x", [], 5], "message"),
    ("/messages", ("ip_pool",), [5, ["default"], {}], "ip_pool"),
    ("/messages", ("tenant",), [5, ["acme"], {}], "tenant"),
    ("/messages", ("campaign",), [5, {}, True], "campaign"),
    ("/messages", ("tags",), ["a", 5, {"a": 1}], "tags"),
    ("/messages", ("tags",), [[5], [None]], "tags[0]"),
    ("/messages", ("metadata",), [[], "x", 5], "metadata"),
    ("/messages", ("metadata",), [{"a": 5}, {"a": None}, {"a": {}}], "metadata"),
    ("/messages", ("send_at",), ["tomorrow", "2026-13-01T00:00:00Z", True, [], {}], "send_at"),
    ("/messages/raw", ("from",), [5, None, ["a@b.test"], {}], "from"),
    ("/messages/raw", ("to",), ["x@a.test", 5, None, {}], "to"),
    ("/messages/raw", ("to",), [[5], [None], [["x@a.test"]]], "to[0]"),
    ("/messages/raw", ("content",), [5, None, ["x"], {"a": 1}, True], "content"),
    ("/messages/raw", ("tenant",), [5, []], "tenant"),
    ("/messages/raw", ("campaign",), [5, {}], "campaign"),
    ("/messages/raw", ("metadata",), [[1], "x"], "metadata"),
    ("/messages/raw", ("send_at",), ["x", True], "send_at"),
]
for _route in ADMIN_POSTS:
    for _name in ("domain", "site", "tenant", "campaign", "queue"):
        WRONG_TYPES.append((_route, (_name,), [5, ["a.test"], {"a": 1}, True, 1.5], _name))
    WRONG_TYPES.append((_route, ("reason",), [5, None, ["r"], {}], "reason"))
WRONG_TYPES.append(("/admin/suspend", ("duration",), ["1h", [1], {}, -1, 0, 1e20], "duration"))
for _route in ("/admin/bounce", "/admin/retry"):
    WRONG_TYPES.append((_route, ("id",), [5, ["x"], {}], "id"))


@pytest.mark.parametrize(
    ("route", "path", "values", "field"),
    WRONG_TYPES,
    ids=[f"{r}:{'.'.join(map(str, p))}->{f}" for r, p, _, f in WRONG_TYPES],
)
async def test_wrong_types_are_422_naming_the_field(
    api: Api,
    server_log: pytest.LogCaptureFixture,
    route: str,
    path: tuple[str | int, ...],
    values: list[Any],
    field: str,
) -> None:
    world, client = await api()
    for value in values:
        reply = await client.post(route, json=set_path(good_body(route), path, value))
        problem = assert_problem(reply, 422)
        named = problem["errors"][0]["field"]
        # msgspec names a dict's values "headers[...]"; anything under the field will do
        assert named == field or named.startswith(f"{field}[") or named.startswith(f"{field}."), (
            f"{route} {path}={value!r}: {problem}"
        )
        await assert_alive(client, server_log)
    assert_nothing_queued(world)


@pytest.mark.parametrize(
    ("route", "body", "field"),
    [
        ("/messages", {**message_request(), "send_at": 5}, "send_at"),
        ("/messages/raw", {**RAW, "send_at": 1_700_000_000}, "send_at"),
        ("/admin/suspend", {"domain": "a.test", "duration": "5"}, "duration"),
    ],
)
async def test_numbers_and_numeric_strings_are_read_leniently(
    api: Api, server_log: pytest.LogCaptureFixture, route: str, body: dict[str, Any], field: str
) -> None:
    """As docs/api.md says: send_at may be Unix seconds, a duration a numeric string."""
    _, client = await api()
    reply = await client.post(route, json=body)
    assert reply.status_code in (200, 202), reply.text
    await assert_alive(client, server_log)


# --------------------------------------------------------------------- unknown fields

UNKNOWN_FIELDS = [
    ("/messages", {**message_request(), "surprise": 1}, None, "surprise"),
    ("/messages", message_request(surprise=1), "message", "surprise"),
    ("/messages", message_request(From="s@sender.test"), "message", "From"),
    ("/messages", message_request(from_="s@sender.test"), "message", "from_"),
    ("/messages", message_request(To=["x@a.test"]), "message", "To"),
    (
        "/messages",
        message_request(attachments=[{"filename": "a", "content": "eA==", "size": 1}]),
        "message.attachments[0]",
        "size",
    ),
    ("/messages/raw", {**RAW, "message": {}}, None, "message"),
    ("/messages/raw", {**RAW, "subject": "x"}, None, "subject"),
    ("/admin/suspend", {"domain": "a.test", "id": "x"}, None, "id"),
    ("/admin/suspend", {"domain": "a.test", "until": 5}, None, "until"),
    ("/admin/bounce", {"domain": "a.test", "duration": 5}, None, "duration"),
    ("/admin/retry", {"domain": "a.test", "all": True}, None, "all"),
]


@pytest.mark.parametrize(
    ("route", "body", "field", "name"),
    UNKNOWN_FIELDS,
    ids=[f"{r}:{f or 'top'}.{n}" for r, _, f, n in UNKNOWN_FIELDS],
)
async def test_unknown_fields_are_422_at_every_level(
    api: Api,
    server_log: pytest.LogCaptureFixture,
    route: str,
    body: dict[str, Any],
    field: str | None,
    name: str,
) -> None:
    world, client = await api()
    reply = await client.post(route, json=body)
    assert_problem(reply, 422, field, mentions=(f"`{name}`",))
    await assert_alive(client, server_log)
    assert_nothing_queued(world)


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/messages", {**message_request(), "surprise": 1}),
        ("/messages", []),
        ("/messages", {"tenant": "acme"}),  # "message" missing
        ("/messages/raw", {"to": ["x@a.test"], "content": "x"}),  # "from" missing
        ("/admin/suspend", {"domain": "a.test", "extra": 1}),
    ],
)
async def test_body_level_errors_do_not_blame_a_field_called_data(
    api: Api, server_log: pytest.LogCaptureFixture, route: str, body: Any
) -> None:
    _, client = await api()
    problem = assert_problem(await client.post(route, json=body), 422)
    assert problem["errors"][0]["field"] != "data", problem
    assert not problem["detail"].startswith("data:"), problem
    await assert_alive(client, server_log)


# --------------------------------------------------------------------- huge bodies


@pytest.mark.parametrize("route", POST_ROUTES)
async def test_body_over_max_body_size_is_413(
    api: Api, server_log: pytest.LogCaptureFixture, route: str
) -> None:
    world, client = await api(api={"max_body_size": 10_000})
    body = httpx.Request("POST", "/", json=set_path(good_body(route), ("pad",), "x" * 20_000))

    async def chunks() -> AsyncIterator[bytes]:
        data = body.read()
        for start in range(0, len(data), 1000):
            yield data[start : start + 1000]

    for content in (body.read(), chunks()):  # with a Content-Length, and chunked
        reply = await client.post(route, content=content, headers=JSON)
        assert_problem(reply, 413, useful=False)
        await assert_alive(client, server_log)
    assert_nothing_queued(world)


async def test_413_says_what_the_limit_is(api: Api, server_log: pytest.LogCaptureFixture) -> None:
    _, client = await api(api={"max_body_size": 10_000})
    reply = await client.post("/messages", json=message_request(text="x" * 20_000))
    assert_problem(reply, 413, mentions=("10000",))
    await assert_alive(client, server_log)


async def test_subject_over_998_characters_is_422(
    api: Api, server_log: pytest.LogCaptureFixture
) -> None:
    world, client = await api()
    reply = await client.post("/messages", json=message_request(subject="s" * 999))
    assert_problem(reply, 422, "message.subject")
    await assert_alive(client, server_log)
    assert_nothing_queued(world)


async def test_rendered_subject_over_998_characters_is_422(
    api: Api, server_log: pytest.LogCaptureFixture
) -> None:
    world, client = await api()
    for request in (
        message_request(subject="{{ 'ab ' * 2000 }}"),
        message_request(subject="{{ s }}", data={"x@a.test": {"s": "ab " * 2000}}),
    ):
        reply = await client.post("/messages", json=request)
        assert_problem(reply, 422, "message.subject")
        await assert_alive(client, server_log)
    assert_nothing_queued(world)


async def test_a_long_subject_and_a_100k_header_value_are_folded(
    api: Api, server_log: pytest.LogCaptureFixture
) -> None:
    world, client = await api()
    subject = "word " * 198 + "word"  # 994 characters
    for index, value in enumerate(("v" * 100_000, "word " * 20_000, "é" * 50_000)):
        recipient = f"long{index}@a.test"
        reply = await client.post(
            "/messages",
            json=message_request(to=[recipient], subject=subject, headers={"X-Long": value}),
        )
        assert reply.status_code == 202, reply.text
        data = await wait_delivered(world, recipient)
        assert_clean_header(data)
        received = parse(data)
        assert received["X-Long"].replace(" ", "") == value.replace(" ", "")
        assert received["Subject"] == subject
        await assert_alive(client, server_log)


async def test_a_2000_character_header_name_is_refused(
    api: Api, server_log: pytest.LogCaptureFixture
) -> None:
    world, client = await api()
    name = "X-" + "n" * 2000
    reply = await client.post("/messages", json=message_request(headers={name: "v"}))
    assert_problem(reply, 422, f"message.headers.{name}")
    await assert_alive(client, server_log)
    assert_nothing_queued(world)


async def test_60000_recipients_is_422_and_queues_nothing(
    api: Api, server_log: pytest.LogCaptureFixture
) -> None:
    world, client = await api()
    recipients = [f"r{i}@a.test" for i in range(60_000)]
    started = time.monotonic()
    reply = await client.post("/messages", json=message_request(to=recipients), timeout=60)
    assert_problem(reply, 422, "message.to", mentions=("50000",))
    assert time.monotonic() - started < 10
    await assert_alive(client, server_log)
    assert_nothing_queued(world)


async def test_recipient_limit_counts_to_cc_and_bcc(
    api: Api, server_log: pytest.LogCaptureFixture
) -> None:
    world, client = await api(api={"max_recipients": 5})
    reply = await client.post(
        "/messages",
        json=message_request(
            to=["a@a.test", "b@a.test"], cc=["c@a.test", "d@a.test"], bcc=["e@a.test", "f@a.test"]
        ),
    )
    assert_problem(reply, 422, "message.to", mentions=("5",))
    too_many_cc = await client.post("/messages", json=message_request(cc=["c@a.test"] * 1001))
    assert_problem(too_many_cc, 422, "message.cc")
    raw = await client.post(
        "/messages/raw", json={**RAW, "to": [f"r{i}@a.test" for i in range(10_001)]}
    )
    assert_problem(raw, 422, "to")
    await assert_alive(client, server_log)
    assert_nothing_queued(world)


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"text": "{{ 'x' * 200000 }}"}, id="template-expansion"),
        pytest.param(
            {
                "attachments": [
                    {"filename": "big.bin", "content": base64.b64encode(b"\0" * 150_000).decode()}
                ]
            },
            id="attachment",
        ),
    ],
)
async def test_a_rendered_message_over_max_message_size_is_refused(
    api: Api, server_log: pytest.LogCaptureFixture, change: dict[str, Any]
) -> None:
    smtp = {"listeners": [{"address": f"127.0.0.1:{free_port()}"}], "max_message_size": 100_000}
    world, client = await api(smtp=smtp)
    reply = await client.post("/messages", json=message_request(**change))
    assert reply.status_code in (413, 422), reply.text
    assert_problem(reply, reply.status_code)
    await assert_alive(client, server_log)
    assert_nothing_queued(world)


# --------------------------------------------------------------------- CR, LF and NUL


def _injections(field: str, bad: str) -> tuple[dict[str, Any], str]:
    """The message change that puts ``bad`` in ``field``, and the field the 422 must name."""
    payload = f"a{bad}Bcc: victim@evil.test"
    return {
        "from": ({"from": f"s@sender.test{bad}Bcc: v@evil.test"}, "message.from"),
        "from-name": ({"from": f"Sen{bad}der <s@sender.test>"}, "message.from"),
        "to": ({"to": [f"x@a.test{bad}Bcc: v@evil.test"]}, "message.to[0]"),
        "to-name": ({"to": [f'"X{bad}Y" <x@a.test>']}, "message.to[0]"),
        "cc": ({"cc": [f"c@a.test{bad}Bcc: v@evil.test"]}, "message.cc[0]"),
        "bcc": ({"bcc": [f"b@a.test{bad}X-Injected: y"]}, "message.bcc[0]"),
        "reply_to": ({"reply_to": f"r@a.test{bad}Bcc: v@evil.test"}, "message.reply_to"),
        "subject": ({"subject": payload}, "message.subject"),
        "subject-by-template": (
            {"subject": "Hi {{ s }}", "data": {"x@a.test": {"s": payload}}},
            "message.subject",
        ),
        "header-name": ({"headers": {f"X-A{bad}Bcc": "v"}}, f"message.headers.X-A{bad}Bcc"),
        "header-value": ({"headers": {"X-Tag": payload}}, "message.headers.X-Tag"),
        "attachment-filename": (
            {"attachments": [{"filename": f"a{bad}b.txt", "content": "eA=="}]},
            "message.attachments[0].filename",
        ),
        "attachment-content-type": (
            {
                "attachments": [
                    {"filename": "a.txt", "content": "eA==", "content_type": f"text/plain{bad}X: y"}
                ]
            },
            "message.attachments[0].content_type",
        ),
    }[field]


HEADER_FIELDS = [
    "from",
    "from-name",
    "to",
    "to-name",
    "cc",
    "bcc",
    "reply_to",
    "subject",
    "subject-by-template",
    "header-name",
    "header-value",
    "attachment-filename",
    "attachment-content-type",
]


@pytest.mark.parametrize("field", HEADER_FIELDS)
async def test_cr_lf_nul_in_a_header_bound_field_is_422(
    api: Api, server_log: pytest.LogCaptureFixture, field: str
) -> None:
    world, client = await api()
    for bad in ("\r", "\n", "\r\n", "\x00", "\r\n "):
        change, named = _injections(field, bad)
        reply = await client.post("/messages", json=message_request(**change))
        problem = assert_problem(reply, 422, named)
        if field == "subject-by-template":
            assert problem["errors"][0]["recipient"] == "x@a.test"
        await assert_alive(client, server_log)
    assert_nothing_queued(world)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**RAW, "from": "b@sender.test\r\nRCPT TO:<v@evil.test>"}, "from"),
        ({**RAW, "to": ["x@a.test\r\nRCPT TO:<v@evil.test>"]}, "to[0]"),
        ({**RAW, "to": ["x@a.test\x00"]}, "to[0]"),
        ({**RAW, "from": "b@sender.test\n"}, "from"),
    ],
)
async def test_cr_lf_nul_in_the_raw_envelope_is_422(
    api: Api, server_log: pytest.LogCaptureFixture, body: dict[str, Any], field: str
) -> None:
    world, client = await api()
    assert_problem(await client.post("/messages/raw", json=body), 422, field)
    await assert_alive(client, server_log)
    assert_nothing_queued(world)


@pytest.mark.parametrize("route", SEND_ROUTES)
@pytest.mark.parametrize("name", ["tenant", "campaign"])
async def test_cr_lf_nul_in_tenant_and_campaign_are_422(
    api: Api, server_log: pytest.LogCaptureFixture, route: str, name: str
) -> None:
    world, client = await api()
    for bad in ("\r\n", "\x00"):
        reply = await client.post(route, json={**good_body(route), name: f"t{bad}X: y"})
        assert_problem(reply, 422, name)
        await assert_alive(client, server_log)
    assert_nothing_queued(world)


# ------------------------------------------------ other line breaks: U+2028, U+0085, VT ...

UNICODE_BREAKS = ("\u2028", "\u2029", "\x85")
ASCII_BREAKS = ("\x0b", "\x0c", "\x1c")  # VT, FF, FS: str.splitlines() breaks lines at them


def _line_break_change(field: str, brk: str, recipient: str) -> tuple[dict[str, Any], str]:
    payload = f"a{brk}X-Injected: yes"
    changes: dict[str, tuple[dict[str, Any], str]] = {
        "subject": ({"subject": payload}, "message.subject"),
        "subject-by-template": (
            {"subject": "{{ s }}", "data": {recipient: {"s": payload}}},
            "message.subject",
        ),
        "from-name": ({"from": f'"{payload}" <s@sender.test>'}, "message.from"),
        "to-name": ({"to": [f'"{payload}" <{recipient}>']}, "message.to[0]"),
        "cc-name": ({"cc": [f'"{payload}" <cc-{recipient}>']}, "message.cc[0]"),
        "reply_to-name": ({"reply_to": f'"{payload}" <r@sender.test>'}, "message.reply_to"),
        "header-value": ({"headers": {"X-Tag": payload}}, "message.headers.X-Tag"),
        "attachment-filename": (
            {"attachments": [{"filename": f"{payload}.txt", "content": "eA=="}]},
            "message.attachments[0].filename",
        ),
    }
    change, field_name = changes[field]
    if field != "to-name":
        change = {"to": [recipient], **change}
    return change, field_name


LINE_BREAK_CASES = [
    pytest.param(
        field,
        breaks,
        id=f"{field}-{kind}",
    )
    for field in (
        "subject",
        "subject-by-template",
        "from-name",
        "to-name",
        "cc-name",
        "reply_to-name",
        "header-value",
        "attachment-filename",
    )
    for kind, breaks in (("unicode", UNICODE_BREAKS), ("ascii", ASCII_BREAKS))
]


@pytest.mark.parametrize(("field", "breaks"), LINE_BREAK_CASES)
async def test_other_line_breaks_never_make_a_header_line(
    api: Api, server_log: pytest.LogCaptureFixture, field: str, breaks: tuple[str, ...]
) -> None:
    """Refused with the field named, or delivered with no new header line and no raw control."""
    world, client = await api()
    for index, brk in enumerate(breaks):
        recipient = f"brk{index}@a.test"
        change, named = _line_break_change(field, brk, recipient)
        reply = await client.post("/messages", json=message_request(**change))
        if reply.status_code == 422:
            assert_problem(reply, 422, named)
        else:
            assert reply.status_code == 202, f"{brk!r}: {reply.status_code} {reply.text[:300]}"
            data = await wait_delivered(world, recipient)
            assert_clean_header(data)
        await assert_alive(client, server_log)


async def test_unicode_line_separators_in_the_subject_are_encoded_at_the_sink(
    api: Api, server_log: pytest.LogCaptureFixture
) -> None:
    """What a subject with U+2028 or U+0085 looks like once delivered, if it is accepted."""
    world, client = await api()
    for index, brk in enumerate(("\u2028", "\x85")):
        recipient = f"sep{index}@a.test"
        subject = f"Hello{brk}Bcc: victim@evil.test"
        reply = await client.post(
            "/messages", json=message_request(to=[recipient], subject=subject)
        )
        if reply.status_code == 422:
            assert_problem(reply, 422, "message.subject")
            continue
        assert reply.status_code == 202, reply.text
        data = await wait_delivered(world, recipient)
        assert_clean_header(data, injected="Bcc")
        assert parse(data)["Subject"] == subject  # RFC 2047: the text survives, on one line
        await assert_alive(client, server_log)


# --------------------------------------------------------------------- custom headers


async def test_reserved_headers_are_refused_in_any_case(
    api: Api, server_log: pytest.LogCaptureFixture
) -> None:
    world, client = await api()
    for name in (
        "from",
        "TO",
        "Cc",
        "BCC",
        "subject",
        "reply-to",
        "DATE",
        "message-id",
        "Mime-Version",
        "content-type",
        "Content-Transfer-Encoding",
        "X-Epoxi-Tenant",
        "x-epoxi-campaign",
    ):
        reply = await client.post("/messages", json=message_request(headers={name: "x"}))
        assert_problem(reply, 422, f"message.headers.{name}")
        await assert_alive(client, server_log)
    for name in ("", " ", "X A", "X:A", "Ä", "X\tA"):
        reply = await client.post("/messages", json=message_request(headers={name: "x"}))
        assert_problem(reply, 422, f"message.headers.{name}")
    assert_nothing_queued(world)


async def test_every_content_header_is_reserved(
    api: Api, server_log: pytest.LogCaptureFixture
) -> None:
    world, client = await api()
    for name in ("Content-Disposition", "Content-ID", "Content-Location", "content-language"):
        reply = await client.post("/messages", json=message_request(headers={name: "x"}))
        assert_problem(reply, 422, f"message.headers.{name}")
        await assert_alive(client, server_log)
    assert_nothing_queued(world)


async def test_multipart_attachment_content_type_is_refused(
    api: Api, server_log: pytest.LogCaptureFixture
) -> None:
    world, client = await api()
    attachment = {"filename": "a.txt", "content": "eA==", "content_type": "multipart/mixed"}
    reply = await client.post("/messages", json=message_request(attachments=[attachment]))
    assert_problem(reply, 422, "message.attachments[0].content_type")
    await assert_alive(client, server_log)
    assert_nothing_queued(world)


# --------------------------------------------------------------------- raw messages


async def test_raw_content_cannot_smuggle_a_second_message(
    api: Api, server_log: pytest.LogCaptureFixture
) -> None:
    world, client = await api()
    smuggled = "MAIL FROM:<evil@evil.test>\r\nRCPT TO:<victim@a.test>\r\nDATA\r\nSubject: 2\r\n"
    for index, end in enumerate(("\r\n.\r\n", "\n.\n", "\r.\r", "\n.\r\n")):
        recipient = f"raw{index}@a.test"
        content = f"Subject: raw\r\n\r\nfirst{end}{smuggled}\r\nx\r\n.\r\nQUIT\r\n"
        reply = await client.post(
            "/messages/raw", json={**RAW, "to": [recipient], "content": content}
        )
        assert reply.status_code == 202, reply.text
        data = await wait_delivered(world, recipient)
        assert b"MAIL FROM:<evil@evil.test>" in data  # delivered as text of the one message
        await assert_alive(client, server_log)
    # Barrier: a later message through the same queue is delivered; a smuggled one would
    # have been spooled (and recorded) with its carrier, before it.
    reply = await client.post("/messages/raw", json={**RAW, "to": ["barrier@a.test"]})
    assert reply.status_code == 202, reply.text
    await wait_delivered(world, "barrier@a.test")
    received = [r for r in world.records if r.type is RecordType.RECEPTION]
    assert sorted(r for rec in received for r in rec.recipients) == sorted(
        [*(f"raw{i}@a.test" for i in range(4)), "barrier@a.test"]
    )
    assert delivered_to(world, "victim@a.test") == []
    everything = [m for sink in world.sinks.values() for m in sink.messages]
    assert len(everything) == 5


async def test_raw_content_cannot_pick_its_tenant_by_header(
    api: Api, server_log: pytest.LogCaptureFixture
) -> None:
    world, client = await api()
    with keys(world) as store:
        _, acme = store.create("acme", {Scope.SEND, Scope.READ}, tenant="acme")
    content = "X-Epoxi-Tenant: other\r\nX-Epoxi-Campaign: c\r\nSubject: raw\r\n\r\nHi.\r\n"
    reply = await client.post("/messages/raw", json={**RAW, "content": content}, headers=auth(acme))
    assert reply.status_code == 202, reply.text
    (queued,) = reply.json()["messages"]
    status = await client.get(f"/messages/{queued['id']}", headers=auth(acme))
    assert status.status_code == 200 and status.json()["tenant"] == "acme"
    await assert_alive(client, server_log)


# --------------------------------------------------------------------- templates

SANDBOX_ESCAPES = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ().__class__.__base__.__subclasses__() }}",
    "{{ self.__init__.__globals__ }}",
    "{{ self._TemplateReference__context }}",
    "{{ lipsum.__globals__ }}",
    "{{ lipsum.__globals__['os'].popen('id').read() }}",
    "{{ cycler.__init__.__globals__.os }}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ config }}",
    "{{ config.items() }}",
    "{{ request }}",
    "{{ request.application.__globals__ }}",
    "{{ ''|attr('__class__') }}",
    "{{ '{0.__class__}'.format('') }}",
    "{{ '%s'.__mod__.__self__.__class__ }}",
    "{{ v.__class__.__mro__ }}",
    "{% for c in [].__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "{% set x = [] %}{{ x.append(1) }}",
    "{% include '/etc/passwd' %}",
    "{% import '/etc/passwd' as p %}",
    "{% from '/etc/passwd' import x %}",
    "{% extends '/etc/passwd' %}",
    "{{ range(10**9)|list }}",
    "{{ range(10**6)|list|length }}",
    "{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}",
    "{{ 1/0 }}",
    "{{",
    "{% for %}",
]


@pytest.mark.parametrize("template", SANDBOX_ESCAPES)
async def test_template_sandbox_escapes_are_422_quickly(
    api: Api, server_log: pytest.LogCaptureFixture, template: str
) -> None:
    world, client = await api()
    for field in ("subject", "text", "html"):
        started = time.monotonic()
        reply = await client.post(
            "/messages",
            json=message_request(**{field: template}, data={"x@a.test": {"v": "x"}}),
            timeout=10,
        )
        assert time.monotonic() - started < 5, f"{field}: {time.monotonic() - started:.1f}s"
        assert_problem(reply, 422, f"message.{field}")
        await assert_alive(client, server_log)
    assert_nothing_queued(world)


def _cap_memory() -> None:  # runs in the child, before exec
    limit = 2 << 30
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


class CappedEpoxi(EpoxiProcess):
    """``epoxi serve`` in a child process that may use at most 2 GiB of address space."""

    preexec = staticmethod(_cap_memory)

    def start(self, config: Path | None = None) -> None:
        super().start(config)
        wait_for_port("127.0.0.1", self.http_port, proc=self.proc)


@pytest.fixture
def capped_epoxi(tmp_path: Path) -> Iterator[CappedEpoxi]:
    process = CappedEpoxi(tmp_path / "capped")
    process.start()
    yield process
    if process.proc is not None:
        process.stop(signal.SIGKILL)


TEMPLATE_BOMBS = [
    pytest.param("text", "{{ range(10**9)|list }}", id="range-1e9-is-capped"),
    pytest.param("text", "{{ lipsum(200, false, 1000, 10000)|length }}", id="lipsum-bounded"),
    pytest.param(
        "text",
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        id="nested-loops-1e10",
    ),
    pytest.param(
        "text",
        "{{ 'x' * 10**9 }}",
        id="string-times-1e9",
    ),
    pytest.param(
        "subject",
        "{{ 'x' * 10**7 }}",
        id="subject-times-1e7",
    ),
]


@pytest.mark.parametrize(("field", "template"), TEMPLATE_BOMBS)
async def test_template_bombs_are_refused_quickly_and_the_server_lives(
    capped_epoxi: CappedEpoxi, field: str, template: str
) -> None:
    base = f"http://127.0.0.1:{capped_epoxi.http_port}"
    async with httpx.AsyncClient(base_url=base) as client:
        started = time.monotonic()
        try:
            reply = await client.post(
                "/messages", json=message_request(**{field: template}), timeout=5
            )
        except httpx.TimeoutException:
            pytest.fail(f"no reply within 5 s: {time.monotonic() - started:.1f}s")
        if reply.status_code == 202:
            pass  # bounded output is allowed: it rendered in time
        else:
            assert reply.status_code in (413, 422), reply.text[:500]
            assert reply.headers["content-type"] == PROBLEM
        try:
            ping = await client.get("/ping", timeout=2)
        except httpx.TimeoutException:
            pytest.fail("the server no longer answers /ping")
        assert ping.status_code == 200
    assert "Traceback" not in capped_epoxi.log()
    assert capped_epoxi.proc is not None and capped_epoxi.proc.poll() is None


# --------------------------------------------------------------------- keys


def keys(world: World) -> KeyStore:
    return KeyStore(store_path(world.app.settings.data_dir))


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


SEND_BODY = message_request()
ROUTES: list[tuple[str, str, Any, Scope, int]] = [
    ("POST", "/messages", SEND_BODY, Scope.SEND, 202),
    ("POST", "/messages/raw", RAW, Scope.SEND, 202),
    ("GET", "/messages/NOSUCHID", None, Scope.READ, 404),
    ("GET", "/metrics", None, Scope.READ, 200),
    ("GET", "/admin/pipelines", None, Scope.ADMIN, 200),
    ("GET", "/admin/pipelines/health", None, Scope.ADMIN, 200),
    ("GET", "/admin/pipelines/nowhere.test", None, Scope.ADMIN, 404),
    ("POST", "/admin/suspend", {"domain": "zz.test"}, Scope.ADMIN, 200),
    ("DELETE", "/admin/suspend?domain=zz.test", None, Scope.ADMIN, 200),
    ("POST", "/admin/bounce", {"domain": "zz.test"}, Scope.ADMIN, 200),
    ("POST", "/admin/retry", {"domain": "zz.test"}, Scope.ADMIN, 200),
    ("GET", "/admin/messages/NOSUCHID", None, Scope.ADMIN, 404),
    ("GET", "/admin/sinks", None, Scope.ADMIN, 200),
    ("GET", "/admin/quarantine", None, Scope.ADMIN, 200),
    ("GET", "/admin/quarantine/1-dsn-NOSUCHID.eml", None, Scope.ADMIN, 404),
    ("DELETE", "/admin/quarantine/1-dsn-NOSUCHID.eml", None, Scope.ADMIN, 404),
]
OPEN_ROUTES = ("/ping", "/health/live", "/health/ready", "/docs/openapi.json")


async def call(
    client: httpx.AsyncClient, method: str, path: str, body: Any, headers: dict[str, str]
) -> httpx.Response:
    if body is None:
        return await client.request(method, path, headers=headers)
    return await client.request(method, path, json=body, headers=headers)


@pytest.mark.parametrize("who", ["none", "garbage", "send", "read", "admin", "revoked", "tenant"])
async def test_every_route_checks_key_and_scope(
    api: Api, server_log: pytest.LogCaptureFixture, who: str
) -> None:
    world, client = await api()
    store = keys(world)
    made = {
        "send": store.create("send", {Scope.SEND})[1],
        "read": store.create("read", {Scope.READ})[1],
        "admin": store.create("admin", {Scope.ADMIN})[1],
        "tenant": store.create("acme", set(Scope), tenant="acme")[1],
        "garbage": "epx_000000000000_" + "A" * 32,
    }
    old, made["revoked"] = store.create("old", set(Scope))
    store.revoke(old.id)
    store.close()
    headers = auth(made[who]) if who in made else {}
    for method, path, body, scope, ok in ROUTES:
        reply = await call(client, method, path, body, headers)
        if who in ("none", "garbage", "revoked"):
            expected = 401
        elif who == "tenant":
            expected = 403 if scope is Scope.ADMIN else ok
        else:
            expected = ok if Scope(who) is scope else 403
        if expected >= 400:
            problem = assert_problem(reply, expected, useful=expected != 404)
            if expected == 401:
                assert reply.headers["www-authenticate"] == "Bearer", problem
        else:
            assert reply.status_code == expected, f"{who} {method} {path}: {reply.text[:300]}"
        await assert_alive(client, server_log)
    for path in OPEN_ROUTES:
        assert (await client.get(path, headers=headers)).status_code == 200, path
    if who not in ("send", "tenant"):
        assert_nothing_queued(world)


MALFORMED_AUTH = [
    "Bearer",
    "Basic abc",
    "Basic " + base64.b64encode(b"admin:admin").decode(),
    "Token epx_abc_def",
    "Bearer " + "x" * 10_000,
    "Bearer epx_",
    "Bearer epx__",
    "Bearer epx_x_y_z",
    "Bearer {valid}garbage",
    "Bearer {valid} extra",
    "Bearer {prefix}",
    "Bearer {upper}",
    "Bearer\t{valid}",
    "{valid}",
    "Bearer ' OR '1'='1",
    "Bearer epx_%_%",
]


@pytest.mark.parametrize("header", MALFORMED_AUTH)
async def test_malformed_authorization_is_401(
    api: Api, server_log: pytest.LogCaptureFixture, header: str
) -> None:
    world, client = await api()
    store = keys(world)
    key, valid = store.create("app", set(Scope))
    store.close()
    value = header.format(valid=valid, prefix=f"epx_{key.id}_", upper=valid.upper())
    for method, path, body, _, _ in ROUTES:
        reply = await call(client, method, path, body, {"Authorization": value})
        assert_problem(reply, 401)
        assert reply.headers["www-authenticate"] == "Bearer"
        await assert_alive(client, server_log)
    assert_nothing_queued(world)


async def raw_request(port: int, head: bytes, body: bytes = b"") -> bytes:
    """One HTTP/1.1 request written by hand (httpx refuses to send some of these headers)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.parametrize(
    "value",
    [b"Bearer ", b"Bearer  ", b"Bearer \xe9\xff", b"\xe9", b"Bearer " + b"y" * 60_000, b""],
    ids=["bearer-space", "bearer-two-spaces", "latin1-token", "latin1-only", "60k-token", "empty"],
)
async def test_hand_written_authorization_headers_are_401(
    api: Api, server_log: pytest.LogCaptureFixture, value: bytes
) -> None:
    world, client = await api()
    with keys(world) as store:
        store.create("app", set(Scope))
    assert world.app.http is not None
    port = world.app.http.addresses[0][1]
    body = httpx.Request("POST", "/", json=message_request()).read()
    head = (
        b"POST /messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: " + value + b"\r\n"
    )
    answer = await raw_request(port, head, body)
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.split()[1] in (b"400", b"401", b"431"), answer[:300]
    if status_line.split()[1] == b"401":
        assert b"content-type: application/problem+json" in rest.lower()
    await assert_alive(client, server_log)
    assert_nothing_queued(world)


async def test_a_tenant_key_stays_in_its_tenant(
    api: Api, server_log: pytest.LogCaptureFixture
) -> None:
    world, client = await api()
    store = keys(world)
    _, acme = store.create("acme", {Scope.SEND, Scope.READ}, tenant="acme")
    _, beta = store.create("beta", {Scope.SEND, Scope.READ}, tenant="beta")
    _, root = store.create("root", {Scope.SEND, Scope.READ})
    _, acme_all = store.create("acme-all", set(Scope), tenant="acme")
    store.close()
    for route in SEND_ROUTES:
        for tenant in ("other", "ACME", "acme ", "acme\x00"):
            reply = await client.post(
                route, json={**good_body(route), "tenant": tenant}, headers=auth(acme)
            )
            if not tenant.isalnum():  # not a valid name at all (a space, a control)
                assert_problem(reply, 422, "tenant")
            else:
                assert_problem(reply, 403, mentions=("acme",))
            await assert_alive(client, server_log)
    assert_nothing_queued(world)
    mine = await client.post("/messages", json={**SEND_BODY, "tenant": "acme"}, headers=auth(acme))
    assert mine.status_code == 202
    others = await client.post(
        "/messages", json={**SEND_BODY, "tenant": "beta"}, headers=auth(root)
    )
    untenanted = await client.post("/messages", json=SEND_BODY, headers=auth(root))
    for reply in (others, untenanted):
        (queued,) = reply.json()["messages"]
        for key in (acme, acme_all):
            seen = await client.get(f"/messages/{queued['id']}", headers=auth(key))
            assert_problem(seen, 404)  # not 403: no hint that the id exists
    (own,) = mine.json()["messages"]
    assert (await client.get(f"/messages/{own['id']}", headers=auth(acme))).status_code == 200
    assert (await client.get(f"/messages/{own['id']}", headers=auth(beta))).status_code == 404
    for method, path, body, _, _ in ROUTES[4:]:  # /admin, even with the admin scope
        reply = await call(client, method, path, body, auth(acme_all))
        assert_problem(reply, 403, mentions=("tenant",))
    await assert_alive(client, server_log)


async def test_an_idempotency_key_never_crosses_tenants(
    api: Api, server_log: pytest.LogCaptureFixture
) -> None:
    world, client = await api()
    store = keys(world)
    _, acme = store.create("acme", {Scope.SEND}, tenant="acme")
    _, beta = store.create("beta", {Scope.SEND}, tenant="beta")
    store.close()
    headers = {"Idempotency-Key": "order-1"}
    first = await client.post("/messages", json=SEND_BODY, headers={**auth(acme), **headers})
    second = await client.post("/messages", json=SEND_BODY, headers={**auth(beta), **headers})
    assert first.status_code == second.status_code == 202
    assert second.json()["idempotency_reused"] is False
    assert second.json()["messages"] != first.json()["messages"]
    await assert_alive(client, server_log)


async def test_an_over_long_idempotency_key_names_the_header(
    api: Api, server_log: pytest.LogCaptureFixture
) -> None:
    world, client = await api()
    reply = await client.post("/messages", json=SEND_BODY, headers={"Idempotency-Key": "k" * 256})
    assert_problem(reply, 422, "Idempotency-Key")
    await assert_alive(client, server_log)
    assert_nothing_queued(world)


def _non_loopback_address() -> str | None:
    """An address of this machine that is not loopback, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET: nothing is sent
            address = str(probe.getsockname()[0])
        except OSError:
            return None
    return None if address.startswith("127.") else address


async def test_revoking_the_last_key_does_not_open_the_api_to_the_network(
    api: Api, server_log: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    address = _non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    with KeyStore(store_path(tmp_path / "data")) as store:  # the world's data dir
        key, secret = store.create("only", set(Scope))
    world, _ = await api(http_listen=[f"{address}:0"])
    assert world.app.http is not None
    port = world.app.http.addresses[0][1]
    async with httpx.AsyncClient(base_url=f"http://{address}:{port}") as remote:
        assert_problem(await remote.post("/messages", json=SEND_BODY), 401)
        assert (await remote.get("/ping")).status_code == 200
        with keys(world) as store:
            store.revoke(key.id)
        for method, path, body, _, _ in ROUTES:
            reply = await call(remote, method, path, body, auth(secret))
            assert reply.status_code in (401, 403), f"{method} {path}: {reply.text[:300]}"
        for path in OPEN_ROUTES:
            assert_problem(await remote.get(path), 403, mentions=("loopback",))
    assert_nothing_queued(world)
    assert "Traceback" not in server_log.text


# --------------------------------------------------------------------- path parameters

ODD_IDS = [
    "A" * 10_000,
    "a%2Fb",
    "%2Fx%2F",
    "..%2F..%2Fetc%2Fpasswd",
    "%2e%2e",
    "%C3%A9%E2%80%A8",
    "%F0%9F%92%A5",
    "%00",
    "%FF%FE",
    "a%0D%0AX-Injected:%20y",
    "%20",
    "'%20OR%20'1'='1",
    "%25",
    "*",
    "a;b",
    "a.test:x@y",
]


@pytest.mark.parametrize("odd", ODD_IDS, ids=[f"{i}-{o[:12]}" for i, o in enumerate(ODD_IDS)])
async def test_odd_path_parameters_are_404(
    api: Api, server_log: pytest.LogCaptureFixture, odd: str
) -> None:
    world, client = await api()
    await client.post("/messages", json=SEND_BODY)  # something exists to be confused with
    await world.wait_records(RecordType.DELIVERY, 1)
    for prefix in ("/messages/", "/admin/messages/", "/admin/pipelines/"):
        reply = await client.get(prefix + odd)
        # "/messages/%2F" is "/messages//": no such route for GET, so 405 is as clear
        assert reply.status_code in (404, 405), f"{prefix}{odd[:40]}: {reply.text[:300]}"
        assert_problem(reply, reply.status_code, useful=False)
        await assert_alive(client, server_log)
