"""Message ids: 20 characters, sortable by creation time, unique without coordination.

An id is the creation time in microseconds (11 base-32 characters) followed by 45 random
bits (9 characters), in an alphabet without look-alike letters (Crockford's base 32).
"""

from __future__ import annotations

import base64
import random
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
# base64's base 32 (RFC 4648) digit by digit into Crockford's: the encoding runs in C.
_CROCKFORD = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", _ALPHABET.encode())


def new_message_id(now: float | None = None) -> str:
    """The 100 bits time << 45 | random as 20 base-32 digits (24 from 15 octets, 4 leading 0s)."""
    micros = int((time.time() if now is None else now) * 1_000_000)
    value = (micros << 45) | random.getrandbits(45)  # seeded from the OS, again in a forked child
    digits = base64.b32encode(value.to_bytes(15, "big")).translate(_CROCKFORD)
    return digits[4:].decode("ascii")


def is_message_id(text: str) -> bool:
    return len(text) == 20 and all(c in _ALPHABET for c in text)
