"""MX resolution for delivery (RFC 5321 §5.1, RFC 7505) and site names.

The site of a domain is the sorted set of its MX host names: domains whose mail goes to the
same hosts share a site, and so one ready queue and its limits.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from epoxi.dns.resolver import Resolver
from epoxi.errors import DnsPermanent


@dataclass(frozen=True)
class MxHost:
    name: str
    preference: int


@dataclass(frozen=True)
class MxPlan:
    """Hosts to try for ``domain``, most preferred first (equal preferences in name order)."""

    domain: str
    hosts: tuple[MxHost, ...]
    site: str
    implicit: bool = False  # no MX: the domain's own address records are used


async def resolve_mx(resolver: Resolver, domain: str) -> MxPlan:
    """The delivery plan for ``domain``; raises DnsPermanent or DnsTransient."""
    domain = domain.lower().rstrip(".")
    literal = _address_literal(domain)
    if literal is not None:
        return MxPlan(domain, (MxHost(literal, 0),), f"[{literal}]", implicit=True)
    records = await resolver.mx(domain)
    if not records:
        return await _implicit_mx(resolver, domain)
    if any(host in ("", ".") for _, host in records):
        if len(records) == 1:
            raise DnsPermanent(f"{domain} does not accept mail (null MX, RFC 7505)")
        records = [(p, h) for p, h in records if h not in ("", ".")]
    hosts = tuple(MxHost(h, p) for p, h in sorted(records))
    return MxPlan(domain, hosts, site_name(h.name for h in hosts))


async def _implicit_mx(resolver: Resolver, domain: str) -> MxPlan:
    if not await resolver.addresses(domain):
        raise DnsPermanent(f"{domain} has no MX and no address records")
    return MxPlan(domain, (MxHost(domain, 0),), domain, implicit=True)


def site_name(hosts: Iterable[str]) -> str:
    return ",".join(sorted(set(hosts)))


def _address_literal(domain: str) -> str | None:
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    inner = inner[5:] if inner.lower().startswith("ipv6:") else inner
    try:
        return str(ipaddress.ip_address(inner))
    except ValueError:
        raise DnsPermanent(f"{domain} is not a valid address literal") from None
