"""Reply classification: code + RFC 3463 enhanced code + text -> a bounce category.

Rules are data (TOML). The first matching rule wins; user rule files are consulted before the
shipped ``rules.toml``. With no rule matching, the enhanced code's class and subject decide,
then the reply code alone. Results are cached by (code, enhanced, text), so a repeated reply
costs a dictionary lookup.
"""

from __future__ import annotations

import enum
import importlib.resources
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from epoxi.errors import ConfigError
from epoxi.smtp.replies import Reply

_CACHE_LIMIT = 20_000


class BounceCategory(enum.Enum):
    INVALID_RECIPIENT = "InvalidRecipient"
    BAD_DOMAIN = "BadDomain"
    MAILBOX_FULL = "MailboxFull"
    MESSAGE_TOO_LARGE = "MessageTooLarge"
    SPAM_BLOCK = "SpamBlock"
    POLICY_REJECTION = "PolicyRejection"
    CONTENT_REJECTED = "ContentRejected"
    RATE_LIMITED = "RateLimited"
    AUTH_REQUIRED = "AuthRequired"
    TLS_REQUIRED = "TLSRequired"
    RELAY_DENIED = "RelayDenied"
    TRANSIENT_NETWORK = "TransientNetwork"
    ROUTING_ERROR = "RoutingError"
    PROTOCOL_ERROR = "ProtocolError"
    EXPIRED = "Expired"
    OTHER = "Other"


@dataclass(frozen=True, slots=True)
class Classification:
    category: BounceCategory
    permanent: bool
    rule: str  # the id of the rule that decided, or "enhanced:X.Y" / "code:NNN"


@dataclass(frozen=True)
class Rule:
    id: str
    category: BounceCategory
    code: re.Pattern[str] | None = None  # "550", "5xx", "55x"
    enhanced: re.Pattern[str] | None = None  # "5.1.1", "5.7.*", "x.7.*"
    text: re.Pattern[str] | None = None
    permanent: bool | None = None  # None: from the reply code

    def matches(self, code: str, enhanced: str, text: str) -> bool:
        return (
            (self.code is None or self.code.fullmatch(code) is not None)
            and (self.enhanced is None or self.enhanced.fullmatch(enhanced) is not None)
            and (self.text is None or self.text.search(text) is not None)
        )


# Fallback by the enhanced code's subject (RFC 3463 §3) and detail.
_BY_ENHANCED: dict[str, BounceCategory] = {
    "1.1": BounceCategory.INVALID_RECIPIENT,
    "1.2": BounceCategory.BAD_DOMAIN,
    "1.3": BounceCategory.INVALID_RECIPIENT,
    "1.6": BounceCategory.INVALID_RECIPIENT,
    "1.10": BounceCategory.BAD_DOMAIN,
    "2.1": BounceCategory.INVALID_RECIPIENT,
    "2.2": BounceCategory.MAILBOX_FULL,
    "2.3": BounceCategory.MESSAGE_TOO_LARGE,
    "3.4": BounceCategory.MESSAGE_TOO_LARGE,
    "4.1": BounceCategory.TRANSIENT_NETWORK,
    "4.2": BounceCategory.TRANSIENT_NETWORK,
    "4.4": BounceCategory.ROUTING_ERROR,
    "4.7": BounceCategory.EXPIRED,
    "7.0": BounceCategory.POLICY_REJECTION,
    "7.1": BounceCategory.POLICY_REJECTION,
    "7.8": BounceCategory.AUTH_REQUIRED,
    "7.11": BounceCategory.TLS_REQUIRED,
}
_BY_SUBJECT: dict[str, BounceCategory] = {
    "1": BounceCategory.INVALID_RECIPIENT,
    "2": BounceCategory.INVALID_RECIPIENT,
    "3": BounceCategory.OTHER,
    "4": BounceCategory.TRANSIENT_NETWORK,
    "5": BounceCategory.PROTOCOL_ERROR,
    "6": BounceCategory.CONTENT_REJECTED,
    "7": BounceCategory.POLICY_REJECTION,
}


class Classifier:
    """Classifies replies with rules; cached, a few microseconds per repeated reply."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = list(rules)
        self._cache: dict[tuple[int, str, str], Classification] = {}

    @classmethod
    def default(cls) -> Classifier:
        return cls.from_files([])

    @classmethod
    def from_files(cls, paths: Sequence[Path]) -> Classifier:
        """User rule files first, in the order given, then the shipped rules."""
        rules: list[Rule] = []
        for path in paths:
            rules += load_rules(_read(path), str(path))
        shipped = importlib.resources.files("epoxi.bounce").joinpath("rules.toml").read_text()
        rules += load_rules(shipped, "epoxi/bounce/rules.toml")
        return cls(rules)

    def classify(self, reply: Reply) -> Classification:
        key = (reply.code, reply.enhanced, reply.text)
        found = self._cache.get(key)
        if found is None:
            found = self._classify(reply)
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[key] = found
        return found

    def _classify(self, reply: Reply) -> Classification:
        code, enhanced, text = str(reply.code), reply.enhanced, reply.text
        default_permanent = reply.code >= 500
        for rule in self.rules:
            if rule.matches(code, enhanced, text):
                permanent = default_permanent if rule.permanent is None else rule.permanent
                return Classification(rule.category, permanent, rule.id)
        return _fallback(reply, default_permanent)


def _fallback(reply: Reply, permanent: bool) -> Classification:
    parts = reply.enhanced.split(".")
    if len(parts) == 3:
        detail = f"{parts[1]}.{parts[2]}"
        if detail in _BY_ENHANCED:
            return Classification(_BY_ENHANCED[detail], permanent, f"enhanced:{detail}")
        if parts[1] in _BY_SUBJECT:
            return Classification(_BY_SUBJECT[parts[1]], permanent, f"enhanced:{parts[1]}")
    category = BounceCategory.TRANSIENT_NETWORK if reply.code == 421 else BounceCategory.OTHER
    return Classification(category, permanent, f"code:{reply.code}")


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read bounce rules: {exc}") from exc


def load_rules(text: str, source: str) -> list[Rule]:
    """Parse a rules file: ``[[rule]]`` tables with id, category and what to match."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    unknown = set(data) - {"rule"}
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key {sorted(unknown)[0]!r}")
    return [
        _parse_rule(entry, f"{source}: rule {index}")
        for index, entry in enumerate(data.get("rule", []))
    ]


_RULE_KEYS = {"id", "category", "code", "enhanced", "text", "permanent"}


def _parse_rule(entry: dict[str, Any], where: str) -> Rule:
    unknown = set(entry) - _RULE_KEYS
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(f"{where}: unknown key {key!r} (value {entry[key]!r})")
    try:
        category = BounceCategory(entry.get("category"))
    except ValueError:
        raise ConfigError(
            f"{where}: category = {entry.get('category')!r} is not one of "
            f"{[c.value for c in BounceCategory]}"
        ) from None
    permanent = entry.get("permanent")
    if permanent is not None and not isinstance(permanent, bool):
        raise ConfigError(f"{where}: permanent = {permanent!r} must be true or false")
    return Rule(
        id=str(entry.get("id", where)),
        category=category,
        code=_pattern(entry, "code", where),
        enhanced=_pattern(entry, "enhanced", where),
        text=_regex(entry, where),
        permanent=permanent,
    )


def _pattern(entry: dict[str, Any], key: str, where: str) -> re.Pattern[str] | None:
    """``5xx``, ``55x``, ``5.7.*``, ``x.1.1``, ``x.1.2|x.1.10`` -> a pattern (fullmatch)."""
    value = entry.get(key)
    if value is None:
        return None
    text = str(value)
    if not re.fullmatch(r"[0-9xX*.|]+", text):
        raise ConfigError(
            f"{where}: {key} = {value!r}: use digits, x, * and | (e.g. '5xx', '5.7.*', '4xx|5xx')"
        )
    return re.compile("|".join(_wildcard(part) for part in text.split("|")))


def _wildcard(part: str) -> str:
    return re.escape(part).replace("x", "[0-9]").replace("X", "[0-9]").replace(r"\*", "[0-9]+")


def _regex(entry: dict[str, Any], where: str) -> re.Pattern[str] | None:
    value = entry.get("text")
    if value is None:
        return None
    try:
        return re.compile(str(value), re.IGNORECASE)
    except re.error as exc:
        raise ConfigError(f"{where}: text = {value!r} is not a valid regex: {exc}") from exc
