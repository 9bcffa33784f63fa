"""Message ids: 20 characters, sortable by creation time, unique without coordination.

An id is the creation time in microseconds (11 base-32 characters) followed by 45 random
bits (9 characters), in an alphabet without look-alike letters (Crockford's base 32).
"""

from __future__ import annotations

import os
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def _b32(value: int, width: int) -> str:
    out = []
    for _ in range(width):
        out.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(out))


def new_message_id(now: float | None = None) -> str:
    micros = int((time.time() if now is None else now) * 1_000_000)
    rand = int.from_bytes(os.urandom(6), "big") >> 3
    return _b32(micros, 11) + _b32(rand, 9)


def is_message_id(text: str) -> bool:
    return len(text) == 20 and all(c in _ALPHABET for c in text)
