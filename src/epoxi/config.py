"""Settings: a TOML file plus ``EPOXI_*`` environment overrides, validated into frozen models.

Validation happens once, at start. An unknown key or a bad value raises
:class:`~epoxi.errors.ConfigError` whose message names the key and the value.
"""

from __future__ import annotations

import datetime
import ipaddress
import math
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from epoxi.errors import ConfigError
from epoxi.message import LABEL_PATTERN
from epoxi.shaping.files import RateText
from epoxi.shaping.policy import ShapingTls
from epoxi.shaping.warmup import SHIPPED as SHIPPED_WARMUP_PROFILES
from epoxi.units import parse_duration as parse_duration  # re-exported: at home in units
from epoxi.units import parse_size as parse_size


def parse_workers(value: Any) -> Any:
    """Worker processes: a count, or ``"auto"`` for one per core this process may run on."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return cpu_count()
        if not text.isdigit():
            raise ValueError("workers is a number of processes (1, 2, ...) or 'auto'")
        return int(text)
    return value


def cpu_count() -> int:
    """The cores this process may use: its affinity mask, capped by a cgroup v2 CPU quota
    (a container given 2 CPUs of a 64-core host gets 2 workers, not 64)."""
    cores = len(os.sched_getaffinity(0)) or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        return max(1, min(cores, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):  # no cgroup v2 file, or "max": no quota
        return cores


def parse_hostport(value: str, default_port: int = 25) -> tuple[str, int]:
    """Split ``host:port``, ``[v6]:port`` or a bare host."""
    value = value.strip()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        host, _, port = value.partition(":")
    else:
        host, port = value, ""
    if not host or (port and not port.isdigit()) or not 0 <= int(port or default_port) <= 65535:
        raise ValueError("expected host:port, such as 127.0.0.1:2525 or [::1]:25")
    return host, int(port or default_port)


Duration = Annotated[float, BeforeValidator(parse_duration), Field(ge=0)]
Size = Annotated[int, BeforeValidator(parse_size), Field(ge=0)]
_NAME = LABEL_PATTERN  # a source or pool name: as tenants and campaigns


def _comma_list(value: Any) -> Any:
    return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Listener(_Model):
    """One SMTP listening address and its own rules."""

    address: str
    tls: Literal["starttls", "implicit", "none"] = "starttls"
    auth: bool = True  # offer AUTH (after TLS unless auth_plaintext)
    auth_plaintext: bool = False  # allow AUTH on an unencrypted connection
    require_auth: bool = False  # submission: relaying needs AUTH even from trusted networks
    trusted_networks: tuple[str, ...] | None = None  # None: the global setting
    local_domains: tuple[str, ...] | None = None  # None: the global setting

    @field_validator("address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        parse_hostport(value)
        return value

    @field_validator("trusted_networks", mode="before")
    @classmethod
    def _check_networks(cls, value: Any) -> Any:
        return _validate_networks(_comma_list(value)) if value is not None else None

    @property
    def host_port(self) -> tuple[str, int]:
        return parse_hostport(self.address)


class SmtpSettings(_Model):
    """Limits and behaviour of the SMTP server, shared by every listener."""

    listeners: tuple[Listener, ...] = (Listener(address="127.0.0.1:2525"),)
    max_message_size: Size = 50 * 1024 * 1024
    max_recipients: int = Field(1000, ge=1)
    max_connections: int = Field(2000, ge=1)
    max_connections_per_ip: int = Field(200, ge=1)
    max_errors: int = Field(10, ge=1)  # bad commands before 421 and close
    max_line_length: int = Field(1000, ge=80)  # octets including CRLF (RFC 5321 §4.5.3.1.6)
    idle_timeout: Duration = 300.0  # waiting for a command (RFC 5321 §4.5.3.2.7: 5 min)
    data_timeout: Duration = 180.0  # waiting for the next DATA/BDAT block
    reject_bare_cr_lf: bool = True  # 554 5.6.0 for bare CR or LF in DATA (smuggling defence)
    reject_nul: bool = True  # 554 5.6.0 for NUL in DATA or BDAT (RFC 5321 §4.1.4 forbids it)
    # Unauthenticated clients sending ahead where RFC 2920 forbids it (before EHLO, after
    # EHLO/DATA/NOOP/..., behind the end of data) get 554 5.5.0 and are disconnected.
    forbid_unauth_pipelining: bool = True
    auth_max_failures: int = Field(5, ge=1)  # per client IP within auth_failure_window
    auth_failure_window: Duration = 300.0
    # AUTH PLAIN naming an authorization identity other than the user: refused with 535 5.7.8
    # (there is no proxy authorization to grant it); true accepts it and ignores the identity.
    auth_ignore_authzid: bool = False
    tls_cert: Path | None = None  # PEM; a self-signed pair is generated in data_dir if unset
    tls_key: Path | None = None
    banner: str = "ESMTP Epoxi"


class SpoolSettings(_Model):
    max_pending: int = Field(20_000, ge=1)  # queued writes before new mail gets 452 4.3.1
    min_free_space: Size = 256 * 1024 * 1024  # below this free disk, new mail gets 452 4.3.1
    max_batch: int = Field(512, ge=1)
    checkpoint_interval: Duration = 1.0  # WAL checkpoint period; keeps the WAL small
    journal_size_limit: Size = 64 * 1024 * 1024  # the WAL is truncated to this after checkpoints
    # bodies of messages not yet tried kept in memory for their first attempt, in all (past
    # it, a first attempt reads its body from the spool): bounds memory under a backlog
    held_bodies: Size = 64 * 1024 * 1024


TlsMode = Literal["opportunistic", "required", "disabled", "implicit"]  # of a connection


class RelaySettings(_Model):
    """A smarthost that receives all outbound mail."""

    host: str
    port: int = Field(25, ge=1, le=65535)
    username: str | None = None
    password: str | None = Field(None, repr=False)
    tls: TlsMode = "opportunistic"


class DnsSettings(_Model):
    nameservers: tuple[str, ...] = ()  # host:port; empty means /etc/resolv.conf
    timeout: Duration = 5.0

    @field_validator("nameservers", mode="before")
    @classmethod
    def _check_nameservers(cls, value: Any) -> Any:
        value = _comma_list(value)
        for item in value:
            parse_hostport(item, 53)
        return value


class ShapingSettings(_Model):
    """Limits for one destination; unset fields inherit (shaping/policy.py has the built-ins:
    10 connections, 100 deliveries per connection, 5 s idle, 100 recipients a transaction,
    opportunistic TLS without verification)."""

    connection_limit: int | None = Field(None, ge=1)  # open connections per ready queue
    max_deliveries_per_connection: int | None = Field(None, ge=1)
    idle_timeout: Duration | None = None  # close a connection idle this long
    max_message_rate: RateText | None = None  # e.g. "100/s", "2000/h"
    max_connection_rate: RateText | None = None  # new connections, e.g. "10/s"
    max_recipients_per_transaction: int | None = Field(None, ge=1)
    tls: ShapingTls | None = None  # implicit TLS is a property of a route, not of shaping
    tls_verify: bool | None = None
    priority: int | None = Field(None, ge=-100, le=100)  # of its mail without one of its own


class TenantRateSettings(_Model):
    """A tenant's message rates: over all its destinations, and per shaping provider (the
    shaping files' provider names, e.g. ``google``)."""

    max_message_rate: RateText | None = None
    providers: dict[str, RateText] = Field(default_factory=dict)


class RouteSettings(_Model):
    """A static route: mail for ``domains`` goes to ``hosts`` instead of the MX hosts."""

    domains: tuple[str, ...]  # "*" matches every domain
    hosts: tuple[str, ...]  # host:port, tried in order
    username: str | None = None
    password: str | None = Field(None, repr=False)
    tls: TlsMode = "opportunistic"
    tls_verify: bool = False
    dsn: bool = True  # send DSNs for mail bounced or expired on this route

    @field_validator("hosts")
    @classmethod
    def _check_hosts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("a route needs at least one host")
        for item in value:
            parse_hostport(item)
        return value


class SourceSettings(_Model):
    """An egress source: the local address connections come from, and the EHLO name.

    At most one hop: ``socks5`` (a SOCKS5 proxy connects for us, from an address it chooses;
    ``bind`` is refused) or ``proxy_protocol`` (an HAProxy told with a PROXY v2 header to
    connect from ``bind``, which is then not bound here and required).
    """

    name: str = Field(pattern=_NAME)
    bind: str | None = None  # local IP address; None lets the kernel choose
    ehlo: str | None = None  # None: the hostname
    socks5: str | None = None  # host:port of a SOCKS5 proxy (RFC 1928)
    socks5_username: str | None = None  # RFC 1929, with socks5_password
    socks5_password: str | None = Field(None, repr=False)
    proxy_protocol: str | None = None  # host:port of an HAProxy taking PROXY v2 (accept-proxy)

    @field_validator("bind")
    @classmethod
    def _check_bind(cls, value: str | None) -> str | None:
        if value is not None:
            ipaddress.ip_address(value)
        return value

    @field_validator("socks5", "proxy_protocol")
    @classmethod
    def _check_hop(cls, value: str | None) -> str | None:
        if value is not None and parse_hostport(value, default_port=0)[1] == 0:
            raise ValueError("expected host:port with a port, such as 127.0.0.1:1080")
        return value

    @field_validator("socks5_username", "socks5_password")
    @classmethod
    def _check_credential(cls, value: str | None) -> str | None:
        if value is not None and not 1 <= len(value.encode()) <= 255:
            raise ValueError("must be 1 to 255 octets (RFC 1929)")
        return value

    @model_validator(mode="after")
    def _check_hops(self) -> SourceSettings:
        if self.socks5 and self.proxy_protocol:
            raise ValueError(f"source {self.name}: socks5 or proxy_protocol, not both")
        if self.socks5 and self.bind:
            raise ValueError(
                f"source {self.name}: bind is not used with socks5 (the proxy chooses the "
                "address mail leaves from); remove it"
            )
        if self.proxy_protocol and not self.bind:
            raise ValueError(
                f"source {self.name}: proxy_protocol needs bind, the address HAProxy sends from"
            )
        if (self.socks5_username is None) != (self.socks5_password is None):
            raise ValueError(f"source {self.name}: socks5_username and socks5_password go together")
        if self.socks5_username is not None and not self.socks5:
            raise ValueError(f"source {self.name}: socks5_username without socks5")
        return self

    @property
    def local_bind(self) -> str | None:
        """The address to bind here: ``bind``, unless it is only written in a PROXY header."""
        return None if self.proxy_protocol else self.bind

    @property
    def hop(self) -> str | None:
        """The hop, as shown to operators ("socks5 127.0.0.1:1080"), or None."""
        if self.socks5:
            return f"socks5 {self.socks5}"
        return f"proxy_protocol {self.proxy_protocol}" if self.proxy_protocol else None


class PoolSettings(_Model):
    """A weighted set of egress sources; ``fallback`` takes over when all of them are
    suspended or failing."""

    name: str = Field(pattern=_NAME)
    sources: dict[str, Annotated[int, Field(ge=1, le=1_000_000)]]  # source name -> weight
    fallback: str | None = None

    @field_validator("sources", mode="before")
    @classmethod
    def _weights(cls, value: Any) -> Any:
        """A list of names is the same weight for each."""
        if isinstance(value, list | tuple):
            return {name: 1 for name in value}
        return value

    @field_validator("sources")
    @classmethod
    def _not_empty(cls, value: dict[str, int]) -> dict[str, int]:
        if not value:
            raise ValueError("a pool needs at least one source")
        return value


_Day = Annotated[int, Field(ge=1, le=3650)]
_Allowance = Annotated[int, Field(ge=0)]


class WarmupProfileSettings(_Model):
    """A custom warm-up profile: day number ("1" is the start date) -> the most jobs a
    source sends that day, overall and per shaping provider. A day not listed keeps the
    figure of the last listed day before it; after the last listed day no cap applies."""

    days: dict[_Day, _Allowance]
    providers: dict[str, dict[_Day, _Allowance]] = Field(default_factory=dict)

    @field_validator("days")
    @classmethod
    def _not_empty(cls, value: dict[int, int]) -> dict[int, int]:
        if not value:
            raise ValueError("a warm-up profile needs at least one day")
        return value


class WarmupSettings(_Model):
    """The warm-up of a source, or of each source of a pool (``[delivery.warmup."NAME"]``)."""

    start: datetime.date  # day 1 (UTC), e.g. 2026-11-20
    profile: str = "standard"  # "standard", "conservative" or a [delivery.warmup_profiles] name
    over_limit: Literal["wait", "spill"] = "wait"  # spill: to the pool's fallback pool
    # The warm-up pauses itself (its mail waits) when, over the source's last ten minutes
    # and at least `min_sample` attempts, deferrals or bounces pass these fractions.
    pause_deferral_rate: float = Field(0.2, gt=0, le=1)
    pause_bounce_rate: float = Field(0.1, gt=0, le=1)
    min_sample: int = Field(50, ge=1)
    paused: bool = False  # paused by the configuration: no mail leaves until false


class TimeoutSettings(_Model):
    """Delivery client timeouts, one per SMTP phase (seconds or '30s', '5m'); Postfix-like.

    ``connect`` covers the TCP connection (and the handshake, for implicit TLS); ``starttls``
    covers the STARTTLS reply and then the handshake; ``data_end`` starts once the whole
    message is handed to the transport, so it also covers sending it.
    """

    connect: Duration = 30.0
    banner: Duration = 300.0
    ehlo: Duration = 300.0
    starttls: Duration = 300.0
    auth: Duration = 300.0
    mail: Duration = 300.0
    rcpt: Duration = 300.0
    data: Duration = 120.0
    data_end: Duration = 600.0
    rset: Duration = 60.0
    quit: Duration = 10.0


class DeliverySettings(_Model):
    """Retries, expiry, shaping, routes and sources of outbound delivery."""

    retry_interval: Duration = 300.0  # first retry; doubles with each attempt (plus jitter)
    max_retry_interval: Duration = 14400.0
    max_age: Duration = 5 * 86400.0  # expire (and DSN) after this long in the queue
    dsn: bool = True  # send RFC 3464 DSNs for bounces and expiries
    dsn_disabled_tenants: tuple[str, ...] = ()  # tenants that handle bounces themselves
    ready_queue_limit: int = Field(10_000, ge=1)  # jobs per ready queue before holding back
    expiry_sweep_interval: Duration = 30.0
    mx_port: int = Field(25, ge=1, le=65535)  # port of MX hosts (tests point it at sinks)
    defaults: ShapingSettings = ShapingSettings()
    shaping: dict[str, ShapingSettings] = Field(default_factory=dict)  # by domain or site
    source_shaping: dict[str, ShapingSettings] = Field(default_factory=dict)  # by source name
    routes: tuple[RouteSettings, ...] = ()
    sources: tuple[SourceSettings, ...] = (SourceSettings(name="default"),)
    # Without [[delivery.pools]], one pool "default" holds every source with weight 1.
    pools: tuple[PoolSettings, ...] = ()
    default_pool: str = "default"
    tenant_pools: dict[str, str] = Field(default_factory=dict)  # tenant -> its pool
    # Tenant fairness (docs/shaping.md): a tenant's default priority (-100..100, higher
    # first) and its message rates; each worker process enforces rate / workers.
    tenant_priorities: dict[str, Annotated[int, Field(ge=-100, le=100)]] = Field(
        default_factory=dict
    )
    tenant_rates: dict[str, TenantRateSettings] = Field(default_factory=dict)
    # IP warm-up (docs/shaping.md): by source or pool name; custom profiles by name.
    warmup: dict[str, WarmupSettings] = Field(default_factory=dict)
    warmup_profiles: dict[str, WarmupProfileSettings] = Field(default_factory=dict)
    # A source whose last `source_failures` connections all failed, to more than one site (or
    # whose address cannot be bound), is "failing": left out of its pools for
    # `source_retry_after`, then tried again.
    source_failures: int = Field(5, ge=1)
    source_retry_after: Duration = 60.0
    timeouts: TimeoutSettings = TimeoutSettings()
    bounce_rules: tuple[Path, ...] = ()  # extra TOML rule files, before the shipped ones
    # Outbound TLS (README "Outbound TLS"): extra CA certificates (PEM) trusted for verified
    # SMTP TLS and MTA-STS policy fetches, on top of the system store; MTA-STS (RFC 8461) on
    # by default; DANE (RFC 7672) opt-in, needs a validating resolver in [dns] nameservers.
    tls_ca_file: Path | None = None
    mta_sts: bool = True
    mta_sts_port: int = Field(443, ge=1, le=65535)  # HTTPS port of policy hosts (tests only)
    dane: bool = False

    @model_validator(mode="after")
    def _check_sources(self) -> DeliverySettings:
        names = [source.name for source in self.sources]
        if not names:
            raise ValueError("sources: at least one egress source is needed")
        if len(set(names)) != len(names):
            raise ValueError(f"sources: names must be unique, got {names}")
        unknown = sorted(set(self.source_shaping) - set(names))
        if unknown:
            raise ValueError(f"source_shaping names no source {unknown}; sources are {names}")
        pool_names = [pool.name for pool in self.pools]
        if len(set(pool_names)) != len(pool_names):
            raise ValueError(f"pools: names must be unique, got {pool_names}")
        _check_pools(self.pool_table(), names, self.default_pool, self.tenant_pools)
        _check_warmup(self)
        return self

    def pool_table(self) -> dict[str, PoolSettings]:
        """Pools by name; without any configured, "default" holds every source equally."""
        if not self.pools:
            everyone = {source.name: 1 for source in self.sources}
            return {"default": PoolSettings(name="default", sources=everyone)}
        return {pool.name: pool for pool in self.pools}


def _check_pools(
    pools: dict[str, PoolSettings], sources: list[str], default: str, tenants: dict[str, str]
) -> None:
    for pool in pools.values():
        unknown = sorted(set(pool.sources) - set(sources))
        if unknown:
            raise ValueError(f"pool {pool.name} names no source {unknown}; sources are {sources}")
        if pool.fallback is not None and pool.fallback not in pools:
            raise ValueError(f"pool {pool.name}: fallback {pool.fallback!r} is not a pool")
        seen, step = [pool.name], pool.fallback
        while step is not None:
            if step in seen:
                raise ValueError(f"pool fallbacks go round: {' -> '.join([*seen, step])}")
            seen.append(step)
            step = pools[step].fallback
    wanted = {"default_pool": default, **{f"tenant_pools.{t}": p for t, p in tenants.items()}}
    for where, name in wanted.items():
        if name not in pools:
            raise ValueError(f"{where}: {name!r} is not a pool; pools are {sorted(pools)}")


def _check_warmup(delivery: DeliverySettings) -> None:
    shipped = sorted(set(delivery.warmup_profiles) & set(SHIPPED_WARMUP_PROFILES))
    if shipped:
        raise ValueError(f"warmup_profiles: {shipped} is a shipped profile; choose another name")
    profiles = sorted({*SHIPPED_WARMUP_PROFILES, *delivery.warmup_profiles})
    pools, sources = delivery.pool_table(), [source.name for source in delivery.sources]
    for name, warmup in delivery.warmup.items():
        if name not in pools and name not in sources:
            raise ValueError(
                f"warmup.{name}: {name!r} is neither a source nor a pool; sources are "
                f"{sources}, pools {sorted(pools)}"
            )
        if warmup.profile not in profiles:
            raise ValueError(
                f"warmup.{name}.profile: no profile {warmup.profile!r}; profiles are {profiles}"
            )
    warmed_by: dict[str, str] = {}
    for pool in pools.values():
        if pool.name not in delivery.warmup or pool.name in sources:
            continue
        for source in pool.sources:
            other = warmed_by.setdefault(source, pool.name)
            if other != pool.name and source not in delivery.warmup:
                raise ValueError(
                    f"warmup: source {source} is in pools {other} and {pool.name}, both with "
                    f"a warm-up; give {source} a [delivery.warmup.{source}] of its own"
                )


def warmup_of(delivery: DeliverySettings) -> dict[str, WarmupSettings]:
    """Each warmed-up source's warm-up: its own, else its pool's."""
    found = {}
    for pool in delivery.pool_table().values():
        if pool.name in delivery.warmup:
            found.update(dict.fromkeys(pool.sources, delivery.warmup[pool.name]))
    names = {source.name for source in delivery.sources}
    found.update({n: w for n, w in delivery.warmup.items() if n in names})
    return found


class DkimKeySettings(_Model):
    """One signing key: ``d=`` domain, ``s=`` selector, and its PEM file (RSA or Ed25519)."""

    domain: str
    selector: str = Field(pattern=r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,62})$")
    key_file: Path

    @field_validator("domain")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.lower().rstrip(".")


class DkimSettings(_Model):
    """DKIM signing at the ingest door. A message is signed with every key of its ``From:``
    domain (or the nearest parent with keys); ``tenants`` gives a tenant's mail a fixed ``d=``
    ("" leaves it unsigned). Mail without a key goes out unsigned, never held back."""

    keys: tuple[DkimKeySettings, ...] = ()
    tenants: dict[str, str] = Field(default_factory=dict)
    threads: int = Field(2, ge=1, le=64)  # signing runs off the event loop, in these
    expire: Duration | None = None  # x=: signatures expire this long after signing

    @model_validator(mode="after")
    def _one_key_per_selector(self) -> DkimSettings:
        seen: dict[tuple[str, str], Path] = {}
        for key in self.keys:
            other = seen.setdefault((key.domain, key.selector), key.key_file)
            if other != key.key_file:
                raise ValueError(
                    f"selector {key.selector} of {key.domain} has two keys: {other} and "
                    f"{key.key_file}; a selector publishes one key"
                )
        return self


SINK_SCHEMES = {
    "rabbitmq": ("amqp", "amqps"),
    "nats": ("nats", "tls"),
    "redis": ("redis", "rediss", "unix"),
}
_SINK_KEYS = {  # the keys that speak to one kind of broker only
    "rabbitmq": {"exchange", "routing_key"},
    "nats": {"subject"},
    "redis": {"maxlen"},
}


class SinkSettings(_Model):
    """One broker sink (``[[events.sinks]]``): the node's events, as JSON, to RabbitMQ, NATS
    JetStream or a Redis stream, through a bounded durable backlog (docs/events.md)."""

    name: str = Field(pattern=_NAME)  # in the backlog's file name and the metrics' label
    kind: Literal["rabbitmq", "nats", "redis"]
    url: str = Field(repr=False)  # may carry a password: never logged (see ``shown_url``)
    exchange: str = "epoxi.events"  # rabbitmq: a durable topic exchange, declared at connect
    routing_key: str = "{type}"  # rabbitmq: {type} is the event type (delivery, bounce ...)
    subject: str = "epoxi.events.{type}"  # nats
    stream: str = ""  # nats: the JetStream stream (EPOXI_EVENTS); redis: the key (epoxi:events)
    maxlen: int = Field(1_000_000, ge=1)  # redis: XADD MAXLEN ~ this
    types: tuple[str, ...] = ()  # event types sent (snake case); empty: all
    tenants: tuple[str, ...] = ()  # tenants whose events are sent; empty: all
    backlog: int = Field(100_000, ge=1)  # events kept while the broker is away; oldest dropped
    batch: int = Field(500, ge=1, le=10_000)  # events per publish round trip
    timeout: Duration = 5.0  # connect, and each batch's acknowledgements
    retry_max: Duration = 30.0  # reconnect backoff grows up to this

    @field_validator("types", "tenants", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return _comma_list(value)

    @model_validator(mode="after")
    def _check_kind(self) -> SinkSettings:
        scheme = self.url.partition("://")[0].lower()
        if "://" not in self.url or scheme not in SINK_SCHEMES[self.kind]:
            allowed = ", ".join(f"{s}://" for s in SINK_SCHEMES[self.kind])
            raise ValueError(f"a {self.kind} sink's url starts with {allowed}")
        for kind, keys in _SINK_KEYS.items():
            if kind != self.kind and keys & self.model_fields_set:
                wrong = ", ".join(sorted(keys & self.model_fields_set))
                raise ValueError(f"{wrong}: not a setting of a {self.kind} sink")
        return self

    @property
    def shown_url(self) -> str:
        """The url as logs and errors show it: without its password."""
        return hidden_url(self.url)


class EventsSettings(_Model):
    """Where the node's events go besides the record log."""

    sinks: tuple[SinkSettings, ...] = ()

    @field_validator("sinks")
    @classmethod
    def _unique_names(cls, value: tuple[SinkSettings, ...]) -> tuple[SinkSettings, ...]:
        names = [sink.name for sink in value]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"two sinks are named {', '.join(twice)}")
        return value


class ApiSettings(_Model):
    """The HTTP API (it listens on ``http_listen``)."""

    max_body_size: Size = 100 * 1024 * 1024  # larger requests get 413
    max_recipients: int = Field(50_000, ge=1)  # per send request
    spool_batch: int = Field(500, ge=1)  # messages per spool transaction for big requests
    idempotency_ttl: Duration = 86400.0  # how long an Idempotency-Key is remembered
    history_ttl: Duration = 7 * 86400.0  # status of finished messages is kept this long


class WebhookSettings(_Model):
    """Event webhooks (docs/events.md): how their POSTs are sent and retried."""

    timeout: Duration = 10.0  # a POST that has no answer by then failed
    batch: int = Field(500, ge=1, le=10_000)  # events in one POST at most
    concurrency: int = Field(2, ge=1, le=64)  # POSTs in flight to one endpoint
    retry_interval: Duration = 10.0  # after a failure, doubling with each one ...
    max_retry_interval: Duration = 3600.0  # ... up to this
    max_age: Duration = 3 * 86400.0  # an event still not taken after this is given up on
    rotation_grace: Duration = 86400.0  # how long a rotated secret still signs
    poll_interval: Duration = 0.25


class ProviderWebhookSettings(_Model):
    """``POST /webhooks/{provider}``: events an upstream provider reports (docs/events.md)."""

    # provider name -> its signing secret; WEBHOOK_SECRET_<PROVIDER> in the environment wins
    secrets: dict[str, str] = Field(default_factory=dict, repr=False)
    tolerance: Duration = 300.0  # a signature's time further than this from now is refused
    keep: Duration = 7 * 86400.0  # how long an applied event id is remembered (dedupe)


class TrackingSettings(_Model):
    """Open and click tracking and one-click unsubscribe, for tenants and sends that ask for
    it (docs/platform.md)."""

    # where recipients' mail programs reach this node's HTTP listener, e.g.
    # https://t.example.com; empty: no tracking (a send that asks for it is a 422)
    base_url: str = Field("", pattern=r"^(https?://[^/?#\s]+(/[^?#\s]*)?)?$")
    secret: str = Field("", repr=False)  # signs the links; empty: made once, data_dir/tracking.key


class DatabaseSettings(_Model):
    """Where the sending platform keeps tenants and templates (docs/platform.md)."""

    # postgresql://user:password@host:5432/db; empty: SQLite in the data dir (store.db)
    url: str = Field("", repr=False)
    schema_name: str = Field("epoxi", alias="schema", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    pool_size: int = Field(4, ge=1, le=100)  # connections per worker process

    @field_validator("url")
    @classmethod
    def _postgres_only(cls, value: str) -> str:
        if value and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql:// URL (or empty for SQLite)")
        return value


class Settings(_Model):
    """Everything Epoxi reads at start."""

    hostname: str = Field(default_factory=socket.getfqdn)
    data_dir: Path = Path("./data")
    local_domains: tuple[str, ...] = ()
    trusted_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    users: dict[str, str] = Field(default_factory=dict, repr=False)  # name -> password hash
    http_listen: tuple[str, ...] = ("127.0.0.1:4000",)  # empty: no HTTP API
    api: ApiSettings = ApiSettings()
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    smtp: SmtpSettings = SmtpSettings()
    spool: SpoolSettings = SpoolSettings()
    relay: RelaySettings | None = None
    dns: DnsSettings = DnsSettings()
    delivery: DeliverySettings = DeliverySettings()
    dkim: DkimSettings = DkimSettings()
    webhooks: WebhookSettings = WebhookSettings()
    provider_webhooks: ProviderWebhookSettings = ProviderWebhookSettings()
    database: DatabaseSettings = DatabaseSettings()
    tracking: TrackingSettings = TrackingSettings()
    events: EventsSettings = EventsSettings()
    # Shaping files (epoxi.shaping.files), layered in this order after Epoxi's shipped one
    # (which speaks for MX-routed sites only; shaping_default = false leaves it out). The
    # [delivery] shaping tables apply after all of them, as one last file.
    shaping_files: tuple[Path, ...] = ()
    shaping_default: bool = True
    # How often the shaping files are checked for edits (applied live); 0 turns that off
    shaping_watch_interval: Annotated[float, BeforeValidator(parse_duration), Field(ge=0)] = 2.0
    max_hops: int = Field(50, ge=1)  # Received: headers before a message is refused (554 5.4.6)
    # Inbound bounces and complaints (docs/events.md). With a bounce domain, every envelope
    # sender of a delivery is b+<token>@bounce_domain (VERP, token signed with bounce_secret,
    # or a key made once in data_dir/bounce.key), and mail to that domain or to an FBL address
    # is parsed into OOB and Feedback records and quarantined, never delivered onward.
    bounce_domain: str = ""
    bounce_secret: str = Field("", repr=False)
    fbl_addresses: tuple[str, ...] = ()
    bounce_quarantine_size: int = Field(1000, ge=0)  # messages kept for inspection, oldest dropped
    workers: Annotated[int, BeforeValidator(parse_workers), Field(ge=1, le=1024)] = Field(
        default_factory=cpu_count  # "auto": one worker process per core
    )

    @field_validator("shaping_files", mode="before")
    @classmethod
    def _split_files(cls, value: Any) -> Any:
        return _comma_list(value)

    @field_validator("local_domains", mode="before")
    @classmethod
    def _lower_domains(cls, value: Any) -> Any:
        return [d.lower().rstrip(".") for d in _comma_list(value)]

    @model_validator(mode="after")
    def _fbl_needs_bounce_domain(self) -> Settings:
        if self.fbl_addresses and not self.bounce_domain:
            raise ValueError(
                "fbl_addresses needs bounce_domain: complaints name their message by the "
                "VERP return path of the bounce domain"
            )
        return self

    @field_validator("bounce_domain", mode="before")
    @classmethod
    def _lower_bounce_domain(cls, value: Any) -> Any:
        return value.lower().strip().rstrip(".") if isinstance(value, str) else value

    @field_validator("fbl_addresses", mode="before")
    @classmethod
    def _lower_fbl_addresses(cls, value: Any) -> Any:
        value = _comma_list(value)
        if not isinstance(value, list | tuple):
            return value
        return [a.lower().strip() if isinstance(a, str) else a for a in value]

    @field_validator("trusted_networks", mode="before")
    @classmethod
    def _check_networks(cls, value: Any) -> Any:
        return _validate_networks(_comma_list(value))

    @field_validator("http_listen", mode="before")
    @classmethod
    def _check_http_listen(cls, value: Any) -> Any:
        value = _comma_list(value)
        for item in value:
            parse_hostport(item, 4000)
        return value


def _validate_networks(value: list[str]) -> list[str]:
    for item in value:
        ipaddress.ip_network(item, strict=False)
    return value


def load_settings(path: Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Read the TOML file (if any), apply ``EPOXI_*`` overrides from ``env``, validate."""
    raw = _read_toml(path) if path is not None else {}
    apply_env_overrides(raw, os.environ if env is None else env)
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from exc


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such configuration file") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


def apply_env_overrides(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    """Overlay the documented ``EPOXI_*`` variables on the parsed file, in place."""
    simple = {
        "EPOXI_HTTP_LISTEN": "http_listen",
        "EPOXI_DATA_DIR": "data_dir",
        "EPOXI_HOSTNAME": "hostname",
        "EPOXI_TRUSTED_NETWORKS": "trusted_networks",
        "EPOXI_LOCAL_DOMAINS": "local_domains",
        "EPOXI_LOG_LEVEL": "log_level",
        "EPOXI_WORKERS": "workers",
        "EPOXI_SHAPING_FILES": "shaping_files",
        "EPOXI_BOUNCE_DOMAIN": "bounce_domain",
    }
    for var, key in simple.items():
        if var in env:
            raw[key] = env[var]
    if "EPOXI_SMTP_LISTEN" in env:
        _override_listeners(raw, _comma_list(env["EPOXI_SMTP_LISTEN"]))
    if "EPOXI_DNS_NAMESERVERS" in env:
        raw.setdefault("dns", {})["nameservers"] = env["EPOXI_DNS_NAMESERVERS"]
    if "EPOXI_DATABASE_URL" in env:
        raw.setdefault("database", {})["url"] = env["EPOXI_DATABASE_URL"]
    _override_relay(raw, env)


def _override_listeners(raw: dict[str, Any], addresses: list[str]) -> None:
    """Replace the listeners' addresses; settings of the file's first listener carry over."""
    smtp = raw.setdefault("smtp", {})
    listeners = smtp.get("listeners") or [{}]
    template = {k: v for k, v in listeners[0].items() if k != "address"}
    smtp["listeners"] = [{**template, "address": address} for address in addresses]


def _override_relay(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    if "EPOXI_SMTP_RELAY" not in env:
        return
    relay = raw.setdefault("relay", {})
    relay["host"] = env["EPOXI_SMTP_RELAY"]
    for var, key in (
        ("EPOXI_SMTP_PORT", "port"),
        ("EPOXI_SMTP_USERNAME", "username"),
        ("EPOXI_SMTP_PASSWORD", "password"),
    ):
        if var in env:
            relay[key] = env[var]


def _describe(exc: ValidationError, path: Path | None) -> str:
    where = f"{path}: " if path else ""
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        hidden = _is_secret(key) or key.startswith("users")
        value = "<hidden>" if hidden else _shown(err["input"])
        if err["type"] == "extra_forbidden":
            lines.append(f"{where}unknown key {key!r} (value {value})")
        else:
            lines.append(f"{where}{key} = {value}: {err['msg']}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _shown(value: Any) -> str:
    """A value for an error message, with every password in it hidden, however deep (a whole
    [delivery] table holds the sources' and routes' passwords)."""
    return repr(_hidden(value))


def _is_secret(key: str) -> bool:
    return "password" in key or "secret" in key


def _hidden(value: Any) -> Any:
    if isinstance(value, str) and "://" in value:
        return hidden_url(value)
    if isinstance(value, dict):
        return {k: "<hidden>" if _is_secret(str(k)) else _hidden(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_hidden(item) for item in value]
    return value


_URL_PASSWORD = re.compile(r"(?<=://)([^/@:]*):[^/]*@")


def hidden_url(url: str) -> str:
    """``url`` with the password of its user info (``user:password@``) hidden."""
    return _URL_PASSWORD.sub(r"\1:<hidden>@", url)
