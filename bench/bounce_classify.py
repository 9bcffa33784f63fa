"""Microseconds per bounce classification: cache hits, near hits and misses.

    .venv/bin/python bench/bounce_classify.py [--rounds N]

- exact hit: the same reply text again (one LRU lookup).
- normalised hit: the text differs only in ids/addresses, as Gmail's and Outlook's replies do
  from message to message (normalise, then one LRU lookup).
- miss: nothing cached (normalise, walk the rules, fall back on the codes).
"""

from __future__ import annotations

import argparse
import itertools
import timeit

from epoxi.bounce.classify import Classifier
from epoxi.smtp.replies import Reply

TEMPLATES: list[tuple[int, str, str]] = [
    (550, "5.1.1", "The email account that you tried to reach does not exist. Please try "
     "double-checking the recipient's email address for typos or unnecessary spaces. For more "
     "information, go to https://support.google.com/mail/?p=NoSuchUser {id}.{n} - gsmtp"),
    (452, "4.2.2", "The email account that you tried to reach is over quota. Please direct the "
     "recipient to https://support.google.com/mail/?p=OverQuotaTemp {id}.{n} - gsmtp"),
    (550, "5.5.0", "Requested action not taken: mailbox unavailable (S2017062302). "
     "[{id}.eop-nam12.prod.protection.outlook.com 2024-03-01T10:00:{n:02d}.000Z]"),
    (421, "4.7.0", "[TSS04] Messages from 192.0.2.{n} temporarily deferred due to unexpected "
     "volume or user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes"),
    (550, "5.1.1", "<user{n}@example.com>: Recipient address rejected: User unknown in virtual "
     "mailbox table"),
    (554, "5.7.1", "Service unavailable; Client host [198.51.100.{n}] blocked using "
     "zen.spamhaus.org"),
    (451, "4.3.0", "Mail server temporarily rejected message {id}"),
    (550, "", "something nobody has seen {n}"),
]  # fmt: skip


def replies(count: int) -> list[Reply]:
    """``count`` replies cycling over the templates, each with its own id."""
    made = []
    for n, (code, enhanced, text) in zip(range(count), itertools.cycle(TEMPLATES), strict=False):
        unique = f"d9443c01a{n:06d}-1e0bb0b1bd3si{n:08d}pla"
        made.append(Reply(code, enhanced, text.format(id=unique, n=n % 100)))
    return made


def per_call_us(classifier: Classifier, batch: list[Reply], rounds: int) -> float:
    """Best of ``rounds`` passes over ``batch``, in microseconds per classify."""
    classify = classifier.classify
    timer = timeit.Timer(lambda: [classify(r) for r in batch])
    return min(timer.repeat(repeat=rounds, number=1)) / len(batch) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--replies", type=int, default=20_000)
    args = parser.parse_args()
    batch = replies(args.replies)

    warm = Classifier.default()
    exact = per_call_us(warm, batch[:1000], args.rounds)  # fits in the cache: hits after round 1

    # More distinct texts than the exact cache holds, scanned in order: every call misses the
    # exact cache (LRU) and hits the normalised one, which holds one entry per wording.
    near = Classifier.default()
    normalised = per_call_us(near, batch, args.rounds)

    cold = Classifier(Classifier.default().rules, cache_size=0)
    miss = per_call_us(cold, batch[:2000], args.rounds)

    print(f"rules: {len(warm.rules)}; replies: {len(batch)} over {len(TEMPLATES)} wordings")
    print(f"exact hit       {exact:7.2f} us/classify")
    print(f"normalised hit  {normalised:7.2f} us/classify")
    print(f"miss            {miss:7.2f} us/classify")


if __name__ == "__main__":
    main()
