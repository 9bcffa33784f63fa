"""Text shown to an operator (terminal tables, log lines), made safe to print.

Addresses, headers and replies come from strangers. Printed raw, an ESC starts a terminal
escape sequence and a bidi control (U+202E ...) makes a line read differently than it is.
``printable`` spells those characters out instead, so what the operator sees is what is there.
"""

from __future__ import annotations

import re
from typing import Final

# C0 controls, DEL, C1 controls, and the bidi controls: marks (LRM, RLM, ALM), embeddings and
# overrides (U+202A-U+202E), isolates (U+2066-U+2069).
_BIDI: Final = "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
_UNSAFE: Final = re.compile(f"[\x00-\x1f\x7f-\x9f{_BIDI}]")
# What ``json.dumps`` leaves raw: it escapes C0 controls inside strings, and outside strings
# a document holds only its own whitespace (indentation).
_UNSAFE_IN_JSON: Final = re.compile(f"[\x7f-\x9f{_BIDI}]")


def _spell(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """``text`` with control and bidi characters written as ``\\x1b``, ``\\u202e`` ...

    A backslash is left alone, so the result may read the same as text that held the escape
    literally; it is for reading, not for parsing back.
    """
    return _UNSAFE.sub(_spell, text)


def printable_json(document: str) -> str:
    """``json.dumps(..., ensure_ascii=False)`` output with DEL, C1 and bidi controls escaped
    as ``\\uXXXX``: still valid JSON meaning the same, and still readable non-ASCII."""
    return _UNSAFE_IN_JSON.sub(lambda match: f"\\u{ord(match.group()):04x}", document)
