"""Commands that talk to a running Epoxi over its HTTP API: send, status, queue, pool."""

from __future__ import annotations

import base64
import contextlib
import csv
import email.policy
import email.utils
import mimetypes
import sys
from collections.abc import Iterator
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from epoxi.api_types import (
    Pipelines,
    PoolList,
    Queued,
    ReadyQueueInfo,
    SelectorIn,
    SendResponse,
    SuspendRequest,
    WarmupInfo,
    WarmupStateResponse,
)
from epoxi.cli.client import DEFAULT_URL, ApiCallError, ApiClient
from epoxi.cli.common import PLAIN_HELP
from epoxi.cli.show import add_row, echo, line, print_json, show, table
from epoxi.config import parse_duration
from epoxi.events.records import Record

Url = Annotated[
    str,
    typer.Option("--url", envvar="EPOXI_URL", help="Base URL of Epoxi's HTTP API."),
]
Key = Annotated[
    str | None,
    typer.Option("--key", envvar="EPOXI_API_KEY", help="API key (epx_...); none on loopback."),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print the API's JSON answer.")]

queue_app = typer.Typer(
    help="Inspect and steer the queues (like postqueue, postsuper and qshape).",
    no_args_is_help=True,
    rich_markup_mode=PLAIN_HELP,
)

pool_app = typer.Typer(
    help="Egress pools and their sources (suspend a source: `epoxi queue suspend --source`).",
    no_args_is_help=True,
    rich_markup_mode=PLAIN_HELP,
)


@contextlib.contextmanager
def _api(url: str, key: str | None) -> Iterator[ApiClient]:
    """A client whose failures end the command with the reason on stderr and exit 1."""
    try:
        with ApiClient(url, key) as client:
            yield client
    except ApiCallError as exc:
        echo(f"epoxi: {exc}", err=True)
        raise typer.Exit(1) from exc


# --------------------------------------------------------------------- send


def send(
    sender: Annotated[str, typer.Option("--from", help="Sender: addr or 'Name <addr>'.")] = "",
    to: Annotated[list[str] | None, typer.Option("--to", help="Recipient (repeatable).")] = None,
    cc: Annotated[list[str] | None, typer.Option("--cc", help="Cc recipient (repeatable).")] = None,
    bcc: Annotated[list[str] | None, typer.Option(help="Bcc recipient (repeatable).")] = None,
    subject: Annotated[str, typer.Option(help="Subject (a Jinja2 template).")] = "",
    text: Annotated[str | None, typer.Option(help="Plain-text body (a template).")] = None,
    html: Annotated[str | None, typer.Option(help="HTML body (a template).")] = None,
    text_file: Annotated[Path | None, typer.Option(help="Read the text body from a file.")] = None,
    html_file: Annotated[Path | None, typer.Option(help="Read the HTML body from a file.")] = None,
    attach: Annotated[list[Path] | None, typer.Option(help="Attach a file (repeatable).")] = None,
    header: Annotated[
        list[str] | None, typer.Option(help="Extra header 'Name: value' (repeatable).")
    ] = None,
    eml: Annotated[
        Path | None,
        typer.Option(
            help="Send this RFC 5322 file as it is; envelope from --from/--to or its headers."
        ),
    ] = None,
    recipients: Annotated[
        Path | None,
        typer.Option(
            help="CSV of recipients: an 'email' column, other columns become template variables."
        ),
    ] = None,
    batch: Annotated[int, typer.Option(help="Recipients per request with --recipients.")] = 1000,
    tenant: Annotated[str | None, typer.Option(help="Tenant the mail is sent for.")] = None,
    campaign: Annotated[str | None, typer.Option(help="Campaign name.")] = None,
    tag: Annotated[list[str] | None, typer.Option(help="Tag (repeatable).")] = None,
    send_at: Annotated[
        str | None, typer.Option(help="Send later: ISO 8601 time, e.g. 2026-12-01T09:00:00Z.")
    ] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Retrying with the same key sends nothing twice.")
    ] = None,
    url: Url = DEFAULT_URL,
    key: Key = None,
    as_json: AsJson = False,
) -> None:
    """Send a message to each recipient, or an .eml file as it is.

    \b
    Examples:
      epoxi send --from me@example.com --to you@example.net --subject Hi --text Hello
      epoxi send --from me@example.com --recipients list.csv \\
          --subject "Hi {{ name }}" --text-file body.txt
      epoxi send --eml message.eml
    """
    given = {"tenant": tenant, "campaign": campaign, "send_at": send_at}
    extra: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    with _api(url, key) as client:
        if eml is not None:
            result = _send_eml(client, eml, sender, to or [], extra, idempotency_key)
        else:
            message = {
                "from": sender,
                "to": to or [],
                "cc": cc or [],
                "bcc": bcc or [],
                "subject": subject,
                "text": text_file.read_text() if text_file else text,
                "html": html_file.read_text() if html_file else html,
                "headers": _headers(header or []),
                "attachments": [_attachment(path) for path in attach or []],
            }
            if not sender:
                raise typer.BadParameter("--from is required", param_hint="--from")
            if tag:
                extra["tags"] = tag
            if recipients is not None:
                result = _send_csv(client, message, recipients, batch, extra, idempotency_key)
            else:
                result = client.send({"message": message, **extra}, idempotency_key)
    if as_json:
        print_json(result)
        return
    queued = table("id", "recipient", title=f"{result.count} messages queued")
    for item in result.messages[:50]:
        add_row(queued, item.id, item.recipient)
    show(queued)
    if result.count > 50:
        line(f"... and {result.count - 50} more (use --json for all)")


def _send_eml(
    client: ApiClient,
    path: Path,
    sender: str,
    to: list[str],
    extra: dict[str, Any],
    idempotency_key: str | None,
) -> Any:
    content = path.read_bytes()
    headers = BytesHeaderParser(policy=email.policy.compat32).parsebytes(content)
    if not sender:
        sender = email.utils.parseaddr(headers.get("From", ""))[1]
    if not to:
        fields = headers.get_all("To", []) + headers.get_all("Cc", [])
        to = [addr for _, addr in email.utils.getaddresses(fields) if addr]
    if not to:
        raise typer.BadParameter("no recipients: give --to or a To header", param_hint="--to")
    request = {"from": sender, "to": to, "content": content.decode("utf-8", "replace"), **extra}
    return client.send_raw(request, idempotency_key)


def _send_csv(
    client: ApiClient,
    message: dict[str, Any],
    path: Path,
    batch: int,
    extra: dict[str, Any],
    idempotency_key: str | None,
) -> SendResponse:
    rows = list(_csv_rows(path))
    queued: list[Queued] = []
    with Progress(
        TextColumn("[bold]sending"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as progress:
        task = progress.add_task("send", total=len(rows))
        for number, start in enumerate(range(0, len(rows), batch)):
            chunk = rows[start : start + batch]
            request = {
                "message": {
                    **message,
                    "to": [address for address, _ in chunk],
                    "data": dict(chunk),
                },
                **extra,
            }
            key = f"{idempotency_key}-{number}" if idempotency_key else None
            queued += client.send(request, key).messages
            progress.advance(task, len(chunk))
    return SendResponse(count=len(queued), messages=queued)


def _csv_rows(path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        column = next((c for c in fields if c.strip().lower() in ("email", "address")), None)
        if column is None:
            raise typer.BadParameter(
                f"{path} needs an 'email' column (has: {', '.join(fields)})",
                param_hint="--recipients",
            )
        for row in reader:
            address = row.pop(column, "").strip()
            if address:
                yield address, {k: v for k, v in row.items() if k}


def _headers(items: list[str]) -> dict[str, str]:
    headers = {}
    for item in items:
        name, colon, value = item.partition(":")
        if not colon:
            raise typer.BadParameter(f"expected 'Name: value', got {item!r}", param_hint="--header")
        headers[name.strip()] = value.strip()
    return headers


def _attachment(path: Path) -> dict[str, str]:
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return {
        "filename": path.name,
        "content_type": content_type,
        "content": base64.b64encode(path.read_bytes()).decode(),
    }


# --------------------------------------------------------------------- status


def status(
    message_id: Annotated[str, typer.Argument(help="The id the send call returned.")],
    url: Url = DEFAULT_URL,
    key: Key = None,
    as_json: AsJson = False,
) -> None:
    """Show a message's state, its recipients and its history."""
    with _api(url, key) as client:
        found = client.status(message_id)
    if as_json:
        print_json(found)
        return
    line(
        found.id,
        f" {found.state}  from <{found.sender}>  attempts {found.attempts}  {found.last_response}",
        bold_first=True,
    )
    recipients = table("recipient", "state", "attempts", "last response")
    for item in found.recipients:
        add_row(recipients, item.recipient, item.state, item.attempts, item.last_response)
    show(recipients)
    events = table("time", "event", "recipient", "detail", title="history")
    for event in found.events:
        response = event.response
        detail = (
            " ".join(str(v) for v in (response.code, response.enhanced, response.text) if v)
            if response
            else event.reason or (f"DKIM: {event.dkim}" if event.dkim else "")
        )
        add_row(
            events,
            _time(event.timestamp),
            event.type.value,
            event.recipient or ",".join(event.recipients),
            "\n".join(part for part in (detail, _path(event)) if part),
        )
    show(events)


def _path(event: Record) -> str:
    """Which egress source (and pool) an attempt left from, the server that answered, and
    the TLS it had."""
    if not event.source:
        return ""
    pool = f" (pool {event.pool})" if event.pool else ""
    to = f" to {event.peer_address}" if event.peer_address else ""
    tls = f"\nTLS: {event.tls}" if event.tls else ""
    return f"from {event.source}{pool}{to}{tls}"


def _time(timestamp: float | None) -> str:
    if not timestamp:
        return ""
    from datetime import UTC, datetime

    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S")


# --------------------------------------------------------------------- queue


Target = Annotated[str | None, typer.Option(help="A recipient domain.")]
Site = Annotated[str | None, typer.Option(help="A site: the MX host set, as in `queue ls`.")]
Tenant = Annotated[str | None, typer.Option(help="A tenant.")]
Campaign = Annotated[str | None, typer.Option(help="A campaign.")]
Queue = Annotated[str | None, typer.Option(help="A scheduled queue: campaign:tenant@domain.")]
Source = Annotated[
    str | None, typer.Option(help="An egress source (delivery.sources): stops its ready queues.")
]


MessageIds = Annotated[list[str] | None, typer.Option("--id", help="A message id (repeatable).")]
IdsFile = Annotated[
    Path | None, typer.Option(help="A file of message ids, one per line ('-': stdin).")
]


def _ids(message_ids: list[str] | None, ids_file: Path | None) -> list[str]:
    return list(message_ids or []) + (_read_ids(ids_file) if ids_file else [])


def _selector(**fields: str | None) -> dict[str, str]:
    return {k: v for k, v in fields.items() if v}


@queue_app.command("ls")
def queue_ls(url: Url = DEFAULT_URL, key: Key = None, as_json: AsJson = False) -> None:
    """List every scheduled and ready queue with counts, due times and connections."""
    with _api(url, key) as client:
        _show_pipelines(client.pipelines(), as_json)


@queue_app.command("show")
def queue_show(
    routing_key: Annotated[str, typer.Argument(help="A domain, a site or a ready queue name.")],
    url: Url = DEFAULT_URL,
    key: Key = None,
    as_json: AsJson = False,
) -> None:
    """Show the queues of one domain or site."""
    with _api(url, key) as client:
        _show_pipelines(client.pipelines(routing_key), as_json)


def _show_pipelines(found: Pipelines, as_json: bool) -> None:
    if as_json:
        print_json(found)
        return
    totals = found.totals
    line(
        f"scheduled {totals.scheduled}  held {totals.held}  ready {totals.ready}  "
        f"connections {totals.connections}"
    )
    scheduled = table("queue", "scheduled", "held", "next due", "suspended", title="scheduled")
    for q in found.scheduled:
        add_row(scheduled, q.name, q.scheduled, q.held, _time(q.next_due), q.suspended)
    show(scheduled)
    ready = table(
        "ready queue",
        "queued",
        "connections",
        "attempts",
        "per minute",
        "suspended",
        "last error",
        title="ready",
    )
    for r in found.ready:
        add_row(
            ready,
            r.name,
            r.queued,
            f"{r.connections}/{r.connection_limit}",
            r.deliveries,
            _per_minute(r),
            r.suspended,
            r.last_error,
        )
    show(ready)
    if found.suspensions:
        suspensions = table("target", "value", "reason", "until", title="suspensions")
        for s in found.suspensions:
            value = f"{s.value} on {s.site}" if s.site else s.value
            add_row(suspensions, s.target, value, s.reason, _time(s.until) or "resumed")
        show(suspensions)


def _per_minute(ready: ReadyQueueInfo) -> str:
    """Attempts in the last minute, and the rate limit: configured, and adaptive when it is."""
    limits = [f"max {ready.max_message_rate}"] if ready.max_message_rate else []
    limits += [f"now {ready.adaptive_message_rate}"] if ready.adaptive_message_rate else []
    return f"{ready.attempts_last_minute}" + (f" ({', '.join(limits)})" if limits else "")


@queue_app.command("suspend")
def queue_suspend(
    domain: Target = None,
    site: Site = None,
    tenant: Tenant = None,
    campaign: Campaign = None,
    queue: Queue = None,
    source: Source = None,
    reason: Annotated[str, typer.Option(help="Why; shown in records and `queue ls`.")] = "",
    duration: Annotated[
        str | None, typer.Option(help="How long, e.g. 30m or 2h; default: until resumed.")
    ] = None,
    url: Url = DEFAULT_URL,
    key: Key = None,
    as_json: AsJson = False,
) -> None:
    """Hold mail for one domain, site, source, tenant, campaign or queue."""
    target = _selector(
        domain=domain, site=site, tenant=tenant, campaign=campaign, queue=queue, source=source
    )
    try:
        seconds = parse_duration(duration) if duration else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--duration") from exc
    request = SuspendRequest(**target, reason=reason, duration=seconds)
    with _api(url, key) as client:
        result = client.suspend(request)
    if as_json:
        print_json(result)
    else:
        until = _time(result.until) or "resumed"
        line(f"suspended {result.target} {result.value} until {until}")


@queue_app.command("resume")
def queue_resume(
    domain: Target = None,
    site: Site = None,
    tenant: Tenant = None,
    campaign: Campaign = None,
    queue: Queue = None,
    source: Source = None,
    url: Url = DEFAULT_URL,
    key: Key = None,
    as_json: AsJson = False,
) -> None:
    """Lift a suspension (name the same target it was made with)."""
    target = _selector(
        domain=domain, site=site, tenant=tenant, campaign=campaign, queue=queue, source=source
    )
    with _api(url, key) as client:
        result = client.resume(target)
    if as_json:
        print_json(result)
    else:
        line(f"resumed {result.target} {result.value}: {result.released} released")


@queue_app.command("bounce")
def queue_bounce(
    domain: Target = None,
    site: Site = None,
    tenant: Tenant = None,
    campaign: Campaign = None,
    queue: Queue = None,
    message_id: MessageIds = None,
    ids_file: IdsFile = None,
    reason: Annotated[str, typer.Option(help="Why; written in each AdminBounce record.")] = "",
    url: Url = DEFAULT_URL,
    key: Key = None,
    as_json: AsJson = False,
) -> None:
    """Remove matching queued messages (no DSN), each with an AdminBounce record."""
    target = _selector(domain=domain, site=site, tenant=tenant, campaign=campaign, queue=queue)
    with _api(url, key) as client:
        _act_on_selection("bounce", target, _ids(message_id, ids_file), reason, client, as_json)


@queue_app.command("retry")
def queue_retry(
    domain: Target = None,
    site: Site = None,
    tenant: Tenant = None,
    campaign: Campaign = None,
    queue: Queue = None,
    message_id: MessageIds = None,
    ids_file: IdsFile = None,
    url: Url = DEFAULT_URL,
    key: Key = None,
    as_json: AsJson = False,
) -> None:
    """Make matching deferred messages due now (none named: every deferred message)."""
    target = _selector(domain=domain, site=site, tenant=tenant, campaign=campaign, queue=queue)
    with _api(url, key) as client:
        _act_on_selection("retry", target, _ids(message_id, ids_file), "", client, as_json)


def _act_on_selection(
    action: str,
    target: dict[str, str],
    ids: list[str],
    reason: str,
    client: ApiClient,
    as_json: bool,
) -> None:
    """One call for the target, or one per message id (with a progress bar)."""
    selections = [SelectorIn(**target, id=message_id, reason=reason) for message_id in ids] or [
        SelectorIn(**target, reason=reason)
    ]
    count_key = "bounced" if action == "bounce" else "retried"
    total = 0
    with _progress(action, len(selections)) as advance:
        for selection in selections:
            if action == "bounce":
                total += client.bounce(selection).bounced
            else:
                total += client.retry(selection).retried
            advance()
    if as_json:
        print_json({count_key: total})
    else:
        line(f"{count_key} {total}")


def _read_ids(path: Path) -> list[str]:
    text = sys.stdin.read() if str(path) == "-" else path.read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


class _progress:
    """A progress bar on stderr when there are many calls to make."""

    def __init__(self, label: str, total: int) -> None:
        self.progress = (
            Progress(
                TextColumn(f"[bold]{label}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            if total > 1
            else None
        )
        self.total = total

    def __enter__(self) -> Any:
        if self.progress is None:
            return lambda: None
        self.progress.start()
        task = self.progress.add_task("", total=self.total)
        return lambda: self.progress.advance(task) if self.progress else None

    def __exit__(self, *_: object) -> None:
        if self.progress is not None:
            self.progress.stop()


@queue_app.command("message")
def queue_message(
    message_id: Annotated[str, typer.Argument(help="A queued message's id.")],
    url: Url = DEFAULT_URL,
    key: Key = None,
    as_json: AsJson = False,
) -> None:
    """Show a queued message: envelope, headers, where its jobs wait and their attempts."""
    with _api(url, key) as client:
        found = client.admin_message(message_id)
    if as_json:
        print_json(found)
        return
    meta = found.meta
    line(meta.id, f" from <{meta.sender}> to {', '.join(meta.recipients)}", bold_first=True)
    for name, value in found.headers:
        line(f"  {name}: {value}")
    jobs = table("domain", "where", "attempts", "due", "queue", "site")
    for job in found.jobs:
        add_row(jobs, job.domain, job.where, job.attempts, _time(job.due), job.queue, job.site)
    show(jobs)


# --------------------------------------------------------------------- pool


@pool_app.command("ls")
def pool_ls(url: Url = DEFAULT_URL, key: Key = None, as_json: AsJson = False) -> None:
    """List each pool's sources: weight, address and EHLO name, state, and the last ten
    minutes' recipients sent, deferred and bounced and connections made and failed."""
    with _api(url, key) as client:
        found = client.typed(PoolList, "GET", "/admin/pools")
    if as_json:
        print_json(found)
        return
    for pool in found.pools:
        notes = [
            f"fallback {pool.fallback}" if pool.fallback else "",
            "default" if pool.default else "",
        ]
        notes += [f"tenants {', '.join(pool.tenants)}"] if pool.tenants else []
        warming = any(s.warmup is not None for s in pool.sources)
        sources = table(
            "source",
            "weight",
            "bind / ehlo",
            "state",
            "sent/deferred/bounced",
            "connects/failed",
            "last error",
            *(["warm-up today"] if warming else []),
            title=" ".join([pool.name, *(f"({n})" for n in notes if n)]),
        )
        for s in pool.sources:
            warmup = [_warmup_text(s.warmup) if s.warmup else ""] if warming else []
            add_row(
                sources,
                s.name,
                s.weight,
                f"{s.bind or 'any'} {s.ehlo or '(hostname)'}" + (f" via {s.hop}" if s.hop else ""),
                s.state,
                f"{s.delivered}/{s.deferred}/{s.bounced}",
                f"{s.connections}/{s.connection_failures}",
                f"{_time(s.last_error_at)} {s.last_error}" if s.last_error else "",
                *warmup,
            )
        show(sources)


def _warmup_text(warmup: WarmupInfo) -> str:
    """One cell: "standard day 3/14: 512/800 sent (google 100/400); paused: why"."""
    if warmup.over:
        head = f"{warmup.profile} over (day {warmup.day}): {warmup.sent_today} sent"
    else:
        allowed = warmup.allowed_today if warmup.allowed_today is not None else "-"
        head = f"{warmup.profile} day {warmup.day}/{warmup.last_day}: "
        head += f"{warmup.sent_today}/{allowed} sent"
    providers = [
        f"{p.name} {p.sent}/{p.allowed if p.allowed is not None else '-'}"
        for p in warmup.providers
        if p.sent or p.allowed is not None
    ]
    text = head + (f" ({', '.join(providers)})" if providers else "")
    text += f"; deferred {warmup.deferral_rate:.0%}, bounced {warmup.bounce_rate:.0%}"
    return text + (f"; PAUSED: {warmup.paused_reason}" if warmup.paused else "")


warmup_app = typer.Typer(
    help="Pause or resume a source's IP warm-up (its progress: `epoxi pool ls`).",
    no_args_is_help=True,
    rich_markup_mode=PLAIN_HELP,
)
pool_app.add_typer(warmup_app, name="warmup")
WarmupSource = Annotated[str, typer.Argument(help="The source whose warm-up it is.")]


@warmup_app.command("pause")
def warmup_pause(
    source: WarmupSource,
    reason: Annotated[str, typer.Option(help="Why; shown in `pool ls`.")] = "",
    url: Url = DEFAULT_URL,
    key: Key = None,
    as_json: AsJson = False,
) -> None:
    """Pause a source's warm-up: its mail waits (or spills) until resumed."""
    with _api(url, key) as client:
        found = client.typed(
            WarmupStateResponse, "POST", f"/admin/warmup/{source}/pause", json={"reason": reason}
        )
    _show_warmup_state(found, as_json)


@warmup_app.command("resume")
def warmup_resume(
    source: WarmupSource, url: Url = DEFAULT_URL, key: Key = None, as_json: AsJson = False
) -> None:
    """Resume a source's warm-up, paused by itself or by an operator."""
    with _api(url, key) as client:
        found = client.typed(WarmupStateResponse, "POST", f"/admin/warmup/{source}/resume", json={})
    _show_warmup_state(found, as_json)


def _show_warmup_state(found: WarmupStateResponse, as_json: bool) -> None:
    if as_json:
        print_json(found)
    elif found.paused:
        line(f"warm-up of {found.source} paused: {found.paused_reason}")
    else:
        line(f"warm-up of {found.source} running")
