"""The ``Epoxi-Signature`` header: HMAC-SHA256 of ``"<t>.<body>"`` with the endpoint's secret.

``t`` is the Unix time of the POST, so a receiver can refuse an old (replayed) call; while a
rotated secret still counts, the header carries one ``v1=`` per secret and a receiver accepts
the call if any of them matches its own secret (docs/events.md has the check).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

HEADER = "Epoxi-Signature"


def signature(secrets_now: list[str], timestamp: int, body: bytes) -> str:
    signed = f"{timestamp}.".encode() + body
    digests = [
        hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest() for secret in secrets_now
    ]
    return ",".join([f"t={timestamp}", *(f"v1={digest}" for digest in digests)])


def new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)
