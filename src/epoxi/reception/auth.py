"""AUTH for the SMTP server: password hashes, the credential check, SASL PLAIN and LOGIN.

Hashes are scrypt (stdlib), in the form ``$scrypt$ln=14,r=8,p=1$<salt>$<hash>`` (base64).
Checking one costs tens of milliseconds of CPU, so it runs in a worker thread.
Passwords never reach a log line or a ``repr``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

_SCHEME = "scrypt"
_DEFAULT_LN = 14
_DEFAULT_R = 8
_DEFAULT_P = 1
_KEY_LEN = 32


def hash_password(password: str, *, ln: int = _DEFAULT_LN) -> str:
    """A new salted scrypt hash of ``password``, for the ``users`` table of the config."""
    salt = os.urandom(16)
    key = _scrypt(password, salt, ln, _DEFAULT_R, _DEFAULT_P)
    return f"${_SCHEME}$ln={ln},r={_DEFAULT_R},p={_DEFAULT_P}${_b64(salt)}${_b64(key)}"


def verify_password(password: str, encoded: str) -> bool:
    """True if ``password`` matches ``encoded``; a malformed hash never matches."""
    try:
        _, scheme, params, salt_b64, key_b64 = encoded.split("$")
        settings = dict(item.split("=") for item in params.split(","))
        ln, r, p = int(settings["ln"]), int(settings["r"]), int(settings["p"])
        salt, expected = _unb64(salt_b64), _unb64(key_b64)
    except (ValueError, KeyError, binascii.Error):
        return False
    if scheme != _SCHEME:
        return False
    return hmac.compare_digest(_scrypt(password, salt, ln, r, p), expected)


def is_password_hash(encoded: str) -> bool:
    return encoded.startswith(f"${_SCHEME}$") and encoded.count("$") == 4


def _scrypt(password: str, salt: bytes, ln: int, r: int, p: int) -> bytes:
    n = 1 << ln
    return hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=n * r * 256, dklen=_KEY_LEN
    )


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class Credentials:
    """A user name and password from a client; the password is never shown."""

    username: str
    password: str = field(repr=False)
    authzid: str = ""  # SASL PLAIN: the identity to act as; "" means the user itself

    @property
    def acts_as_other(self) -> bool:
        """True when the client asks to act as someone other than the user it proves to be."""
        return bool(self.authzid) and self.authzid != self.username


class Authenticator:
    """Checks credentials against the configured users, off the event loop."""

    def __init__(self, users: Mapping[str, str]) -> None:
        self._users = dict(users)
        # Unknown users are checked against a dummy hash so timing does not reveal them.
        self._dummy = hash_password(os.urandom(8).hex(), ln=_DEFAULT_LN)

    def __repr__(self) -> str:
        return f"Authenticator(users={len(self._users)})"

    @property
    def enabled(self) -> bool:
        return bool(self._users)

    async def check(self, credentials: Credentials) -> bool:
        encoded = self._users.get(credentials.username, self._dummy)
        ok = await asyncio.to_thread(verify_password, credentials.password, encoded)
        return ok and credentials.username in self._users


class SaslError(ValueError):
    """A SASL response could not be decoded."""


def decode_b64(text: str) -> bytes:
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:  # ValueError: characters outside ASCII
        raise SaslError("not valid base64") from exc


def parse_plain(response: str) -> Credentials:
    """SASL PLAIN (RFC 4616): base64 of ``authzid NUL authcid NUL passwd``."""
    parts = decode_b64(response).split(b"\x00")
    if len(parts) != 3 or not parts[1]:
        raise SaslError("PLAIN response must be authzid NUL user NUL password")
    try:
        return Credentials(
            parts[1].decode("utf-8"), parts[2].decode("utf-8"), parts[0].decode("utf-8")
        )
    except UnicodeDecodeError as exc:
        raise SaslError("PLAIN credentials are not UTF-8") from exc


def decode_login_field(response: str) -> str:
    """One step of SASL LOGIN: a base64 user name or password."""
    try:
        return decode_b64(response).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SaslError("LOGIN field is not UTF-8") from exc
