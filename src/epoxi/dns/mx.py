"""MX resolution for delivery (RFC 5321 §5.1, RFC 7505) and site names.

The site of a domain is the sorted set of its MX host names joined by commas: domains whose
mail goes to the same hosts share a site, and so one ready queue and its limits.

Decisions:

* ``MxPlan.hosts`` is ordered by preference, equal preferences by name, so a plan is
  deterministic (logs, tests, caching). RFC 5321 §5.1 requires a sender to spread load over
  equal-preference hosts: the delivery side calls :meth:`MxPlan.attempt_order` for each
  connection, which shuffles within each preference.
* An MX target that is an IP address written as a name ("192.0.2.1") is used as that address,
  with a warning, as Postfix does ("numeric domain name in resource data of MX record").
* A null MX ("." alone, RFC 7505) is permanent. A null MX published beside other MX records
  (which RFC 7505 forbids) is dropped with a warning and the other hosts are used.
* A host listed twice keeps its lowest preference.
* Only the names are resolved here: addresses are looked up at connection time with
  :func:`resolve_host_addresses`, so their TTLs are honoured where they are used.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass

from epoxi.dns.resolver import Resolver, ip_literal
from epoxi.errors import DnsPermanent, NullMx

log = logging.getLogger(__name__)

NULL_MX = "."


@dataclass(frozen=True)
class MxHost:
    """One mail exchanger: a host name (lowercase, no trailing dot) or an IP address."""

    name: str
    preference: int


@dataclass(frozen=True)
class MxPlan:
    """Where mail for ``domain`` goes.

    ``hosts``: most preferred first, equal preferences in name order. ``site``: the sorted
    host names joined by "," (``"[192.0.2.1]"`` for a domain literal). ``implicit``: True
    when the hosts do not come from MX records (no MX, RFC 5321 §5.1: the domain itself is the
    host; or a domain literal).
    """

    domain: str
    hosts: tuple[MxHost, ...]
    site: str
    implicit: bool = False

    def attempt_order(self, rng: random.Random | None = None) -> tuple[MxHost, ...]:
        """The hosts in preference order, shuffled within each preference (RFC 5321 §5.1)."""
        shuffle = (rng or random).shuffle
        ordered: list[MxHost] = []
        for _, same in itertools.groupby(self.hosts, key=lambda h: h.preference):
            group = list(same)
            shuffle(group)
            ordered.extend(group)
        return tuple(ordered)


async def resolve_mx(resolver: Resolver, domain: str) -> MxPlan:
    """The delivery plan for ``domain`` (case and a trailing dot do not matter).

    A domain literal ("[192.0.2.1]", "[IPv6:2001:db8::1]") needs no DNS. Raises DnsPermanent
    for NXDOMAIN, a null MX, no MX and no address, an empty or malformed domain; DnsTransient
    for SERVFAIL, timeouts and unreachable servers.
    """
    domain = domain.strip().lower().rstrip(".")
    if domain.startswith("["):
        return _literal_plan(domain)
    if not domain:
        raise DnsPermanent("empty domain: nowhere to deliver")
    records = await resolver.mx(domain)
    if not records:
        return await _implicit_plan(resolver, domain)
    hosts = _mx_hosts(domain, records)
    return MxPlan(domain, hosts, site_name(h.name for h in hosts))


async def resolve_host_addresses(resolver: Resolver, host: str) -> list[str]:
    """The addresses to connect to for an MX host (IPv4 first); an IP literal as it is.

    Raises DnsPermanent (NXDOMAIN) or DnsTransient; [] when the host has no address records.
    """
    return await resolver.addresses(host)


def site_name(hosts: Iterable[str]) -> str:
    """The site of a set of MX host names: sorted, deduplicated, joined by ","."""
    return ",".join(sorted(set(hosts)))


def _literal_plan(domain: str) -> MxPlan:
    address = ip_literal(domain) if domain.endswith("]") else None
    if address is None:
        raise DnsPermanent(f"{domain} is not a valid address literal")
    return MxPlan(domain, (MxHost(address, 0),), f"[{address}]", implicit=True)


async def _implicit_plan(resolver: Resolver, domain: str) -> MxPlan:
    if not await resolver.addresses(domain):
        raise DnsPermanent(f"{domain} has no MX and no address records")
    return MxPlan(domain, (MxHost(domain, 0),), site_name([domain]), implicit=True)


def _mx_hosts(domain: str, records: list[tuple[int, str]]) -> tuple[MxHost, ...]:
    usable = [(preference, host) for preference, host in records if host != NULL_MX]
    if not usable:
        raise NullMx(f"{domain} does not accept mail (null MX, RFC 7505)")
    if len(usable) < len(records):
        log.warning("%s: null MX published beside other MX records; ignoring it", domain)
    best: dict[str, int] = {}
    for preference, host in usable:
        _warn_if_numeric(domain, host)
        best[host] = min(preference, best.get(host, preference))
    hosts = (MxHost(host, preference) for host, preference in best.items())
    return tuple(sorted(hosts, key=lambda h: (h.preference, h.name)))


def _warn_if_numeric(domain: str, host: str) -> None:
    if ip_literal(host) is not None:
        log.warning("%s: numeric host name in MX record: %s (used as an address)", domain, host)
