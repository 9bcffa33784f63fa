"""MTA-STS (RFC 8461): a domain's published demand for verified TLS to its MX hosts.

A domain that publishes ``_mta-sts.<domain> TXT "v=STSv1; id=..."`` serves its policy at
``https://mta-sts.<domain>/.well-known/mta-sts.txt``::

    version: STSv1
    mode: enforce
    mx: mail.example.com
    mx: *.example.net
    max_age: 86400

:class:`MtaSts` finds the policy of a domain when the router routes it (once per domain per
route cache period, never per message): the TXT record is looked up through Epoxi's resolver
(which caches it by TTL); the policy is fetched with httpx (TLS verified against the system
store plus ``[delivery] tls_ca_file``, 10 s timeout, no redirects, at most 64 KiB) only when
the TXT ``id`` differs from the cached policy's or that one has outlived its ``max_age``.
The cache is in memory, per worker: a restart fetches again. When the TXT record or the fetch
fails, a cached policy that has not expired still applies (RFC 8461 §5.1); without one, the
domain has no policy. The policy host's address comes from Epoxi's resolver too (so the
configured nameservers answer, as for MX), and the TLS name checked is ``mta-sts.<domain>``.

What a policy means for delivery (``epoxi.delivery.hosttls``): ``enforce``: only MX hosts
matching an ``mx`` pattern are used, over TLS verified for the MX host name, else the
message is deferred with 4.7.5; ``testing``: delivered as opportunistic TLS would, the record
says what enforce would have refused; ``none``: nothing.

Parsing is pure (:func:`parse_txt`, :func:`parse_policy`), apart from the I/O below it.
"""

from __future__ import annotations

import functools
import logging
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, cast

import httpx

from epoxi.delivery.dane import name_matches
from epoxi.delivery.expiring import ExpiringMap
from epoxi.dns.resolver import Resolver
from epoxi.errors import DnsError, MtaStsError
from epoxi.smtp.parser import normalize_domain

log = logging.getLogger(__name__)

StsMode = Literal["enforce", "testing", "none"]
MAX_POLICY_SIZE = 64 * 1024  # RFC 8461 §3.3: senders may limit the body; 64 KiB is ample
MAX_AGE_LIMIT = 31_557_600  # RFC 8461 §3.2: one year
FETCH_TIMEOUT = 10.0
_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")


@dataclass(frozen=True, slots=True)
class StsPolicy:
    """A domain's MTA-STS policy, as published under ``id``."""

    id: str
    mode: StsMode
    mx: tuple[str, ...]
    max_age: int

    def allows(self, host: str) -> bool:
        """Whether MX host ``host`` matches one of the policy's ``mx`` patterns."""
        wanted = host.lower().rstrip(".")
        return any(name_matches(pattern, wanted) for pattern in self.mx)

    @property
    def summary(self) -> str:
        """What queues and logs show: ``enforce mx=mail.example.com,*.example.net``."""
        return f"{self.mode} mx={','.join(self.mx)}"


def parse_txt(texts: list[str]) -> str | None:
    """The policy ``id`` of the ``_mta-sts`` TXT records, or None when there is no valid one.

    Records not starting with ``v=STSv1`` are ignored; more than one STSv1 record, or one
    without a valid ``id``, means no policy (RFC 8461 §3.1).
    """
    found = [text for text in texts if re.match(r"v=STSv1\s*(;|$)", text)]
    if len(found) != 1:
        return None
    fields = dict(_txt_field(part) for part in found[0].split(";") if part.strip())
    sts_id = fields.get("id", "")
    return sts_id if _ID.match(sts_id) else None


def _txt_field(part: str) -> tuple[str, str]:
    key, _, value = part.strip().partition("=")
    return key.strip(), value.strip()


def parse_policy(text: str, sts_id: str) -> StsPolicy:
    """The policy in ``text`` (the body of mta-sts.txt); raises MtaStsError if not valid.

    Lines are ``key: value`` ending in LF or CRLF; unknown keys are ignored (RFC 8461 §3.2).
    ``version: STSv1``, ``mode`` and ``max_age`` are required, and an ``mx`` pattern unless
    the mode is ``none``.
    """
    fields: dict[str, str] = {}
    mx: list[str] = []
    for line in text.splitlines():
        key, colon, value = line.partition(":")
        if not colon:
            continue
        key, value = key.strip().lower(), value.strip()
        if key == "mx":
            mx.append(_mx_pattern(value))
        else:
            fields.setdefault(key, value)
    return _policy(fields, tuple(mx), sts_id)


def _policy(fields: dict[str, str], mx: tuple[str, ...], sts_id: str) -> StsPolicy:
    if fields.get("version") != "STSv1":
        raise MtaStsError(f"policy version is {fields.get('version')!r}, not 'STSv1'")
    mode = fields.get("mode", "")
    if mode not in ("enforce", "testing", "none"):
        raise MtaStsError(f"policy mode {mode!r} is not enforce, testing or none")
    max_age = fields.get("max_age", "")
    if not max_age.isdigit() or len(max_age) > 10:
        raise MtaStsError(f"policy max_age {max_age!r} is not a number of seconds")
    if not mx and mode != "none":
        raise MtaStsError(f"a policy in {mode} mode needs an mx pattern")
    return StsPolicy(sts_id, cast(StsMode, mode), mx, min(int(max_age), MAX_AGE_LIMIT))


def _mx_pattern(value: str) -> str:
    pattern = value.lower().rstrip(".")
    body = pattern.removeprefix("*.")
    if not body or "*" in body or " " in body:
        raise MtaStsError(f"mx pattern {value!r} is not a host name or *.domain")
    return pattern


class MtaSts:
    """Policies of recipient domains: looked up, fetched and cached (see the module text).

    ``port`` is the HTTPS port of policy hosts: 443 in the world, another in tests
    (``[delivery] mta_sts_port``). ``max_entries`` bounds the cache (least recently used
    policies go first).
    """

    def __init__(
        self,
        resolver: Resolver,
        *,
        ca_file: str | None = None,
        port: int = 443,
        timeout: float = FETCH_TIMEOUT,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._resolver = resolver
        self._ca_file = ca_file
        self._port = port
        self._timeout = timeout
        self._cache: ExpiringMap[str, StsPolicy] = ExpiringMap(max_entries, clock)
        self.fetches = 0

    async def policy(self, domain: str) -> StsPolicy | None:
        """The policy that applies to mail for ``domain`` now, or None (none, or ``none``)."""
        domain = normalize_domain(domain)  # an IDN's policy lives under its A-label
        cached = self._cache.get(domain)
        sts_id = await self._txt_id(domain)
        if sts_id is None or (cached is not None and cached.id == sts_id):
            return _effective(cached)
        try:
            policy = parse_policy(await self._fetch(domain), sts_id)
        except Exception as exc:  # any failure is "no new policy": never a routing failure
            log.warning("MTA-STS policy of %s (id %s) not usable: %s", domain, sts_id, exc)
            return _effective(cached)
        self._cache.put(domain, policy, policy.max_age)
        log.info("MTA-STS policy of %s: id %s, %s", domain, sts_id, policy.summary)
        return _effective(policy)

    async def _txt_id(self, domain: str) -> str | None:
        try:
            return parse_txt(await self._resolver.txt(f"_mta-sts.{domain}"))
        except DnsError as exc:
            log.debug("MTA-STS TXT of %s: %s", domain, exc)
            return None

    async def _fetch(self, domain: str) -> str:
        """The policy file of ``domain``; its host is looked up through our resolver."""
        host = f"mta-sts.{domain}"
        addresses = await self._resolver.addresses(host)
        if not addresses:
            raise MtaStsError(f"{host} has no address")
        literal = f"[{addresses[0]}]" if ":" in addresses[0] else addresses[0]
        url = f"https://{literal}:{self._port}/.well-known/mta-sts.txt"
        self.fetches += 1
        async with httpx.AsyncClient(
            verify=_https_context(self._ca_file),
            timeout=self._timeout,
            follow_redirects=False,  # RFC 8461 §3.3: redirects are not followed
            trust_env=False,
        ) as client:
            return await _read_policy(client, url, host)


async def _read_policy(client: httpx.AsyncClient, url: str, host: str) -> str:
    headers = {"Host": host}
    extensions = {"sni_hostname": host}  # TLS name checked: mta-sts.<domain>, not the IP
    async with client.stream("GET", url, headers=headers, extensions=extensions) as response:
        if response.status_code != 200:
            raise MtaStsError(f"https://{host}/.well-known/mta-sts.txt: {response.status_code}")
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > MAX_POLICY_SIZE:
                raise MtaStsError(f"policy of {host} is larger than {MAX_POLICY_SIZE} octets")
    return body.decode("utf-8")


@functools.lru_cache(maxsize=8)
def _https_context(ca_file: str | None) -> ssl.SSLContext:
    """Made once per CA file (making one costs about 25 ms), then shared by every fetch."""
    context = ssl.create_default_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=ca_file)
    return context


def _effective(policy: StsPolicy | None) -> StsPolicy | None:
    return policy if policy is not None and policy.mode != "none" else None
