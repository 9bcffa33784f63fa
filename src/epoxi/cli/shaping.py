"""``epoxi shaping``: check shaping files before a running Epoxi takes them; ask a running one
what a domain's shaping is, what automation is in force, lift an action, reload the files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from epoxi.api_types import ShapingReloaded, ShapingResolution, ShapingState
from epoxi.cli.client import DEFAULT_URL
from epoxi.cli.common import PLAIN_HELP
from epoxi.cli.remote import AsJson, Key, Url, _api, _time
from epoxi.cli.show import add_row, echo, print_json, show, table
from epoxi.errors import ConfigError
from epoxi.shaping.automation import Automated
from epoxi.shaping.files import ShapingFiles, load_file

shaping_app = typer.Typer(
    help="Traffic shaping files: limits per provider, site, domain and egress source.",
    no_args_is_help=True,
    rich_markup_mode=PLAIN_HELP,
)


@shaping_app.command("check")
def check(
    files: Annotated[
        list[Path], typer.Argument(help="Shaping files (TOML), layered in the order given.")
    ],
) -> None:
    """Validate shaping files; exit 1 naming the file and key of the first problem.

    Blocks: [default], [providers.NAME] (match_mx_suffix, match_domains), [sites."SITE"],
    [domains."DOMAIN"], each with an optional sources.NAME table, [[...automation]] rules
    and an [...adaptive_rate] table; a later file merges over an earlier one, or replaces a
    block with replace_base = true. See docs/shaping.md.
    """
    try:
        parsed = [(str(path), load_file(path)) for path in files]
    except ConfigError as exc:
        echo(f"epoxi: {exc}", err=True)
        raise typer.Exit(1) from exc
    layered = ShapingFiles(parsed)
    for origin, shaping in parsed:
        echo(
            f"{origin}: OK ({len(shaping.providers)} providers, {len(shaping.sites)} sites, "
            f"{len(shaping.domains)} domains)"
        )
    if len(parsed) > 1:
        echo(f"layered in this order: {' -> '.join(layered.origins)}")


@shaping_app.command("resolve")
def resolve(
    domain: Annotated[str, typer.Argument(help="A recipient domain, e.g. gmail.com.")],
    source: Annotated[
        str | None, typer.Option("--source", help="Egress source: adds its sources.NAME layers.")
    ] = None,
    url: Url = DEFAULT_URL,
    key: Key = None,
    as_json: AsJson = False,
) -> None:
    """Print the effective shaping of DOMAIN on the running Epoxi, each setting with the layer
    it came from (merge order: built-in, default, provider, site, domain, source, automation),
    then its automation rules, adaptive rate and active actions. The domain is routed (MX
    looked up) as mail to it would be, so its provider is matched by MX host too."""
    params = {"domain": domain, **({"source": source} if source else {})}
    with _api(url, key) as client:
        found = client.typed(ShapingResolution, "GET", "/admin/shaping/resolve", params=params)
    if as_json:
        print_json(found)
        return
    echo(f"domain:   {found.domain}")
    echo(f"site:     {found.site}")
    echo(f"provider: {found.provider or '(none)'}")
    if found.source:
        echo(f"source:   {found.source}")
    echo("")
    width = max(len(s.name) for s in found.settings)
    for setting in found.settings:  # one line each, never cut: scripts and diffs read them
        value = json.dumps(setting.value)
        echo(f"{setting.name:<{width}} = {value:<16} # {setting.origin}")
    if found.rules:
        rules = table("rule", "regex", "action", "trigger", "duration")
        for rule in found.rules:
            add_row(rules, rule.rule, rule.regex, rule.action, rule.trigger, f"{rule.duration:g}s")
        show(rules)
    if found.adaptive_rate:
        parts = ", ".join(f"{k}={v}" for k, v in found.adaptive_rate.items() if k != "regex")
        echo(f"adaptive rate: {parts}")
    _show_actions(found.active)


@shaping_app.command("active")
def active(url: Url = DEFAULT_URL, key: Key = None, as_json: AsJson = False) -> None:
    """List the actions traffic shaping automation has in force (suspensions, bounces,
    changed settings), each until it ends by itself, and the adaptive rates of paths that
    have backed off. Lift one early with `epoxi shaping lift ID`."""
    with _api(url, key) as client:
        found = client.typed(ShapingState, "GET", "/admin/shaping")
    if as_json:
        print_json(found)
        return
    _show_actions(found.active)
    if found.adaptive:
        rates = table("source", "site", "configured", "current", "floor", "ceiling")
        for rate in found.adaptive:
            add_row(
                rates,
                rate.source,
                rate.site,
                rate.configured or "-",
                rate.current,
                rate.floor,
                rate.ceiling,
            )
        show(rates)
    if not found.active and not found.adaptive:
        echo("no automation in force")


@shaping_app.command("lift")
def lift(
    action_id: Annotated[str, typer.Argument(help="The action's id (`epoxi shaping active`).")],
    url: Url = DEFAULT_URL,
    key: Key = None,
) -> None:
    """End an automation action now: its suspension lifts, its bounces stop, its changed
    setting goes back. Every worker follows within a second."""
    with _api(url, key) as client:
        lifted = client.typed(Automated, "DELETE", f"/admin/shaping/automation/{action_id}")
    echo(f"lifted {lifted.id}: {lifted.describe()}")


@shaping_app.command("reload")
def reload(url: Url = DEFAULT_URL, key: Key = None) -> None:
    """Make the running Epoxi read its shaping files again now (it also notices edits by
    itself within shaping_watch_interval). A file that does not validate is refused, with the
    reason, and the running limits stay."""
    with _api(url, key) as client:
        done = client.typed(ShapingReloaded, "POST", "/admin/shaping/reload", json={})
    echo(f"applied in {done.workers} worker(s): {', '.join(done.files) or 'no files'}")


def _show_actions(actions: list[Automated]) -> None:
    """Each action as a few lines (ids and rule names are long: a table would cut them)."""
    for action in actions:
        what = action.action + (f" {action.setting}={action.value}" if action.setting else "")
        echo(f"{action.id}  {what} on {action.scope} until {_time(action.until)} UTC")
        echo(f"    rule:  {action.rule} (trigger {action.trigger})")
        echo(f"    reply: {action.reply}")
