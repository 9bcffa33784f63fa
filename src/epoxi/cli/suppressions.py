"""``epoxi suppressions``: each tenant's suppression list, over the HTTP API."""

from __future__ import annotations

import csv
import io
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from epoxi.api_types import SuppressionPage, SuppressionRemoved, SuppressionsAdded
from epoxi.cli.client import DEFAULT_URL
from epoxi.cli.common import PLAIN_HELP
from epoxi.cli.remote import AsJson, Key, Url, _api
from epoxi.cli.show import add_row, echo, print_json, show, table
from epoxi.store.suppressions import Reason, Suppression

IMPORT_CHUNK = 5000  # rows per request of an import: each is added all or none

suppressions_app = typer.Typer(
    help="Each tenant's suppression list: the addresses mail is not sent to (hard bounces, "
    "complaints, unsubscribes, and those added by hand). Tenant * is the global list.",
    no_args_is_help=True,
    rich_markup_mode=PLAIN_HELP,
)

Tenant = Annotated[
    str | None,
    typer.Option(
        "--tenant",
        "-t",
        help="The tenant's list (* the global one). Default: a tenant key's own tenant; for "
        "ls and export with a key for any tenant, every list; else mail without a tenant.",
    ),
]


def _tenant(tenant: str | None) -> dict[str, str]:
    return {"tenant": tenant} if tenant is not None else {}


@suppressions_app.command("ls")
def suppressions_ls(
    tenant: Tenant = None,
    limit: Annotated[int, typer.Option(help="Show at most this many (0: all).")] = 100,
    url: Url = DEFAULT_URL,
    key: Key = None,
    as_json: AsJson = False,
) -> None:
    """List the addresses on a suppression list, with why and when each was added."""
    entries: list[Suppression] = []
    with _api(url, key) as client:
        after: str | None = None
        while limit == 0 or len(entries) < limit:
            size = min(1000, limit - len(entries)) if limit else 1000
            params = {**_tenant(tenant), "limit": str(size), **({"after": after} if after else {})}
            page = client.typed(SuppressionPage, "GET", "/suppressions", params=params)
            entries += page.suppressions
            if page.next is None:
                break
            after = page.next
    if as_json:
        print_json(entries)
        return
    found = table("tenant", "address", "reason", "added (UTC)", "detail")
    for entry in entries:
        added = datetime.fromtimestamp(entry.created_at, UTC).strftime("%Y-%m-%d %H:%M:%S")
        add_row(found, entry.tenant or "-", entry.address, entry.reason.value, added, entry.detail)
    show(found)


@suppressions_app.command("add")
def suppressions_add(
    addresses: Annotated[list[str], typer.Argument(help="The addresses to suppress.")],
    tenant: Tenant = None,
    reason: Annotated[Reason, typer.Option(help="Why they are on the list.")] = Reason.MANUAL,
    detail: Annotated[str, typer.Option(help="A note kept with each.")] = "",
    url: Url = DEFAULT_URL,
    key: Key = None,
    as_json: AsJson = False,
) -> None:
    """Add addresses to a suppression list: new mail to them is not sent."""
    items = [
        {"address": a, "reason": reason.value, "detail": detail, **_tenant(tenant)}
        for a in addresses
    ]
    with _api(url, key) as client:
        added = client.typed(SuppressionsAdded, "POST", "/suppressions", json=items)
    if as_json:
        print_json(added)
        return
    echo(f"added {added.added}, already listed {added.already}")


@suppressions_app.command("rm")
def suppressions_rm(
    address: Annotated[str, typer.Argument(help="The address to send to again.")],
    tenant: Tenant = None,
    url: Url = DEFAULT_URL,
    key: Key = None,
    as_json: AsJson = False,
) -> None:
    """Take an address off a suppression list."""
    path = f"/suppressions/{quote(address, safe='@')}"
    with _api(url, key) as client:
        removed = client.typed(SuppressionRemoved, "DELETE", path, params=_tenant(tenant))
    if as_json:
        print_json(removed)
        return
    echo(f"removed {removed.address} from the list of {removed.tenant or 'mail without a tenant'}")


@suppressions_app.command("import")
def suppressions_import(
    file: Annotated[
        Path,
        typer.Argument(
            help="CSV: address[,reason] per line, or a header "
            "row naming address and reason (as export writes)."
        ),
    ],
    tenant: Tenant = None,
    url: Url = DEFAULT_URL,
    key: Key = None,
    as_json: AsJson = False,
) -> None:
    """Add every address of a CSV file, in chunks (a chunk with an invalid row is refused
    whole, naming the row; the chunks before it stay)."""
    header, rows = _csv_file(file)
    total = SuppressionsAdded(added=0, already=0, suppressions=[])
    with _api(url, key) as client, _progress() as progress:
        task = progress.add_task("import", total=len(rows))
        for start in range(0, len(rows), IMPORT_CHUNK):
            chunk = rows[start : start + IMPORT_CHUNK]
            done = client.typed(
                SuppressionsAdded,
                "POST",
                "/suppressions/import",
                params=_tenant(tenant),
                content=_csv_text([header, *chunk] if header else chunk).encode(),
                headers={"Content-Type": "text/csv"},
            )
            total.added += done.added
            total.already += done.already
            progress.advance(task, len(chunk))
    if as_json:
        print_json(total)
        return
    echo(f"imported {len(rows)} rows: added {total.added}, already listed {total.already}")


@suppressions_app.command("export")
def suppressions_export(
    file: Annotated[Path | None, typer.Argument(help="Write here (default: stdout).")] = None,
    tenant: Tenant = None,
    url: Url = DEFAULT_URL,
    key: Key = None,
) -> None:
    """Write a suppression list as CSV (tenant,address,reason,detail,created_at)."""
    with _api(url, key) as client:
        text = client.call("GET", "/suppressions/export", params=_tenant(tenant))
    if file is None:
        sys.stdout.write(text)
    else:
        file.write_text(text, encoding="utf-8")
        echo(f"wrote {max(text.count(chr(10)) - 1, 0)} addresses to {file}", err=True)


def _csv_file(path: Path) -> tuple[list[str] | None, list[list[str]]]:
    """(header row if any, the rows with an address)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        echo(f"epoxi: cannot read {path}: {exc}", err=True)
        raise typer.Exit(1) from exc
    rows = [row for row in csv.reader(io.StringIO(text)) if any(c.strip() for c in row)]
    if rows and "address" in [c.strip().lower() for c in rows[0]]:
        return rows[0], rows[1:]
    return None, rows


def _csv_text(rows: list[list[str]]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerows(rows)
    return out.getvalue()


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]importing"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
