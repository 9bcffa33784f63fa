"""``epoxi bounce parse``: the inbound report parser over files, for operators and scripts;
``epoxi bounce quarantine``: the reports a running node kept."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import typer

from epoxi.api_types import QuarantinedReport, QuarantineList
from epoxi.bounce.classify import Classifier
from epoxi.bounce.inbound import Kind, Report, parse
from epoxi.bounce.verp import ForgedToken, Verp, existing_key
from epoxi.cli.client import DEFAULT_URL
from epoxi.cli.common import PLAIN_HELP, ConfigOption, load
from epoxi.cli.remote import AsJson, Key, Url, _api, _time
from epoxi.cli.show import add_row, echo, print_json, show, table
from epoxi.config import Settings
from epoxi.text import printable, printable_json

bounce_app = typer.Typer(
    help="Inbound bounces and complaints: read DSNs, ARF reports and auto-replies.",
    no_args_is_help=True,
    rich_markup_mode=PLAIN_HELP,
)
quarantine_app = typer.Typer(
    help="The reports a running node kept (data_dir/bounces): list, print, delete.",
    no_args_is_help=True,
    rich_markup_mode=PLAIN_HELP,
)
bounce_app.add_typer(quarantine_app, name="quarantine")

ReportName = Annotated[
    str, typer.Argument(help="The report's file name (`epoxi bounce quarantine ls`).")
]


@bounce_app.command("parse")
def parse_files(
    files: Annotated[list[Path], typer.Argument(help="Messages as received (headers and body).")],
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON line per file, for scripts.")
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Say what each message is (dsn, arf, autoreply, none) and what it reports.

    With --json, one line per file: {"file", "kind", "recipients": [{"address", "action",
    "status", "diagnostic", "class"}], "feedback_type", "original_message_id"}. Recipients are
    classified with the shipped bounce rules, and delivery.bounce_rules when -c is given.
    With -c and a bounce_domain, also "message_id" (Epoxi's, from the VERP token) and
    "verp": "verified", "forged" or null.
    A file that cannot be read is reported on stderr and the exit status is 1.
    """
    settings = load(config) if config is not None else None
    classifier = Classifier.from_files(list(settings.delivery.bounce_rules if settings else ()))
    verp = _verp(settings)
    failed = False
    for path in files:
        try:
            data = path.read_bytes()
        except OSError as exc:
            echo(f"epoxi: {path}: {exc.strerror or exc}", err=True)
            failed = True
            continue
        report = parse(data, classifier)
        summary = summarize(str(path), report)
        if verp is not None:
            summary.update(verified(report, verp))
        echo(printable_json(json.dumps(summary, ensure_ascii=False)) if as_json else human(summary))
    if failed:
        raise typer.Exit(1)


def _verp(settings: Settings | None) -> Verp | None:
    if settings is None or not settings.bounce_domain:
        return None
    key = existing_key(settings.bounce_secret, settings.data_dir)
    return Verp(settings.bounce_domain, key) if key is not None else None


def verified(report: Report, verp: Verp) -> dict[str, Any]:
    """``message_id`` (Epoxi's queue id) from the first VERP address of ours in the report,
    and ``verp``: "verified", "forged", or None when it names none."""
    for address in report.return_paths():
        if verp.is_ours(address):
            try:
                return {"message_id": verp.decode(address).message_id, "verp": "verified"}
            except ForgedToken:
                return {"message_id": None, "verp": "forged"}
    return {"message_id": None, "verp": None}


def summarize(file: str, report: Report) -> dict[str, Any]:
    """The contract's JSON object for one file."""
    recipients = [
        {
            "address": r.address,
            "action": r.action,
            "status": r.status,
            "diagnostic": r.diagnostic,
            "class": r.category.value,
        }
        for r in report.recipients
    ]
    feedback = report.feedback
    if feedback is not None:
        address = feedback.original_rcpt_to or report.original.recipient
        if address:
            recipients.append(
                {"address": address, "action": "", "status": "", "diagnostic": "", "class": ""}
            )
    return {
        "file": file,
        "kind": report.kind.value,
        "recipients": recipients,
        "feedback_type": feedback.feedback_type if feedback is not None else None,
        "original_message_id": report.original.message_id,
    }


def human(summary: dict[str, Any]) -> str:
    """One line for the file, then one indented line per recipient."""
    head = f"{summary['file']}: {summary['kind']}"
    if summary["kind"] == Kind.ARF.value:
        head += f" ({summary['feedback_type'] or 'no feedback type'})"
    if summary["original_message_id"]:
        head += f" about {summary['original_message_id']}"
    if summary.get("verp"):
        head += f" (VERP {summary['verp']}: {summary['message_id'] or 'no message'})"
    lines = [head]
    for r in summary["recipients"]:
        detail = " ".join(p for p in (r["action"], r["status"], r["class"]) if p)
        lines.append(f"  {r['address']} {detail}".rstrip())
        if r["diagnostic"]:
            lines.append(f"    {r['diagnostic']}")
    return "\n".join(lines)


# --------------------------------------------------------------------- the quarantine


@quarantine_app.command("ls")
def quarantine_ls(
    limit: Annotated[int, typer.Option(help="Show at most this many, the newest.")] = 50,
    url: Url = DEFAULT_URL,
    key: Key = None,
    as_json: AsJson = False,
) -> None:
    """List the reports kept, newest first: when, file name, kind (dsn, arf, autoreply,
    none), the queue id the report got when it came in, and its size."""
    with _api(url, key) as client:
        found = client.typed(
            QuarantineList, "GET", "/admin/quarantine", params={"limit": str(limit)}
        )
    if as_json:
        print_json(found)
        return
    if not found.reports:
        echo("no reports kept")
        return
    title = f"{len(found.reports)} of {found.total} reports kept"
    kept = table("kept", "name", "kind", "queue id", "size", title=title)
    for report in found.reports:
        add_row(kept, _time(report.kept_at), report.name, report.kind, report.queue_id, report.size)
    show(kept)


@quarantine_app.command("show")
def quarantine_show(
    name: ReportName,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the report to this file.")
    ] = None,
    url: Url = DEFAULT_URL,
    key: Key = None,
) -> None:
    """Print a report as it was received. Piped or written with -o, its bytes are exactly
    the report's; on a terminal, control characters are spelled out (\\x1b ...)."""
    with _api(url, key) as client:
        data = client.octets("GET", f"/admin/quarantine/{quote(name, safe='')}")
    if output is not None:
        output.write_bytes(data)
    elif sys.stdout.isatty():
        for line in data.decode("utf-8", "replace").splitlines():
            typer.echo(printable(line))
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()


@quarantine_app.command("rm")
def quarantine_rm(name: ReportName, url: Url = DEFAULT_URL, key: Key = None) -> None:
    """Delete a report from the quarantine."""
    with _api(url, key) as client:
        gone = client.typed(
            QuarantinedReport, "DELETE", f"/admin/quarantine/{quote(name, safe='')}"
        )
    echo(f"removed {gone.name} ({gone.kind}, {gone.size} octets)")
