"""``printable``: what a terminal or a log shows of text that came from strangers."""

from __future__ import annotations

import json

import pytest

from epoxi.text import printable, printable_json

UNSAFE = [chr(c) for c in range(0x20)] + [chr(c) for c in range(0x7F, 0xA0)]
BIDI = [
    "\u061c",
    "\u200e",
    "\u200f",
    *map(chr, range(0x202A, 0x202F)),
    *map(chr, range(0x2066, 0x206A)),
]


@pytest.mark.parametrize(
    "raw, shown",
    [
        ("\x1b[31mred", "\\x1b[31mred"),
        ("evil\u202eexe.txt", "evil\\u202eexe.txt"),
        ("a\r\nb\tc\x00", "a\\x0d\\x0ab\\x09c\\x00"),
        ("del\x7f c1\x85 csi\x9b", "del\\x7f c1\\x85 csi\\x9b"),
        (
            "\u2066isolate\u2069 \u200emark\u200f \u061c",
            "\\u2066isolate\\u2069 \\u200emark\\u200f \\u061c",
        ),
    ],
)
def test_controls_and_bidi_are_spelled_out(raw: str, shown: str) -> None:
    assert printable(raw) == shown


@pytest.mark.parametrize("char", UNSAFE + BIDI, ids=lambda c: f"U+{ord(c):04X}")
def test_no_unsafe_character_survives(char: str) -> None:
    out = printable(f"a{char}b")
    assert char not in out and out.startswith("a\\") and out.endswith("b")


def test_ordinary_text_is_left_alone() -> None:
    text = "Grüße, 日本語, émoji 📬, [bold], <a@b.test>, back\\slash, \u00a0nbsp, \u200djoiner"
    assert printable(text) == text


def test_json_stays_valid_and_means_the_same() -> None:
    value = {"name": "x\x1b[2J\u202e\x7f\x85é", "n": [1, "\u2066"]}
    document = printable_json(json.dumps(value, ensure_ascii=False))
    assert json.loads(document) == value
    assert not any(c in document for c in UNSAFE + BIDI)
    assert "é" in document  # non-ASCII stays readable
