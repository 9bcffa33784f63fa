"""``epoxi dkim``: make a signing key and check its DNS record."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import dns.exception
import dns.resolver
import typer

from epoxi.cli.common import PLAIN_HELP
from epoxi.cli.show import echo
from epoxi.dkim.keys import generate, load_key, parse_record
from epoxi.errors import ConfigError

dkim_app = typer.Typer(
    help="DKIM signing keys: make one, check its DNS record.",
    no_args_is_help=True,
    rich_markup_mode=PLAIN_HELP,
)


@dkim_app.command("keygen")
def keygen(
    domain: Annotated[str, typer.Option(help="The signing domain (d=).")],
    selector: Annotated[str, typer.Option(help="The selector (s=), e.g. s2026.")],
    kind: Annotated[
        Literal["rsa", "ed25519"], typer.Option("--type", help="rsa (the default) or ed25519.")
    ] = "rsa",
    bits: Annotated[int, typer.Option(help="RSA key size.")] = 2048,
    out: Annotated[
        Path | None, typer.Option(help="Where to write the key (default DOMAIN.SELECTOR.pem).")
    ] = None,
) -> None:
    """Write a new private key (PEM, mode 600) and print the TXT record to publish.

    The last line is the record's text alone, for scripts. Then add to the configuration:
    [[dkim.keys]] with domain, selector and key_file.
    """
    path = out or Path(f"{domain}.{selector}.pem")
    if path.exists():
        echo(f"epoxi: {path} exists; choose another --out or selector", err=True)
        raise typer.Exit(1)
    try:
        pem = generate(kind, bits)
    except ValueError as exc:
        echo(f"epoxi: {exc}", err=True)
        raise typer.Exit(2) from exc
    path.touch(mode=0o600)
    path.write_bytes(pem)
    key = load_key(domain, selector, path)
    echo(f"key written to {path}")
    echo(f"publish this TXT record at {key.dns_name}:")
    echo(key.txt_record())


@dkim_app.command("check")
def check(
    domain: Annotated[str, typer.Argument(help="The signing domain (d=).")],
    selector: Annotated[str, typer.Argument(help="The selector (s=).")],
    key_file: Annotated[
        Path | None, typer.Option(help="The private key (default DOMAIN.SELECTOR.pem).")
    ] = None,
    nameserver: Annotated[
        str | None, typer.Option(help="Ask this DNS server (host or host:port).")
    ] = None,
) -> None:
    """Look the selector's TXT record up and say whether it matches the private key."""
    try:
        key = load_key(domain, selector, key_file or Path(f"{domain}.{selector}.pem"))
    except ConfigError as exc:
        echo(f"epoxi: {exc}", err=True)
        raise typer.Exit(2) from exc
    resolver = dns.resolver.Resolver()
    if nameserver:
        host, _, port = nameserver.partition(":")
        resolver.nameservers, resolver.port = [host], int(port or 53)
    try:
        answer = resolver.resolve(key.dns_name, "TXT")
    except dns.exception.DNSException as exc:
        echo(f"epoxi: no TXT record at {key.dns_name}: {exc}", err=True)
        raise typer.Exit(1) from exc
    published = [b"".join(r.strings).decode("ascii", "replace") for r in answer]
    wanted = key.public_value()
    if any(parse_record(text).get("p") == wanted for text in published):
        echo(f"{key.dns_name}: the record matches {key.path} ({key.algorithm})")
        return
    echo(f"epoxi: {key.dns_name} does not publish this key; publish:", err=True)
    echo(key.txt_record(), err=True)
    raise typer.Exit(1)
