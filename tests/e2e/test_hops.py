"""Egress hops on real peers: Dante's danted as the SOCKS5 proxy (sending from 127.0.0.30; with
RFC 1929 username/password checked against a system account made for the test), and HAProxy
with ``accept-proxy`` and ``usesrc clientip`` reading our PROXY v2 header (sending from the
source's bind, to the destination named in the header). A dead hop makes its source failing at
once, and the pool's other source takes the mail."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from epoxi.delivery.client import SmtpClient, TlsPolicy
from epoxi.delivery.hops import ProxyProtocolHop, Socks5Hop
from epoxi.errors import ConnectionFailed, SourceUnusable
from epoxi.events.records import RecordType
from epoxi.testing.certs import make_test_tls_context
from tests.conftest import eventually, free_port, wait_for_port
from tests.e2e.conftest import Api, World, send
from tests.e2e.test_client import _TlsGreeter
from tests.e2e.test_pools import body, peers

SOCKS_EXTERNAL = "127.0.0.30"  # danted connects onward from here
AUTH_EXTERNAL = "127.0.0.31"  # danted with username/password connects from here
HAPROXY_SOURCE = "127.0.0.40"  # the source address our PROXY header gives HAProxy
BLOCKED = "127.0.0.99"  # danted's rules refuse this destination

DANTED_CONF = """\
logoutput: {log}
internal: 127.0.0.1 port = {port}
external: {external}
external: ::1
clientmethod: none
socksmethod: {method}
{users}
client pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 }}
socks block {{ from: 0.0.0.0/0 to: {blocked}/32 }}
socks pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 log: connect }}
socks pass {{ from: 127.0.0.0/8 to: ::/0 log: connect }}
"""

# accept-proxy: the frontend reads our PROXY v2 header; the backend connects to the header's
# destination (server 0.0.0.0:0, transparent) from its source (usesrc clientip, which needs
# root: HAProxy refuses to drop privileges with it).
HAPROXY_CFG = """\
global
    log stderr format raw local0
defaults
    mode tcp
    log global
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend smtp
    bind 127.0.0.1:{port} accept-proxy
    log-format "hop client=%ci:%cp server=%si:%sp"
    default_backend mx
backend mx
    source 0.0.0.0 usesrc clientip
    server mx 0.0.0.0:0
"""


@dataclass
class Peer:
    """A proxy process started for one test."""

    port: int
    log: Path
    proc: subprocess.Popen[bytes]

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: danted's children too
        self.proc.wait(10)


def program(name: str, package: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin")
    if found is None:
        pytest.fail(f"{name} is missing: ./scripts/bootstrap test installs Debian's {package}")
    return found


@contextlib.contextmanager
def started(args: list[str], port: int, log: Path) -> Iterator[Peer]:
    with log.open("ab") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=out, start_new_session=True)
    peer = Peer(port, log, proc)
    try:
        wait_for_port("127.0.0.1", port, proc=proc)
        yield peer
    finally:
        peer.stop()


@pytest.fixture
def danted(tmp_path: Path) -> Iterator[Peer]:
    """danted without authentication."""
    yield from run_danted(tmp_path, "none", SOCKS_EXTERNAL)


def run_danted(tmp_path: Path, method: str, external: str) -> Iterator[Peer]:
    """Dante's SOCKS5 server on a free loopback port, connecting onward from ``external``; as
    root it drops to nobody for everything but binding and reading passwords."""
    danted = program("danted", "dante-server")
    port, log = free_port(), tmp_path / "danted.log"
    users = "user.privileged: root\nuser.unprivileged: nobody" if os.getuid() == 0 else ""
    config = tmp_path / "danted.conf"
    config.write_text(
        DANTED_CONF.format(
            log=log, port=port, external=external, method=method, users=users, blocked=BLOCKED
        )
    )
    pid = tmp_path / "danted.pid"
    with started([danted, "-f", str(config), "-p", str(pid), "-N", "1"], port, log) as peer:
        yield peer


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[Peer]:
    """HAProxy taking PROXY v2 on a free loopback port, connecting as the header says."""
    haproxy = program("haproxy", "haproxy")
    port = free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(HAPROXY_CFG.format(port=port))
    with started([haproxy, "-db", "-f", str(config)], port, tmp_path / "haproxy.log") as peer:
        yield peer


def sources(**hop: Any) -> list[dict[str, Any]]:
    return [
        {"name": "hop", "ehlo": "hop.sender.test", **hop},
        {"name": "ip11", "bind": "127.0.0.11", "ehlo": "mta11.sender.test"},
    ]


def through(**hop: Any) -> dict[str, Any]:
    """Delivery settings: pool "only" has the hop's source alone, pool "both" the hop's and
    a direct one on 127.0.0.11."""
    pools = [
        {"name": "only", "sources": ["hop"]},
        {"name": "both", "sources": ["hop", "ip11"]},
    ]
    return {"sources": sources(**hop), "pools": pools, "default_pool": "only"}


def sink_tls() -> dict[str, Any]:
    context, _, _ = make_test_tls_context("mx1.a.test")
    return {"tls": context}


async def source_state(api_client: Any, name: str) -> dict[str, Any]:
    pools = (await api_client.get("/admin/pools")).json()["pools"]
    return next(s for p in pools for s in p["sources"] if s["name"] == name)


async def assert_dead_hop_reroutes(world: World, client: Any, error: str) -> None:
    """Mail for pool "both" leaves by ip11; the hop's source is failing, naming its hop."""
    await send(
        world, ["x@a.test"], body=body("both"), count=20
    )  # some hash to the hop (1 - 2**-20)
    await world.wait_records(RecordType.DELIVERY, 20)
    assert peers(world) == {"127.0.0.11": 20}
    moved = [r for r in world.records if r.type is RecordType.REROUTED]
    assert moved and all(r.source == "ip11" for r in moved)
    assert not [r for r in world.records if r.type is RecordType.TRANSIENT_FAILURE]
    hop = await source_state(client, "hop")
    assert hop["state"] == "failing" and error in hop["last_error"], hop


# --------------------------------------------------------------------- SOCKS5: danted


async def test_mail_leaves_through_danted_from_its_external_address_with_starttls(
    api: Api, danted: Peer
) -> None:
    world, client = await api(
        sink_options=sink_tls(), delivery=through(socks5=f"127.0.0.1:{danted.port}")
    )
    await send(world, ["x@a.test", "y@shared.test"], count=3)
    delivered = await world.wait_records(RecordType.DELIVERY, 6)
    assert {(r.pool, r.source) for r in delivered} == {("only", "hop")}
    assert peers(world) == {SOCKS_EXTERNAL: 6}
    received = [m for sink in world.sinks.values() for m in sink.messages]
    assert all(m.tls and m.helo == "hop.sender.test" for m in received)
    hop = await source_state(client, "hop")
    assert (hop["hop"], hop["bind"]) == (f"socks5 127.0.0.1:{danted.port}", None)
    assert hop["state"] == "ok" and hop["connections"] >= 1


async def test_a_dead_socks5_proxy_makes_its_source_failing_and_the_pool_reroutes(
    api: Api,
) -> None:
    dead = free_port()  # nothing listens there
    world, client = await api(delivery=through(socks5=f"127.0.0.1:{dead}"))
    await assert_dead_hop_reroutes(world, client, f"cannot reach socks5 proxy 127.0.0.1:{dead}")


@pytest.mark.both_loops
async def test_implicit_tls_runs_over_the_socks5_hop(danted: Peer) -> None:
    context, _, _ = make_test_tls_context("tls.test", addresses=("127.0.0.2",))
    greeters: list[_Greeter] = []

    def greeter() -> _Greeter:
        greeters.append(_Greeter())
        return greeters[-1]

    server = await asyncio.get_running_loop().create_server(greeter, "127.0.0.2", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    try:
        client = await SmtpClient.connect(
            "127.0.0.2",
            port,
            server_name="tls.test",
            ehlo_name="c.test",
            tls=TlsPolicy("implicit"),
            hop=Socks5Hop(("127.0.0.1", danted.port)),
        )
        assert client.tls_active and client.extensions == {"SIZE": "100"}
        await client.quit()
        await asyncio.wait_for(greeters[0].closed, 10)  # our side is closed too, then
    finally:
        server.close()
        await server.wait_closed()


class _Greeter(_TlsGreeter):
    def __init__(self) -> None:
        self.closed = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set_result(None)


@pytest.mark.both_loops
async def test_an_ipv6_destination_is_connected_through_danted(danted: Peer) -> None:
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET6) as listener:
        listener.bind(("::1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        sock = await Socks5Hop(("127.0.0.1", danted.port)).open("::1", port)
        accepted, peer = await loop.sock_accept(listener)
        accepted.close()
        sock.close()
    assert peer[0] == "::1"  # danted's IPv6 external address


@pytest.mark.both_loops
async def test_danted_refusals_say_whose_fault_they_are(danted: Peer) -> None:
    hop = Socks5Hop(("127.0.0.1", danted.port))
    closed = free_port("127.0.0.2")
    with pytest.raises(ConnectionFailed) as info:
        await hop.open("127.0.0.2", closed)
    assert not isinstance(info.value, SourceUnusable)  # the destination's fault, not ours
    assert str(info.value) == (
        f"socks5 proxy 127.0.0.1:{danted.port} refused CONNECT to 127.0.0.2:{closed}: "
        "connection refused (5)"
    )
    with pytest.raises(SourceUnusable, match=r"connection not allowed by ruleset \(2\)"):
        await hop.open(BLOCKED, 25)


# --------------------------------------------------------------------- SOCKS5: RFC 1929


@dataclass
class Account:
    """A system account for danted's username method (RFC 1929 against /etc/shadow)."""

    username: str
    password: str


@pytest.fixture
def account() -> Iterator[Account]:
    """A system user of its own for this test, removed afterwards (needs root, as CI is)."""
    if os.getuid() != 0:
        pytest.fail("danted checks SOCKS5 passwords against system users: creating one needs root")
    created = Account(f"epoxi-socks-{secrets.token_hex(3)}", "s3cret-pw")
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
         created.username],
        check=True,
    )  # fmt: skip
    try:
        subprocess.run(
            ["chpasswd"], input=f"{created.username}:{created.password}\n", text=True, check=True
        )
        yield created
    finally:
        subprocess.run(["userdel", created.username], check=True)


@pytest.fixture
def danted_password(tmp_path: Path, account: Account) -> Iterator[Peer]:
    """danted taking only username/password."""
    yield from run_danted(tmp_path, "username", AUTH_EXTERNAL)


def logging_in(proxy: Peer, username: str, password: str) -> dict[str, Any]:
    return through(
        socks5=f"127.0.0.1:{proxy.port}", socks5_username=username, socks5_password=password
    )


async def test_username_and_password_reach_the_proxy_and_mail_leaves_through_it(
    api: Api, danted_password: Peer, account: Account
) -> None:
    world, _ = await api(delivery=logging_in(danted_password, account.username, account.password))
    await send(world, ["x@a.test"], count=2)
    await world.wait_records(RecordType.DELIVERY, 2)
    assert peers(world) == {AUTH_EXTERNAL: 2}
    assert f"username%{account.username}@" in danted_password.output()  # danted's log


async def test_a_refused_password_makes_the_source_failing_and_the_pool_reroutes(
    api: Api, danted_password: Peer, account: Account
) -> None:
    world, client = await api(delivery=logging_in(danted_password, account.username, "wrong"))
    await assert_dead_hop_reroutes(world, client, "username/password refused (status 1)")
    hop = await source_state(client, "hop")
    assert "wrong" not in hop["last_error"]


async def test_a_proxy_that_wants_a_password_we_do_not_have_is_unusable(
    danted_password: Peer,
) -> None:
    hop = Socks5Hop(("127.0.0.1", danted_password.port))
    with pytest.raises(SourceUnusable) as info:
        await hop.open("127.0.0.2", 25)
    assert str(info.value) == (
        f"socks5 proxy 127.0.0.1:{danted_password.port}: no acceptable authentication method "
        "(offered no authentication)"
    )


# --------------------------------------------------------------------- PROXY v2: HAProxy


async def test_mail_leaves_through_haproxy_from_the_address_in_our_proxy_header(
    api: Api, haproxy: Peer
) -> None:
    world, client = await api(
        sink_options=sink_tls(),
        delivery=through(bind=HAPROXY_SOURCE, proxy_protocol=f"127.0.0.1:{haproxy.port}"),
    )
    await send(world, ["x@a.test"], count=3)
    await world.wait_records(RecordType.DELIVERY, 3)
    assert peers(world) == {HAPROXY_SOURCE: 3}
    received = [m for sink in world.sinks.values() for m in sink.messages]
    assert all(m.tls and m.helo == "hop.sender.test" for m in received)
    hop = await source_state(client, "hop")
    assert (hop["hop"], hop["bind"]) == (f"proxy_protocol 127.0.0.1:{haproxy.port}", HAPROXY_SOURCE)
    # HAProxy logs each session as it ends: the client address it read from our header, and
    # the server it connected to, the destination in the header (the sink's port).
    sink_port = world.sink_port
    await eventually(lambda: "hop client=" in haproxy.output(), what="HAProxy's log line")
    line = next(x for x in haproxy.output().splitlines() if x.startswith("hop client="))
    assert line.startswith(f"hop client={HAPROXY_SOURCE}:") and line.endswith(
        f"server=127.0.0.2:{sink_port}"
    ), line


async def test_a_dead_haproxy_makes_its_source_failing_and_the_pool_reroutes(api: Api) -> None:
    dead = free_port()
    world, client = await api(
        delivery=through(bind=HAPROXY_SOURCE, proxy_protocol=f"127.0.0.1:{dead}")
    )
    await assert_dead_hop_reroutes(world, client, f"cannot reach haproxy 127.0.0.1:{dead}")


@pytest.mark.both_loops
async def test_the_proxy_header_comes_first_on_the_connection() -> None:
    received: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.set_result(await reader.readexactly(28))
        writer.close()

    server = await asyncio.start_server(read, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        sock = await ProxyProtocolHop(("127.0.0.1", port), HAPROXY_SOURCE).open("127.0.0.2", 25)
        local_port = sock.getsockname()[1]
        sock.close()
        header = await received
    finally:
        server.close()
        await server.wait_closed()
    assert header[:16] == b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c"
    assert header[16:] == socket.inet_aton(HAPROXY_SOURCE) + socket.inet_aton("127.0.0.2") + (
        local_port.to_bytes(2, "big") + (25).to_bytes(2, "big")
    )
