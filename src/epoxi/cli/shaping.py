"""``epoxi shaping``: check shaping files before a running Epoxi takes them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from epoxi.cli.common import PLAIN_HELP
from epoxi.cli.show import echo
from epoxi.errors import ConfigError
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
    [domains."DOMAIN"], each with an optional sources.NAME table; a later file merges over
    an earlier one, or replaces a block with replace_base = true.
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
