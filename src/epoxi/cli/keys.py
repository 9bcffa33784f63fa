"""``epoxi keys``: API keys, kept hashed in the store of the data dir (works while serving)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import typer

from epoxi.cli.common import PLAIN_HELP, ConfigOption, load
from epoxi.cli.show import add_row, echo, print_json, show, table
from epoxi.store import KeyStore, Scope, store_path

keys_app = typer.Typer(
    help="Create, list and revoke API keys (kept hashed in the data dir).",
    no_args_is_help=True,
    rich_markup_mode=PLAIN_HELP,
)


def _store(config: ConfigOption) -> KeyStore:
    return KeyStore(store_path(load(config).data_dir))


@keys_app.command("create")
def create(
    name: Annotated[str, typer.Option(help="What the key is for, e.g. the application.")],
    scope: Annotated[
        list[Scope],
        typer.Option(
            help="send (inject mail), read (status, metrics), admin (queues); repeatable."
        ),
    ],
    tenant: Annotated[
        str, typer.Option(help="Bind the key to a tenant: it sends and reads for it only.")
    ] = "",
    config: ConfigOption = None,
) -> None:
    """Create a key and print it: it is shown this once, and only its hash is kept."""
    with _store(config) as store:
        key, secret = store.create(name, set(scope), tenant)
    typer.echo(secret)
    echo(
        f"created key {key.id} ({', '.join(sorted(s.value for s in key.scopes))}"
        f"{', tenant ' + tenant if tenant else ''}); store it now, it cannot be shown again",
        err=True,
    )


@keys_app.command("list")
def list_keys(
    revoked: Annotated[bool, typer.Option("--revoked", help="Show revoked keys too.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    config: ConfigOption = None,
) -> None:
    """List keys (never their secrets)."""
    with _store(config) as store:
        keys = store.list(include_revoked=revoked)
    if as_json:
        rows = [
            {
                "id": k.id,
                "name": k.name,
                "scopes": sorted(s.value for s in k.scopes),
                "tenant": k.tenant,
                "created_at": k.created_at,
                "revoked_at": k.revoked_at,
            }
            for k in keys
        ]
        print_json(rows)
        return
    listed = table("id", "name", "scopes", "tenant", "created", "revoked")
    for k in keys:
        add_row(
            listed,
            k.id,
            k.name,
            ",".join(sorted(s.value for s in k.scopes)),
            k.tenant,
            _date(k.created_at),
            _date(k.revoked_at),
        )
    show(listed)


@keys_app.command("revoke")
def revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (from `keys list`) or the key.")],
    config: ConfigOption = None,
) -> None:
    """Revoke a key: the API refuses it from the next request on."""
    with _store(config) as store:
        if not store.revoke(key_id):
            echo(f"epoxi: no active key {key_id!r}", err=True)
            raise typer.Exit(1)
    echo(f"revoked {key_id}")


def _date(timestamp: float | None) -> str:
    if timestamp is None:
        return ""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M")
