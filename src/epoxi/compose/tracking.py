"""Open and click tracking and one-click unsubscribe links (pure: no I/O but the key file).

A link is ``<base_url>/t/<token>`` (an open pixel or a click) or ``<base_url>/u/<token>``
(unsubscribe), where the token is the base64url JSON of ``[kind, message id, recipient, url]``
and 16 bytes of its HMAC-SHA256 under the node's tracking secret, so a forged or altered token
is refused (the routes answer 404 and change nothing).

Tracked HTML has every ``http(s)`` link of an ``<a href>`` sent through a click link, and a
1x1 pixel before ``</body>``. Bulk mail gets ``List-Unsubscribe`` (RFC 2369) and
``List-Unsubscribe-Post: List-Unsubscribe=One-Click`` (RFC 8058).
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import html as html_lib
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import msgspec

MAC_SIZE = 16


class Kind(enum.StrEnum):
    OPEN = "o"
    CLICK = "c"
    UNSUBSCRIBE = "u"


@dataclass(frozen=True)
class Tracked:
    """What a valid token says."""

    kind: Kind
    message_id: str
    recipient: str
    url: str = ""


_LINK = re.compile(r"""(<a\b[^>]*?\bhref\s*=\s*)(["'])(https?://[^"'<>\s]+)\2""", re.IGNORECASE)
_BODY_END = re.compile(r"</body\s*>", re.IGNORECASE)


class Tracker:
    def __init__(self, base_url: str, secret: bytes) -> None:
        self.base_url = base_url.rstrip("/")
        self._secret = secret

    @classmethod
    def load(cls, base_url: str, secret: str, data_dir: Path) -> Tracker:
        """The configured secret, or the data dir's (made once, shared by the workers)."""
        return cls(base_url, secret.encode() if secret else _key_file(data_dir / "tracking.key"))

    # ----------------------------------------------------------------- tokens

    def token(self, kind: Kind, message_id: str, recipient: str, url: str = "") -> str:
        payload = msgspec.json.encode([kind.value, message_id, recipient, url])
        mac = hmac.new(self._secret, payload, hashlib.sha256).digest()[:MAC_SIZE]
        return f"{_b64(payload)}.{_b64(mac)}"

    def read(self, token: str) -> Tracked | None:
        """What the token says, or None when it is not one of ours (forged, altered, cut)."""
        payload_text, _, mac_text = token.partition(".")
        try:
            payload, mac = _unb64(payload_text), _unb64(mac_text)
        except (binascii.Error, ValueError):
            return None
        if _b64(payload) != payload_text or _b64(mac) != mac_text:
            return None  # spare bits set: the same bytes, but not the token made
        expected = hmac.new(self._secret, payload, hashlib.sha256).digest()[:MAC_SIZE]
        if not hmac.compare_digest(mac, expected):
            return None
        try:
            kind, message_id, recipient, url = msgspec.json.decode(
                payload, type=tuple[str, str, str, str]
            )
            return Tracked(Kind(kind), message_id, recipient, url)
        except (msgspec.DecodeError, ValueError):
            return None

    def link(self, kind: Kind, message_id: str, recipient: str, url: str = "") -> str:
        path = "u" if kind is Kind.UNSUBSCRIBE else "t"
        return f"{self.base_url}/{path}/{self.token(kind, message_id, recipient, url)}"

    # ----------------------------------------------------------------- the message

    def html(self, html: str, message_id: str, recipient: str) -> str:
        """``html`` with its links through click links and an open pixel at its end."""

        def through(match: re.Match[str]) -> str:
            url = html_lib.unescape(match.group(3))
            tracked = self.link(Kind.CLICK, message_id, recipient, url)
            return f"{match.group(1)}{match.group(2)}{tracked}{match.group(2)}"

        linked = _LINK.sub(through, html)
        pixel = (
            f'<img src="{self.link(Kind.OPEN, message_id, recipient)}" width="1" height="1"'
            ' alt="" style="display:none">'
        )
        ends = [match.start() for match in _BODY_END.finditer(linked)]
        if not ends:
            return linked + pixel
        return linked[: ends[-1]] + pixel + linked[ends[-1] :]

    def unsubscribe_headers(self, message_id: str, recipient: str) -> bytes:
        """The RFC 2369 and RFC 8058 header fields, to put before the message's own."""
        url = self.link(Kind.UNSUBSCRIBE, message_id, recipient)
        return (
            f"List-Unsubscribe: <{url}>\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
        ).encode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    if not text or len(text) > 8192:
        raise ValueError("no token")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _key_file(path: Path) -> bytes:
    """The key in ``path``, made with 32 random bytes the first time (O_EXCL: of workers
    starting together, one writes it and the others read it)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(100):
            text = path.read_text().strip()
            if text:
                return bytes.fromhex(text)
            os.sched_yield()  # another worker is writing it
        raise ValueError(f"{path} is empty: remove it, and a new key is made") from None
    key = secrets.token_bytes(32)
    with os.fdopen(fd, "w") as out:
        out.write(key.hex() + "\n")
        out.flush()
        os.fsync(out.fileno())
    return key
