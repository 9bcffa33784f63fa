"""An async DNS resolver with a TTL-honouring cache, built on dnspython's asyncresolver.

Answers (and NXDOMAIN) are cached for their TTL, capped at ``max_ttl``; identical lookups
in flight at the same time share one query. Failures are typed: NXDOMAIN is
:class:`~epoxi.errors.DnsPermanent`; SERVFAIL, timeouts and unreachable servers are
:class:`~epoxi.errors.DnsTransient`; a name with no records of the type is an empty list.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from epoxi.errors import DnsError, DnsPermanent, DnsTransient

_Entry = tuple[float, list[Any] | DnsError]


class Resolver:
    """Cached lookups. ``nameservers`` as (host, port) pairs; None reads /etc/resolv.conf."""

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
        self._resolver = dns.asyncresolver.Resolver(configure=nameservers is None)
        if nameservers is not None:
            self._resolver.nameservers = [
                dns.nameserver.Do53Nameserver(host, port) for host, port in nameservers
            ]
        self._resolver.timeout = timeout
        self._resolver.lifetime = timeout
        self._resolver.cache = None  # ours below honours TTLs and caches NXDOMAIN too
        self.max_entries = max_entries
        self.max_ttl = max_ttl
        self.negative_ttl = negative_ttl
        self._clock = clock
        self._cache: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._inflight: dict[tuple[str, str], asyncio.Future[list[Any]]] = {}
        self.queries = 0  # queries sent (not answered from the cache)

    async def query(self, name: str, rdtype: str) -> list[Any]:
        """The rdata of ``name``/``rdtype`` (dnspython objects); [] when there are none."""
        key = (name.lower().rstrip("."), rdtype)
        cached = self._cached(key)
        if cached is not None:
            if isinstance(cached, DnsError):
                raise cached
            return cached
        inflight = self._inflight.get(key)
        if inflight is not None:
            return await asyncio.shield(inflight)
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            result = await self._lookup(*key)
        except DnsError as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters get it through shield
            raise
        else:
            future.set_result(result)
            return result
        finally:
            del self._inflight[key]

    def _cached(self, key: tuple[str, str]) -> list[Any] | DnsError | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        return entry[1]

    def _store(self, key: tuple[str, str], ttl: float, value: list[Any] | DnsError) -> None:
        self._cache[key] = (self._clock() + min(ttl, self.max_ttl), value)
        self._cache.move_to_end(key)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)

    async def _lookup(self, name: str, rdtype: str) -> list[Any]:
        self.queries += 1
        key = (name, rdtype)
        try:
            answer = await self._resolver.resolve(
                name, rdtype, raise_on_no_answer=False, search=False
            )
        except dns.resolver.NXDOMAIN as exc:
            error = DnsPermanent(f"{name}: no such domain (NXDOMAIN)")
            self._store(key, self.negative_ttl, error)
            raise error from exc
        except dns.resolver.YXDOMAIN as exc:
            raise DnsPermanent(f"{name}: name too long after CNAME expansion") from exc
        except (dns.resolver.NoNameservers, dns.exception.Timeout) as exc:
            raise DnsTransient(f"{name} {rdtype}: {_describe(exc)}") from exc
        except dns.exception.DNSException as exc:
            raise DnsTransient(f"{name} {rdtype}: {exc}") from exc
        rrset = answer.rrset
        if rrset is None:
            self._store(key, self.negative_ttl, [])
            return []
        records = list(rrset)
        self._store(key, float(rrset.ttl), records)
        return records

    async def mx(self, domain: str) -> list[tuple[int, str]]:
        """(preference, host) pairs as published; host "" is the null MX target."""
        records = await self.query(domain, "MX")
        return [(r.preference, r.exchange.to_text(omit_final_dot=True).lower()) for r in records]

    async def addresses(self, host: str) -> list[str]:
        """IPv4 then IPv6 addresses of ``host``; an IP literal is returned as it is."""
        literal = host.strip("[]")
        try:
            return [str(ipaddress.ip_address(literal.removeprefix("IPv6:")))]
        except ValueError:
            pass
        results: tuple[list[Any] | BaseException, ...] = await asyncio.gather(
            self.query(host, "A"), self.query(host, "AAAA"), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if len(errors) == len(results):
            raise errors[0]
        return [r.address for result in results if isinstance(result, list) for r in result]

    async def txt(self, name: str) -> list[str]:
        records = await self.query(name, "TXT")
        return [b"".join(r.strings).decode("utf-8", "replace") for r in records]


def _describe(exc: Exception) -> str:
    if isinstance(exc, dns.exception.Timeout):
        return "timed out"
    return "server failure (SERVFAIL or no server answered)"
