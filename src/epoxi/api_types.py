"""The HTTP API's types: request and response bodies, and the admin snapshots.

msgspec structs: the daemon serves them (they are the OpenAPI schema) and the CLI decodes
its replies into the same classes, so both sides agree by construction.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from epoxi.message import LABEL_PATTERN, MessageMeta
from epoxi.queue.suspensions import SuspendKind
from epoxi.shaping.automation import Automated
from epoxi.store.platform import (
    BulkError,
    BulkState,
    TemplateSummary,
    TemplateVersion,
    Tenant,
    TenantStatus,
)
from epoxi.store.suppressions import Reason, Suppression

Address = Annotated[str, Meta(min_length=3, max_length=998, examples=["user@example.com"])]
Short = Annotated[str, Meta(max_length=200, pattern=r"^[^\x00-\x1f\x7f]*$")]  # no controls
Label = Annotated[
    str,
    Meta(
        pattern=LABEL_PATTERN,
        description="1-100 letters, digits, '.', '_', '+' or '-' (as X-Epoxi-Tenant over SMTP)",
        examples=["acme"],
    ),
]


Priority = Annotated[
    int,
    Meta(
        ge=-100,
        le=100,
        description="higher is sent first from each ready queue (as X-Epoxi-Priority over "
        "SMTP); without it, the tenant's priority, else the destination's, else 0",
        examples=[50],
    ),
]


class Strict(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A request body: an unknown field is an error, not ignored."""


class AttachmentIn(Strict):
    filename: Annotated[str, Meta(min_length=1, max_length=255)]
    content: Annotated[str, Meta(description="the file, base64-encoded")]
    content_type: Annotated[str, Meta(max_length=255)] = "application/octet-stream"


class MessageIn(Strict):
    from_: Address = msgspec.field(name="from")
    to: Annotated[list[Address], Meta(max_length=100_000)] = msgspec.field(default_factory=list)
    cc: Annotated[list[Address], Meta(max_length=1000)] = msgspec.field(default_factory=list)
    bcc: Annotated[list[Address], Meta(max_length=1000)] = msgspec.field(default_factory=list)
    reply_to: Address | None = None
    subject: Annotated[str, Meta(max_length=998, description="a Jinja2 template")] = ""
    text: Annotated[str | None, Meta(description="a Jinja2 template")] = None
    html: Annotated[str | None, Meta(description="a Jinja2 template; values are escaped")] = None
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    attachments: list[AttachmentIn] = msgspec.field(default_factory=list)
    data: Annotated[
        dict[str, dict[str, Any]],
        Meta(description="template variables per recipient address"),
    ] = msgspec.field(default_factory=dict)


class SendRequest(Strict):
    """One message per recipient (to, cc and bcc), each rendered with its own ``data``."""

    message: MessageIn
    ip_pool: Short | None = None
    tenant: Label | None = None
    campaign: Label | None = None
    tags: Annotated[list[Short], Meta(max_length=20)] = msgspec.field(default_factory=list)
    metadata: dict[str, str] = msgspec.field(default_factory=dict)
    send_at: datetime | None = None
    priority: Priority | None = None


class CancelResponse(msgspec.Struct, kw_only=True):
    id: str
    cancelled: int  # recipients taken back


class RawRequest(Strict):
    """An RFC 5322 message and its envelope; one message for all recipients, as over SMTP."""

    from_: Annotated[str, Meta(max_length=998, description='envelope sender; "" for <>')] = (
        msgspec.field(name="from")
    )
    to: Annotated[list[Address], Meta(min_length=1, max_length=10_000)]
    content: Annotated[str, Meta(min_length=1, description="the message, headers and body")]
    ip_pool: Short | None = None
    tenant: Label | None = None
    campaign: Label | None = None
    metadata: dict[str, str] = msgspec.field(default_factory=dict)
    send_at: datetime | None = None
    priority: Priority | None = None


class Queued(msgspec.Struct):
    id: str
    recipient: str


class Suppressed(msgspec.Struct):
    """A recipient not sent to: it is on the tenant's suppression list (or the global one)."""

    id: str  # the message it was taken off (not spooled if it had no other recipient)
    recipient: str
    reason: str  # why it is on the list: bounce, complaint, unsubscribe, manual


class SendResponse(msgspec.Struct, kw_only=True):
    count: int  # messages queued (recipients of POST /messages/raw)
    messages: list[Queued]
    idempotency_reused: bool = False
    suppressed: list[Suppressed] = msgspec.field(default_factory=list)


# --------------------------------------------------------------------- suppression lists

ListName = Annotated[
    str,
    Meta(
        pattern=r"^(?:\*|[A-Za-z0-9][A-Za-z0-9._+-]{0,99})$",
        description="a tenant, or * for the operator's global list (an admin key's only)",
        examples=["acme"],
    ),
]


class SuppressionIn(Strict):
    address: Address
    tenant: ListName | None = None  # a tenant-bound key's own tenant when not given
    reason: Reason = Reason.MANUAL
    detail: Short = ""


class SuppressionPage(msgspec.Struct, kw_only=True):
    suppressions: list[Suppression]
    next: str | None = None  # pass as ``after`` for the next page; None: this was the last


class SuppressionsAdded(msgspec.Struct, kw_only=True):
    added: int  # new on their list
    already: int  # listed before (each keeps its first reason and time)
    suppressions: list[Suppression]  # those added


class SuppressionRemoved(msgspec.Struct, kw_only=True):
    tenant: str
    address: str
    removed: bool


class SuspendRequest(Strict):
    """Exactly one of the targets; ``duration`` in seconds (none: until resumed)."""

    domain: Short | None = None
    site: Annotated[str, Meta(max_length=4000)] | None = None
    tenant: Label | None = None
    campaign: Label | None = None
    queue: Short | None = None
    source: Short | None = None
    reason: Short = ""
    duration: Annotated[float, Meta(gt=0, le=365 * 86400)] | None = None

    def target(self) -> tuple[SuspendKind, str] | None:
        given = [
            (name, value)
            for name, value in (
                ("domain", self.domain),
                ("site", self.site),
                ("tenant", self.tenant),
                ("campaign", self.campaign),
                ("queue", self.queue),
                ("source", self.source),
            )
            if value
        ]
        return given[0] if len(given) == 1 else None  # type: ignore[return-value]


class SuspendResponse(msgspec.Struct, kw_only=True):
    target: SuspendKind
    value: str
    reason: str
    until: float | None
    site: str | None = None  # only on this site (traffic shaping automation)
    ready_queues: int


class ResumeResponse(msgspec.Struct, kw_only=True):
    target: SuspendKind
    value: str
    released: int


class SelectorIn(Strict):
    domain: Short | None = None
    site: Annotated[str, Meta(max_length=4000)] | None = None
    tenant: Label | None = None
    campaign: Label | None = None
    queue: Short | None = None
    id: Short | None = None
    reason: Short = ""


class BounceResponse(msgspec.Struct, kw_only=True):
    bounced: int  # recipients removed


class RetryResponse(msgspec.Struct, kw_only=True):
    retried: int  # jobs made due now


class ReadyStatus(msgspec.Struct, kw_only=True):
    status: str
    checks: dict[str, str]


class Problem(msgspec.Struct, kw_only=True, omit_defaults=True):
    """RFC 9457 problem details."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str = ""
    instance: str = ""
    errors: list[dict[str, str]] = msgspec.field(default_factory=list)


# --------------------------------------------------------------------- admin snapshots


class ScheduledQueueInfo(msgspec.Struct, kw_only=True):
    name: str
    domain: str
    scheduled: int  # waiting for their next attempt (or send_at)
    held: int  # due but suspended
    next_due: float | None
    suspended: str | None  # the reason, when a suspension applies to the whole queue


class ReadyQueueInfo(msgspec.Struct, kw_only=True):
    name: str  # source->site
    site: str
    source: str
    hosts: list[str]
    queued: int
    connections: int
    connection_limit: int
    connects: int
    deliveries: int
    attempts_last_minute: int  # the measured rate: transactions started in the last 60 s
    max_message_rate: str | None  # the configured limit
    adaptive_message_rate: str | None = None  # AIMD's current rate, when adaptive
    suspended: str | None
    suspended_until: float | None
    last_error: str | None
    last_error_at: float | None


class ProviderAllowance(msgspec.Struct, kw_only=True):
    name: str  # a shaping provider ("google"), as the shaping files name it
    sent: int
    allowed: int | None  # None: no cap for this provider today


class WarmupInfo(msgspec.Struct, kw_only=True):
    """A source's IP warm-up today (docs/shaping.md). With worker processes the counts
    and allowances are the sums of every worker's (each has its share of the allowance)."""

    profile: str
    configured_as: str  # the source or pool whose [delivery.warmup] entry this is
    start: str  # the start date, day 1 (UTC), e.g. "2026-11-20"
    day: int  # 1 on the start date; 0 or less before it
    last_day: int  # the profile's last day with a cap
    over: bool  # past the last day: no cap any more
    over_limit: Literal["wait", "spill"]
    sent_today: int  # jobs let through today (UTC), attempts and retries alike
    allowed_today: int | None  # None: no cap
    providers: list[ProviderAllowance]
    deferral_rate: float  # of the last ten minutes' attempts (the counts above)
    bounce_rate: float
    paused: bool
    paused_reason: str | None = None


class SourceInfo(msgspec.Struct, kw_only=True):
    """An egress source in a pool: its state and what it did in the last ten minutes."""

    name: str
    weight: int
    bind: str | None
    ehlo: str | None
    state: Literal["ok", "suspended", "failing"]
    delivered: int
    deferred: int
    bounced: int
    connections: int
    connection_failures: int
    last_error: str | None
    last_error_at: float | None
    hop: str | None = None  # "socks5 host:port" or "proxy_protocol host:port"
    warmup: WarmupInfo | None = None  # its IP warm-up, when it has one


class PoolInfo(msgspec.Struct, kw_only=True):
    name: str
    fallback: str | None
    default: bool  # mail without a pool of its own (or its tenant's) leaves from here
    tenants: list[str]  # tenants whose mail this pool sends
    sources: list[SourceInfo]


class PoolList(msgspec.Struct, kw_only=True):
    pools: list[PoolInfo]


class WarmupPauseRequest(Strict):
    reason: Short = ""  # shown in /admin/pools and the log


class WarmupStateResponse(msgspec.Struct, kw_only=True):
    """After pausing or resuming a source's warm-up."""

    source: str
    paused: bool
    paused_reason: str | None = None


class SuspensionInfo(msgspec.Struct, kw_only=True):
    target: SuspendKind
    value: str
    reason: str
    until: float | None
    site: str | None = None  # only on this site (traffic shaping automation)


class Totals(msgspec.Struct, kw_only=True):
    scheduled: int
    held: int
    ready: int
    connections: int


class Pipelines(msgspec.Struct, kw_only=True):
    totals: Totals
    scheduled: list[ScheduledQueueInfo]
    ready: list[ReadyQueueInfo]
    suspensions: list[SuspensionInfo]


class PipelineHealth(msgspec.Struct, kw_only=True):
    name: str
    status: Literal["ok", "suspended", "failing"]
    queued: int
    connections: int
    detail: str | None


class Health(msgspec.Struct, kw_only=True):
    status: Literal["ok", "degraded"]
    pipelines: list[PipelineHealth]


class JobInfo(msgspec.Struct, kw_only=True):
    domain: str
    queue: str
    site: str
    where: Literal["scheduled", "held", "routing", "ready"]
    recipients: list[str]
    attempts: int
    due: float


class MessageDetails(msgspec.Struct, kw_only=True):
    meta: MessageMeta
    headers: list[tuple[str, str]]
    jobs: list[JobInfo]  # empty while a job is on a connection (in flight)


class AdaptiveInfo(msgspec.Struct, kw_only=True):
    """A path's adaptive message rate (AIMD) in one worker, beside its configured one."""

    source: str
    site: str
    configured: str | None
    current: str
    floor: str
    ceiling: str


class ShapingState(msgspec.Struct, kw_only=True):
    """``GET /admin/shaping``: the files in use, active automation and adaptive rates."""

    files: list[str]
    active: list[Automated]
    adaptive: list[AdaptiveInfo]


class SettingInfo(msgspec.Struct, kw_only=True):
    name: str
    value: Any  # a number, a rate or TLS mode as text, a boolean, or null
    origin: str  # the layer it came from: "provider google (default.toml)", "built-in", ...


class RuleInfo(msgspec.Struct, kw_only=True):
    rule: str
    regex: str
    action: str
    trigger: str
    duration: float


class ShapingResolution(msgspec.Struct, kw_only=True):
    """``GET /admin/shaping/resolve``: the effective shaping of a domain (from a source)."""

    domain: str
    site: str
    source: str | None
    provider: str | None
    settings: list[SettingInfo]
    rules: list[RuleInfo]
    adaptive_rate: dict[str, str | float] | None
    active: list[Automated]


class ShapingReloaded(msgspec.Struct, kw_only=True):
    files: list[str]
    workers: int


# --------------------------------------------------------------------- event webhooks

WebhookUrl = Annotated[
    str,
    Meta(
        min_length=8,
        max_length=2000,
        pattern=r"^https?://[^\s]+$",
        examples=["https://app.example.com/hooks/epoxi"],
    ),
]


class WebhookRequest(Strict):
    """An endpoint to POST events to: the types it wants (none: every type), and for an
    operator's key the tenant whose events it gets (none: every tenant's)."""

    url: WebhookUrl
    events: list[Annotated[str, Meta(max_length=40)]] = msgspec.field(default_factory=list)
    tenant: Label | None = None


class Webhook(msgspec.Struct, kw_only=True):
    id: str
    url: str
    events: list[str]
    tenant: str | None
    created_at: float
    secret: str | None = None  # shown when made and when rotated, never again
    old_secret_until: float | None = None  # the previous secret still signs until then


class WebhookList(msgspec.Struct, kw_only=True):
    webhooks: list[Webhook]


class ProviderOutcome(msgspec.Struct, frozen=True):
    """What became of one event of a provider's webhook call."""

    provider_event_id: str
    # applied | duplicate (applied before: no change) | ignored (a type Epoxi does not take)
    # | unknown_message | unknown_recipient
    outcome: str
    detail: str = ""  # applied: the record type made; else why nothing changed


class ProviderReceipt(msgspec.Struct, frozen=True):
    """The answer to ``POST /webhooks/{provider}``."""

    provider: str
    applied: int
    duplicates: int
    results: list[ProviderOutcome]


class WebhookTestFired(msgspec.Struct, kw_only=True):
    event_id: str


class WebhookBacklog(msgspec.Struct, kw_only=True):
    """An endpoint's waiting events and health."""

    id: str
    url: str
    tenant: str | None
    queued: int
    due: int  # of those, due now (the others wait for a retry)
    oldest: float | None
    failures: int  # failed POSTs in a row
    last_error: str | None
    last_error_at: float | None
    last_success_at: float | None
    dropped: int  # events given up on after max_age


class WebhookBacklogs(msgspec.Struct, kw_only=True):
    webhooks: list[WebhookBacklog]


class WebhookEvents(msgspec.Struct, kw_only=True):
    id: str
    events: int  # replayed or dropped


# --------------------------------------------------------------------- tenants and templates

TemplateSource = Annotated[str, Meta(max_length=1_000_000, description="a Jinja2 template")]
Rate = Annotated[float, Meta(ge=0, le=1_000_000, description="API requests a second; 0: no limit")]
DailyRecipients = Annotated[
    int, Meta(ge=0, le=10**12, description="recipients a day, over every send; 0: no limit")
]


class TenantIn(Strict):
    id: Label
    name: Annotated[str, Meta(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]*$")]
    default_pool: Label | None = None
    dkim_domain: Annotated[str, Meta(max_length=253)] = ""
    sender: Address | None = None  # the From of its /send mail when a request names none
    requests_per_second: Rate = 0.0
    recipients_per_day: DailyRecipients = 0
    tracking: bool = False  # opens, clicks and one-click unsubscribe on its mail by default


class TenantPatch(Strict):
    """The fields to change; the others stay."""

    name: (
        Annotated[str, Meta(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]*$")] | None
    ) = None
    status: TenantStatus | None = None
    default_pool: Label | None = None
    dkim_domain: Annotated[str, Meta(max_length=253)] | None = None
    sender: Address | None = None
    requests_per_second: Rate | None = None
    recipients_per_day: DailyRecipients | None = None
    tracking: bool | None = None


class TenantList(msgspec.Struct, kw_only=True):
    tenants: list[Tenant]


class TemplateIn(Strict, kw_only=True):
    """A new stored template (Mailsystem's fields): version 1, active."""

    tenant_id: Label | None = None  # a tenant-bound key's own tenant when not given
    name: Annotated[str, Meta(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]*$")]
    subject_template: Annotated[str, Meta(max_length=998)]
    html_template: TemplateSource = ""
    text_template: TemplateSource | None = None  # None: made from the HTML when sent


class TemplateVersionIn(Strict):
    """A new version of a template; active at once only with ``activate``."""

    subject_template: Annotated[str, Meta(max_length=998)]
    html_template: TemplateSource = ""
    text_template: TemplateSource | None = None
    activate: bool = False


Version = Annotated[int, Meta(ge=1, le=1_000_000_000)]


class ActivateIn(Strict):
    version: Version


class RenderIn(Strict):
    variables: dict[str, Any] = msgspec.field(default_factory=dict)
    version: Version | None = None  # the active one when not given


class Rendering(msgspec.Struct, kw_only=True):
    template_id: str
    version: int
    subject: str
    html: str
    text: str
    text_from_html: bool  # the template has no text part: this one was made from the HTML
    missing: list[str]  # variables the template uses that were not given (shown as {{ name }})


class TemplateList(msgspec.Struct, kw_only=True):
    templates: list[TemplateSummary]


class TemplateVersions(msgspec.Struct, kw_only=True):
    versions: list[TemplateVersion]


class TemplateDeleted(msgspec.Struct, kw_only=True):
    id: str
    versions: int


class SinkInfo(msgspec.Struct, kw_only=True):
    """A broker sink (``[[events.sinks]]``), over all the node's workers."""

    name: str
    kind: str  # rabbitmq, nats, redis
    url: str  # without its password
    types: list[str]  # the event types it sends; empty: all
    tenants: list[str]  # the tenants whose events it sends; empty: all
    workers: int  # workers running it (each has its own backlog and connection)
    connected: int  # of those, connected to the broker
    backlog: int  # events waiting, in all the workers' backlogs
    backlog_limit: int  # each worker's backlog holds up to this many (the oldest dropped)
    dropped: int  # events dropped from a full backlog since start
    published: int  # events the broker acknowledged since start
    last_error: str | None  # the latest failure of any worker
    last_error_at: float | None


class SinkList(msgspec.Struct, kw_only=True):
    sinks: list[SinkInfo]


class QuarantinedReport(msgspec.Struct, kw_only=True):
    """A report kept in the feedback mailbox's quarantine (data_dir/bounces)."""

    name: str  # the file name: <ns>-<kind>-<queue id>.eml
    kind: str  # dsn, arf, autoreply, none
    queue_id: str  # the id Epoxi gave the report when it came in
    size: int  # octets
    kept_at: float


class QuarantineList(msgspec.Struct, kw_only=True):
    reports: list[QuarantinedReport]  # newest first
    total: int  # reports kept (the list stops at the limit)


class RecipientIn(Strict):
    email: Address
    name: Annotated[str, Meta(max_length=200, pattern=r"^[^\x00-\x1f\x7f]*$")] = ""


class TemplateSend(Strict, kw_only=True):
    """``POST /send`` (the Mailsystem seed's body)."""

    tenant_id: Label | None = None  # a tenant-bound key's own tenant when not given
    recipient: RecipientIn
    template_id: Annotated[str, Meta(min_length=1, max_length=100)]
    template_version: Version | None = None  # the active version when not given
    variables: dict[str, Any] = msgspec.field(default_factory=dict)
    metadata: Annotated[dict[str, Any], Meta(max_length=100)] = msgspec.field(default_factory=dict)
    idempotency_key: Annotated[str, Meta(min_length=1, max_length=255)] | None = None
    send_at: datetime | None = None
    from_: Address | None = msgspec.field(default=None, name="from")  # else the tenant's sender
    campaign: Label | None = None
    ip_pool: Label | None = None  # else the tenant's default pool
    tracking: bool | None = None  # opens and clicks; None: the tenant's setting


class TemplateSent(msgspec.Struct, kw_only=True):
    email_id: str
    status: Literal["queued", "scheduled", "suppressed"]
    template_id: str
    template_version: int
    idempotency_reused: bool = False


MAX_BULK_RECIPIENTS = 100_000
Metadata = Annotated[
    dict[str, Any],
    Meta(
        max_length=100,
        description="returned as given by GET /emails/{id}; strings on the "
        "message's webhook events and records",
    ),
]


class BulkRecipient(Strict):
    """One recipient of a bulk send. An address that is not one is that recipient's error
    (GET /bulk/{id}), not the request's."""

    email: Annotated[str, Meta(min_length=1, max_length=998, examples=["user@example.com"])]
    name: Annotated[str, Meta(max_length=200, pattern=r"^[^\x00-\x1f\x7f]*$")] = ""
    variables: dict[str, Any] = msgspec.field(default_factory=dict)  # over shared_variables
    metadata: Metadata = msgspec.field(default_factory=dict)  # over the request's


class BulkSend(Strict, kw_only=True):
    """``POST /send/bulk`` (the Mailsystem seed's body)."""

    tenant_id: Label | None = None  # a tenant-bound key's own tenant when not given
    template_id: Annotated[str, Meta(min_length=1, max_length=100)]
    template_version: Version | None = None  # the active version when not given
    recipients: Annotated[list[BulkRecipient], Meta(min_length=1, max_length=MAX_BULK_RECIPIENTS)]
    shared_variables: dict[str, Any] = msgspec.field(default_factory=dict)
    metadata: Metadata = msgspec.field(default_factory=dict)
    idempotency_key: Annotated[str, Meta(min_length=1, max_length=255)] | None = None
    send_at: datetime | None = None
    from_: Address | None = msgspec.field(default=None, name="from")  # else the tenant's sender
    campaign: Label | None = None
    ip_pool: Label | None = None  # else the tenant's default pool
    # opens, clicks and a one-click unsubscribe link; None: the tenant's setting
    tracking: bool | None = None


class BulkAccepted(msgspec.Struct, kw_only=True):
    """Every recipient is handled: spooled (fsynced), suppressed or failed."""

    bulk_job_id: str
    status: BulkState
    total: int
    queued: int
    suppressed: int
    failed: int  # GET /bulk/{id} lists why
    template_id: str
    template_version: int
    idempotency_reused: bool = False


class BulkProgress(msgspec.Struct, kw_only=True):
    bulk_job_id: str
    tenant_id: str
    template_id: str
    template_version: int
    status: BulkState
    accepted: int  # recipients in the request
    processed: int  # handled so far, in request order
    rendered: int
    queued: int
    suppressed: int
    failed: int
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    errors: list[BulkError]  # the first ``errors_limit`` after ``errors_after``
    errors_next: int | None  # pass as errors_after for the next page; None: no more


class EmailRecipient(msgspec.Struct, kw_only=True):
    email: str
    name: str = ""


class EmailEvent(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One step of an email's life: an Epoxi record, with the status it moved the email to."""

    type: str  # the record type (docs/events.md)
    status: str | None = None  # the email status it set, if any (docs/platform.md)
    at: datetime
    detail: str = ""  # the remote reply, or why
    url: str = ""  # a click's link


class EmailView(msgspec.Struct, kw_only=True):
    """``GET /emails/{email_id}``."""

    email_id: str
    tenant_id: str
    status: str  # docs/platform.md: queued, scheduled, delivered, opened, bounced, ...
    recipient: EmailRecipient
    template_id: str | None
    template_version: int | None
    bulk_job_id: str | None
    metadata: dict[str, Any] | None  # as the request gave it
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    events: list[EmailEvent]


class AnalyticsCounts(msgspec.Struct, kw_only=True):
    accepted: int
    delivered: int
    deferred: int
    bounced: int
    failed: int
    complained: int
    opened: int
    clicked: int
    suppressed: int
    cancelled: int
    unsubscribed: int


class AnalyticsRates(msgspec.Struct, kw_only=True):
    """Fractions (0-1): delivery and bounce of the accepted, the rest of the delivered."""

    delivery: float
    bounce: float
    complaint: float
    open: float
    click: float


class AnalyticsBucket(msgspec.Struct, kw_only=True):
    start: datetime
    counts: AnalyticsCounts
    rates: AnalyticsRates


class Analytics(msgspec.Struct, kw_only=True):
    """``GET /analytics``: counts and rates per hour or day, from the hourly rollups."""

    tenant_id: str
    template_id: str | None
    group_by: Literal["hour", "day"]
    from_: datetime = msgspec.field(name="from")
    to: datetime
    totals: AnalyticsCounts
    rates: AnalyticsRates
    buckets: list[AnalyticsBucket]  # periods with no events are left out


class DeadLetterView(msgspec.Struct, kw_only=True):
    """A recipient that failed for good, with its last error."""

    email_id: str
    recipient: str
    tenant_id: str
    template_id: str | None  # None: not made from a template (it cannot be re-sent)
    reason: str  # bounced, failed
    last_error: str
    failed_at: datetime
    resent_as: str | None  # the email that re-sent it


class DeadLetterList(msgspec.Struct, kw_only=True):
    dead_letters: list[DeadLetterView]  # newest first
    next_before: str | None  # pass as ``before`` for the next page; None: no more


class ResendIn(Strict):
    """``POST /dead-letters/{id}/resend``: ``{}``, or the tenant it is for."""

    tenant_id: Label | None = None


class Resent(msgspec.Struct, kw_only=True):
    email_id: str  # the new email
    resent_from: str  # the dead letter's
    status: Literal["queued", "scheduled", "suppressed"]
    template_id: str
    template_version: int
