"""The inbound report parser: DSNs (standard and human text), ARF complaints, auto-replies.

Real bounces from many MTAs come from flufl.bounce's sdist, fetched by ``scripts/bootstrap
test`` into ``.venv/cache/sdist`` (not committed). Without them these tests fail, not skip.
"""

from __future__ import annotations

import base64
from email.message import EmailMessage
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epoxi.bounce.classify import BounceCategory, Classifier
from epoxi.bounce.dsn import RecipientFailure, build_dsn
from epoxi.bounce.inbound import Kind, classify_reported, parse
from epoxi.message import MessageMeta
from epoxi.smtp.replies import Reply

CLASSIFIER = Classifier.default()
ROOT = Path(__file__).resolve().parents[2]
ORIGINAL_HEADERS = (
    b"Return-Path: <b+TOKEN@bounce.example>\r\n"
    b"From: News <news@shop.example>\r\n"
    b"To: <ann@mail.example>\r\n"
    b"Subject: Offers\r\n"
    b"Message-ID: <m1@shop.example>\r\n"
    b"X-Epoxi-Campaign: spring\r\n"
)


def corpus() -> Path:
    found = sorted(ROOT.glob(".venv/cache/sdist/flufl_bounce-6.0.*/tests/data"))
    assert found, "flufl.bounce's test messages are missing: run ./scripts/bootstrap test"
    return found[-1]


# ------------------------------------------------------------------- DSNs built in the test


def delivery_status(per_message: str, *recipients: str) -> str:
    return "\n".join([per_message, *recipients])


def dsn(status: str, returned: bytes = ORIGINAL_HEADERS) -> bytes:
    """A multipart/report as Postfix writes one: text, delivery-status, returned headers."""
    return "\n".join(
        [
            "From: MAILER-DAEMON@mail.example",
            "Subject: Undelivered Mail Returned to Sender",
            "MIME-Version: 1.0",
            'Content-Type: multipart/report; report-type=delivery-status; boundary="B"',
            "",
            "--B",
            "Content-Type: text/plain",
            "",
            "This is the mail system at host mail.example.",
            "",
            "--B",
            "Content-Type: message/delivery-status",
            "",
            status,
            "--B",
            "Content-Type: text/rfc822-headers",
            "",
            returned.decode().replace("\r\n", "\n"),
            "--B--",
            "",
        ]
    ).encode()


def test_dsn_machine_readable_part_decides() -> None:
    raw = dsn(
        delivery_status(
            "Reporting-MTA: dns; mail.example\nOriginal-Envelope-Id: ENV42\n",
            "Final-Recipient: rfc822; ann@mail.example\nOriginal-Recipient: rfc822;ann@mail.example"
            "\nAction: failed\nStatus: 5.1.1\nRemote-MTA: dns; mx.mail.example\n"
            "Diagnostic-Code: smtp; 550 5.1.1 <ann@mail.example>: Recipient address rejected:\n"
            " User unknown in local recipient table\n",
            "Final-Recipient: rfc822; bob@mail.example\nAction: delayed\nStatus: 4.2.2\n"
            "Diagnostic-Code: smtp; 452 4.2.2 Mailbox full\n",
        )
    )
    report = parse(raw, CLASSIFIER)
    assert report.kind is Kind.DSN
    ann, bob = report.recipients
    assert (ann.address, ann.action, ann.status) == ("ann@mail.example", "failed", "5.1.1")
    assert ann.category is BounceCategory.InvalidRecipient and ann.permanent
    assert ann.diagnostic.startswith("550 5.1.1 <ann@mail.example>: Recipient address rejected")
    assert ann.remote_mta == "mx.mail.example"
    assert ann.original_recipient == "ann@mail.example"
    assert (bob.action, bob.status, bob.category) == (
        "delayed",
        "4.2.2",
        BounceCategory.MailboxFull,
    )
    assert not bob.permanent
    assert report.failed == (ann,)
    assert report.reporting_mta == "mail.example"
    assert report.original.envelope_id == "ENV42"
    assert report.original.message_id == "<m1@shop.example>"
    assert report.original.return_path == "b+TOKEN@bounce.example"
    assert report.original.epoxi == {"x-epoxi-campaign": "spring"}


def test_dsn_without_diagnostic_is_classified_by_its_status() -> None:
    raw = dsn(
        delivery_status(
            "Reporting-MTA: dns; mail.example\n",
            "Final-Recipient: rfc822;ann@mail.example\nAction: failed\nStatus: 5.2.2\n",
        )
    )
    (ann,) = parse(raw, CLASSIFIER).recipients
    assert (ann.status, ann.category, ann.permanent) == ("5.2.2", BounceCategory.MailboxFull, True)


def test_generic_status_takes_the_diagnostics_detail() -> None:
    raw = dsn(
        delivery_status(
            "Reporting-MTA: dns; mail.example\n",
            "Final-Recipient: rfc822;ann@mail.example\nAction: failed\nStatus: 5.0.0\n"
            "Diagnostic-Code: smtp; 550-5.7.1 this message has been blocked as spam\n",
        )
    )
    (ann,) = parse(raw, CLASSIFIER).recipients
    assert (ann.status, ann.category) == ("5.7.1", BounceCategory.SpamBlock)


def test_relay_that_gave_up_on_a_transient_failure_reports_an_expiry() -> None:
    # Postfix after maximal_queue_lifetime: Action failed, the last (4xx) trouble as Status.
    raw = dsn(
        delivery_status(
            "Reporting-MTA: dns; mail.example\n",
            "Final-Recipient: rfc822;ann@mail.example\nAction: failed\nStatus: 4.4.1\n"
            "Diagnostic-Code: X-Postfix; delivery temporarily suspended: connect to\n"
            " mx.mail.example[192.0.2.1]:25: Connection timed out\n",
            "Final-Recipient: rfc822;bob@mail.example\nAction: delayed\nStatus: 4.4.1\n"
            "Diagnostic-Code: X-Postfix; connect to mx.mail.example[192.0.2.1]:25: Connection\n"
            " timed out\n",
        )
    )
    ann, bob = parse(raw, CLASSIFIER).recipients
    assert (ann.category, ann.permanent) == (BounceCategory.Expired, True)
    assert (bob.category, bob.permanent) == (BounceCategory.TransientNetwork, False)


def test_classify_reported_keeps_lasting_reasons_and_makes_failures_final() -> None:
    full = Reply(552, "5.2.2", "Mailbox full")
    assert CLASSIFIER.classify(full).permanent is False  # Epoxi itself would retry
    verdict = classify_reported(CLASSIFIER, full, "failed")
    assert (verdict.category, verdict.permanent) == (BounceCategory.MailboxFull, True)
    unknown = Reply(450, "4.1.1", "Recipient address rejected: User unknown")
    verdict = classify_reported(CLASSIFIER, unknown, "failed")
    assert (verdict.category, verdict.permanent) == (BounceCategory.InvalidRecipient, True)
    assert classify_reported(CLASSIFIER, unknown, "delayed") == CLASSIFIER.classify(unknown)


def test_dsn_without_diagnostic_takes_the_reason_from_its_text_part() -> None:
    raw = dsn(
        delivery_status(
            "Reporting-MTA: dns; mail.example\n",
            "Final-Recipient: rfc822; ann@nowhere.example\nAction: failed\nStatus: 5.0.0\n",
        )
    ).replace(
        b"This is the mail system at host mail.example.\n",
        b"This is the mail system at host mail.example.\n\n"
        b"ann@nowhere.example: Domain does not exist\n",
    )
    (ann,) = parse(raw, CLASSIFIER).recipients
    assert ann.diagnostic == "ann@nowhere.example: Domain does not exist"
    assert (ann.status, ann.category) == ("5.0.0", BounceCategory.BadDomain)


def test_reply_code_in_brackets_after_the_text_and_not_inside_ids() -> None:
    raw = dsn(
        delivery_status(
            "Reporting-MTA: dns; mail.example\n",
            "Final-Recipient: rfc822;ann@mail.example\nAction: failed\nStatus: 5.0.0\n"
            "Diagnostic-Code: smtp; Requested action not taken: mailbox unavailable.\n"
            " [SMTP Error Code 550]\n",
            "Final-Recipient: rfc822;bob@mail.example\nAction: failed\nStatus: 5.0.0\n"
            "Diagnostic-Code: X-Notes; unknown recipient (id NextPart_01C276B8.EB5EB90E)\n",
        )
    )
    ann, bob = parse(raw, CLASSIFIER).recipients
    assert ann.category is BounceCategory.InvalidRecipient
    assert bob.category is BounceCategory.InvalidRecipient


def test_epoxis_own_dsn_round_trips() -> None:
    original = MessageMeta(
        id="ORIG", sender="a@x.test", recipients=["b@y.test"], received_at=1.7e9, size=10
    )
    raw = build_dsn(
        reporting_mta="mx.test",
        original=original,
        original_headers=ORIGINAL_HEADERS,
        failures=[RecipientFailure("b@y.test", Reply(552, "5.2.2", "Over quota"), "mx.y.test")],
        dsn_id="DSN1",
        now=1.7e9,
    )
    report = parse(raw, CLASSIFIER)
    (b,) = report.recipients
    assert (b.address, b.action, b.status, b.category) == (
        "b@y.test",
        "failed",
        "5.2.2",
        BounceCategory.MailboxFull,
    )
    assert report.original.message_id == "<m1@shop.example>"


# ------------------------------------------------------------------------------------ ARF


def arf(fields: str, returned: MIMEBase) -> bytes:
    report = MIMEMultipart("report", report_type="feedback-report")
    report["From"] = "<staff@isp.example>"
    report["Subject"] = "FW: Offers"
    report.attach(MIMEText("This is an email abuse report for an email message received.\n"))
    feedback = MIMEBase("message", "feedback-report")
    feedback.set_payload(fields)
    report.attach(feedback)
    report.attach(returned)
    return report.as_bytes()


def returned_message() -> MIMEBase:
    original = EmailMessage()
    for line in ORIGINAL_HEADERS.decode().splitlines():
        name, _, value = line.partition(": ")
        original[name] = value
    original.set_content("Spring offers!\n")
    part = MIMEBase("message", "rfc822")
    part.set_payload([original])
    return part


def test_arf_complaint_becomes_feedback() -> None:
    raw = arf(
        "Feedback-Type: abuse\nUser-Agent: SomeGenerator/1.0\nVersion: 1\n"
        "Original-Mail-From: <b+TOKEN@bounce.example>\nOriginal-Rcpt-To: <ann@mail.example>\n"
        "Arrival-Date: Thu, 8 Mar 2005 14:00:00 EDT\nSource-IP: 192.0.2.1\n"
        "Reported-Domain: shop.example\n",
        returned_message(),
    )
    report = parse(raw, CLASSIFIER)
    assert report.kind is Kind.ARF and report.recipients == ()
    feedback = report.feedback
    assert feedback is not None
    assert feedback.feedback_type == "abuse"
    assert feedback.user_agent == "SomeGenerator/1.0"
    assert feedback.original_mail_from == "b+TOKEN@bounce.example"
    assert feedback.original_rcpt_to == "ann@mail.example"
    assert feedback.source_ip == "192.0.2.1"
    assert feedback.reported_domain == "shop.example"
    assert report.original.message_id == "<m1@shop.example>"
    assert report.original.return_path == "b+TOKEN@bounce.example"
    assert report.original.epoxi == {"x-epoxi-campaign": "spring"}


def test_redacted_arf_with_headers_only_names_the_recipient_by_to() -> None:
    headers = MIMEBase("text", "rfc822-headers")
    headers.set_payload(ORIGINAL_HEADERS.decode())
    report = parse(
        arf("Feedback-Type: fraud\nUser-Agent: FBL/2\nVersion: 1\n", headers), CLASSIFIER
    )
    assert report.feedback is not None and report.feedback.feedback_type == "fraud"
    assert report.feedback.original_rcpt_to == ""
    assert report.original.recipient == "ann@mail.example"


# ------------------------------------------------------------------- auto-replies and none


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("Auto-Submitted", "auto-replied (vacation)"),
        ("X-Autoreply", "yes"),
        ("Subject", "Out of Office: Offers"),
        ("Subject", "Automatic reply: Offers"),
    ],
)
def test_autoreply(header: str, value: str) -> None:
    message = EmailMessage()
    message["From"] = "ann@mail.example"
    message[header] = value
    message.set_content("I am away until Monday.\n")
    assert parse(message.as_bytes(), CLASSIFIER).kind is Kind.AUTOREPLY


def test_ordinary_mail_is_none() -> None:
    message = EmailMessage()
    message["From"] = "ann@mail.example"
    message["Subject"] = "Hello"
    message.set_content("Just a note.\n")
    report = parse(message.as_bytes(), CLASSIFIER)
    assert report.kind is Kind.NONE and report.recipients == () and report.feedback is None


def test_garbage_is_none() -> None:
    assert parse(b"\x00\xff not a message at all", CLASSIFIER).kind is Kind.NONE


# -------------------------------------------------------- real bounces from flufl.bounce


@pytest.mark.parametrize(
    ("name", "address", "action", "status", "category"),
    [
        # RFC 3464 DSNs
        ("dsn_05.txt", "userx@example.cz", "delayed", "4.4.1", "TransientNetwork"),
        ("dsn_12.txt", "userx@example.jp", "failed", "5.1.1", "InvalidRecipient"),
        ("dsn_14.txt", "userx@example.com.dk", "failed", "5.1.1", "InvalidRecipient"),
        ("dsn_17.txt", "xxx@example.fi", "delayed", "4.3.0", "MailboxFull"),
        ("dsn_15.txt", "userx@example.com", "failed", "5.1.1", "InvalidRecipient"),  # forwarded
        ("dsn_03.txt", "userx@example.be", "failed", "5.0.0", "MessageTooLarge"),  # odd fields
        # Exim (with a DSN part) relaying Gmail's spam refusal
        ("simple_42.txt", "david...@gmail.com", "failed", "5.7.1", "SpamBlock"),
        # human text only: Postfix, Exim, qmail, Microsoft, Yahoo, Sendmail-like
        ("postfix_01.txt", "xxxxx@local.ie", "failed", "5.1.1", "InvalidRecipient"),
        # a final bounce after "Host not found, try again": DNS failed for now, until it expired
        ("postfix_02.txt", "yyyyy@digicool.com", "failed", "5.0.0", "Expired"),
        ("postfix_04.txt", "userx@mail1.example.com", "failed", "5.0.0", "MailboxFull"),
        ("exim_01.txt", "userx@its.example.nl", "failed", "5.1.1", "InvalidRecipient"),
        ("qmail_03.txt", "userx@example.jp", "failed", "5.1.1", "InvalidRecipient"),
        ("qmail_06.txt", "ntl@xxx.com", "failed", "5.0.0", "MailboxFull"),
        ("microsoft_01.txt", "userx@example.COM", "failed", "5.0.0", "InvalidRecipient"),
        ("yahoo_02.txt", "userx@example.es", "failed", "5.0.0", "MailboxFull"),
        ("yahoo_11.txt", "bad_user@aol.com", "failed", "5.1.1", "InvalidRecipient"),
        ("simple_07.txt", "userx@example.net", "failed", "5.0.0", "MailboxFull"),
        ("simple_15.txt", "userx@example.be", "failed", "5.1.1", "InvalidRecipient"),
        ("simple_21.txt", "userx@example.com", "delayed", "4.0.0", "TransientNetwork"),  # no reply
    ],
)
def test_real_bounces(name: str, address: str, action: str, status: str, category: str) -> None:
    report = parse((corpus() / name).read_bytes(), CLASSIFIER)
    assert report.kind is Kind.DSN
    found = {r.address: r for r in report.recipients}
    assert address in found, sorted(found)
    recipient = found[address]
    assert (recipient.action, recipient.status, recipient.category.value) == (
        action,
        status,
        category,
    )
    assert recipient.permanent is (action == "failed")


def test_yahoo_multi_recipient_bounce_names_each() -> None:
    report = parse((corpus() / "yahoo_07.txt").read_bytes(), CLASSIFIER)
    assert [r.address for r in report.failed] == [
        "userw@example.com",
        "userx@example.com",
        "usery@example.com",
        "userz@example.com",
    ]
    assert {r.category for r in report.failed} == {BounceCategory.InvalidRecipient}


def test_every_corpus_message_parses() -> None:
    kinds = {p.name: parse(p.read_bytes(), CLASSIFIER).kind for p in corpus().glob("*.txt")}
    assert len(kinds) > 100
    assert sum(kind is Kind.DSN for kind in kinds.values()) > 100
    assert kinds["qmail_08.txt"] is Kind.AUTOREPLY  # a vacation reply


def test_base64_delivery_status_and_encoded_autoreply_subject() -> None:
    status = base64.b64encode(
        b"Reporting-MTA: dns; mail.example\r\n\r\nFinal-Recipient: rfc822; ann@mail.example\r\n"
        b"Action: failed\r\nStatus: 5.1.1\r\n"
    ).decode()
    raw = dsn(status).replace(
        b"Content-Type: message/delivery-status\n",
        b"Content-Type: message/delivery-status\nContent-Transfer-Encoding: base64\n",
    )
    (ann,) = parse(raw, CLASSIFIER).recipients
    assert (ann.address, ann.status) == ("ann@mail.example", "5.1.1")
    away = b"From: ann@mail.example\nSubject: =?utf-8?q?Automatic_reply=3A_Offers?=\n\nAway.\n"
    assert parse(away, CLASSIFIER).kind is Kind.AUTOREPLY


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=300).map(lambda tail: ORIGINAL_HEADERS + b"\r\n" + tail))
def test_any_message_parses_to_some_kind(data: bytes) -> None:
    assert parse(data, CLASSIFIER).kind in Kind
