"""The TLS policy of one connection: the destination's, then DANE, MTA-STS and what we
remember of the host.

In order, for a host reached through MX (static routes and the smarthost keep their own
policy; ``disabled`` always wins, it is the operator's word):

1. DANE (``[delivery] dane = true``): validated TLSA records at ``_25._tcp.<mx host>`` make
   TLS required and the certificate must match them (``policy=dane``); no downgrade, a
   mismatch or a failed TLSA lookup defers with 4.7.5.
2. MTA-STS ``enforce``: an MX host outside the policy is refused (4.7.5); others need TLS
   verified for the MX host name (``policy=mta-sts enforce``). ``testing``: the same is tried,
   and when it fails the message goes as opportunistic TLS would, the record saying why
   (``policy=mta-sts testing``).
3. The shaping's mode (``opportunistic``, ``required``, ``required-verified``, ``disabled``).

Opportunistic only: a host (address) whose TLS handshake failed is remembered for
``broken_ttl`` seconds (at most ``max_broken`` hosts) and reached in plain text at once and
on later connections, as KumoMTA's ``OpportunisticInsecure``; the record says so.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from epoxi.delivery.client import TlsPolicy
from epoxi.delivery.dane import usable
from epoxi.delivery.expiring import ExpiringMap
from epoxi.dns.resolver import Resolver, ip_literal
from epoxi.dns.tlsa import lookup_tlsa
from epoxi.errors import DnsError, TlsFailed
from epoxi.smtp.replies import Reply

if TYPE_CHECKING:
    from epoxi.config import DeliverySettings
    from epoxi.delivery.routing import Destination

log = logging.getLogger(__name__)

BROKEN_NOTE = "TLS handshake broken at this host, remembered: plain text"
DANE_PORT = 25  # TLSA at _25._tcp.<mx host>: MX delivery's port, whatever mx_port tests use


class BrokenTls:
    """Hosts whose TLS handshake failed lately: bounded, each forgotten after ``ttl``."""

    def __init__(
        self,
        ttl: float = 3600.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self._hosts: ExpiringMap[str, bool] = ExpiringMap(max_entries, clock)

    def remember(self, address: str) -> None:
        self._hosts.put(address, True, self.ttl)

    def __contains__(self, address: object) -> bool:
        return self._hosts.get(str(address)) is not None

    def __len__(self) -> int:
        return len(self._hosts)


class HostTls:
    """Decides each connection's :class:`TlsPolicy`, and what to do after a TLS failure."""

    def __init__(
        self,
        resolver: Resolver | None = None,
        *,
        dane: bool = False,
        ca_file: str | None = None,
        broken: BrokenTls | None = None,
    ) -> None:
        self._resolver = resolver
        self.dane = dane and resolver is not None
        self.ca_file = ca_file
        self.broken = broken if broken is not None else BrokenTls()
        self._warned_insecure = False

    @classmethod
    def from_settings(cls, resolver: Resolver, delivery: DeliverySettings) -> HostTls:
        ca_file = str(delivery.tls_ca_file) if delivery.tls_ca_file is not None else None
        return cls(resolver, dane=delivery.dane, ca_file=ca_file)

    async def policy(self, destination: Destination, host: str, address: str) -> TlsPolicy:
        """The policy for ``host`` at ``address``; raises TlsFailed (4.7.5) when the
        destination's policy forbids this host (MTA-STS) or its TLSA cannot be looked up."""
        tls = self._base(destination)
        if tls.mode == "disabled" or not destination.via_mx:
            return tls
        sts = destination.mta_sts
        outside = ""
        if sts is not None and not sts.allows(host):
            # Before DANE: an MX host the domain's enforced policy does not list may be a
            # spoofed one, and TLSA in the spoofer's own signed zone proves nothing.
            outside = f"MTA-STS: MX host {host} is not in the policy ({sts.summary})"
            if sts.mode == "enforce":
                raise _refused(outside, f"mta-sts {sts.mode}")
        if self.dane and ip_literal(host) is None:
            dane = await self._dane(tls, host)
            if dane is not None:
                return dane
        if sts is not None:
            mode = f"mta-sts {sts.mode}"
            if outside:
                return _not_enforced(tls, mode, outside)
            return replace(tls, mode="required", verify=True, server_name=None, policy=mode)
        if not tls.strict and address in self.broken:
            return _plain(tls)
        return tls

    async def _dane(self, tls: TlsPolicy, host: str) -> TlsPolicy | None:
        assert self._resolver is not None
        try:
            found = await lookup_tlsa(self._resolver, host, DANE_PORT)
        except DnsError as exc:
            if not await self._signed(host):
                return None  # an unsigned zone cannot have DANE, whatever its TLSA lookups do
            raise _refused(f"DANE: TLSA lookup for {host} failed: {exc}", "dane") from exc
        if found.records and not found.secure:
            self._warn_insecure(host)
        if not found.secure or not found.records:
            return None
        records = tuple(record for record in found.records if usable(record))
        if not records:  # only PKIX usages, say (RFC 7672 §3.1.3): TLS, but nothing to match
            return replace(tls, mode="required", server_name=None, policy="dane (no usable TLSA)")
        return replace(tls, mode="required", server_name=None, policy="dane", tlsa=records)

    async def _signed(self, host: str) -> bool:
        """Whether ``host``'s address records are DNSSEC-validated: only then does a failed
        TLSA lookup mean "defer" rather than "no DANE" (RFC 7672 §2.2)."""
        assert self._resolver is not None
        for rdtype in ("A", "AAAA"):
            try:
                records, secure = await self._resolver.secure_query(host, rdtype)
            except DnsError:
                continue
            if records:
                return secure
        return False

    def _warn_insecure(self, host: str) -> None:
        """Once: TLSA records came without the AD bit, so DANE cannot be applied."""
        if not self._warned_insecure:
            self._warned_insecure = True
            log.warning(
                "DANE: the TLSA records of %s are not validated (no AD bit): they are ignored; "
                "is [dns] nameservers a validating resolver?",
                host,
            )

    def _base(self, destination: Destination) -> TlsPolicy:
        """The destination's own policy (routes, shaping), with the configured CA file."""
        tls = destination.tls
        if tls.ca_file is None and self.ca_file is not None:
            return replace(tls, ca_file=self.ca_file)
        return tls

    def after_failure(
        self, destination: Destination, tls: TlsPolicy, address: str, exc: TlsFailed
    ) -> TlsPolicy | None:
        """The policy to try the same host with after ``exc``, or None to give up on it."""
        if tls.policy == "mta-sts testing" and tls.verify:
            log.warning("MTA-STS testing policy not met at %s: %s", address, exc)
            return _not_enforced(self._base(destination), tls.policy, str(exc))
        if tls.strict:
            return None
        log.info("TLS handshake with %s failed (%s): plain text from now on", address, exc)
        self.broken.remember(address)
        return _plain(tls)


def _not_enforced(base: TlsPolicy, policy: str, why: str) -> TlsPolicy:
    """The destination's own policy (opportunistic, unless its shaping asks for more), the
    record saying what an MTA-STS testing policy would have refused."""
    name = policy if base.name == "opportunistic" else f"{base.name} + {policy}"
    return replace(base, policy=name, note=f"not enforced: {why}")


def _plain(tls: TlsPolicy) -> TlsPolicy:
    return replace(tls, mode="disabled", policy=tls.name, note=BROKEN_NOTE)


def _refused(message: str, policy: str) -> TlsFailed:
    return TlsFailed(message, Reply(421, "4.7.5", message), policy=policy)
