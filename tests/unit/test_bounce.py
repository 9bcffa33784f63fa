"""Bounce classification and DSN construction."""

from __future__ import annotations

import email
import email.policy
from pathlib import Path

import pytest
from flufl.bounce import all_failures

from epoxi.bounce.classify import BounceCategory, Classifier
from epoxi.bounce.dsn import RecipientFailure, build_dsn, should_send_dsn
from epoxi.errors import ConfigError
from epoxi.smtp.replies import Reply
from epoxi.spool.records import MessageMeta

C = BounceCategory
CASES = [
    (
        550,
        "5.1.1",
        "The email account that you tried to reach does not exist.",
        C.INVALID_RECIPIENT,
        True,
    ),
    (
        550,
        "5.1.1",
        "<x@y>: Recipient address rejected: User unknown in virtual mailbox table",
        C.INVALID_RECIPIENT,
        True,
    ),
    (550, "", "No such user here", C.INVALID_RECIPIENT, True),
    (553, "5.1.1", "Requested action not taken: mailbox unavailable", C.INVALID_RECIPIENT, True),
    (550, "5.5.0", "Requested action not taken: mailbox unavailable", C.INVALID_RECIPIENT, True),
    (511, "", "sorry, no mailbox here by that name", C.INVALID_RECIPIENT, True),
    (
        552,
        "5.2.2",
        "The email account that you tried to reach is over quota.",
        C.MAILBOX_FULL,
        False,
    ),
    (452, "4.2.2", "Mailbox full", C.MAILBOX_FULL, False),
    (
        550,
        "",
        "Mailbox is full / Blocks limit exceeded / Inode limit exceeded",
        C.MAILBOX_FULL,
        False,
    ),
    (552, "5.3.4", "Message size exceeds fixed maximum message size", C.MESSAGE_TOO_LARGE, True),
    (552, "", "Message too large", C.MESSAGE_TOO_LARGE, True),
    (421, "4.7.0", "Try again later, closing connection.", C.RATE_LIMITED, False),
    (
        450,
        "4.2.1",
        "The user you are trying to contact is receiving mail at a rate that prevents additional messages",
        C.RATE_LIMITED,
        False,
    ),
    (421, "", "Too many connections from your IP", C.RATE_LIMITED, False),
    (451, "4.7.1", "Greylisted, please try again in 300 seconds", C.RATE_LIMITED, False),
    (
        554,
        "5.7.1",
        "Service unavailable; Client host [1.2.3.4] blocked using zen.spamhaus.org",
        C.SPAM_BLOCK,
        True,
    ),
    (
        550,
        "5.7.1",
        "Our system has detected that this message is likely unsolicited mail",
        C.SPAM_BLOCK,
        True,
    ),
    (
        550,
        "5.7.606",
        "Access denied, banned sending IP. To request removal from this list ... blocklist",
        C.SPAM_BLOCK,
        True,
    ),
    (
        550,
        "5.7.26",
        "Unauthenticated email from x is not accepted due to domain's DMARC policy",
        C.POLICY_REJECTION,
        True,
    ),
    (
        550,
        "5.7.23",
        "The message was rejected because of Sender Policy Framework violation (SPF)",
        C.POLICY_REJECTION,
        True,
    ),
    (530, "5.7.0", "Must issue a STARTTLS command first", C.TLS_REQUIRED, True),
    (530, "5.7.0", "Authentication required", C.AUTH_REQUIRED, True),
    (535, "5.7.8", "Authentication credentials invalid", C.AUTH_REQUIRED, True),
    (550, "5.7.1", "Relaying denied", C.RELAY_DENIED, True),
    (554, "5.7.1", "<x@y>: Relay access denied", C.RELAY_DENIED, True),
    (550, "5.1.2", "Host or domain name not found", C.BAD_DOMAIN, True),
    (556, "5.1.10", "Recipient address has null MX", C.BAD_DOMAIN, True),
    (554, "5.6.0", "Message contains a virus", C.CONTENT_REJECTED, True),
    (451, "4.4.1", "connection refused", C.TRANSIENT_NETWORK, False),
    (
        451,
        "4.4.2",
        "connection lost: timeout waiting for the data-end reply",
        C.TRANSIENT_NETWORK,
        False,
    ),
    (450, "4.2.0", "Temporary failure, user x", C.TRANSIENT_NETWORK, False),
    (554, "5.7.1", "Rejected for policy reasons", C.POLICY_REJECTION, True),
    (550, "", "something nobody has seen", C.OTHER, True),
    (451, "4.3.0", "Local error in processing", C.OTHER, False),
]


@pytest.mark.parametrize(("code", "enhanced", "text", "category", "permanent"), CASES)
def test_classification_table(
    code: int, enhanced: str, text: str, category: BounceCategory, permanent: bool
) -> None:
    result = Classifier.default().classify(Reply(code, enhanced, text))
    assert (result.category, result.permanent) == (category, permanent), result.rule


def test_user_rules_come_first(tmp_path: Path) -> None:
    rules = tmp_path / "mine.toml"
    rules.write_text(
        '[[rule]]\nid = "acme"\ncategory = "SpamBlock"\ncode = "5xx"\n'
        'text = "acme says no"\npermanent = false\n'
    )
    result = Classifier.from_files([rules]).classify(Reply(550, "5.1.1", "ACME says no"))
    assert result == result.__class__(C.SPAM_BLOCK, False, "acme")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[rule]]\nid = "x"\ncategory = "Nope"\n', "category = 'Nope'"),
        ('[[rule]]\nid = "x"\ncategory = "Other"\ntext = "(("\n', "not a valid regex"),
        ('[[rule]]\nid = "x"\ncategory = "Other"\ncode = "abc"\n', "code = 'abc'"),
        ('[[rule]]\nid = "x"\ncategory = "Other"\ncolour = 1\n', "unknown key 'colour'"),
        ("[[rule]\n", "not valid TOML"),
    ],
)
def test_malformed_rules_are_config_errors(tmp_path: Path, text: str, message: str) -> None:
    rules = tmp_path / "bad.toml"
    rules.write_text(text)
    with pytest.raises(ConfigError, match=r"bad\.toml") as info:
        Classifier.from_files([rules])
    assert message in str(info.value)


def test_cache_returns_the_same_object() -> None:
    classifier = Classifier.default()
    reply = Reply(550, "5.1.1", "User unknown")
    assert classifier.classify(reply) is classifier.classify(Reply(550, "5.1.1", "User unknown"))


ORIGINAL_HEADERS = (
    b"From: a@x.test\r\nTo: b@y.test\r\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
    b"Message-ID: <1@x.test>\r\n"
)


def original() -> MessageMeta:
    return MessageMeta(
        id="ORIG",
        sender="a@x.test",
        recipients=["b@y.test", "c@y.test"],
        received_at=1_700_000_000,
        size=100,
    )


def test_dsn_is_a_parseable_delivery_status_report() -> None:
    failures = [
        RecipientFailure("b@y.test", Reply(550, "5.1.1", "User unknown"), "mx.y.test"),
        RecipientFailure("c@y.test", Reply(552, "5.2.2", "Mailbox full"), "mx.y.test"),
    ]
    raw = build_dsn(
        reporting_mta="mx.test",
        original=original(),
        original_headers=ORIGINAL_HEADERS,
        failures=failures,
        dsn_id="DSN1",
    )
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert message["Auto-Submitted"] == "auto-replied" and message["To"] == "a@x.test"
    text, status, headers = message.get_payload()  # type: ignore[misc]
    assert "User unknown" in text.get_content()
    blocks = status.get_payload()
    assert blocks[0]["Reporting-MTA"] == "dns; mx.test"
    assert [b["Final-Recipient"] for b in blocks[1:]] == ["rfc822; b@y.test", "rfc822; c@y.test"]
    assert [b["Status"] for b in blocks[1:]] == ["5.1.1", "5.2.2"]
    assert blocks[1]["Diagnostic-Code"] == "smtp; 550 5.1.1 User unknown"
    assert headers.get_content_type() == "text/rfc822-headers"
    assert headers.get_payload(decode=True) == ORIGINAL_HEADERS
    _temporary, permanent = all_failures(email.message_from_bytes(raw))
    assert {p.decode() if isinstance(p, bytes) else p for p in permanent} == {
        "b@y.test",
        "c@y.test",
    }


def test_no_dsn_for_null_sender_or_for_a_dsn() -> None:
    meta = original()
    assert should_send_dsn(meta, ORIGINAL_HEADERS)
    meta.sender = ""
    assert not should_send_dsn(meta, ORIGINAL_HEADERS)
    meta.sender = "MAILER-DAEMON@x.test"
    assert not should_send_dsn(meta, ORIGINAL_HEADERS)
    meta.sender = "a@x.test"
    report = b"Content-Type: multipart/report; report-type=delivery-status;\r\n boundary=x\r\n"
    assert not should_send_dsn(meta, report)
