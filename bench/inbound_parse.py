"""Inbound DSN parsing: messages per second through ``epoxi.bounce.inbound.parse``.

    .venv/bin/python bench/inbound_parse.py [--count N] [--rounds R]

- dsn: N distinct RFC 3464 DSNs shaped as Postfix writes them (text part, delivery-status
  with a remote reply, returned headers), each with its own recipient, queue id and reply
  text, so the classifier's cache sees what it would see in production.
- corpus: flufl.bounce's real bounces (many MTAs, most in human text only), when
  ``scripts/bootstrap test`` has fetched them into ``.venv/cache/sdist``.

Goal (issue 14): at least 2,000 DSNs a second on one core.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

from epoxi.bounce.classify import Classifier
from epoxi.bounce.inbound import Kind, parse

REPLIES = [
    "550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown in virtual mailbox table",
    "552 5.2.2 <{rcpt}>: mailbox full (quota exceeded) id {n}",
    "550 5.7.1 Service unavailable; Client host [198.51.100.{m}] blocked using zen.spamhaus.org",
    "554 5.7.1 <{rcpt}>: Relay access denied",
    "550-5.1.1 The email account that you tried to reach does not exist. Please try\n"
    " 550 5.1.1 double-checking the recipient's email address for typos {n} - gsmtp",
    "450 4.2.0 <{rcpt}>: Recipient address rejected: Greylisted, see http://postgrey/ {n}",
]

TEMPLATE = """\
Return-Path: <>
Received: by mx{m}.mail.example (Postfix) id Q{n:010d}; Tue,  1 Dec 2026 10:00:00 +0000 (UTC)
Date: Tue,  1 Dec 2026 10:00:00 +0000 (UTC)
From: MAILER-DAEMON@mx{m}.mail.example (Mail Delivery System)
Subject: Undelivered Mail Returned to Sender
To: b+01hzx3t8m2qk7r9v5w4yabcdabcdabcdabcdabcd@bounce.example
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
\tboundary="Q{n:010d}.1700000000/mx{m}.mail.example"
Message-Id: <20261201100000.Q{n:010d}@mx{m}.mail.example>

This is a MIME-encapsulated message.

--Q{n:010d}.1700000000/mx{m}.mail.example
Content-Description: Notification
Content-Type: text/plain; charset=us-ascii

This is the mail system at host mx{m}.mail.example.

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients. It's attached below.

<{rcpt}>: host in.mail.example[192.0.2.{m}] said: {reply}

--Q{n:010d}.1700000000/mx{m}.mail.example
Content-Description: Delivery report
Content-Type: message/delivery-status

Reporting-MTA: dns; mx{m}.mail.example
X-Postfix-Queue-ID: Q{n:010d}
X-Postfix-Sender: rfc822; b+01hzx3t8m2qk7r9v5w4yabcdabcdabcdabcdabcd@bounce.example
Arrival-Date: Tue,  1 Dec 2026 09:59:59 +0000 (UTC)

Final-Recipient: rfc822; {rcpt}
Original-Recipient: rfc822;{rcpt}
Action: {action}
Status: {status}
Remote-MTA: dns; in.mail.example
Diagnostic-Code: smtp; {reply}

--Q{n:010d}.1700000000/mx{m}.mail.example
Content-Description: Undelivered Message Headers
Content-Type: text/rfc822-headers

Return-Path: <b+01hzx3t8m2qk7r9v5w4yabcdabcdabcdabcdabcd@bounce.example>
Received: from shop.example (shop.example [203.0.113.5])
\tby mx{m}.mail.example (Postfix) with ESMTPS id Q{n:010d}
\tfor <{rcpt}>; Tue,  1 Dec 2026 09:59:59 +0000 (UTC)
From: News <news@shop.example>
To: <{rcpt}>
Subject: Spring offers {n}
Message-ID: <{n}.offers@shop.example>
Date: Tue,  1 Dec 2026 09:59:58 +0000

--Q{n:010d}.1700000000/mx{m}.mail.example--
"""


def dsns(count: int) -> list[bytes]:
    made = []
    for n, reply in zip(range(count), itertools.cycle(REPLIES), strict=False):
        status = reply.split()[1].split("-")[-1] if reply[3] != "-" else reply[4:9]
        text = reply.format(rcpt=f"user{n}@mail{n % 50}.example", n=n, m=n % 200)
        made.append(
            TEMPLATE.format(
                n=n,
                m=n % 200,
                rcpt=f"user{n}@mail{n % 50}.example",
                reply=text,
                status=status,
                action="delayed" if status.startswith("4") else "failed",
            )
            .replace("\n", "\r\n")
            .encode()
        )
    return made


def rate(messages: list[bytes], rounds: int) -> tuple[float, dict[str, int]]:
    """Best of ``rounds`` passes, in messages per second, with a fresh classifier each."""
    best = float("inf")
    kinds: dict[str, int] = {}
    for _ in range(rounds):
        classifier = Classifier.default()
        start = time.perf_counter()
        reports = [parse(message, classifier) for message in messages]
        best = min(best, time.perf_counter() - start)
        kinds = {k.value: sum(r.kind is k for r in reports) for k in Kind}
    return len(messages) / best, kinds


def corpus() -> list[bytes]:
    root = Path(__file__).resolve().parents[1]
    found = sorted(root.glob(".venv/cache/sdist/flufl_bounce-6.0.*/tests/data"))
    return [p.read_bytes() for p in sorted(found[-1].glob("*.txt"))] if found else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    generated = dsns(args.count)
    per_second, kinds = rate(generated, args.rounds)
    size = sum(map(len, generated)) // len(generated)
    print(
        f"dsn     {len(generated):6d} messages, {size} bytes avg: {per_second:8.0f} msg/s {kinds}"
    )
    real = corpus()
    if real:
        per_second, kinds = rate(real, args.rounds)
        print(f"corpus  {len(real):6d} messages (flufl.bounce): {per_second:8.0f} msg/s {kinds}")
    else:
        print("corpus  not fetched: run ./scripts/bootstrap test")


if __name__ == "__main__":
    main()
