"""What the CLI's command groups share: the --config option and loading settings."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Final

import typer

from epoxi.cli.show import echo
from epoxi.config import Settings, load_settings
from epoxi.errors import ConfigError

# Help texts are plain text: "[users]" is a TOML table there, not Rich markup to swallow.
PLAIN_HELP: Final = None

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="TOML configuration file (see examples/epoxi.toml).",
        exists=False,
        dir_okay=False,
    ),
]


def load(config: Path | None) -> Settings:
    """The settings, or exit 2 with the configuration error on stderr."""
    try:
        return load_settings(config)
    except ConfigError as exc:
        echo(f"epoxi: {exc}", err=True)
        raise typer.Exit(2) from exc
