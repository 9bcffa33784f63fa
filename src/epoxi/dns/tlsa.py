"""TLSA lookups for DANE (RFC 6698, RFC 7672 §2.2): only DNSSEC-validated answers count.

The resolver is asked with the AD and DO bits; the answer counts only when the validating
resolver sets AD in its reply. Epoxi does not validate signatures itself: ``[dns]
nameservers`` must be a validating resolver on a trusted path (loopback, as unbound).

- ``TlsaLookup.records`` empty and ``secure`` True: no TLSA records (validated NODATA or
  NXDOMAIN): DANE does not apply.
- ``secure`` False: the answer is not authenticated (an unsigned zone): DANE does not apply.
- A failed lookup (SERVFAIL, as a validating resolver answers for bogus data) raises
  :class:`~epoxi.errors.DnsTransient`: the caller must not fall back to plain text.
"""

from __future__ import annotations

from dataclasses import dataclass

from dns.rdtypes.ANY.TLSA import TLSA

from epoxi.dns.resolver import Resolver
from epoxi.errors import DnsPermanent


@dataclass(frozen=True, slots=True)
class Tlsa:
    """One TLSA record: certificate usage, selector, matching type, association data."""

    usage: int
    selector: int
    matching: int
    data: bytes


@dataclass(frozen=True, slots=True)
class TlsaLookup:
    records: tuple[Tlsa, ...]
    secure: bool


async def lookup_tlsa(resolver: Resolver, host: str, port: int = 25) -> TlsaLookup:
    """The TLSA records of ``_<port>._tcp.<host>``, and whether the answer was validated."""
    name = f"_{port}._tcp.{host}"
    try:
        rdatas, secure = await resolver.secure_query(name, "TLSA")
    except DnsPermanent:
        return TlsaLookup((), True)  # no such name: no TLSA (denied or not, DANE is off)
    records = tuple(
        Tlsa(r.usage, r.selector, r.mtype, bytes(r.cert)) for r in rdatas if isinstance(r, TLSA)
    )
    return TlsaLookup(records, secure)
