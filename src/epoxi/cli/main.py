"""The ``epoxi`` command: its groups and the server-side commands."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import sys
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, TypeVar

import typer
import uvloop

from epoxi import __version__
from epoxi.cli.bounce import bounce_app
from epoxi.cli.common import PLAIN_HELP, ConfigOption, load
from epoxi.cli.dkim import dkim_app
from epoxi.cli.keys import keys_app
from epoxi.cli.logs import configure_logging
from epoxi.cli.platform import templates_app, tenants_app
from epoxi.cli.remote import pool_app, queue_app, send, status
from epoxi.cli.shaping import shaping_app
from epoxi.cli.show import echo
from epoxi.cli.sinks import sinks_app
from epoxi.cli.suppressions import suppressions_app
from epoxi.cli.webhooks import webhooks_app
from epoxi.config import load_settings, parse_workers
from epoxi.errors import ConfigError, EpoxiError

T = TypeVar("T")

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
app.add_typer(pool_app, name="pool")
app.add_typer(shaping_app, name="shaping")
app.add_typer(dkim_app, name="dkim")
app.add_typer(webhooks_app, name="webhooks")
app.add_typer(tenants_app, name="tenants")
app.add_typer(templates_app, name="templates")
app.add_typer(bounce_app, name="bounce")
app.add_typer(suppressions_app, name="suppressions")
app.add_typer(sinks_app, name="sinks")
app.command()(send)
app.command()(status)


WorkersOption = Annotated[
    str | None,
    typer.Option(
        "--workers",
        "-w",
        help="Worker processes: a number, or 'auto' for one per core "
        "(default: the 'workers' setting, EPOXI_WORKERS, else auto).",
        show_default=False,
    ),
]


@app.command()
def serve(config: ConfigOption = None, workers: WorkersOption = None) -> None:
    """Run Epoxi in the foreground until SIGTERM or SIGINT.

    With --workers N (N > 1) this process supervises N workers: each is a full Epoxi on its
    own spool shard, all serve the same SMTP and HTTP ports, and one that dies is restarted
    at once. Environment variables (EPOXI_SMTP_LISTEN, EPOXI_DATA_DIR, ...) override the file.
    """
    settings = load(config)
    count = settings.workers if workers is None else _worker_count(workers)
    if count == 1:
        from epoxi.app import Epoxi

        configure_logging(settings.log_level)
        _serve(Epoxi(settings).run(reload=lambda: load_settings(config)))
        return
    from epoxi.supervisor import Supervisor

    configure_logging(settings.log_level, process="supervisor")
    command = [sys.executable, "-m", "epoxi", "worker", *(["-c", str(config)] if config else [])]
    supervisor = Supervisor(settings, count, command, load=lambda: load_settings(config))
    code = _serve(supervisor.run(), loop_factory=asyncio.new_event_loop)
    if code:
        raise typer.Exit(code)


@app.command(hidden=True)
def worker(config: ConfigOption = None) -> None:
    """One worker of `epoxi serve --workers N`, started by that supervisor."""
    from epoxi.app import Epoxi
    from epoxi.workers.placement import Placement, die_with_supervisor

    placement = Placement.from_env()
    if placement is None:
        echo("epoxi: workers are started by `epoxi serve --workers N`", err=True)
        raise typer.Exit(2)
    die_with_supervisor(placement)
    settings = load(config)
    configure_logging(settings.log_level, process=f"worker {placement.index}")
    _serve(Epoxi(settings, placement).run(reload=lambda: load_settings(config)))


def _worker_count(text: str) -> int:
    try:
        count = int(parse_workers(text))
    except ValueError as exc:
        echo(f"epoxi: --workers {text!r}: {exc}", err=True)
        raise typer.Exit(2) from exc
    if count < 1:
        echo("epoxi: --workers must be at least 1", err=True)
        raise typer.Exit(2)
    return count


def _serve(
    main: Coroutine[Any, Any, T],
    loop_factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop,
) -> T:
    """Run the server's main coroutine; a configuration or socket error exits with a line."""
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(main)
    except ConfigError as exc:
        echo(f"epoxi: {exc}", err=True)
        raise typer.Exit(2) from exc
    except (OSError, EpoxiError) as exc:  # an address in use, a spool it cannot open ...
        echo(f"epoxi: cannot start: {exc}", err=True)
        raise typer.Exit(1) from exc


@config_app.command("check")
def config_check(config: ConfigOption = None) -> None:
    """Validate a configuration file (and the EPOXI_* environment) without starting.

    DKIM key files and shaping files are read too."""
    from epoxi.app import dkim_signer, shaping_files
    from epoxi.sinks.sink import check_sinks

    settings = load(config)
    try:
        dkim_signer(settings.dkim)
        shaping_files(settings)
        check_sinks(settings)
    except ConfigError as exc:
        echo(f"epoxi: {exc}", err=True)
        raise typer.Exit(2) from exc
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
