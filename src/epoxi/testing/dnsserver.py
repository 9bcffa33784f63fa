"""A small authoritative DNS server for loopback tests, on UDP and TCP.

Records are added in code or read from a master-file-like text::

    zone = Zone()
    zone.add("example.test", "MX", "10 mx1.example.test")
    zone.add("mx1.example.test", "A", "127.0.0.2")
    async with DnsServer(zone) as server:
        resolver = Resolver([server.nameserver])

Answers:

* the records of the exact name and type asked (names in rdata are absolute: a trailing dot
  is optional);
* a CNAME chain inside the zone is followed and the whole chain is answered; a CNAME loop is
  answered as far as it goes without repeating, as an authoritative server does;
* NXDOMAIN for a name with no records (and no records below it); NODATA (NOERROR, empty
  answer) for a name that has other types. Negative answers carry an SOA in the authority
  section whose minimum is ``Zone.negative_ttl`` (RFC 2308);
* ``zone.fail(name, "SERVFAIL" | "REFUSED" | "TIMEOUT")``: that rcode, or no answer at all;
* over UDP, an answer larger than 512 bytes (or the query's EDNS size) is sent empty with TC
  set, so the client asks again over TCP.

The zone may be changed while the server runs; the next query sees the change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections import Counter
from pathlib import Path
from typing import Literal, cast, get_args

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from epoxi.testing._service import Service

log = logging.getLogger(__name__)

Failure = Literal["SERVFAIL", "REFUSED", "TIMEOUT"]
_FAILURES: tuple[str, ...] = get_args(Failure)
_UDP_LIMIT = 512  # RFC 1035 §4.2.1, without EDNS
_BIND_ATTEMPTS = 5  # port 0: the free UDP port may be taken on TCP; try another
_IN = dns.rdataclass.IN


def _name(text: str) -> dns.name.Name:
    return dns.name.from_text(text, origin=dns.name.root)


class Zone:
    """Records held in memory, by name and type, plus names made to misbehave.

    ``default_ttl`` applies to records added without a TTL; ``negative_ttl`` is the SOA
    minimum of negative answers, i.e. how long resolvers may cache them.
    """

    def __init__(self, default_ttl: int = 300, negative_ttl: int = 60) -> None:
        self.default_ttl = default_ttl
        self.negative_ttl = negative_ttl
        self._records: dict[dns.name.Name, dict[dns.rdatatype.RdataType, dns.rrset.RRset]] = {}
        self._failures: dict[dns.name.Name, Failure] = {}

    # ------------------------------------------------------------------ building

    def add(self, name: str, rdtype: str, rdata: str, ttl: int | None = None) -> None:
        """Add one record, e.g. ``add("a.test", "MX", "10 mx.a.test")``.

        A TTL given here becomes the TTL of the whole record set. Raises ValueError for an
        unknown type, rdata that does not parse, or a CNAME beside other data.
        """
        owner = _name(name)
        record = _parse_rdata(rdtype, rdata)
        by_type = self._records.setdefault(owner, {})
        _check_cname_rule(owner, record.rdtype, by_type)
        rrset = by_type.get(record.rdtype)
        if rrset is None:
            rrset = by_type[record.rdtype] = dns.rrset.RRset(owner, _IN, record.rdtype)
            rrset.ttl = self.default_ttl if ttl is None else ttl
        elif ttl is not None:
            rrset.ttl = ttl
        rrset.add(record)

    def remove(self, name: str, rdtype: str | None = None) -> None:
        """Remove the records of ``name`` of one type, or all of them."""
        owner = _name(name)
        if rdtype is None:
            self._records.pop(owner, None)
            return
        by_type = self._records.get(owner, {})
        by_type.pop(dns.rdatatype.from_text(rdtype), None)
        if not by_type:
            self._records.pop(owner, None)

    def fail(self, name: str, failure: Failure) -> None:
        """Make queries for exactly ``name`` fail: SERVFAIL, REFUSED, or TIMEOUT (no answer)."""
        if failure not in _FAILURES:
            raise ValueError(f"unknown failure {failure!r}; expected one of {_FAILURES}")
        self._failures[_name(name)] = failure

    def heal(self, name: str) -> None:
        """Undo :meth:`fail` for ``name``."""
        self._failures.pop(_name(name), None)

    @classmethod
    def from_text(cls, text: str, default_ttl: int = 300) -> Zone:
        """A zone from lines of ``name [ttl] [IN] TYPE rdata``; ``;`` starts a comment.

        Names are absolute whether or not they end with a dot. Raises ValueError naming the
        line that does not parse.
        """
        zone = cls(default_ttl=default_ttl)
        for number, raw in enumerate(text.splitlines(), start=1):
            line = _strip_comment(raw).strip()
            if not line:
                continue
            try:
                zone.add(*_split_record(line))
            except (ValueError, IndexError) as exc:
                raise ValueError(f"line {number}: {raw.strip()!r}: {exc}") from exc
        return zone

    @classmethod
    def from_file(cls, path: str | Path, default_ttl: int = 300) -> Zone:
        """:meth:`from_text` on the contents of ``path``."""
        return cls.from_text(Path(path).read_text(encoding="utf-8"), default_ttl)

    # ------------------------------------------------------------------ answering

    def answer(self, query: dns.message.Message) -> dns.message.Message | None:
        """The response to ``query``, or None to stay silent (a TIMEOUT failure)."""
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if query.opcode() != dns.opcode.QUERY:
            response.set_rcode(dns.rcode.NOTIMP)
            return response
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response
        question = query.question[0]
        failure = self._failures.get(question.name)
        if failure == "TIMEOUT":
            return None
        if failure is not None:
            response.set_rcode(dns.rcode.from_text(failure))
        elif question.rdclass != _IN:
            response.set_rcode(dns.rcode.REFUSED)
        else:
            self._resolve(response, question.name, question.rdtype)
        return response

    def _resolve(
        self, response: dns.message.Message, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType
    ) -> None:
        """Fill the answer for ``qname``/``rdtype``, following CNAMEs until a name repeats."""
        name, seen = qname, set[dns.name.Name]()
        while name not in seen:
            seen.add(name)
            by_type = self._records.get(name)
            if by_type is None:
                self._negative(response, name, nxdomain=not self._has_descendants(name))
                return
            if rdtype in by_type:
                response.answer.append(by_type[rdtype])
                return
            cname = by_type.get(dns.rdatatype.CNAME)
            if cname is None:
                self._negative(response, name, nxdomain=False)
                return
            response.answer.append(cname)
            name = cname[0].target

    def _has_descendants(self, name: dns.name.Name) -> bool:
        """An empty non-terminal (RFC 8020): no records, but names below it exist."""
        return any(owner != name and owner.is_subdomain(name) for owner in self._records)

    def _negative(self, response: dns.message.Message, name: dns.name.Name, nxdomain: bool) -> None:
        if nxdomain:
            response.set_rcode(dns.rcode.NXDOMAIN)
        response.authority.append(self._soa_for(name))

    def _soa_for(self, name: dns.name.Name) -> dns.rrset.RRset:
        """The zone's SOA above ``name``, or one made up at its top-level label."""
        for ancestor in _ancestors(name):
            soa = self._records.get(ancestor, {}).get(dns.rdatatype.SOA)
            if soa is not None:
                return soa
        apex = dns.name.Name(name.labels[-2:]) if len(name.labels) > 1 else dns.name.root
        rdata = f"ns.invalid. hostmaster.invalid. 1 3600 600 86400 {self.negative_ttl}"
        return dns.rrset.from_text(apex, self.negative_ttl, _IN, dns.rdatatype.SOA, rdata)


class DnsServer(Service):
    """Serves ``zone`` on UDP and TCP at ``host``:``port`` (0 picks a free port).

    ``queries`` counts every query received (answered or not); ``questions`` counts them by
    (name, type), e.g. ``server.questions["a.test", "MX"]``.
    """

    def __init__(self, zone: Zone, host: str = "127.0.0.1", port: int = 0) -> None:
        self.zone = zone
        self.host = host
        self._port = port
        self.queries = 0
        self.questions: Counter[tuple[str, str]] = Counter()
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tcp_writers: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        """The port listened on: the real one once started, even when 0 was asked for."""
        return self._port

    @property
    def nameserver(self) -> tuple[str, int]:
        """(host, port), ready for ``Resolver([server.nameserver])``."""
        return self.host, self._port

    async def start(self) -> None:
        """Listen on UDP and TCP, both on the same port.

        If cancelled or failing half-way, it closes whatever it had opened before raising: a
        socket left open would hold the event loop (on uvloop, ``loop.close()`` can hang).
        """
        binding = asyncio.ensure_future(self._bind())
        try:
            await asyncio.shield(binding)
        except BaseException:
            try:
                await asyncio.wait({binding})  # a cancelled start lets the bind finish ...
            finally:
                await self.stop()  # ... and then undoes all of it
            raise

    async def _bind(self) -> None:
        for attempt in range(_BIND_ATTEMPTS):
            udp_port = await self._start_udp()
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, self.host, udp_port)
            except OSError:
                await self.stop()
                if self._port != 0 or attempt == _BIND_ATTEMPTS - 1:
                    raise
                continue
            self._port = udp_port
            log.debug("DNS server on %s:%d (UDP and TCP)", self.host, udp_port)
            return

    async def _start_udp(self) -> int:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _UdpProtocol(self), local_addr=(self.host, self._port)
        )
        self._udp = transport
        return int(transport.get_extra_info("sockname")[1])

    async def stop(self) -> None:
        """Stop listening and close open TCP connections. Safe to call twice."""
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            for writer in list(self._tcp_writers):
                writer.close()
            await self._tcp.wait_closed()
            self._tcp = None

    def respond(self, wire: bytes, max_size: int = 65535) -> bytes | None:
        """The reply to one query in wire format, at most ``max_size`` bytes (or the query's
        EDNS size if larger; otherwise truncated with TC set); None means stay silent."""
        self.queries += 1
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None  # not worth an answer
        self._count(query)
        response = self.zone.answer(query)
        if response is None:
            return None
        limit = max(max_size, query.payload) if query.edns >= 0 else max_size
        try:
            return response.to_wire(max_size=min(limit, 65535))
        except dns.exception.TooBig:
            return _truncated(query)

    def _count(self, query: dns.message.Message) -> None:
        for question in query.question:
            name = question.name.to_text(omit_final_dot=True).lower()
            self.questions[name, dns.rdatatype.to_text(question.rdtype)] += 1

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._tcp_writers.add(writer)
        try:
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                await self._answer_stream(reader, writer)
        finally:
            self._tcp_writers.discard(writer)
            writer.close()

    async def _answer_stream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """RFC 1035 §4.2.2 / RFC 7766: two-byte length prefix, many queries per connection."""
        while True:
            (length,) = struct.unpack("!H", await reader.readexactly(2))
            reply = self.respond(await reader.readexactly(length))
            if reply is not None:
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = self.server.respond(data, max_size=_UDP_LIMIT)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


async def serve_forever(
    zone: Zone, host: str = "127.0.0.1", port: int = 5353, ready: asyncio.Event | None = None
) -> None:
    """Serve ``zone`` until cancelled (for a CLI command and manual tests).

    ``ready``, if given, is set once both UDP and TCP are listening.
    """
    async with DnsServer(zone, host, port) as server:
        log.info("DNS server listening on %s:%d", server.host, server.port)
        if ready is not None:
            ready.set()
        await asyncio.Event().wait()


# ---------------------------------------------------------------------- helpers


def _parse_rdata(rdtype: str, rdata: str) -> dns.rdata.Rdata:
    try:
        kind = dns.rdatatype.from_text(rdtype)
        return dns.rdata.from_text(_IN, kind, rdata, origin=dns.name.root, relativize=False)
    except dns.exception.DNSException as exc:
        raise ValueError(f"bad {rdtype} record {rdata!r}: {exc}") from exc


def _check_cname_rule(
    owner: dns.name.Name,
    rdtype: dns.rdatatype.RdataType,
    by_type: dict[dns.rdatatype.RdataType, dns.rrset.RRset],
) -> None:
    """RFC 1034 §3.6.2: a CNAME cannot share its name with other data."""
    others = set(by_type) - {rdtype}
    if others and dns.rdatatype.CNAME in {rdtype, *others}:
        raise ValueError(f"{owner}: a CNAME cannot share its name with other records")


def _split_record(line: str) -> tuple[str, str, str, int | None]:
    """``name [ttl] [IN] TYPE rdata`` -> (name, type, rdata, ttl); rdata is kept verbatim."""
    name, rest = _first_word(line)
    word, after = _first_word(rest)
    ttl = None
    if word.isdigit():
        ttl, (word, after) = int(word), _first_word(after)
    if word.upper() == "IN":
        word, after = _first_word(after)
    return name, word, after, ttl


def _first_word(text: str) -> tuple[str, str]:
    parts = text.split(None, 1)
    if not parts:
        raise ValueError("expected name [ttl] [IN] TYPE rdata")
    return parts[0], parts[1] if len(parts) > 1 else ""


def _strip_comment(line: str) -> str:
    """The line up to a ``;`` that is not inside double quotes."""
    quoted = False
    for index, char in enumerate(line):
        if char == '"' and (index == 0 or line[index - 1] != "\\"):
            quoted = not quoted
        elif char == ";" and not quoted:
            return line[:index]
    return line


def _ancestors(name: dns.name.Name) -> list[dns.name.Name]:
    """``name`` and every name above it, up to the root."""
    return [dns.name.Name(name.labels[i:]) for i in range(len(name.labels))]


def _truncated(query: dns.message.Message) -> bytes:
    response = dns.message.make_response(query)
    response.flags |= dns.flags.AA | dns.flags.TC
    return response.to_wire()
