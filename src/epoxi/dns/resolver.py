"""An async DNS resolver with a TTL-honouring cache, built on dnspython's asyncresolver.

Contracts:

* Answers are cached per (name, type) for their TTL (the smallest TTL along a CNAME chain),
  capped at ``max_ttl``. Negative answers (NXDOMAIN and NODATA) are cached too, for the
  SOA minimum of the answer (RFC 2308) or ``negative_ttl`` when the answer carries no SOA.
  The cache holds at most ``max_entries`` entries and evicts the least recently used.
* Failures are typed: NXDOMAIN or an invalid name is :class:`~epoxi.errors.DnsPermanent`;
  SERVFAIL, REFUSED, a timeout, an unreachable server, a broken answer (a CNAME loop
  included) is :class:`~epoxi.errors.DnsTransient`, never cached. A name that exists but has
  no records of the type asked for (NODATA) is an empty list, not an error.
* Identical lookups in flight at the same time share one query; cancelling one caller does
  not cancel the query for the others.
* CNAME chains are followed inside one response, as dnspython does (a recursive resolver
  returns the whole chain).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.rdata
import dns.rdatatype
import dns.resolver
from dns.rdtypes.ANY.MX import MX
from dns.rdtypes.ANY.TXT import TXT
from dns.rdtypes.IN.A import A
from dns.rdtypes.IN.AAAA import AAAA

from epoxi.errors import ConfigError, DnsError, DnsPermanent, DnsTransient

log = logging.getLogger(__name__)

Rdata = dns.rdata.Rdata
_Key = tuple[str, str]  # (lowercase name without trailing dot, upper-case type)

_EDNS_PAYLOAD = 1232  # the DNS flag day 2020 size: no IP fragmentation, fewer TCP retries
_MAX_ATTEMPT = 2.0  # seconds one server gets before the next try (UDP loss, dead server)


@dataclass(frozen=True, slots=True)
class _Entry:
    """One cached answer: records, or the NXDOMAIN message to raise, until ``expires``."""

    expires: float
    records: tuple[Rdata, ...] = ()
    nxdomain: str | None = None
    authenticated: bool = False  # the validating resolver set AD (secure_query only)

    def unpack(self) -> list[Rdata]:
        """The records as a fresh list; raises a fresh DnsPermanent for a cached NXDOMAIN."""
        if self.nxdomain is not None:
            raise DnsPermanent(self.nxdomain)
        return list(self.records)


class Resolver:
    """Cached DNS lookups for delivery.

    ``nameservers`` are (IP address, port) pairs, tried in order; None reads
    /etc/resolv.conf. ``timeout`` is the most one lookup may take, all servers and retries
    included. ``clock`` (monotonic seconds) is there so tests can move time.
    """

    def __init__(
        self,
        nameservers: list[tuple[str, int]] | None = None,
        *,
        timeout: float = 5.0,
        max_entries: int = 50_000,
        max_ttl: float = 3600.0,
        negative_ttl: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._resolver = _make_dnspython_resolver(nameservers, timeout)
        self._secure = _make_dnspython_resolver(nameservers, timeout, secure=True)
        self.timeout = timeout
        self.max_entries = max_entries
        self.max_ttl = max_ttl
        self.negative_ttl = negative_ttl
        self._clock = clock
        self._cache: OrderedDict[_Key, _Entry] = OrderedDict()
        self._inflight: dict[_Key, asyncio.Task[_Entry]] = {}
        self.queries = 0  # lookups sent to the network (coalesced callers count once)
        self.hits = 0  # lookups answered from the cache

    # ------------------------------------------------------------------ lookups

    async def query(self, name: str, rdtype: str) -> list[Rdata]:
        """The records of ``name``/``rdtype`` (dnspython rdata objects); [] for NODATA.

        Raises DnsPermanent (NXDOMAIN, invalid name) or DnsTransient (anything else);
        ValueError for an unknown ``rdtype``.
        """
        key = _key(name, rdtype)
        entry = self._fresh(key)
        if entry is None:
            entry = await self._shared_lookup(key)
        else:
            self.hits += 1
        return entry.unpack()

    async def secure_query(self, name: str, rdtype: str) -> tuple[list[Rdata], bool]:
        """As :meth:`query`, asking with the AD and DO bits (RFC 6840 §5.7); also returns
        whether the resolver authenticated the answer (AD set). Cached apart from ``query``."""
        name, rdtype = _key(name, rdtype)
        key = (name, rdtype + "/AD")
        entry = self._fresh(key)
        if entry is None:
            entry = await self._shared_lookup(key)
        else:
            self.hits += 1
        return entry.unpack(), entry.authenticated

    async def mx(self, domain: str) -> list[tuple[int, str]]:
        """(preference, host) pairs as published, host lowercased without the trailing dot.

        The null MX target (RFC 7505) is returned as ".".
        """
        records = await self.query(domain, "MX")
        return [(r.preference, _host_text(r.exchange)) for r in records if isinstance(r, MX)]

    async def addresses(self, host: str) -> list[str]:
        """IPv4 addresses, then IPv6 ones, of ``host``; an IP literal is returned as it is.

        ``host`` may be "192.0.2.1", "[192.0.2.1]" or "[IPv6:2001:db8::1]". The A and AAAA
        lookups run together; if either finds addresses those are returned. Otherwise a
        transient failure of either wins over NXDOMAIN (retry rather than bounce), and [] means
        the name exists without addresses.
        """
        literal = ip_literal(host)
        if literal is not None:
            return [literal]
        results = await asyncio.gather(
            self.query(host, "A"), self.query(host, "AAAA"), return_exceptions=True
        )
        return _merge_addresses(results)

    async def txt(self, name: str) -> list[str]:
        """Each TXT record of ``name`` as one string (its parts joined, decoded as UTF-8)."""
        records = await self.query(name, "TXT")
        texts = (b"".join(r.strings) for r in records if isinstance(r, TXT))
        return [text.decode("utf-8", "replace") for text in texts]

    # ------------------------------------------------------------------ cache

    def _fresh(self, key: _Key) -> _Entry | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        if entry.expires <= self._clock():
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        return entry

    def _remember(
        self,
        key: _Key,
        ttl: float,
        records: tuple[Rdata, ...] = (),
        nxdomain: str | None = None,
        *,
        authenticated: bool = False,
    ) -> _Entry:
        expires = self._clock() + max(0.0, min(ttl, self.max_ttl))
        stored = _Entry(expires, records, nxdomain, authenticated)
        self._cache[key] = stored
        self._cache.move_to_end(key)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        return stored

    def clear(self) -> None:
        """Forget every cached answer (queries in flight still complete)."""
        self._cache.clear()

    def __len__(self) -> int:
        """The number of cached answers, expired ones not yet evicted included."""
        return len(self._cache)

    # ------------------------------------------------------------------ network

    async def _shared_lookup(self, key: _Key) -> _Entry:
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._lookup(key))
            self._inflight[key] = task
            task.add_done_callback(functools.partial(self._landed, key))
        return await asyncio.shield(task)

    def _landed(self, key: _Key, task: asyncio.Task[_Entry]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved: every caller may have gone away

    async def _lookup(self, key: _Key) -> _Entry:
        name, rdtype = key
        qname = _qname(name)
        secure = rdtype.endswith("/AD")
        rdtype = rdtype.removesuffix("/AD")
        resolver = self._secure if secure else self._resolver
        self.queries += 1
        try:
            answer = await resolver.resolve(qname, rdtype, raise_on_no_answer=False, search=False)
        except dns.resolver.NXDOMAIN as exc:
            message = f"{name}: no such domain (NXDOMAIN)"
            return self._remember(key, self._nxdomain_ttl(exc), nxdomain=message)
        except dns.resolver.YXDOMAIN as exc:
            raise DnsPermanent(f"{name}: name too long after DNAME substitution") from exc
        except dns.exception.Timeout as exc:
            raise DnsTransient(f"{name} {rdtype}: timed out after {self.timeout:g}s") from exc
        except dns.exception.DNSException as exc:
            raise DnsTransient(f"{name} {rdtype}: {exc}") from exc
        authenticated = secure and bool(answer.response.flags & dns.flags.AD)
        return self._remember_answer(key, answer, authenticated)

    def _remember_answer(
        self, key: _Key, answer: dns.resolver.Answer, authenticated: bool = False
    ) -> _Entry:
        chain = answer.chaining_result
        if chain.answer is None:
            ttl = min([self._negative_ttl(answer.response), *(c.ttl for c in chain.cnames)])
            return self._remember(key, ttl, authenticated=authenticated)
        records = tuple(chain.answer)
        return self._remember(key, chain.minimum_ttl, records, authenticated=authenticated)

    def _nxdomain_ttl(self, exc: dns.resolver.NXDOMAIN) -> float:
        responses: dict[dns.name.Name, dns.message.Message] = exc.kwargs.get("responses", {})
        response = next(iter(responses.values()), None)
        return self.negative_ttl if response is None else self._negative_ttl(response)

    def _negative_ttl(self, response: dns.message.Message) -> float:
        """RFC 2308 §5: the smaller of the SOA's TTL and its MINIMUM, else our default."""
        for rrset in response.authority:
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset) > 0:
                return float(min(rrset.ttl, rrset[0].minimum))
        return self.negative_ttl


# ---------------------------------------------------------------------- helpers


def ip_literal(host: str) -> str | None:
    """The address in ``host`` if it is an IP literal ("192.0.2.1", "[192.0.2.1]",
    "[IPv6:2001:db8::1]", "2001:db8::1"), in canonical form; None for a host name."""
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if text[:5].lower() == "ipv6:":
        text = text[5:]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def _make_dnspython_resolver(
    nameservers: list[tuple[str, int]] | None, timeout: float, *, secure: bool = False
) -> dns.asyncresolver.Resolver:
    try:
        resolver = dns.asyncresolver.Resolver(configure=nameservers is None)
    except dns.resolver.NoResolverConfiguration as exc:
        raise ConfigError(f"dns.nameservers: none given and /etc/resolv.conf: {exc}") from exc
    if nameservers is not None:
        resolver.nameservers = [_nameserver(host, port) for host, port in nameservers]
    servers = max(1, min(len(resolver.nameservers), 3))
    resolver.lifetime = timeout
    resolver.timeout = min(_MAX_ATTEMPT, timeout / servers)
    resolver.cache = None  # ours honours TTLs the same way and caches NXDOMAIN per type too
    resolver.use_edns(0, dns.flags.DO if secure else 0, _EDNS_PAYLOAD)
    if secure:
        resolver.flags = dns.flags.RD | dns.flags.AD
    return resolver


def _nameserver(host: str, port: int) -> dns.nameserver.Nameserver:
    if ip_literal(host) is None or not 0 < port < 65536:
        raise ConfigError(f"dns.nameservers: {host}:{port} is not an IP address and port")
    return dns.nameserver.Do53Nameserver(ip_literal(host) or host, port)


def _key(name: str, rdtype: str) -> _Key:
    try:
        dns.rdatatype.from_text(rdtype)
    except dns.rdatatype.UnknownRdatatype:
        raise ValueError(f"unknown DNS record type {rdtype!r}") from None
    return name.lower().rstrip("."), rdtype.upper()


def _qname(name: str) -> dns.name.Name:
    try:
        return dns.name.from_text(name, origin=dns.name.root)
    except dns.exception.DNSException as exc:
        raise DnsPermanent(f"{name!r} is not a valid domain name: {exc}") from exc


def _host_text(name: dns.name.Name) -> str:
    return "." if name == dns.name.root else name.to_text(omit_final_dot=True).lower()


def _merge_addresses(results: Sequence[list[Rdata] | BaseException]) -> list[str]:
    found = [
        r.address
        for result in results
        if isinstance(result, list)
        for r in result
        if isinstance(r, A | AAAA)
    ]
    errors = [r for r in results if isinstance(r, BaseException)]
    unexpected = [e for e in errors if not isinstance(e, DnsError)]
    if unexpected:
        raise unexpected[0]
    if found or not errors:
        return found
    transient = [e for e in errors if isinstance(e, DnsTransient)]
    raise (transient or errors)[0]
