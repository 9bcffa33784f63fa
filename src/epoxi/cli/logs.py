"""Logging for ``epoxi serve``: the CLI configures it, library code only logs.

Log lines carry what strangers sent (addresses, HELO names, user names, replies), so the
formatter spells out control and bidi characters: a log line can neither move the terminal's
cursor nor read backwards, and one record stays one line (a traceback keeps its own lines).
"""

from __future__ import annotations

import logging
import sys
from types import TracebackType
from typing import TextIO, TypeAlias

from epoxi.text import printable

ExcInfo: TypeAlias = (
    tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]
)
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class PrintableFormatter(logging.Formatter):
    """A ``logging.Formatter`` whose output holds no raw control or bidi character."""

    def format(self, record: logging.LogRecord) -> str:
        cached, record.exc_text = record.exc_text, None  # another handler's, maybe raw
        try:
            return super().format(record)
        finally:
            record.exc_text = cached

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record))

    def formatException(self, ei: ExcInfo) -> str:
        return _each_line(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _each_line(super().formatStack(stack_info))


def _each_line(text: str) -> str:
    return "\n".join(printable(line) for line in text.split("\n"))


def configure_logging(
    level: str, stream: TextIO | None = None, process: str = ""
) -> logging.Handler:
    """Send log records at ``level`` and above to ``stream`` (stderr), made printable.

    ``process`` names the process in every line ("supervisor", "worker 1") when several
    write to the same stream."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    named = FORMAT.replace("%(name)s", f"[{process}] %(name)s") if process else FORMAT
    handler.setFormatter(PrintableFormatter(named))
    root = logging.getLogger()
    root.setLevel(level.upper())
    root.addHandler(handler)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per call between workers
    return handler
