"""Where mail for a domain goes: the smarthost, a static route, or the domain's MX hosts.

The answer is a :class:`Destination`, whose ``site`` names the ready queue: domains whose
MX hosts are the same set share one site, and so one ready queue and its limits.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from dataclasses import dataclass

from epoxi.config import RouteSettings, Settings, parse_hostport
from epoxi.delivery.client import ClientAuth, TlsPolicy
from epoxi.delivery.mtasts import MtaSts, StsPolicy
from epoxi.dns.mx import resolve_mx
from epoxi.dns.resolver import Resolver

_ROUTE_CACHE_SECONDS = 60.0  # MX answers are cached by the resolver too; this skips the await


@dataclass(frozen=True)
class Destination:
    """The hosts to try, in order, and how to talk to them."""

    site: str
    hosts: tuple[tuple[str, int], ...]  # (host name or IP, port), most preferred first
    tls: TlsPolicy
    auth: ClientAuth | None = None
    via_mx: bool = False  # hosts came from DNS: failures fall back to the next host
    dsn: bool = True  # DSNs for failures on this destination
    preferences: tuple[int, ...] = ()  # MX preference of each host; empty: keep the order
    mta_sts: StsPolicy | None = None  # the domain's MTA-STS policy (enforce or testing)

    def attempt_order(self, rng: random.Random | None = None) -> list[tuple[str, int]]:
        """Hosts in preference order, shuffled among equal preferences (RFC 5321 §5.1)."""
        if not self.preferences:
            return list(self.hosts)
        order: list[tuple[str, int]] = []
        pairs = zip(self.preferences, self.hosts, strict=True)
        for _, group in itertools.groupby(pairs, key=lambda pair: pair[0]):
            hosts = [host for _, host in group]
            (rng or random).shuffle(hosts)
            order += hosts
        return order


class Router:
    """Routes domains; static answers are immediate, MX answers are cached briefly."""

    def __init__(self, settings: Settings, resolver: Resolver) -> None:
        self.settings = settings
        self.resolver = resolver
        self.mta_sts = _mta_sts(settings, resolver)
        self._set_routes(settings)
        self._cache: dict[str, tuple[float, Destination]] = {}

    def _set_routes(self, settings: Settings) -> None:
        """Each route's destination is made once: ``static`` runs for every due job."""
        routes = self._static_routes(settings)
        self._static = [(route, _route_destination(route)) for route in routes]
        wildcard = [destination for route, destination in self._static if "*" in route.domains]
        self._wildcard = wildcard[0] if wildcard else None

    @staticmethod
    def _static_routes(settings: Settings) -> list[RouteSettings]:
        routes = list(settings.delivery.routes)
        if settings.relay is not None:
            relay = settings.relay
            routes.insert(
                0,
                RouteSettings(
                    domains=("*",),
                    hosts=(f"{relay.host}:{relay.port}",),
                    username=relay.username,
                    password=relay.password,
                    tls=relay.tls,
                ),
            )
        return routes

    def reload(self, settings: Settings) -> None:
        """New static routes and smarthost; MX answers are looked up again."""
        self.settings = settings
        if (self.mta_sts is None) != (not settings.delivery.mta_sts):
            self.mta_sts = _mta_sts(settings, self.resolver)
        self._set_routes(settings)
        self._cache.clear()

    def static(self, domain: str) -> Destination | None:
        """The destination from a static route (or the smarthost), or None for MX routing."""
        for route, destination in self._static:
            if domain in route.domains:
                return destination
        return self._wildcard

    def cached(self, domain: str) -> Destination | None:
        """A destination known without waiting: static, or MX looked up recently."""
        static = self.static(domain)
        if static is not None:
            return static
        entry = self._cache.get(domain)
        if entry is not None and entry[0] > time.monotonic():
            return entry[1]
        return None

    async def route(self, domain: str) -> Destination:
        """Route ``domain``; raises DnsPermanent (bounce) or DnsTransient (retry later)."""
        known = self.cached(domain)
        if known is not None:
            return known
        if self.mta_sts is not None:
            plan, sts = await asyncio.gather(
                resolve_mx(self.resolver, domain), self.mta_sts.policy(domain)
            )
        else:
            plan, sts = await resolve_mx(self.resolver, domain), None
        port = self.settings.delivery.mx_port
        destination = Destination(
            site=plan.site,
            hosts=tuple((h.name, port) for h in plan.hosts),
            preferences=tuple(h.preference for h in plan.hosts),
            tls=TlsPolicy(),  # the shaping policy decides (delivery.dispatcher.with_tls)
            via_mx=True,
            mta_sts=sts,
        )
        self._cache[domain] = (time.monotonic() + _ROUTE_CACHE_SECONDS, destination)
        return destination


def _mta_sts(settings: Settings, resolver: Resolver) -> MtaSts | None:
    delivery = settings.delivery
    if not delivery.mta_sts:
        return None
    ca_file = str(delivery.tls_ca_file) if delivery.tls_ca_file is not None else None
    return MtaSts(resolver, ca_file=ca_file, port=delivery.mta_sts_port)


def _route_destination(route: RouteSettings) -> Destination:
    hosts = tuple(parse_hostport(h) for h in route.hosts)
    auth = ClientAuth(route.username, route.password or "") if route.username else None
    return Destination(
        site="route:" + ",".join(f"{h}:{p}" for h, p in hosts),
        hosts=hosts,
        tls=TlsPolicy(mode=route.tls, verify=route.tls_verify),
        auth=auth,
        dsn=route.dsn,
    )
