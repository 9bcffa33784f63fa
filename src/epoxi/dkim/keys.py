"""DKIM keys: PEM files in, the DNS record to publish out, new keys made.

The algorithm follows from the key: an RSA key signs ``rsa-sha256`` (RFC 6376), an Ed25519
key ``ed25519-sha256`` (RFC 8463). Keys are read once, at start or reload.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from epoxi.errors import ConfigError

Algorithm = Literal["rsa-sha256", "ed25519-sha256"]
KeyType = Literal["rsa", "ed25519"]
MIN_RSA_BITS = 1024  # RFC 8301: verifiers must not accept less


@dataclass(frozen=True)
class DkimKey:
    """One signing key: ``d=`` domain, ``s=`` selector and the private key."""

    domain: str
    selector: str
    private: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    path: Path | None = None

    @property
    def algorithm(self) -> Algorithm:
        return "rsa-sha256" if isinstance(self.private, rsa.RSAPrivateKey) else "ed25519-sha256"

    @property
    def dns_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    def public_value(self) -> str:
        """The ``p=`` of the DNS record: SubjectPublicKeyInfo for RSA, the raw key for
        Ed25519 (RFC 8463 section 4.2)."""
        public = self.private.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            raw = public.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        else:
            raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return base64.b64encode(raw).decode("ascii")

    def txt_record(self) -> str:
        kind = "rsa" if self.algorithm == "rsa-sha256" else "ed25519"
        return f"v=DKIM1; k={kind}; p={self.public_value()}"


def load_key(domain: str, selector: str, path: Path) -> DkimKey:
    """Read a PEM private key; ConfigError naming the file when it cannot be used."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"dkim key {path}: cannot read it: {exc.strerror or exc}") from exc
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"dkim key {path}: not an unencrypted PEM private key ({exc})") from exc
    if isinstance(private, rsa.RSAPrivateKey):
        if private.key_size < MIN_RSA_BITS:
            raise ConfigError(f"dkim key {path}: RSA {private.key_size} bits; use 2048")
    elif not isinstance(private, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"dkim key {path}: only RSA and Ed25519 keys can sign DKIM")
    return DkimKey(domain.lower().rstrip("."), selector, private, path)


def generate(kind: KeyType = "rsa", bits: int = 2048) -> bytes:
    """A new private key as PEM (PKCS#8)."""
    private: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    if kind == "rsa":
        if bits < MIN_RSA_BITS:
            raise ValueError(f"RSA keys under {MIN_RSA_BITS} bits are refused by verifiers")
        private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    else:
        private = ed25519.Ed25519PrivateKey.generate()
    return private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def parse_record(text: str) -> dict[str, str]:
    """The tags of a DKIM key record (``v=DKIM1; k=rsa; p=...``), values without spaces."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        name, sep, value = part.partition("=")
        if sep:
            tags[name.strip()] = "".join(value.split())
    return tags
