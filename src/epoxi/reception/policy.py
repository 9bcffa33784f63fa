"""Who may send what: relay rules, connection limits and the AUTH failure throttle.

All of it is plain in-memory state, cheap enough to consult for every command.
"""

from __future__ import annotations

import ipaddress
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from epoxi.smtp import replies
from epoxi.smtp.parser import Mailbox, normalize_domain
from epoxi.smtp.replies import Reply

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(cidrs: Iterable[str]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


@dataclass(frozen=True)
class RelayPolicy:
    """Mail to a local domain is accepted from anyone; mail elsewhere needs trust or AUTH."""

    local_domains: frozenset[str]
    trusted_networks: tuple[IPNetwork, ...]
    require_auth: bool = False  # a submission listener: relaying always needs AUTH
    local_addresses: frozenset[str] = frozenset()  # FBL mailboxes, taken like a local domain's

    @classmethod
    def build(
        cls,
        local_domains: Iterable[str],
        trusted: Iterable[str],
        require_auth: bool = False,
        local_addresses: Iterable[str] = (),
    ) -> RelayPolicy:
        domains = frozenset(normalize_domain(d) for d in local_domains)
        addresses = frozenset(a.lower() for a in local_addresses)
        return cls(domains, parse_networks(trusted), require_auth, addresses)

    def is_trusted(self, peer_ip: str) -> bool:
        try:
            address = ipaddress.ip_address(peer_ip.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.trusted_networks)

    def is_local(self, mailbox: Mailbox) -> bool:
        if not mailbox.domain:  # the special <postmaster> recipient
            return True
        if normalize_domain(mailbox.domain) in self.local_domains:
            return True
        return bool(self.local_addresses) and str(mailbox).lower() in self.local_addresses

    def check_recipient(
        self, mailbox: Mailbox, *, trusted: bool, authenticated: bool
    ) -> Reply | None:
        """None when the recipient is acceptable, else the rejection."""
        if self.is_local(mailbox) and _has_no_relay_syntax(mailbox):
            return None
        if authenticated or (trusted and not self.require_auth):
            return None
        return replies.RELAY_DENIED


def _has_no_relay_syntax(mailbox: Mailbox) -> bool:
    """False for local parts some systems route onward: ``a%b@local``, ``b!a@local``, ``"a@b"``."""
    return not any(ch in mailbox.local for ch in "%!@")


class ConnectionTracker:
    """Counts open connections overall and per client IP."""

    def __init__(self, max_total: int, max_per_ip: int) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.total = 0
        self._per_ip: dict[str, int] = {}

    def admit(self, ip: str) -> Reply | None:
        """Count a new connection, or return the 421 that refuses it (then nothing is counted)."""
        if self.total >= self.max_total:
            return replies.TOO_MANY_CONNECTIONS
        count = self._per_ip.get(ip, 0)
        if count >= self.max_per_ip:
            return replies.TOO_MANY_FROM_IP
        self._per_ip[ip] = count + 1
        self.total += 1
        return None

    def release(self, ip: str) -> None:
        count = self._per_ip.get(ip, 0) - 1
        if count <= 0:
            self._per_ip.pop(ip, None)
        else:
            self._per_ip[ip] = count
        self.total -= 1


class AuthThrottle:
    """Sliding-window count of AUTH failures per key (a client IP or a user name)."""

    def __init__(
        self, max_failures: int, window: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_failures = max_failures
        self.window = window
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}

    def is_blocked(self, key: str) -> bool:
        failures = self._failures.get(key)
        if not failures:
            return False
        self._expire(key, failures)
        return len(failures) >= self.max_failures

    def record_failure(self, key: str) -> None:
        failures = self._failures.setdefault(key, deque())
        failures.append(self._clock())
        self._expire(key, failures)

    def _expire(self, key: str, failures: deque[float]) -> None:
        horizon = self._clock() - self.window
        while failures and failures[0] < horizon:
            failures.popleft()
        if not failures:
            del self._failures[key]
