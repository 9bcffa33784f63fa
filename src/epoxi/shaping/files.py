"""Shaping files: the limits of every destination as data, in layers.

A shaping file is TOML with four kinds of block::

    [default]                                  # every destination
    connection_limit = 10
    [default.sources.out1]                     # ... when sending from egress source out1
    max_connection_rate = "5/s"

    [providers.google]                         # a mailbox provider: its MX hosts or domains
    match_mx_suffix = ["google.com", "googlemail.com"]
    match_domains = ["gmail.com", "googlemail.com"]
    max_message_rate = "2000/h"

    [sites."mx1.example.net,mx2.example.net"]  # one site: a set of MX hosts, as queues name it
    [domains."example.org"]                    # one recipient domain

Several files are layered in the order given: a block in a later file merges over the same
block of an earlier one, setting by setting, or replaces it whole with ``replace_base = true``.
For one destination (domain, site, egress source) the blocks apply in one order, each over
the ones before::

    built-in -> default -> provider -> site -> domain
             -> then their `sources.<source>` tables, in the same order

The provider is the first (in file order) whose ``match_domains`` holds the domain or one of
whose ``match_mx_suffix`` ends one of the site's MX host names, so every Google Workspace
domain gets Google's limits without being listed. Parsing and layering are pure; reading a
file is :func:`load_file`, which names the file and the key of anything invalid.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from epoxi.errors import ConfigError
from epoxi.shaping.policy import KINDS, ShapingTls
from epoxi.shaping.throttle import Rate
from epoxi.units import parse_duration

Seconds = Annotated[float, BeforeValidator(parse_duration), Field(ge=0)]


def _checked_rate(text: str) -> str:
    Rate.parse(text)  # ValueError says what a rate looks like
    return text


RateText = Annotated[str, AfterValidator(_checked_rate)]  # "100/s", "2000/h", kept as text


class Values(BaseModel):
    """The settings a block may give; what it leaves out comes from the layers before."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    connection_limit: int | None = Field(None, ge=1)
    max_deliveries_per_connection: int | None = Field(None, ge=1)
    idle_timeout: Seconds | None = None
    max_message_rate: RateText | None = None
    max_connection_rate: RateText | None = None
    max_recipients_per_transaction: int | None = Field(None, ge=1)
    tls: ShapingTls | None = None
    tls_verify: bool | None = None
    retry_interval: Seconds | None = None
    max_retry_interval: Seconds | None = None
    max_age: Seconds | None = None
    priority: int | None = Field(None, ge=-100, le=100)  # higher goes first

    def given(self) -> dict[str, Any]:
        """The settings this block gives (not its sources or match rules)."""
        return self.model_dump(include=_SETTINGS, exclude_none=True)


_SETTINGS = set(Values.model_fields)


Action = Literal[
    "suspend",
    "suspend_tenant",
    "suspend_campaign",
    "bounce",
    "bounce_tenant",
    "bounce_campaign",
    "set_config",
]
# Settings an automation rule may change for a while (set_config).
CHANGEABLE = frozenset(
    {
        "connection_limit",
        "max_deliveries_per_connection",
        "idle_timeout",
        "max_message_rate",
        "max_connection_rate",
        "max_recipients_per_transaction",
    }
)


class Trigger(BaseModel):
    """When a rule acts: at its first match, or at the ``count``-th within ``period`` s."""

    model_config = ConfigDict(frozen=True)

    count: int = 1
    period: float = 0.0

    @property
    def immediate(self) -> bool:
        return self.count <= 1

    def __str__(self) -> str:
        return "immediate" if self.immediate else str(Rate(self.count, self.period))


def _trigger(value: object) -> object:
    if isinstance(value, str):
        if value.strip() == "immediate":
            return Trigger()
        rate = Rate.parse(value)  # "5/h": the 5th match within an hour
        if rate.count != int(rate.count):
            raise ValueError("a threshold counts whole matches, like '5/h'")
        return Trigger(count=int(rate.count), period=rate.period)
    return value


class AutomationRule(BaseModel):
    """Traffic shaping automation: when a receiver's reply matches ``regex`` (matched against
    "code enhanced-code text"), take ``action`` for ``duration``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    regex: str
    action: Action
    trigger: Annotated[Trigger, BeforeValidator(_trigger)] = Trigger()
    duration: Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]
    name: str | None = None  # set_config: which setting
    value: Any = None  # set_config: its value for the duration

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from exc
        return value

    @model_validator(mode="after")
    def _set_config_names_a_setting(self) -> AutomationRule:
        if self.action != "set_config":
            if self.name is not None or self.value is not None:
                raise ValueError("name and value go with action = 'set_config' only")
            return self
        if self.name not in CHANGEABLE:
            raise ValueError(f"set_config needs name = one of {', '.join(sorted(CHANGEABLE))}")
        if self.value is None:
            raise ValueError("set_config needs a value")
        Values.model_validate({self.name: self.value})  # the same checks as in a block
        return self

    @cached_property
    def pattern(self) -> re.Pattern[str]:
        return re.compile(self.regex)

    def change(self) -> dict[str, Any]:
        """set_config: the setting as a layer would give it (durations in seconds)."""
        assert self.name is not None
        return Values.model_validate({self.name: self.value}).given()


RATE_REPLIES = r"(?i)\brate\b|rate.?limit|too many|throttl|TS0[1-4]|4\.7\.28"


class AdaptiveRate(BaseModel):
    """AIMD on a path's message rate: a deferral matching ``regex`` multiplies the rate by
    ``decrease`` (not below ``floor``); each ``every`` seconds with deliveries and no such
    deferral adds ``increase`` (not above ``ceiling``, where it starts)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    floor: RateText
    ceiling: RateText
    decrease: float = Field(0.5, gt=0, lt=1)
    increase: RateText | None = None  # default: a tenth of the ceiling
    every: Annotated[float, BeforeValidator(parse_duration), Field(gt=0)] = 60.0
    regex: str = RATE_REPLIES

    @cached_property
    def pattern(self) -> re.Pattern[str]:
        return re.compile(self.regex)

    @model_validator(mode="after")
    def _floor_below_ceiling(self) -> AdaptiveRate:
        floor, ceiling = Rate.parse(self.floor), Rate.parse(self.ceiling)
        if floor.count / floor.period > ceiling.count / ceiling.period:
            raise ValueError("floor must not be above ceiling")
        re.compile(self.regex)
        return self


class Block(Values):
    sources: dict[str, Values] = Field(default_factory=dict)
    replace_base: bool = False  # replace the same block of earlier files instead of merging
    automation: tuple[AutomationRule, ...] = ()
    adaptive_rate: AdaptiveRate | None = None


class Provider(Block):
    match_mx_suffix: tuple[str, ...] = ()
    match_domains: tuple[str, ...] = ()

    @field_validator("match_mx_suffix", "match_domains")
    @classmethod
    def _lower(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(item.lower().strip(".") for item in value)


@dataclass
class _Match:
    """Which destinations a provider covers: a later block without match rules keeps these
    (even with ``replace_base``, which replaces settings); one with rules adds to them, or
    replaces them with ``replace_base``."""

    domains: set[str] = field(default_factory=set)
    mx_suffixes: set[str] = field(default_factory=set)

    def add(self, block: Provider) -> None:
        if not (block.match_domains or block.match_mx_suffix):
            return
        if block.replace_base:
            self.domains.clear()
            self.mx_suffixes.clear()
        self.domains.update(block.match_domains)
        self.mx_suffixes.update(block.match_mx_suffix)

    def covers(self, domain: str, mx_hosts: Sequence[str]) -> bool:
        if domain in self.domains:
            return True
        return any(_under(host, suffix) for suffix in self.mx_suffixes for host in mx_hosts)


class ShapingFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    default: Block = Block()
    providers: dict[str, Provider] = Field(default_factory=dict)
    sites: dict[str, Block] = Field(default_factory=dict)
    domains: dict[str, Block] = Field(default_factory=dict)

    @field_validator("domains")
    @classmethod
    def _lower_domains(cls, value: dict[str, Block]) -> dict[str, Block]:
        return {name.lower().rstrip("."): block for name, block in value.items()}


def _under(host: str, suffix: str) -> bool:
    return host == suffix or host.endswith("." + suffix)


def parse(text: str, name: str = "<text>") -> ShapingFile:
    """A shaping file from its TOML text; ConfigError naming ``name`` and the bad key."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{name}: not valid TOML: {exc}") from exc
    try:
        return ShapingFile.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, name)) from exc


def load_file(path: Path) -> ShapingFile:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the shaping file: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text") from exc
    return parse(text, str(path))


def _describe(exc: ValidationError, name: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"{name}: unknown key {key!r}")
        else:
            lines.append(f"{name}: {key} = {err['input']!r}: {err['msg']}")
    return "invalid shaping file:\n  " + "\n  ".join(lines)


# --------------------------------------------------------------------- layering


@dataclass
class _Stacked:
    """One block as the files give it: its parts, each with the file it came from and
    whether that file is for MX-routed sites only, in order (a ``replace_base`` drops the
    parts before it)."""

    parts: list[tuple[str, Block, bool]] = field(default_factory=list)

    def add(self, origin: str, block: Block, mx_only: bool = False) -> None:
        if block.replace_base:
            self.parts.clear()
        self.parts.append((origin, block, mx_only))


@dataclass(frozen=True)
class Layer:
    """Settings from one block of one file, named for ``epoxi shaping resolve``."""

    label: str  # e.g. "provider google (shaping.toml)"
    values: Mapping[str, Any]


class ShapingFiles:
    """Shaping files layered in order; answers the layers that apply to a destination.

    Files named in ``mx_only`` (the shipped default file) say nothing about static routes
    and the smarthost (sites ``route:...``): those are the operator's own servers, not the
    internet's receivers.
    """

    def __init__(
        self, files: Sequence[tuple[str, ShapingFile]] = (), mx_only: frozenset[str] = frozenset()
    ) -> None:
        self.origins = [origin for origin, _ in files]
        self._mx_only = mx_only
        self._default = _Stacked()
        self._providers: dict[str, _Stacked] = {}
        self._matches: dict[str, _Match] = {}  # from files for every site
        self._mx_matches: dict[str, _Match] = {}  # ... and from MX-only ones too
        self._sites: dict[str, _Stacked] = {}
        self._domains: dict[str, _Stacked] = {}
        for origin, parsed in files:
            only = origin in mx_only
            self._default.add(origin, parsed.default, only)
            for kind, blocks in (
                (self._providers, parsed.providers),
                (self._sites, parsed.sites),
                (self._domains, parsed.domains),
            ):
                for name, block in blocks.items():
                    kind.setdefault(name, _Stacked()).add(origin, block, only)
            if not only:
                for name, provider in parsed.providers.items():
                    self._matches.setdefault(name, _Match()).add(provider)
            for name, provider in parsed.providers.items():
                self._mx_matches.setdefault(name, _Match()).add(provider)

    @classmethod
    def load(cls, paths: Sequence[Path], mx_only: Sequence[Path] = ()) -> ShapingFiles:
        """``mx_only`` files come first and apply to MX-routed sites only (the shipped one)."""
        files = [(str(path), load_file(path)) for path in [*mx_only, *paths]]
        return cls(files, frozenset(str(path) for path in mx_only))

    def provider_of(
        self, domain: str, mx_hosts: Sequence[str], *, routed: bool = False
    ) -> str | None:
        """The first provider whose domains or MX suffixes match, if any (``routed``: a static
        route or the smarthost, which MX-only files do not cover)."""
        matches = self._matches if routed else self._mx_matches
        for name, match in matches.items():
            if match.covers(domain, mx_hosts):
                return name
        return None

    def sets_any(self, settings: frozenset[str]) -> bool:
        """Whether any block (or its sources tables) gives one of ``settings``."""
        stacks = [self._default, *self._providers.values(), *self._sites.values()]
        for stacked in [*stacks, *self._domains.values()]:
            for _, block, _ in stacked.parts:
                given = [block.given(), *(values.given() for values in block.sources.values())]
                if any(settings & values.keys() for values in given):
                    return True
        return False

    def provider_at(self, domain: str, site: str) -> str | None:
        """The provider of ``domain`` routed to ``site`` (a ready queue's name for it)."""
        return self.provider_of(domain, mx_hosts_of(site), routed=site.startswith("route:"))

    def layers(self, domain: str, site: str, source: str = "") -> list[Layer]:
        """The blocks that apply to ``domain`` at ``site`` from ``source``, first to last."""
        by_kind = self.layers_by_kind(domain, site, source)
        return [layer for kind in KINDS for layer in by_kind[kind]]

    def _blocks(self, domain: str, site: str) -> list[tuple[str, str, _Stacked | None]]:
        provider = self.provider_at(domain, site)
        return [
            ("default", "default", self._default),
            ("provider", f"provider {provider}", self._providers.get(provider or "")),
            ("site", f"site {site}", self._sites.get(site)),
            ("domain", f"domain {domain}", self._domains.get(domain)),
        ]

    def rules(self, domain: str, site: str) -> list[tuple[str, AutomationRule]]:
        """The automation rules for ``domain`` at ``site``, each named by its block, file and
        place ("provider yahoo (shaping.toml) rule 1"): every applicable block's, in order."""
        routed = site.startswith("route:")
        found = []
        for _, label, stacked in self._blocks(domain, site):
            for origin, block, mx_only in stacked.parts if stacked else ():
                if not (routed and mx_only):
                    found += [
                        (f"{label} ({origin}) rule {n}", rule)
                        for n, rule in enumerate(block.automation, 1)
                    ]
        return found

    def adaptive(self, domain: str, site: str) -> AdaptiveRate | None:
        """The adaptive rate of ``domain`` at ``site``: the last applicable block's."""
        routed = site.startswith("route:")
        found = None
        for _, _, stacked in self._blocks(domain, site):
            for _, block, mx_only in stacked.parts if stacked else ():
                if block.adaptive_rate is not None and not (routed and mx_only):
                    found = block.adaptive_rate
        return found

    def layers_by_kind(self, domain: str, site: str, source: str = "") -> dict[str, list[Layer]]:
        """The same layers, by kind (default, provider, site, domain, source), so a caller
        can put its own between them."""
        routed = site.startswith("route:")
        blocks = self._blocks(domain, site)
        found: dict[str, list[Layer]] = {kind: [] for kind in KINDS}
        for kind, label, stacked in blocks:
            found[kind] = [Layer(*part) for part in _parts(label, stacked, Block.given, routed)]
        if source:
            for _, label, stacked in blocks:
                found["source"] += [
                    Layer(f"{name} source {source}", values)
                    for name, values in _parts(
                        label, stacked, lambda block: _source_values(block, source), routed
                    )
                ]
        return found


def _parts(
    label: str, stacked: _Stacked | None, values_of: Any, routed: bool
) -> Iterator[tuple[str, dict[str, Any]]]:
    if stacked is None:
        return
    for origin, block, mx_only in stacked.parts:
        if routed and mx_only:
            continue
        values = values_of(block)
        if values:
            yield f"{label} ({origin})", values


def _source_values(block: Block, source: str) -> dict[str, Any]:
    values = block.sources.get(source)
    return values.given() if values is not None else {}


def mx_hosts_of(site: str) -> list[str]:
    """The MX host names of a site ("mx1.a.test,mx2.a.test"); none for a static route."""
    if site.startswith("route:"):
        return []
    return [host for host in site.split(",") if host]


def shipped_file() -> Path:
    """Epoxi's default shaping file (package data): the large providers' published limits."""
    return Path(__file__).with_name("default.toml")
