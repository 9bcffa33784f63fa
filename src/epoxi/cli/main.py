"""The ``epoxi`` command: its groups and the server-side commands."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import sys
from typing import Annotated

import typer
import uvloop

from epoxi import __version__
from epoxi.cli.common import PLAIN_HELP, ConfigOption, load
from epoxi.cli.keys import keys_app
from epoxi.cli.logs import configure_logging
from epoxi.cli.remote import queue_app, send, status
from epoxi.cli.show import echo
from epoxi.config import load_settings
from epoxi.errors import ConfigError

app = typer.Typer(
    help="Epoxi, a Mail Transfer Agent.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=PLAIN_HELP,
)
config_app = typer.Typer(
    help="Check configuration files.", no_args_is_help=True, rich_markup_mode=PLAIN_HELP
)
users_app = typer.Typer(
    help="Manage SMTP AUTH users.", no_args_is_help=True, rich_markup_mode=PLAIN_HELP
)
app.add_typer(config_app, name="config")
app.add_typer(users_app, name="users")
app.add_typer(keys_app, name="keys")
app.add_typer(queue_app, name="queue")
app.command()(send)
app.command()(status)


@app.command()
def serve(config: ConfigOption = None) -> None:
    """Run Epoxi in the foreground until SIGTERM or SIGINT.

    Environment variables (EPOXI_SMTP_LISTEN, EPOXI_DATA_DIR, ...) override the file.
    """
    from epoxi.app import Epoxi

    settings = load(config)
    configure_logging(settings.log_level)
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(Epoxi(settings).run(reload=lambda: load_settings(config)))
    except ConfigError as exc:
        echo(f"epoxi: {exc}", err=True)
        raise typer.Exit(2) from exc
    except OSError as exc:  # most often: an address already in use, or not ours to bind
        echo(f"epoxi: cannot start: {exc}", err=True)
        raise typer.Exit(1) from exc


@config_app.command("check")
def config_check(config: ConfigOption = None) -> None:
    """Validate a configuration file (and the EPOXI_* environment) without starting."""
    settings = load(config)
    listeners = ", ".join(f"{lst.address} ({lst.tls})" for lst in settings.smtp.listeners)
    echo(
        f"configuration OK: hostname {settings.hostname}, SMTP on {listeners}, "
        f"data in {settings.data_dir}"
    )


@users_app.command("hash")
def users_hash(
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from standard input.")
    ] = False,
) -> None:
    """Print a password hash for the [users] table of the configuration."""
    from epoxi.reception.auth import hash_password

    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            typer.echo("epoxi: the passwords differ", err=True)
            raise typer.Exit(1)
    if not password:
        typer.echo("epoxi: empty password", err=True)
        raise typer.Exit(1)
    typer.echo(hash_password(password))


@app.command()
def sink(
    listen: Annotated[
        str, typer.Option(help="Address to listen on, host:port.")
    ] = "127.0.0.1:2526",
    tls: Annotated[
        bool, typer.Option(help="Offer STARTTLS with a self-signed certificate.")
    ] = False,
    auth: Annotated[
        list[str] | None, typer.Option(help="Accept AUTH for user:password (repeatable).")
    ] = None,
    slow_delay: Annotated[float, typer.Option(help="Delay of replies to slow-* recipients.")] = 2.0,
) -> None:
    """Run a test SMTP sink that accepts and counts everything.

    Recipients whose local part starts with tempfail-, reject-, quota-, tempfail-data-,
    reject-data-, slow-, disconnect-in-data- or reset-after-data- get that misbehaviour.
    """
    from epoxi.config import parse_hostport
    from epoxi.testing.certs import make_test_tls_context
    from epoxi.testing.sink import run_sink

    host, port = parse_hostport(listen, 2526)
    users = dict(item.split(":", 1) for item in auth or [])
    context = make_test_tls_context(host)[0] if tls else None
    with (
        asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner,
        contextlib.suppress(KeyboardInterrupt),
    ):
        runner.run(
            run_sink(
                host,
                port,
                tls=context,
                auth=users or None,
                auth_plaintext=not tls,
                slow_delay=slow_delay,
            )
        )


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(f"epoxi {__version__}")


def main() -> None:
    app(prog_name="epoxi")
