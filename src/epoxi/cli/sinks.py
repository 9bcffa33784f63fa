"""``epoxi sinks``: the broker sinks of a running node (``[[events.sinks]]``)."""

from __future__ import annotations

import typer

from epoxi.api_types import SinkInfo, SinkList
from epoxi.cli.client import DEFAULT_URL
from epoxi.cli.common import PLAIN_HELP
from epoxi.cli.remote import AsJson, Key, Url, _api, _time
from epoxi.cli.show import add_row, echo, print_json, show, table

sinks_app = typer.Typer(
    help="Broker sinks: the node's events to RabbitMQ, NATS JetStream and Redis Streams.",
    no_args_is_help=True,
    rich_markup_mode=PLAIN_HELP,
)


@sinks_app.command("ls")
def ls(url: Url = DEFAULT_URL, key: Key = None, as_json: AsJson = False) -> None:
    """List each sink over all the node's workers: its broker and filter, the workers
    connected, the events waiting in the backlogs (of each one's limit), dropped and
    published since start, and the last error."""
    with _api(url, key) as client:
        found = client.typed(SinkList, "GET", "/admin/sinks")
    if as_json:
        print_json(found)
        return
    if not found.sinks:
        echo("no sinks ([[events.sinks]] in the configuration)")
        return
    columns = ("sink", "kind", "url", "filter", "connected", "backlog", "dropped", "published")
    sinks = table(*columns, "last error")
    for sink in found.sinks:
        add_row(
            sinks,
            sink.name,
            sink.kind,
            sink.url,
            _filter(sink),
            f"{sink.connected}/{sink.workers}",
            f"{sink.backlog}/{sink.backlog_limit}",
            sink.dropped,
            sink.published,
            f"{_time(sink.last_error_at)} {sink.last_error}" if sink.last_error else "",
        )
    show(sinks)


def _filter(sink: SinkInfo) -> str:
    types = ", ".join(sink.types) or "all types"
    return f"{types}; tenants {', '.join(sink.tenants)}" if sink.tenants else types
