"""DKIM signing (RFC 6376, RFC 8463): dkimpy canonicalises and builds the field, RSA goes
through ``cryptography``.

dkimpy computes RSA with Python integers (5.8 ms a signature for 2048 bits, against 0.5 ms
through ``cryptography``: docs/architecture.md, DESIGN.md's measurements), so its one RSA
function, ``dkim.RSASSA_PKCS1_v1_5_sign``, is replaced by :func:`_rsa_sign`, which signs the
same digest with the same padding. Everything else (canonicalisation, the header list, the
field) is dkimpy's.

Signing is CPU work: :class:`Signer` is called off the event loop (``Ingest`` runs it in a
thread; ``cryptography`` releases the GIL while it signs).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import dkim
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from epoxi.dkim.keys import DkimKey

log = logging.getLogger(__name__)

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

    def __init__(self, keys: Sequence[DkimKey], tenants: Mapping[str, str] | None = None) -> None:
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

    def sign(self, body: bytes, tenant: str = "") -> Signed:
        keys, reason = self.keys_for(tenant, from_domain(body))
        if not keys:
            return Signed(body, [], reason)
        headers = header_names(body)
        include = [name.encode() for name in sign_list(headers)]
        fields = []
        for key in keys:
            fields.append(
                dkim.sign(
                    body,
                    key.selector.encode(),
                    key.domain.encode(),
                    key.dkimpy_secret(),
                    canonicalize=(b"relaxed", b"relaxed"),
                    signature_algorithm=key.algorithm.encode(),
                    include_headers=include,
                )
            )
        described = [f"d={k.domain} s={k.selector} a={k.algorithm}" for k in keys]
        return Signed(b"".join(fields) + body, described)


def sign_list(present: Sequence[str]) -> list[str]:
    """The ``h=`` list: the signed fields present, in order, then one more of each
    over-signed field (present or not, so none can be added)."""
    names = [name for name in present if name in SIGNED]
    return names + [name for name in SIGNED if name in OVERSIGNED]


def header_names(body: bytes) -> list[str]:
    """The lower-cased names of the header fields, in order."""
    end = body.find(b"\r\n\r\n")
    head = body[: end if end >= 0 else len(body)]
    names = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") or b":" not in line:
            continue
        names.append(line.split(b":", 1)[0].strip().decode("ascii", "replace").lower())
    return names


def from_domain(body: bytes) -> str:
    """The domain of the (first) address in ``From:``, lower-cased; "" if none."""
    end = body.find(b"\r\n\r\n")
    head = b"\r\n" + body[: end if end >= 0 else len(body)]
    start = head.lower().find(b"\r\nfrom:")
    if start < 0:
        return ""
    value = head[start + 7 :]
    stop = 0
    while True:  # the field ends at the first line that is not a continuation
        stop = value.find(b"\r\n", stop)
        if stop < 0 or value[stop + 2 : stop + 3] not in (b" ", b"\t"):
            break
        stop += 2
    text = value[: stop if stop >= 0 else len(value)].decode("utf-8", "replace")
    address = text.rpartition("<")[2].partition(">")[0] if "<" in text else text
    return address.rpartition("@")[2].strip().strip(">").lower().rstrip(".")


# --------------------------------------------------------------------- RSA through cryptography

_KEYS: dict[int, rsa.RSAPrivateKey] = {}  # dkimpy's parsed key (by modulus) -> cryptography's
_DIGESTS: Final = {"sha256": hashes.SHA256, "sha1": hashes.SHA1}


def _rsa_sign(digest: Any, private_key: dict[str, int]) -> bytes:
    """dkimpy's ``RSASSA_PKCS1_v1_5_sign``, done by ``cryptography``."""
    key = _KEYS.get(private_key["modulus"])
    if key is None:
        numbers = rsa.RSAPrivateNumbers(
            p=private_key["prime1"],
            q=private_key["prime2"],
            d=private_key["privateExponent"],
            dmp1=private_key["exponent1"],
            dmq1=private_key["exponent2"],
            iqmp=private_key["coefficient"],
            public_numbers=rsa.RSAPublicNumbers(
                private_key["publicExponent"], private_key["modulus"]
            ),
        )
        key = _KEYS[private_key["modulus"]] = numbers.private_key()
    algorithm = _DIGESTS[digest.name.lower()]()
    return key.sign(digest.digest(), padding.PKCS1v15(), utils.Prehashed(algorithm))


dkim.RSASSA_PKCS1_v1_5_sign = _rsa_sign
