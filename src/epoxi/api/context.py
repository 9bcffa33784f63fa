"""What the HTTP API needs from the node, handed over by the composition root."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from litestar.connection import ASGIConnection

from epoxi.admin import Admin
from epoxi.api.limits import SendLimits
from epoxi.api.peers import Peers
from epoxi.compose.tracking import Tracker
from epoxi.config import Settings
from epoxi.events.records import Record
from epoxi.events.sink import EventSink
from epoxi.ingest.feedback import Quarantine
from epoxi.message import MessageMeta
from epoxi.sinks.sink import BrokerSink
from epoxi.store.keys import KeyStore
from epoxi.store.platform import ActivityFeed, PlatformStore, Tenant
from epoxi.store.status import StatusStore
from epoxi.store.suppressions import Suppressions
from epoxi.webhooks.outbox import Webhooks
from epoxi.webhooks.provider import ProviderEvents

# returns the Suppression records of the recipients taken off (suppressed)
InjectMany = Callable[[list[tuple[MessageMeta, bytes]]], Awaitable[list[Record]]]


@dataclass
class ApiContext:
    settings: Settings
    inject_many: InjectMany  # commits every message to the spool (fsynced), then queues them
    status: StatusStore
    keys: KeyStore
    admin: Admin
    readiness: Callable[[], dict[str, str]]  # check name -> "ok" or what is wrong
    metrics_text: Callable[[], bytes]
    suppressions: Suppressions
    platform: PlatformStore  # tenants, templates, emails, bulk jobs, analytics
    activity: ActivityFeed  # records on their way to the platform store: flush before reads
    limits: SendLimits  # tenants' send rates and daily recipients
    records: EventSink  # where the API's own records go (opens, clicks, unsubscribes)
    webhooks: Webhooks | None = None  # event webhooks: endpoints and their outbox
    provider_events: ProviderEvents | None = None  # POST /webhooks/{provider}
    sinks: list[BrokerSink] = field(default_factory=list)  # GET /admin/sinks
    quarantine: Quarantine | None = None  # the feedback mailbox's (a bounce domain is set)
    tracker: Tracker | None = None  # [tracking] base_url is set: tracked links can be made
    peers: Peers = field(default_factory=Peers)  # the other workers of this machine, if any
    idempotency_in_flight: set[tuple[str, str]] = field(default_factory=set)
    # tenant -> (when read, the tenant; None: not a platform tenant), for api/sending.py
    tenant_states: dict[str, tuple[float, Tenant | None]] = field(default_factory=dict)


def context(connection: ASGIConnection[Any, Any, Any, Any]) -> ApiContext:
    ctx: ApiContext = connection.app.state.ctx
    return ctx
