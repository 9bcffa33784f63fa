"""Shaping policy: the limits of each ready queue, merged from layers of settings.

The layers, each overriding the ones before it, in one fixed order of kinds::

    built-in defaults -> default -> provider -> site -> domain -> source [-> automation]

For each kind, the shaping files' blocks come first (:mod:`epoxi.shaping.files`: the shipped
file for MX-routed sites, then the configured ones, in order), then the configuration's own:
``[delivery.defaults]``; ``[delivery.shaping."<name>"]``, looked up by site name (the sorted
MX host set, or ``route:host:port``) and by domain; ``[delivery.source_shaping."<source>"]``
by egress source. Last of all, a setting that traffic shaping automation changed for a while
on one path (source x site). A ready queue's limits can be changed while it runs
(``ReadyQueue.reshape``), so a reload of the policy needs no rebuild.

This module takes plain mappings (``model_dump(exclude_none=True)`` of the settings), so it
depends on nothing above it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from epoxi.shaping.throttle import Rate

if TYPE_CHECKING:
    from epoxi.shaping.files import ShapingFiles

# The kinds of layer, in the order they apply; shaping files and the configuration alike.
KINDS = ("default", "provider", "site", "domain", "source")

ShapingTls = Literal["opportunistic", "required", "required-verified", "disabled"]

BUILTIN: Mapping[str, Any] = {
    "connection_limit": 10,
    "max_deliveries_per_connection": 100,
    "idle_timeout": 5.0,
    "max_recipients_per_transaction": 100,
    "max_message_rate": None,
    "max_connection_rate": None,
    "tls": "opportunistic",
    "tls_verify": False,
    "priority": 0,
    "retry_interval": None,
    "max_retry_interval": None,
    "max_age": None,
}
MAX_CACHED = 100_000  # (domain, site, source) -> merged limits kept
RETRY_SETTINGS = frozenset({"retry_interval", "max_retry_interval", "max_age"})

Layer = Mapping[str, Any]


@dataclass(frozen=True)
class Shaping:
    """Concrete limits of one ready queue."""

    connection_limit: int
    max_deliveries_per_connection: int
    idle_timeout: float
    max_recipients_per_transaction: int
    max_message_rate: Rate | None = None
    max_connection_rate: Rate | None = None
    tls: ShapingTls = "opportunistic"
    tls_verify: bool = False
    priority: int = 0  # of jobs whose message and tenant give none (higher goes first)
    # Retries of mail to this destination; None: the [delivery] setting
    retry_interval: float | None = None
    max_retry_interval: float | None = None
    max_age: float | None = None


@dataclass(frozen=True)
class Resolved:
    """The merged limits, and for each setting the layer it came from."""

    shaping: Shaping
    origins: Mapping[str, str]


class ShapingPolicy:
    """Resolves the limits of (domain, site, source) from the configured layers."""

    def __init__(
        self,
        defaults: Layer | None = None,
        named: Mapping[str, Layer] | None = None,
        sources: Mapping[str, Layer] | None = None,
        files: ShapingFiles | None = None,
        overrides: Mapping[tuple[str, str], tuple[str, Layer]] | None = None,
    ) -> None:
        self._files = files
        self._defaults = dict(defaults or {})
        self._named = {k: dict(v) for k, v in (named or {}).items()}
        self._sources = {k: dict(v) for k, v in (sources or {}).items()}
        # (source, site) -> (label, settings) that traffic shaping automation set for a while
        self.overrides = dict(overrides or {})
        # Whether any layer sets retries: if none does, a job's retries need no lookup
        layers = [self._defaults, *self._named.values(), *self._sources.values()]
        self.sets_retries = any(RETRY_SETTINGS & layer.keys() for layer in layers) or bool(
            files is not None and files.sets_any(RETRY_SETTINGS)
        )
        self._cache: dict[tuple[str, str, str], Resolved] = {}

    def with_overrides(
        self, overrides: Mapping[tuple[str, str], tuple[str, Layer]]
    ) -> ShapingPolicy:
        """The same layers with other automation overrides (the last layer of all)."""
        policy = ShapingPolicy(files=self._files, overrides=overrides)
        policy._defaults, policy._named, policy._sources = (
            self._defaults,
            self._named,
            self._sources,
        )
        return policy

    @property
    def files(self) -> ShapingFiles | None:
        return self._files

    def provider_of(self, domain: str, site: str) -> str | None:
        """The shaping files' provider of ``domain`` at ``site`` (e.g. "google"), if any."""
        return self._files.provider_at(domain, site) if self._files is not None else None

    def resolve(self, domain: str, site: str, source: str = "") -> Shaping:
        return self.explain(domain, site, source).shaping

    def explain(self, domain: str, site: str, source: str = "") -> Resolved:
        """The merged limits and where each came from; cached per (domain, site, source)."""
        key = (domain, site, source)
        found = self._cache.get(key)
        if found is None:
            if len(self._cache) >= MAX_CACHED:  # a cache: domains x sources can grow large
                self._cache.clear()
            found = self._cache[key] = self._merge(domain, site, source)
        return found

    def _layers(self, domain: str, site: str, source: str) -> list[tuple[str, Layer]]:
        """Each kind in turn (default, provider, site, domain, source): the shaping files'
        blocks of that kind, then the configuration's, as if it were one more file."""
        own: dict[str, Layer | None] = {
            "default": self._defaults,
            "site": self._named.get(site) if site != domain else None,
            "domain": self._named.get(domain),
            "source": self._sources.get(source),
        }
        names = {
            "default": "delivery.defaults",
            "site": f"site {site}",
            "domain": f"domain {domain}",
            "source": f"source {source}",
        }
        from_files = self._files.layers_by_kind(domain, site, source) if self._files else {}
        layers: list[tuple[str, Layer | None]] = [("built-in", BUILTIN)]
        for kind in KINDS:
            layers += [(layer.label, layer.values) for layer in from_files.get(kind, ())]
            if kind in own:
                layers.append((names[kind], own[kind]))
        if (source, site) in self.overrides:
            layers.append(self.overrides[(source, site)])
        return [(name, layer) for name, layer in layers if layer]

    def _merge(self, domain: str, site: str, source: str) -> Resolved:
        values: dict[str, Any] = {}
        origins: dict[str, str] = {}
        for name, layer in self._layers(domain, site, source):
            for setting, value in layer.items():
                if value is not None or setting not in values:
                    values[setting], origins[setting] = value, name
        return Resolved(_shaping(values), origins)


def _shaping(values: Mapping[str, Any]) -> Shaping:
    return Shaping(
        connection_limit=int(values["connection_limit"]),
        max_deliveries_per_connection=int(values["max_deliveries_per_connection"]),
        idle_timeout=float(values["idle_timeout"]),
        max_recipients_per_transaction=int(values["max_recipients_per_transaction"]),
        max_message_rate=_rate(values["max_message_rate"]),
        max_connection_rate=_rate(values["max_connection_rate"]),
        tls=values["tls"],
        tls_verify=bool(values["tls_verify"]),
        priority=int(values["priority"]),
        retry_interval=_seconds(values["retry_interval"]),
        max_retry_interval=_seconds(values["max_retry_interval"]),
        max_age=_seconds(values["max_age"]),
    )


def _seconds(value: float | None) -> float | None:
    return float(value) if value is not None else None


def _rate(text: str | None) -> Rate | None:
    return Rate.parse(text) if text else None
