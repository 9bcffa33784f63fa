"""The log lines ``epoxi serve`` writes spell out control and bidi characters."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from epoxi.cli.logs import configure_logging

EVIL = "evil\x1b[2J\u202eexe.test\r\nFAKE 2026 INFO forged line"


@pytest.fixture
def logged() -> Iterator[io.StringIO]:
    """The root logger configured as ``serve`` does, into a buffer; restored afterwards."""
    root = logging.getLogger()
    level = root.level
    stream = io.StringIO()
    handler = configure_logging("info", stream)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def test_message_and_arguments_are_escaped(logged: io.StringIO) -> None:
    logging.getLogger("epoxi.reception.session").info("[%s] relay denied to %s", "1.2.3.4", EVIL)
    (line,) = logged.getvalue().splitlines()
    assert line.endswith(
        "[1.2.3.4] relay denied to evil\\x1b[2J\\u202eexe.test\\x0d\\x0aFAKE 2026 INFO forged line"
    )
    assert " INFO epoxi.reception.session: " in line


def test_a_traceback_keeps_its_lines_but_not_their_controls(logged: io.StringIO) -> None:
    try:
        raise ValueError(EVIL)
    except ValueError:
        logging.getLogger("epoxi.test").exception("failed for %s", "\u2066x\u2069")
    text = logged.getvalue()
    assert "\x1b" not in text and "\u202e" not in text and "\u2066" not in text
    assert "failed for \\u2066x\\u2069" in text
    assert "ValueError: evil\\x1b[2J\\u202eexe.test\\x0d\n" in text  # a traceback is lines
    assert text.splitlines()[1] == "Traceback (most recent call last):"


def test_level_is_applied(logged: io.StringIO) -> None:
    logging.getLogger("epoxi.test").debug("hidden")
    logging.getLogger("epoxi.test").warning("shown")
    assert "hidden" not in logged.getvalue() and "shown" in logged.getvalue()
