"""Output for the operator: tables and lines whose data is printed as it is, made printable.

Values from the API (addresses, queue names, replies, headers) come from strangers. They go
through ``printable`` (control and bidi characters spelled out) and into Rich as ``Text``, so
a ``[bold]`` in an address is shown, not obeyed, and an ESC cannot reach the terminal.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from epoxi.text import printable, printable_json

console = Console()


def cell(value: object) -> Text:
    """One table cell or line fragment: ``value`` as plain text, never markup."""
    return Text(printable("" if value is None else str(value)))


def table(*columns: str, title: str | None = None) -> Table:
    return Table(*columns, title=cell(title) if title is not None else None)


def add_row(to: Table, *values: object) -> None:
    to.add_row(*(cell(value) for value in values))


def line(*parts: object, bold_first: bool = False) -> None:
    """Print ``parts`` side by side on one line, the first one in bold if asked."""
    text = Text()
    for index, part in enumerate(parts):
        text.append(cell(part).plain, style="bold" if bold_first and index == 0 else "")
    console.print(text, highlight=False)


def echo(message: str, err: bool = False) -> None:
    """A plain line on stdout (or stderr), made printable."""
    typer.echo(printable(message), err=err)


def print_json(value: Any) -> None:
    """JSON for scripts: readable non-ASCII, with control and bidi characters escaped."""
    plain = msgspec.to_builtins(value)  # the API's structs, or plain data
    typer.echo(printable_json(json.dumps(plain, indent=2, ensure_ascii=False)))


def show(rendered: Table) -> None:
    """Print a table made with ``table`` and ``add_row``."""
    console.print(rendered)
