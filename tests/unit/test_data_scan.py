"""The scans of received DATA against their slow, obvious versions."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from epoxi.smtp.data import has_bare_cr_or_lf, has_long_line, unstuff

# Short alphabets, so that CR, LF and dots meet each other often.
octets = st.binary(max_size=60).map(lambda b: bytes(b"a\r\n."[x % 4] for x in b))
lines = st.lists(st.text("ab.", max_size=12).map(str.encode), max_size=8)


def crlf_lines(parts: list[bytes]) -> bytes:
    return b"".join(part + b"\r\n" for part in parts)


@given(octets)
def test_bare_cr_or_lf_as_counting_crlf_says(chunk: bytes) -> None:
    crlf = chunk.count(b"\r\n")
    expected = chunk.count(b"\n") != crlf or chunk.count(b"\r") != crlf
    assert has_bare_cr_or_lf(chunk) == expected


def test_bare_cr_or_lf_examples() -> None:
    assert not has_bare_cr_or_lf(b"a\r\nb\r\n")
    assert has_bare_cr_or_lf(b"a\nb\r\r\n")  # as many CR as LF, yet both bare
    assert has_bare_cr_or_lf(b"a\r\nb\r")
    assert has_bare_cr_or_lf(b"\n\r")


@given(lines, st.integers(min_value=2, max_value=16))
def test_long_line_as_splitting_says(parts: list[bytes], limit: int) -> None:
    chunk = crlf_lines(parts)
    expected = max(map(len, chunk.split(b"\r\n"))) + 2 > limit
    assert has_long_line(chunk, limit) == expected


def test_long_line_at_the_limit() -> None:
    assert not has_long_line(b"abc\r\n", 5)  # five octets with CRLF: allowed
    assert has_long_line(b"abcd\r\n", 5)
    assert has_long_line(b"ab\r\nabcd\r\nab\r\n", 5)
    assert not has_long_line(b"ab\r\nabc\r\n\r\n", 5)


@given(lines)
def test_unstuff_removes_the_first_dot_of_each_line(parts: list[bytes]) -> None:
    expected = crlf_lines([part[1:] if part.startswith(b".") else part for part in parts])
    assert unstuff(crlf_lines(parts)) == expected
