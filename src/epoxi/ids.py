"""Message ids: 20 characters, sortable by creation time, unique without coordination.

An id is the creation time in microseconds (11 base-32 characters) followed by 45 random
bits (9 characters), in an alphabet without look-alike letters (Crockford's base 32).
"""

from __future__ import annotations

import random
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
# Every 10-bit value as its two digits: an id is ten look-ups (base64's base 32 runs in Python).
_PAIRS = [high + low for high in _ALPHABET for low in _ALPHABET]
_SHIFTS = tuple(range(90, -1, -10))


def new_message_id(now: float | None = None) -> str:
    """The 100 bits time << 45 | random as 20 base-32 digits, most significant first."""
    micros = int((time.time() if now is None else now) * 1_000_000)
    value = (micros << 45) | random.getrandbits(45)  # seeded from the OS, again in a forked child
    return "".join([_PAIRS[(value >> shift) & 1023] for shift in _SHIFTS])


def is_message_id(text: str) -> bool:
    return len(text) == 20 and all(c in _ALPHABET for c in text)
