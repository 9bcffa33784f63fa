"""``epoxi webhooks``: register endpoints for events, test-fire them, rotate their secrets,
and (operators) see their backlogs, replay or drop them."""

from __future__ import annotations

from typing import Annotated

import typer

from epoxi.api_types import Webhook, WebhookBacklogs, WebhookEvents, WebhookList, WebhookTestFired
from epoxi.cli.client import DEFAULT_URL
from epoxi.cli.common import PLAIN_HELP
from epoxi.cli.remote import AsJson, Key, Url, _api, _time
from epoxi.cli.show import echo, print_json

webhooks_app = typer.Typer(
    help="Event webhooks: endpoints that get each record of your mail as a signed JSON POST.",
    no_args_is_help=True,
    rich_markup_mode=PLAIN_HELP,
)

WebhookId = Annotated[str, typer.Argument(help="The endpoint's id (wh_...; `epoxi webhooks ls`).")]


@webhooks_app.command("add")
def add(
    url: Annotated[str, typer.Argument(help="Where to POST events (http:// or https://).")],
    event: Annotated[
        list[str] | None,
        typer.Option(
            "--event",
            "-e",
            help="An event type to send (repeat; none: every type): delivery, "
            "bounce, transient_failure, expiration, reception, oob, feedback, suppression, ...",
        ),
    ] = None,
    tenant: Annotated[
        str | None, typer.Option(help="Only this tenant's events (an operator's key).")
    ] = None,
    url_: Url = DEFAULT_URL,
    key: Key = None,
    as_json: AsJson = False,
) -> None:
    """Register an endpoint. Prints its id and signing secret: keep the secret, it is shown
    only now (and when rotated). Check each POST's Epoxi-Signature with it (docs/events.md)."""
    body = {"url": url, "events": event or [], **({"tenant": tenant} if tenant else {})}
    with _api(url_, key) as client:
        made = client.typed(Webhook, "POST", "/event-webhooks", json=body)
    if as_json:
        print_json(made)
        return
    echo(f"{made.id}  {made.url}  events: {', '.join(made.events) or 'all'}")
    echo(f"secret: {made.secret}")


@webhooks_app.command("ls")
def ls(url: Url = DEFAULT_URL, key: Key = None, as_json: AsJson = False) -> None:
    """List the endpoints this key may see."""
    with _api(url, key) as client:
        found = client.typed(WebhookList, "GET", "/event-webhooks")
    if as_json:
        print_json(found)
        return
    for hook in found.webhooks:
        tenant = f"  tenant {hook.tenant}" if hook.tenant else ""
        echo(f"{hook.id}  {hook.url}  events: {', '.join(hook.events) or 'all'}{tenant}")
    if not found.webhooks:
        echo("no webhooks")


@webhooks_app.command("rm")
def rm(webhook_id: WebhookId, url: Url = DEFAULT_URL, key: Key = None) -> None:
    """Remove an endpoint and the events waiting for it."""
    with _api(url, key) as client:
        gone = client.typed(Webhook, "DELETE", f"/event-webhooks/{webhook_id}")
    echo(f"removed {gone.id} ({gone.url})")


@webhooks_app.command("test")
def test(webhook_id: WebhookId, url: Url = DEFAULT_URL, key: Key = None) -> None:
    """Send the endpoint a test event (type "test"), signed like every other."""
    with _api(url, key) as client:
        fired = client.typed(
            WebhookTestFired, "POST", f"/event-webhooks/{webhook_id}/test", json={}
        )
    echo(f"test event {fired.event_id} queued for {webhook_id}")


@webhooks_app.command("rotate")
def rotate(webhook_id: WebhookId, url: Url = DEFAULT_URL, key: Key = None) -> None:
    """A new signing secret. POSTs carry both signatures until the old one expires
    (webhooks.rotation_grace, a day by default), so receivers can switch without a gap."""
    with _api(url, key) as client:
        rotated = client.typed(Webhook, "POST", f"/event-webhooks/{webhook_id}/rotate", json={})
    echo(f"secret: {rotated.secret}")
    echo(f"the old secret still signs until {_time(rotated.old_secret_until)} UTC")


@webhooks_app.command("status")
def status(url: Url = DEFAULT_URL, key: Key = None, as_json: AsJson = False) -> None:
    """Operators: each endpoint's waiting events, failures in a row and last error."""
    with _api(url, key) as client:
        found = client.typed(WebhookBacklogs, "GET", "/admin/webhooks")
    if as_json:
        print_json(found)
        return
    for hook in found.webhooks:
        echo(
            f"{hook.id}  {hook.url}  queued {hook.queued} (due {hook.due})"
            f"  failures {hook.failures}  dropped {hook.dropped}"
        )
        if hook.last_error:
            echo(f"    last error {_time(hook.last_error_at)} UTC: {hook.last_error}")
    if not found.webhooks:
        echo("no webhooks")


@webhooks_app.command("replay")
def replay(webhook_id: WebhookId, url: Url = DEFAULT_URL, key: Key = None) -> None:
    """Operators: send an endpoint's waiting events now instead of at their retry time."""
    with _api(url, key) as client:
        done = client.typed(WebhookEvents, "POST", f"/admin/webhooks/{webhook_id}/replay", json={})
    echo(f"{done.events} events of {done.id} due now")


@webhooks_app.command("drop")
def drop(
    webhook_id: WebhookId,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask.")] = False,
    url: Url = DEFAULT_URL,
    key: Key = None,
) -> None:
    """Operators: forget an endpoint's waiting events (they are not sent)."""
    if not yes:
        typer.confirm(f"Drop every waiting event of {webhook_id}?", abort=True)
    with _api(url, key) as client:
        done = client.typed(WebhookEvents, "POST", f"/admin/webhooks/{webhook_id}/drop", json={})
    echo(f"{done.events} events of {done.id} dropped")
