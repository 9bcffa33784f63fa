"""Reply classification: (code, RFC 3463 enhanced code, text) -> a bounce category.

Rules are data (TOML, see ``rules.toml``). The first rule that matches decides, in file order;
user rule files come before the shipped ones. When no rule matches, the enhanced code's
subject and detail decide (RFC 3463, RFC 7372, RFC 7505), then the reply code alone, ending
in ``Other``. Permanence follows the reply code (4xx transient, 5xx permanent) unless the
rule that matched says otherwise.

Text rules run over the *normalised* text (see :func:`normalize_text`): lowercased, mail
addresses replaced by ``@``, and long id-like runs (queue ids, timestamps, IP addresses,
numbered host names) by ``#``. Two replies that differ only in those parts are one cache
entry, so a server that puts a fresh id into every reply still hits the cache.

Failures where no server replied get a synthetic reply from one table
(``epoxi.outcomes.synthetic``) and are classified like any other, so records and DSNs always
carry a reply.
"""

from __future__ import annotations

import enum
import functools
import importlib.resources
import re
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from epoxi.errors import ConfigError
from epoxi.smtp.replies import Reply

SHIPPED_RULES = "rules.toml"
DEFAULT_CACHE_SIZE = 4096


class BounceCategory(enum.Enum):
    """Why a reply failed. Names and values are stable: they go into records and APIs."""

    InvalidRecipient = "InvalidRecipient"  # the mailbox does not exist or is disabled
    BadDomain = "BadDomain"  # the recipient domain does not exist or takes no mail
    BadSender = "BadSender"  # the envelope sender was refused (RFC 3463 X.1.7, X.1.8)
    MailboxFull = "MailboxFull"
    MessageTooLarge = "MessageTooLarge"
    SpamBlock = "SpamBlock"  # spam, blocklist, reputation
    PolicyRejection = "PolicyRejection"  # local policy, DMARC/SPF/DKIM, reverse DNS
    RelayDenied = "RelayDenied"
    RateLimited = "RateLimited"  # volume, connections, greylisting, too many recipients
    AuthRequired = "AuthRequired"
    TLSRequired = "TLSRequired"
    TransientNetwork = "TransientNetwork"  # connect, timeout, lost connection
    ContentRejected = "ContentRejected"  # virus, attachment type, content filter
    RoutingError = "RoutingError"  # unroutable, mail loop, DNS trouble
    MailSystemError = "MailSystemError"  # the remote system is full or broken (X.3.x)
    ProtocolError = "ProtocolError"  # syntax, sequence, unsupported feature (X.5.x)
    Expired = "Expired"  # too long in a queue (X.4.7)
    Other = "Other"


@dataclass(frozen=True, slots=True)
class Classification:
    """The verdict on one reply. ``rule`` names what decided, for debugging."""

    category: BounceCategory
    permanent: bool
    rule: str  # a rule id, or "rfc3463:X.S.D", "rfc3463:X.S", "code:NNN", "code:Nxx"


@dataclass(frozen=True, slots=True)
class Rule:
    """One compiled rule; every matcher given must match."""

    id: str
    category: BounceCategory
    codes: frozenset[int] | None = None
    enhanced: re.Pattern[str] | None = None  # fullmatch against the enhanced code
    text: re.Pattern[str] | None = None  # search in the normalised text
    permanent: bool | None = None  # None: from the reply code

    def matches(self, code: int, enhanced: str, text: str) -> bool:
        """True when the reply parts satisfy every matcher of this rule."""
        return (
            (self.codes is None or code in self.codes)
            and (self.enhanced is None or self.enhanced.fullmatch(enhanced) is not None)
            and (self.text is None or self.text.search(text) is not None)
        )


# ------------------------------------------------------------------------- normalisation

# Each pattern starts with a literal or a small set, so re skips ahead in C: a few µs a reply.
_AT_TAIL = re.compile(r"@[^\s<>()\[\]{}\"',;]+")  # "@example.com"; reversed: the local part
_DIGIT_RUN = re.compile(r"[0-9][0-9A-Za-z_.:+=-]{6,}")


def normalize_text(text: str) -> str:
    """The text that text rules see, and the cache key: lowercase, variable parts masked.

    Line breaks become spaces; a mail address becomes ``@``; from a digit on, a run of 7 or
    more characters of ``[0-9A-Za-z_.:+=-]`` becomes ``#`` (``d9443c01a73-1e0b`` -> ``d#``,
    ``192.0.2.1`` -> ``#``, ``mta1234.mail.example.net`` -> ``mta#``). Short codes such as
    ``5.7.1``, ``TSS04``, ``S3150`` and numbers such as ``300`` are kept.
    """
    if "\n" in text:
        text = text.replace("\r", "").replace("\n", " ")
    if "@" in text:
        text = _AT_TAIL.sub("@", text)  # the domain
        text = _AT_TAIL.sub("@", text[::-1])[::-1]  # the local part, read backwards
    return _DIGIT_RUN.sub("#", text).lower()


# ------------------------------------------------------------------------------ classifier


class Classifier:
    """Classifies replies with rules, first match wins; results are cached (LRU).

    A repeated reply costs one cache lookup; a reply that differs from a cached one only in
    masked parts (ids, addresses) costs a normalisation and a lookup.
    """

    def __init__(self, rules: Sequence[Rule], *, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self.rules: tuple[Rule, ...] = tuple(rules)
        self._by_exact = functools.lru_cache(maxsize=cache_size)(self._classify_exact)
        self._by_normalized = functools.lru_cache(maxsize=cache_size)(self._classify_normalized)

    @classmethod
    def default(cls) -> Classifier:
        """A classifier with the shipped rules only."""
        return cls(_shipped_rules())

    @classmethod
    def from_files(cls, paths: Iterable[str | Path]) -> Classifier:
        """User rule files first, in the order given, then the shipped rules."""
        rules: list[Rule] = []
        for path in paths:
            rules += load_rules(_read_rules_file(Path(path)), str(path))
        return cls([*rules, *_shipped_rules()])

    def classify(self, reply: Reply) -> Classification:
        """Category and permanence of a failed ``reply``."""
        return self._by_exact(reply.code, reply.enhanced, reply.text)

    def cache_clear(self) -> None:
        """Forget every cached verdict (for benchmarks and tests)."""
        self._by_exact.cache_clear()
        self._by_normalized.cache_clear()

    def _classify_exact(self, code: int, enhanced: str, text: str) -> Classification:
        return self._by_normalized(code, enhanced, normalize_text(text))

    def _classify_normalized(self, code: int, enhanced: str, text: str) -> Classification:
        for rule in self.rules:
            if rule.matches(code, enhanced, text):
                permanent = code >= 500 if rule.permanent is None else rule.permanent
                return Classification(rule.category, permanent, rule.id)
        return fallback(code, enhanced)


# -------------------------------------------------------------------------------- fallback

_C = BounceCategory

# RFC 3463 (with RFC 7372 and RFC 7505 additions): subject.detail -> category.
_BY_DETAIL: dict[str, BounceCategory] = {
    "1.0": _C.InvalidRecipient,
    "1.1": _C.InvalidRecipient,
    "1.2": _C.BadDomain,
    "1.3": _C.InvalidRecipient,
    "1.4": _C.InvalidRecipient,
    "1.6": _C.InvalidRecipient,
    "1.7": _C.BadSender,
    "1.8": _C.BadSender,
    "1.10": _C.BadDomain,
    "2.0": _C.InvalidRecipient,
    "2.1": _C.InvalidRecipient,
    "2.2": _C.MailboxFull,
    "2.3": _C.MessageTooLarge,
    "3.4": _C.MessageTooLarge,
    "4.3": _C.RoutingError,
    "4.4": _C.RoutingError,
    "4.5": _C.RateLimited,
    "4.6": _C.RoutingError,
    "4.7": _C.Expired,
    "5.3": _C.RateLimited,
    "7.8": _C.AuthRequired,
    "7.9": _C.AuthRequired,
    "7.10": _C.TLSRequired,
    "7.11": _C.TLSRequired,
    "7.12": _C.AuthRequired,
    "7.13": _C.InvalidRecipient,
    "7.17": _C.InvalidRecipient,
    "7.18": _C.BadDomain,
    "7.27": _C.BadSender,
    "7.28": _C.SpamBlock,
    "7.30": _C.TLSRequired,
}
_BY_SUBJECT: dict[str, BounceCategory] = {
    "1": _C.InvalidRecipient,
    "2": _C.InvalidRecipient,
    "3": _C.MailSystemError,
    "4": _C.TransientNetwork,
    "5": _C.ProtocolError,
    "6": _C.ContentRejected,
    "7": _C.PolicyRejection,
}
# RFC 5321, RFC 4954, RFC 7504: reply code alone. 550 and 554 say too little to guess.
_BY_CODE: dict[int, BounceCategory] = {
    421: _C.TransientNetwork,
    451: _C.MailSystemError,
    452: _C.MailSystemError,
    500: _C.ProtocolError,
    501: _C.ProtocolError,
    502: _C.ProtocolError,
    503: _C.ProtocolError,
    504: _C.ProtocolError,
    521: _C.BadDomain,
    530: _C.AuthRequired,
    534: _C.AuthRequired,
    535: _C.AuthRequired,
    538: _C.TLSRequired,
    551: _C.InvalidRecipient,
    553: _C.InvalidRecipient,
    555: _C.ProtocolError,
    556: _C.BadDomain,
}
_ENHANCED_SHAPE = re.compile(r"[245]\.(\d{1,3})\.(\d{1,3})")


def fallback(code: int, enhanced: str) -> Classification:
    """The verdict when no rule matched: enhanced code, then reply code, then ``Other``."""
    permanent = code >= 500
    shape = _ENHANCED_SHAPE.fullmatch(enhanced)
    if shape is not None:
        subject, detail = shape.groups()
        found = _BY_DETAIL.get(f"{subject}.{detail}")
        if found is not None:
            return Classification(found, permanent, f"rfc3463:X.{subject}.{detail}")
        found = _BY_SUBJECT.get(subject)
        if found is not None:
            return Classification(found, permanent, f"rfc3463:X.{subject}")
    found = _BY_CODE.get(code)
    if found is not None:
        return Classification(found, permanent, f"code:{code}")
    return Classification(_C.Other, permanent, f"code:{code // 100}xx")


# ---------------------------------------------------------------- connection-level failures

# ------------------------------------------------------------------------------ rule files

_RULE_KEYS = frozenset({"id", "category", "code", "enhanced", "text", "permanent"})
_MATCH_KEYS = ("code", "enhanced", "text")
_CODE_SHAPE = re.compile(r"[2-5][0-9xX][0-9xX]")
_ENHANCED_PATTERN_SHAPE = re.compile(r"([245xX*])\.(\d{1,3}|\*)\.(\d{1,3}|\*)")


@functools.cache
def _shipped_rules() -> tuple[Rule, ...]:
    resource = importlib.resources.files("epoxi.bounce").joinpath(SHIPPED_RULES)
    return tuple(load_rules(resource.read_text(encoding="utf-8"), f"epoxi/bounce/{SHIPPED_RULES}"))


def _read_rules_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read bounce rules: {exc}") from exc


def load_rules(text: str, source: str) -> list[Rule]:
    """Parse a rules file: ``[[rule]]`` tables. Errors name ``source``, rule number and key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    unknown = sorted(set(data) - {"rule"})
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key {unknown[0]!r}; expected [[rule]]")
    entries = data.get("rule", [])
    if not isinstance(entries, list):
        raise ConfigError(f"{source}: 'rule' must be an array of tables ([[rule]])")
    rules = [_parse_rule(entry, f"{source}: [[rule]] #{n}") for n, entry in enumerate(entries, 1)]
    _check_unique_ids(rules, source)
    return rules


def _check_unique_ids(rules: list[Rule], source: str) -> None:
    seen: set[str] = set()
    for n, rule in enumerate(rules, 1):
        if rule.id in seen:
            raise ConfigError(f"{source}: [[rule]] #{n}: id = {rule.id!r} is used twice")
        seen.add(rule.id)


def _parse_rule(entry: Any, where: str) -> Rule:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: must be a table, got {entry!r}")
    unknown = sorted(set(entry) - _RULE_KEYS)
    if unknown:
        key = unknown[0]
        raise ConfigError(f"{where}: unknown key {key!r} (value {entry[key]!r})")
    if not any(key in entry for key in _MATCH_KEYS):
        raise ConfigError(f"{where}: matches everything; give code, enhanced or text")
    return Rule(
        id=_rule_id(entry, where),
        category=_category(entry, where),
        codes=_codes(entry.get("code"), where),
        enhanced=_enhanced(entry.get("enhanced"), where),
        text=_text(entry.get("text"), where),
        permanent=_permanent(entry.get("permanent"), where),
    )


def _rule_id(entry: dict[str, Any], where: str) -> str:
    value = entry.get("id")
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: id = {value!r}: every rule needs a non-empty string id")
    return value


def _category(entry: dict[str, Any], where: str) -> BounceCategory:
    value = entry.get("category")
    try:
        return BounceCategory(value)
    except ValueError:
        names = ", ".join(c.value for c in BounceCategory)
        raise ConfigError(f"{where}: category = {value!r} is not one of {names}") from None


def _permanent(value: Any, where: str) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise ConfigError(f"{where}: permanent = {value!r} must be true or false")
    return value


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _codes(value: Any, where: str) -> frozenset[int] | None:
    """``550``, ``"55x"``, ``"5xx"`` or a list of them -> the set of codes they cover."""
    if value is None:
        return None
    codes: set[int] = set()
    for item in _as_list(value):
        text = str(item) if isinstance(item, int) and not isinstance(item, bool) else item
        if not isinstance(text, str) or not _CODE_SHAPE.fullmatch(text):
            raise ConfigError(
                f"{where}: code = {value!r}: use a reply code or class like 550, '55x', '5xx'"
            )
        codes.update(_expand_code(text.lower()))
    return frozenset(codes)


def _expand_code(pattern: str) -> set[int]:
    return {
        n
        for n in range(200, 600)
        if all(p in ("x", d) for p, d in zip(pattern, str(n), strict=True))
    }


def _enhanced(value: Any, where: str) -> re.Pattern[str] | None:
    """``"5.1.1"``, ``"5.7.*"``, ``"X.7.*"``, ``""`` (no enhanced code) or a list of them."""
    if value is None:
        return None
    alternatives: list[str] = []
    for item in _as_list(value):
        shape = _ENHANCED_PATTERN_SHAPE.fullmatch(item) if isinstance(item, str) else None
        if shape is None and item != "":
            raise ConfigError(
                f"{where}: enhanced = {value!r}: use codes like '5.1.1', '5.7.*', 'X.1.1', "
                "or '' for replies without one"
            )
        alternatives.append(_enhanced_regex(shape.groups()) if shape else "")
    return re.compile("|".join(f"(?:{a})" for a in alternatives))


def _enhanced_regex(parts: tuple[str, ...]) -> str:
    klass, subject, detail = parts
    klass_regex = "[245]" if klass in ("x", "X", "*") else klass
    return r"\.".join(
        [
            klass_regex,
            r"\d{1,3}" if subject == "*" else subject,
            r"\d{1,3}" if detail == "*" else detail,
        ]
    )


def _text(value: Any, where: str) -> re.Pattern[str] | None:
    """A regex, or a list of them meaning any of them; compiled as one alternation."""
    if value is None:
        return None
    items = _as_list(value)
    if not items or not all(isinstance(item, str) and item for item in items):
        raise ConfigError(
            f"{where}: text = {value!r} must be a regular expression or a list of them"
        )
    for item in items:
        _compile_text(item, where)  # so that an error names the one that is wrong
    return _compile_text(_alternation(items), where)


_SPECIAL = frozenset("\\.^$*+?{}[]|()")
_QUANTIFIERS = frozenset("?*+{")


def _alternation(items: list[str]) -> str:
    """``items`` as one alternation, those that start with the same literal character grouped
    behind it: ``user unknown|unknown user|user not found`` becomes
    ``u(?:ser (?:unknown|not found)|nknown user)`` (and so on behind each shared prefix). It
    matches the same texts, and re tries one branch per distinct first character at each
    position instead of every pattern, so long lists of wordings stay fast."""
    groups: dict[str, list[str]] = {}
    whole: list[str] = []
    for item in items:
        if not item or item[0] in _SPECIAL or item[1:2] in _QUANTIFIERS:
            whole.append(item)
        elif _has_top_level_bar(item):
            whole.append(f"(?:{item})")
        else:
            groups.setdefault(item[0], []).append(item[1:])
    factored = [
        first + (rests[0] if len(rests) == 1 else f"(?:{_alternation(rests)})")
        for first, rests in groups.items()
    ]
    return "|".join(factored + whole)


def _has_top_level_bar(pattern: str) -> bool:
    """True when ``pattern`` is itself an alternation at its top level (``a|b``)."""
    depth = 0
    in_class = escaped = False
    for char in pattern:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "|" and depth == 0:
            return True
    return False


def _compile_text(pattern: str, where: str) -> re.Pattern[str]:
    flags = 0 if _is_lowercase_pattern(pattern) else re.IGNORECASE
    try:
        return re.compile(pattern, flags)
    except re.error as exc:
        raise ConfigError(f"{where}: text = {pattern!r} is not a valid regex: {exc}") from exc


_ESCAPE = re.compile(r"\\.")
_CODEPOINT_ESCAPE = re.compile(r"\\[xuUN0-7]")


def _is_lowercase_pattern(pattern: str) -> bool:
    """True when ``pattern`` can only match lowercase letters, so that searching lowercased
    text without IGNORECASE (much faster in re) finds what IGNORECASE would."""
    if _CODEPOINT_ESCAPE.search(pattern):
        return False
    return not any(c.isupper() for c in _ESCAPE.sub("", pattern))
