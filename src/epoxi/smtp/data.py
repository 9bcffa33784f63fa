"""Scans of received message data, each a few passes in C: line ends, line lengths, dots.

Pure functions over one chunk of DATA that starts at a line start and ends with CRLF (the
session cuts its input so). No I/O: cheap to test against the slow, obvious versions.
"""

from __future__ import annotations

import functools
import re

_BARE_CR = re.compile(rb"\r(?!\n)")
# On CPython 3.11 a search with a literal first byte runs faster than ``in`` or ``find`` with
# a two-byte needle, and much faster than a replace that finds nothing.
_DOT_AFTER_LF = re.compile(rb"\n\.")


def has_bare_cr_or_lf(chunk: bytes) -> bool:
    """Whether ``chunk`` holds a CR or an LF outside a CRLF (a CR at its very end counts).

    With no bare CR every CR starts a CRLF; then as many LFs as CRs means every LF ends one.
    Two one-byte counts and a search: a third cheaper than counting CRLF as well.
    """
    return chunk.count(b"\n") != chunk.count(b"\r") or _BARE_CR.search(chunk) is not None


def has_long_line(chunk: bytes, limit: int) -> bool:
    """Whether a line of ``chunk``, its CRLF included, is longer than ``limit`` octets.

    Every line must end in CRLF (check ``has_bare_cr_or_lf`` first). A line is too long when
    the octets before its LF, CR included, number ``limit`` or more: the first line is
    measured with a ``find``, the others with one regular-expression search that jumps from
    LF to LF, instead of splitting the chunk into a list of lines.
    """
    first = chunk.find(b"\n")
    if first < 0:
        return len(chunk) >= limit
    return first >= limit or _run_after_lf(limit).search(chunk, first) is not None


@functools.lru_cache(maxsize=8)
def _run_after_lf(limit: int) -> re.Pattern[bytes]:
    return re.compile(rb"\n[^\n]{%d}" % limit)


def unstuff(chunk: bytes) -> bytes:
    """``chunk`` without the first dot of every line that starts with one (RFC 5321 §4.5.2)."""
    if chunk.startswith(b"."):
        chunk = chunk[1:]
    if _DOT_AFTER_LF.search(chunk) is None:
        return chunk  # the common case: no copy
    return chunk.replace(b"\r\n.", b"\r\n")
