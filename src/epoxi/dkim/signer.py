"""DKIM signing (RFC 6376; Ed25519 per RFC 8463), relaxed/relaxed, written here.

dkimpy was measured first, with its RSA replaced by ``cryptography`` as DESIGN.md planned: a
5 KB message still cost 794 µs to sign with RSA-2048 and 337 µs with Ed25519, of which the RSA
operation itself is about 225 µs and the Ed25519 one about 40 µs. The rest was dkimpy parsing
the PEM key in Python on every call, a regex pass per header and per body line, and building
a verifier-grade message object. Relaxed canonicalisation is a few lines of ``bytes`` work, so
the signer is written here; dkimpy and Perl's Mail::DKIM verify its signatures in the tests.

Signing is CPU work: :class:`Signer` runs off the event loop (``Ingest`` calls it in a thread;
``cryptography`` releases the GIL while it signs).
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from epoxi.dkim.keys import DkimKey

# Signed when present: the fields a reader sees and a replay would change.
SIGNED: Final = (
    "from",
    "sender",
    "reply-to",
    "subject",
    "date",
    "message-id",
    "to",
    "cc",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "content-disposition",
    "in-reply-to",
    "references",
    "list-id",
    "list-unsubscribe",
    "list-unsubscribe-post",
)
# Signed once more than they occur, so a copy cannot be added after signing (over-signing).
OVERSIGNED: Final = frozenset(
    {"from", "sender", "reply-to", "subject", "date", "message-id", "to", "cc"}
)

_WSP_RUN: Final = re.compile(rb"[ \t]+")
_FOLD: Final = re.compile(rb"\r\n(?=[ \t])")
_B64_LINE: Final = 76


@dataclass(frozen=True)
class Signed:
    body: bytes  # the message with its DKIM-Signature fields on top
    signatures: list[str]  # "d=example.com s=s2026 a=rsa-sha256", one per key
    unsigned_reason: str = ""  # why there is none, when there is none


class Signer:
    """Signs a message with every key of its signing domain (RSA and Ed25519 side by side).

    The signing domain is the tenant's, when ``tenants`` names one ("" leaves that tenant's
    mail unsigned), else the ``From:`` domain or its nearest parent that has keys (aligned
    for DMARC, relaxed)."""

    def __init__(
        self,
        keys: Sequence[DkimKey],
        tenants: Mapping[str, str] | None = None,
        expire: float | None = None,
    ) -> None:
        self.expire = expire  # seconds: adds x=, when set
        self.by_domain: dict[str, list[DkimKey]] = {}
        for key in keys:
            self.by_domain.setdefault(key.domain, []).append(key)
        self.tenants = {k: v.lower().rstrip(".") for k, v in (tenants or {}).items()}

    def keys_for(self, tenant: str, from_domain: str) -> tuple[list[DkimKey], str]:
        """The keys to sign with, or none and why."""
        if tenant in self.tenants:
            domain = self.tenants[tenant]
            if not domain:
                return [], f"tenant {tenant} is not signed"
            keys = self.by_domain.get(domain, [])
            return keys, "" if keys else f"no key for {domain} (tenant {tenant})"
        if not from_domain:
            return [], "no From: domain"
        candidate = from_domain
        while "." in candidate:
            if candidate in self.by_domain:
                return self.by_domain[candidate], ""
            candidate = candidate.partition(".")[2]
        return [], f"no key for {from_domain}"

    def sign(self, message: bytes, tenant: str = "", now: float | None = None) -> Signed:
        end = message.find(b"\r\n\r\n")
        head, body = (message[: end + 2], message[end + 4 :]) if end >= 0 else (message, b"")
        fields = header_fields(head)
        keys, reason = self.keys_for(tenant, from_domain(fields))
        if not keys:
            return Signed(message, [], reason)
        names = sign_list([name for name, _ in fields])
        signed_part = canonical_headers(fields, names)
        body_hash = base64.b64encode(hashlib.sha256(relaxed_body(body)).digest()).decode()
        stamp = int(time.time() if now is None else now)
        times = f"t={stamp}" + (f"; x={stamp + int(self.expire)}" if self.expire else "")
        made = [signature_field(key, names, body_hash, signed_part, times) for key in keys]
        described = [f"d={k.domain} s={k.selector} a={k.algorithm}" for k in keys]
        return Signed(b"".join(made) + message, described)


def signature_field(
    key: DkimKey, names: list[str], body_hash: str, signed_part: bytes, times: str
) -> bytes:
    """One ``DKIM-Signature:`` field (folded, CRLF-terminated); ``times`` is ``t=`` (and
    ``x=``)."""
    value = (
        f"v=1; a={key.algorithm}; c=relaxed/relaxed; d={key.domain}; s={key.selector};\r\n"
        f"\t{times}; h={':'.join(names)};\r\n\tbh={body_hash};\r\n\tb="
    ).encode()
    data = signed_part + b"dkim-signature:" + relaxed_value(value)
    signature = base64.b64encode(_signature(key, data))
    lines = [signature[i : i + _B64_LINE] for i in range(0, len(signature), _B64_LINE)]
    return b"DKIM-Signature: " + value + b"\r\n\t".join(lines) + b"\r\n"


def _signature(key: DkimKey, data: bytes) -> bytes:
    if isinstance(key.private, rsa.RSAPrivateKey):
        return key.private.sign(data, padding.PKCS1v15(), hashes.SHA256())
    return key.private.sign(hashlib.sha256(data).digest())  # RFC 8463: Ed25519 over SHA-256


# --------------------------------------------------------------------- canonical forms


def header_fields(head: bytes) -> list[tuple[str, bytes]]:
    """(lower-cased name, the whole field as it is, without its last CRLF), in order."""
    fields: list[tuple[str, bytes]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            name, raw = fields[-1]
            fields[-1] = (name, raw + b"\r\n" + line)
        elif b":" in line:
            fields.append(
                (line.partition(b":")[0].strip().decode("ascii", "replace").lower(), line)
            )
    return fields


def canonical_headers(fields: list[tuple[str, bytes]], names: list[str]) -> bytes:
    """The relaxed form of the fields named in ``h=``, each instance taken from the bottom up
    (a name listed more often than it occurs adds nothing)."""
    remaining: dict[str, list[bytes]] = {}
    for name, raw in fields:
        remaining.setdefault(name, []).append(raw)
    out = []
    for name in names:
        instances = remaining.get(name)
        if instances:
            raw = instances.pop()
            out.append(name.encode() + b":" + relaxed_value(raw.partition(b":")[2]) + b"\r\n")
    return b"".join(out)


def relaxed_value(value: bytes) -> bytes:
    """A header value, relaxed: unfolded, runs of space and tab as one space, trimmed."""
    return _WSP_RUN.sub(b" ", _FOLD.sub(b"", value)).strip(b" ")


def relaxed_body(body: bytes) -> bytes:
    """The body, relaxed: runs of space and tab as one space, none at line ends, no empty
    lines at the end; empty stays empty."""
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    body = _WSP_RUN.sub(b" ", body).replace(b" \r\n", b"\r\n").rstrip(b"\r\n")
    return body + b"\r\n" if body else b""


def sign_list(present: Sequence[str]) -> list[str]:
    """The ``h=`` list: the signed fields present, in order, then one more of each
    over-signed field (present or not, so none can be added)."""
    names = [name for name in present if name in SIGNED]
    return names + [name for name in SIGNED if name in OVERSIGNED]


def from_domain(fields: list[tuple[str, bytes]]) -> str:
    """The domain of the (first) address in the first ``From:``, lower-cased; "" if none."""
    raw = next((raw for name, raw in fields if name == "from"), None)
    if raw is None:
        return ""
    text = _FOLD.sub(b"", raw.partition(b":")[2]).decode("utf-8", "replace")
    address = text.rpartition("<")[2].partition(">")[0] if "<" in text else text
    return address.rpartition("@")[2].strip().strip(">").lower().rstrip(".")
