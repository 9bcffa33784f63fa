"""A small authoritative DNS server for loopback tests (UDP and TCP).

Records are added in code or read from a master-file-like text::

    zone = Zone()
    zone.add("example.test", "MX", "10 mx1.example.test.")
    zone.add("mx1.example.test", "A", "127.0.0.2")
    async with DnsServer(zone) as server:
        ...  # point Epoxi at 127.0.0.1:server.port

Names with no records get NXDOMAIN; a name with records of other types gets an empty answer;
CNAMEs inside the zone are followed. ``zone.fail(name, "SERVFAIL" | "REFUSED" | "TIMEOUT")``
makes a name misbehave.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

Failure = Literal["SERVFAIL", "REFUSED", "TIMEOUT"]
_MAX_CNAME_HOPS = 8


def _norm(name: str) -> str:
    return name.lower().rstrip(".")


@dataclass
class Zone:
    """Records by name: ``{name: {type: (ttl, [rdata text, ...])}}``."""

    default_ttl: int = 300
    records: dict[str, dict[str, tuple[int, list[str]]]] = field(default_factory=dict)
    failures: dict[str, Failure] = field(default_factory=dict)

    def add(self, name: str, rdtype: str, rdata: str, ttl: int | None = None) -> None:
        by_type = self.records.setdefault(_norm(name), {})
        old_ttl, values = by_type.get(rdtype.upper(), (ttl or self.default_ttl, []))
        by_type[rdtype.upper()] = (ttl if ttl is not None else old_ttl, [*values, rdata])

    def remove(self, name: str, rdtype: str | None = None) -> None:
        if rdtype is None:
            self.records.pop(_norm(name), None)
        else:
            self.records.get(_norm(name), {}).pop(rdtype.upper(), None)

    def fail(self, name: str, failure: Failure) -> None:
        self.failures[_norm(name)] = failure

    @classmethod
    def from_text(cls, text: str) -> Zone:
        """Lines of ``name [ttl] TYPE rdata``; ``;`` starts a comment."""
        zone = cls()
        for raw in text.splitlines():
            line = raw.split(";", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            ttl = int(parts[1]) if parts[1].isdigit() else None
            at = 2 if ttl is not None else 1
            rdtype, rdata = parts[at], " ".join(parts[at + 1 :])
            zone.add(parts[0], rdtype, rdata, ttl)
        return zone

    @classmethod
    def from_file(cls, path: Path) -> Zone:
        return cls.from_text(path.read_text())

    def answer(self, query: dns.message.Message) -> dns.message.Message | None:
        """The response to ``query``, or None to stay silent (a TIMEOUT failure)."""
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        question = query.question[0]
        name = _norm(question.name.to_text())
        failure = self.failures.get(name)
        if failure == "TIMEOUT":
            return None
        if failure is not None:
            response.set_rcode(dns.rcode.from_text(failure))
            return response
        self._resolve(response, name, dns.rdatatype.to_text(question.rdtype))
        return response

    def _resolve(self, response: dns.message.Message, name: str, rdtype: str) -> None:
        for _ in range(_MAX_CNAME_HOPS):
            by_type = self.records.get(name)
            if by_type is None:
                if not response.answer:
                    response.set_rcode(dns.rcode.NXDOMAIN)
                return
            if rdtype in by_type:
                response.answer.append(self._rrset(name, rdtype, *by_type[rdtype]))
                return
            if "CNAME" not in by_type:
                return  # NODATA
            response.answer.append(self._rrset(name, "CNAME", *by_type["CNAME"]))
            name = _norm(by_type["CNAME"][1][0])
        response.set_rcode(dns.rcode.SERVFAIL)  # a CNAME loop

    @staticmethod
    def _rrset(name: str, rdtype: str, ttl: int, values: list[str]) -> dns.rrset.RRset:
        return dns.rrset.from_text_list(name + ".", ttl, dns.rdataclass.IN, rdtype, values)


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = self.server.respond(data, max_size=512)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


class DnsServer:
    """Serves ``zone`` on UDP and TCP at ``host``:``port`` (0 picks a free port)."""

    def __init__(self, zone: Zone, host: str = "127.0.0.1", port: int = 0) -> None:
        self.zone = zone
        self.host = host
        self._port = port
        self.queries = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None

    @property
    def port(self) -> int:
        return self._port

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _UdpProtocol(self), local_addr=(self.host, self._port)
        )
        self._udp = transport
        self._port = int(transport.get_extra_info("sockname")[1])
        self._tcp = await asyncio.start_server(self._serve_tcp, self.host, self._port)

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()

    async def __aenter__(self) -> DnsServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def respond(self, wire: bytes, max_size: int = 65535) -> bytes | None:
        """Answer one query in wire format; None means no answer."""
        self.queries += 1
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        response = self.zone.answer(query)
        if response is None:
            return None
        limit = max(max_size, query.payload if query.edns >= 0 else 0)
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            response.answer.clear()
            response.flags |= dns.flags.TC
            return response.to_wire()

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                reply = self.respond(await reader.readexactly(length))
                if reply is None:
                    continue
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        writer.close()


async def serve_forever(zone: Zone, host: str = "127.0.0.1", port: int = 5353) -> None:
    """Run a DNS server until cancelled (for `epoxi dns-server` and manual tests)."""
    async with DnsServer(zone, host, port):
        await asyncio.Event().wait()
