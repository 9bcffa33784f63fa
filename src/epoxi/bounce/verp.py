"""VERP return paths: ``b+<token>@<bounce domain>``, a token signed so it cannot be forged.

The token names the message and, when the transaction had one recipient, that recipient:

    <message id, 20 chars, lowercased> <recipient hash, 4 chars> <tag, 16 chars>

40 characters, so the local part (``b+`` and the token, 42 octets) stays well under RFC 5321's
64. The recipient hash is 20 bits of BLAKE2b of the lowercased address (the address itself
does not fit); a transaction of several recipients hashes ``""`` and the bounce names its
recipients. The tag is 80 bits of HMAC-SHA256 over id and hash with the site's key: a token
whose tag does not verify is refused (:class:`ForgedToken`). Tokens are lowercase base 32,
so a relay that changes the local part's case does not break them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from epoxi.errors import ConfigError, EpoxiError

PREFIX = "b+"
KEY_FILE = "bounce.key"  # in data_dir, made once when no bounce_secret is configured
_ID_LENGTH = 20
_HASH_LENGTH = 4
_TAG_BYTES = 10
_BODY_LENGTH = _ID_LENGTH + _HASH_LENGTH
TOKEN_LENGTH = _BODY_LENGTH + _TAG_BYTES * 8 // 5
_TOKEN = re.compile(f"[0-9a-z]{{{TOKEN_LENGTH}}}")


class ForgedToken(EpoxiError):
    """A VERP address whose token is malformed or whose tag does not verify."""


@dataclass(frozen=True, slots=True)
class Verp:
    """Makes and checks the VERP return paths of one bounce domain."""

    domain: str
    key: bytes

    def __repr__(self) -> str:  # the key never reaches a log
        return f"Verp(domain={self.domain!r})"

    def sender(self, message_id: str, recipients: list[str]) -> str:
        """The envelope sender for a transaction of ``message_id`` to ``recipients``."""
        recipient = recipients[0] if len(recipients) == 1 else ""
        return f"{PREFIX}{self.token(message_id, recipient)}@{self.domain}"

    def sender_for(self, sender: str, message_id: str, recipients: list[str]) -> str:
        """MAIL FROM for a delivery: VERP, except for the null sender (DSNs keep ``<>``)."""
        return self.sender(message_id, recipients) if sender else ""

    def token(self, message_id: str, recipient: str = "") -> str:
        body = message_id.lower() + recipient_hash(recipient)
        return body + self._tag(body)

    def is_ours(self, address: str) -> bool:
        """Whether ``address`` is in the bounce domain (forged or not)."""
        return address.rpartition("@")[2].lower().rstrip(".") == self.domain

    def decode(self, address: str) -> Decoded:
        """The message (and recipient hash) an address of ours names; ForgedToken if forged."""
        local, _, domain = address.rpartition("@")
        if domain.lower().rstrip(".") != self.domain or not local.lower().startswith(PREFIX):
            raise ForgedToken(f"{address!r} is not a VERP address of {self.domain}")
        token = local[len(PREFIX) :].lower()
        if not _TOKEN.fullmatch(token):
            raise ForgedToken(f"{address!r}: malformed VERP token")
        body, tag = token[:_BODY_LENGTH], token[_BODY_LENGTH:]
        if not hmac.compare_digest(tag, self._tag(body)):
            raise ForgedToken(f"{address!r}: VERP token does not verify")
        return Decoded(body[:_ID_LENGTH].upper(), body[_ID_LENGTH:])

    def _tag(self, body: str) -> str:
        digest = hmac.new(self.key, body.encode(), hashlib.sha256).digest()
        return base64.b32encode(digest[:_TAG_BYTES]).decode().lower()


@dataclass(frozen=True, slots=True)
class Decoded:
    """What a verified token says: the message id, and which recipient (by hash)."""

    message_id: str
    recipient_hash: str

    @property
    def per_message(self) -> bool:
        """True when the transaction had several recipients: the bounce names them."""
        return self.recipient_hash == recipient_hash("")

    def names(self, recipient: str) -> bool:
        """Whether ``recipient`` is the one the token was made for."""
        return recipient_hash(recipient) == self.recipient_hash


def recipient_hash(recipient: str) -> str:
    digest = hashlib.blake2b(recipient.lower().encode(), digest_size=5).digest()
    return base64.b32encode(digest).decode().lower()[:_HASH_LENGTH]


# ------------------------------------------------------------------------------------ key


def load_key(secret: str, data_dir: Path) -> bytes:
    """The configured secret, or the key in ``data_dir/bounce.key``, made once (mode 600)."""
    if secret:
        return secret.encode()
    path = data_dir / KEY_FILE
    try:
        return _read_or_create(path)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read or create the VERP key: {exc}") from exc


def existing_key(secret: str, data_dir: Path) -> bytes | None:
    """The key if there is one (for tools: they never make one), else None."""
    if secret:
        return secret.encode()
    try:
        return (data_dir / KEY_FILE).read_text().strip().encode() or None
    except OSError:
        return None


def _read_or_create(path: Path) -> bytes:
    """Written aside, then linked into place: a reader never sees a half-written key, and of
    workers starting together the first link wins and the others read its key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        aside = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
        fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
        finally:
            aside.unlink()
    return path.read_text().strip().encode()
