"""``epoxi bounce parse``: the inbound report parser over files, for operators and scripts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from epoxi.bounce.classify import Classifier
from epoxi.bounce.inbound import Kind, Report, parse
from epoxi.bounce.verp import ForgedToken, Verp, existing_key
from epoxi.cli.common import PLAIN_HELP, ConfigOption, load
from epoxi.cli.show import echo
from epoxi.config import Settings
from epoxi.text import printable_json

bounce_app = typer.Typer(
    help="Inbound bounces and complaints: read DSNs, ARF reports and auto-replies.",
    no_args_is_help=True,
    rich_markup_mode=PLAIN_HELP,
)


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
