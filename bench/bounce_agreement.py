"""How often the bounce rules agree with a labelled set of real-world replies.

    .venv/bin/python bench/bounce_agreement.py [--misses] [--rules FILE]

- replies: ``tests/data/bounce-corpus/replies.toml``, replies and DSN diagnostics as receivers
  word them, each labelled with the category and permanence it means (its header says how).
  Agreement on the reason (category) and on permanent vs temporary, overall, per expected
  category, and per kind of reply: with an RFC 3463 enhanced code, or without one (a bare
  code, or prose from a human-readable bounce).
- holdout: ``tests/data/bounce-corpus/holdout.toml``, more replies in the same format, never
  used to tune the rules: how they do on wordings they were not written against.
- flufl: ``tests/data/bounce-corpus/flufl.toml`` labels the recipients of some of
  flufl.bounce's real bounce messages; they go through Epoxi's inbound parser. Only when
  ``scripts/bootstrap test`` has fetched them into ``.venv/cache/sdist``.

``--rules FILE`` classifies with that file's rules alone instead of the shipped ones (to
measure an older or a candidate rules file on the same set). ``--misses`` lists each miss.
"""

from __future__ import annotations

import argparse
import tomllib
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from epoxi.bounce.classify import BounceCategory, Classifier, load_rules
from epoxi.bounce.inbound import classify_reported, parse
from epoxi.smtp.replies import Reply

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "data" / "bounce-corpus"
REPLIES = CORPUS / "replies.toml"
HOLDOUT = CORPUS / "holdout.toml"
FLUFL = CORPUS / "flufl.toml"


@dataclass(frozen=True, slots=True)
class Case:
    """One labelled failed recipient and Epoxi's verdict on it."""

    where: str  # the reply text, or "file: address"
    group: str  # "enhanced", "no enhanced code" or "flufl"
    expected: BounceCategory
    expected_permanent: bool
    got: BounceCategory
    got_permanent: bool
    rule: str

    @property
    def reason_ok(self) -> bool:
        return self.got is self.expected

    @property
    def permanence_ok(self) -> bool:
        return self.got_permanent is self.expected_permanent


def load_replies(path: Path = REPLIES) -> list[dict[str, object]]:
    """The labelled entries of a replies file."""
    with path.open("rb") as f:
        entries = tomllib.load(f)["reply"]
    assert isinstance(entries, list)
    return entries


def reply_cases(classifier: Classifier, entries: Iterable[dict[str, object]]) -> list[Case]:
    """Classify each labelled reply as the outbound path (or, with an action, a DSN) would."""
    cases = []
    for entry in entries:
        code, enhanced, text = entry["code"], entry["enhanced"], entry["text"]
        assert isinstance(code, int) and isinstance(enhanced, str) and isinstance(text, str)
        action = str(entry.get("action", ""))
        verdict = classify_reported(classifier, Reply(code, enhanced, text), action)
        cases.append(
            Case(
                where=f"{code} {enhanced} {text}".replace("  ", " "),
                group="enhanced" if enhanced else "no enhanced code",
                expected=BounceCategory(entry["category"]),
                expected_permanent=bool(entry["permanent"]),
                got=verdict.category,
                got_permanent=verdict.permanent,
                rule=verdict.rule,
            )
        )
    return cases


def flufl_data() -> Path | None:
    """flufl.bounce's test messages, when scripts/bootstrap has fetched them."""
    found = sorted(ROOT.glob(".venv/cache/sdist/flufl_bounce-6.0.*/tests/data"))
    return found[-1] if found else None


def flufl_cases(classifier: Classifier, data: Path, manifest: Path = FLUFL) -> list[Case]:
    """Each labelled recipient of flufl.bounce's messages, through the inbound parser."""
    with manifest.open("rb") as f:
        messages = tomllib.load(f)["message"]
    cases = []
    for name, recipients in sorted(messages.items()):
        report = parse((data / name).read_bytes(), classifier)
        found = {r.address.lower(): r for r in report.recipients}
        for address, label in recipients.items():
            seen = found.get(address.lower())
            cases.append(
                Case(
                    where=f"{name}: {address}",
                    group="flufl",
                    expected=BounceCategory(label["category"]),
                    expected_permanent=bool(label["permanent"]),
                    got=seen.category if seen else BounceCategory.Other,
                    got_permanent=seen.permanent if seen else not label["permanent"],
                    rule=(seen.diagnostic or seen.status) if seen else "(recipient not found)",
                )
            )
    return cases


def agreement(cases: list[Case]) -> tuple[float, float]:
    """Fractions of ``cases`` that agree on the reason and on the permanence."""
    if not cases:
        return (1.0, 1.0)
    return (
        sum(c.reason_ok for c in cases) / len(cases),
        sum(c.permanence_ok for c in cases) / len(cases),
    )


def _line(label: str, cases: list[Case]) -> str:
    reason, permanence = agreement(cases)
    return f"{label:<28} {len(cases):5d} {reason:8.1%} {permanence:8.1%}"


def report(cases: list[Case], title: str) -> list[str]:
    """Agreement overall, per kind of reply and per expected category."""
    lines = [title, f"{'':<28} {'n':>5} {'reason':>8} {'perm':>8}", _line("all", cases)]
    by_group: dict[str, list[Case]] = defaultdict(list)
    by_category: dict[str, list[Case]] = defaultdict(list)
    for case in cases:
        by_group[case.group].append(case)
        by_category[case.expected.value].append(case)
    if len(by_group) > 1:
        lines += [_line(f"  {group}", group_cases) for group, group_cases in by_group.items()]
    lines += [_line(f"  {name}", by_category[name]) for name in sorted(by_category)]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--misses", action="store_true", help="list every disagreement")
    parser.add_argument("--rules", type=Path, help="classify with this rules file alone")
    args = parser.parse_args()
    if args.rules:
        classifier = Classifier(load_rules(args.rules.read_text(encoding="utf-8"), str(args.rules)))
    else:
        classifier = Classifier.default()

    cases = reply_cases(classifier, load_replies())
    print("\n".join(report(cases, f"replies ({REPLIES.relative_to(ROOT)})")))
    holdout = reply_cases(classifier, load_replies(HOLDOUT))
    print()
    print("\n".join(report(holdout, f"held out ({HOLDOUT.relative_to(ROOT)})")))
    data = flufl_data()
    flufl = flufl_cases(classifier, data) if data else []
    if flufl:
        print()
        print("\n".join(report(flufl, f"flufl.bounce messages ({FLUFL.relative_to(ROOT)})")))
    else:
        print("\n(flufl.bounce's messages are missing: run ./scripts/bootstrap test)")
    if args.misses:
        print("\nmisses: expected -> got (rule)")
        for case in cases + holdout + flufl:
            if not (case.reason_ok and case.permanence_ok):
                print(
                    f"  {case.expected.value}/{'perm' if case.expected_permanent else 'temp'}"
                    f" -> {case.got.value}/{'perm' if case.got_permanent else 'temp'}"
                    f" ({case.rule}): {case.where[:150]}"
                )


if __name__ == "__main__":
    main()
