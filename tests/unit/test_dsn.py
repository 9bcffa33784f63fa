"""DSN generation with the sender's RFC 3461 wishes: RET, ENVID, ORCPT, NOTIFY, delay, success."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage
from typing import Any

import pytest
from flufl.bounce import all_failures

from epoxi.bounce.dsn import (
    RecipientFailure,
    RecipientReport,
    build_dsn,
    notify_wants,
    success_action,
)
from epoxi.message import MessageMeta
from epoxi.smtp.replies import Reply

HEADERS = b"From: a@x.test\r\nTo: b@y.test\r\nSubject: hello\r\nMIME-Version: 1.0\r\n"
MESSAGE = HEADERS + b"\r\nthe body\r\n"
FAILED = [RecipientFailure("b@y.test", Reply(550, "5.1.1", "User unknown"), "mx.y.test")]
NOW = 1_700_000_500


def meta(**fields: Any) -> MessageMeta:
    return MessageMeta(
        id="ORIG",
        sender="a@x.test",
        recipients=["b@y.test", "c@y.test"],
        received_at=1_700_000_000,
        size=len(MESSAGE),
        **fields,
    )


def raw_dsn(failures: list[RecipientFailure], original: MessageMeta, **kwargs: Any) -> bytes:
    raw = build_dsn(
        reporting_mta="mx.test",
        original=original,
        original_headers=HEADERS,
        failures=failures,
        dsn_id="DSN1",
        now=NOW,
        **kwargs,
    )
    assert raw.isascii()
    return raw


def dsn(failures: list[RecipientFailure], original: MessageMeta, **kwargs: Any) -> EmailMessage:
    raw = raw_dsn(failures, original, **kwargs)
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def parts(message: EmailMessage) -> list[Any]:
    payload = message.get_payload()
    assert isinstance(payload, list)
    return payload


def blocks(message: EmailMessage) -> list[Any]:
    payload = parts(message)[1].get_payload()
    assert isinstance(payload, list)
    return payload


# ------------------------------------------------------------------------------------- RET


def returned(message: EmailMessage) -> Any:
    return parts(message)[2]


def test_ret_full_returns_the_whole_message() -> None:
    raw = raw_dsn(FAILED, meta(dsn_ret="FULL"), original_message=MESSAGE)
    assert b"\r\nContent-Type: message/rfc822\r\n\r\n" + MESSAGE + b"\r\n--" in raw  # as it was
    report = dsn(FAILED, meta(dsn_ret="FULL"), original_message=MESSAGE)
    part = returned(report)
    assert part.get_content_type() == "message/rfc822"
    (inner,) = part.iter_parts()
    assert inner["Subject"] == "hello" and inner.get_content() == "the body\r\n"
    assert "It is attached below." in parts(report)[0].get_content()


@pytest.mark.parametrize(
    ("ret", "message"),
    [("HDRS", MESSAGE), ("", MESSAGE), ("FULL", None), ("FULL", MESSAGE + b"x" * 100)],
)
def test_headers_only_unless_full_was_asked_and_fits(ret: str, message: bytes | None) -> None:
    report = dsn(FAILED, meta(dsn_ret=ret), original_message=message, return_limit=len(MESSAGE))
    part = returned(report)
    assert part.get_content_type() == "text/rfc822-headers"
    assert part.get_payload(decode=True) == HEADERS
    assert "Its headers are attached below." in parts(report)[0].get_content()


def test_ret_full_applies_only_to_failures() -> None:
    delayed = [RecipientFailure("b@y.test", Reply(451, "4.4.1", "no answer"))]
    report = dsn(delayed, meta(dsn_ret="FULL"), kind="delayed", original_message=MESSAGE)
    assert returned(report).get_content_type() == "text/rfc822-headers"


def test_ret_full_8bit_message_is_returned_7bit() -> None:
    body = HEADERS + b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + "Köln\r\n".encode()
    report = dsn(FAILED, meta(dsn_ret="FULL"), original_message=body)
    (inner,) = returned(report).iter_parts()
    assert inner["Content-Transfer-Encoding"] == "quoted-printable"
    assert inner.get_content().rstrip() == "Köln"


def test_ret_full_message_that_cannot_be_7bit_returns_headers() -> None:
    body = "Subject: Grüße\r\n\r\nKöln\r\n".encode()
    report = dsn(FAILED, meta(dsn_ret="FULL"), original_message=body)
    assert returned(report).get_content_type() == "text/rfc822-headers"


# ----------------------------------------------------------------------- ENVID and ORCPT


def test_original_envelope_id_and_original_recipient() -> None:
    original = meta(
        dsn_envid="batch 7+x",
        dsn_orcpt={"b@y.test": "rfc822;Old@y.test", "c@y.test": "rfc822;jörg@y.test"},
    )
    failures = [*FAILED, RecipientFailure("c@y.test", Reply(550, "5.1.1", "no"))]
    per_message, first, second = blocks(dsn(failures, original))
    assert per_message["Original-Envelope-Id"] == "batch 7+x"
    assert per_message.keys()[0] == "Original-Envelope-Id"
    assert first["Original-Recipient"] == "rfc822; Old@y.test"
    assert list(first.keys())[:2] == ["Original-Recipient", "Final-Recipient"]
    assert second["Original-Recipient"] == "utf-8; j\\x{F6}rg@y.test"


def test_no_envid_or_orcpt_no_fields() -> None:
    per_message, first = blocks(dsn(FAILED, meta()))
    assert "Original-Envelope-Id" not in per_message
    assert "Original-Recipient" not in first


def test_envid_cannot_break_a_field() -> None:
    (per_message, _first) = blocks(dsn(FAILED, meta(dsn_envid="x\r\nBcc: evil")))
    assert per_message["Original-Envelope-Id"] == "x??Bcc: evil"
    assert "Bcc" not in per_message


# ------------------------------------------------------------------------------- delayed


def test_delayed_dsn_says_until_when_it_is_retried() -> None:
    delayed = [RecipientFailure("b@y.test", Reply(451, "4.4.1", "no answer"), "mx.y.test")]
    report = dsn(delayed, meta(), kind="delayed", retry_until=1_700_432_000)
    (_per_message, block) = blocks(report)
    assert (block["Action"], block["Status"]) == ("delayed", "4.4.1")
    assert block["Will-Retry-Until"] == "Sun, 19 Nov 2023 22:13:20 -0000"
    text = " ".join(parts(report)[0].get_content().split())
    assert "has not been delivered yet" in text
    assert "Delivery is delayed. It will be tried again until Sun, 19 Nov 2023" in text


def test_delayed_status_is_never_permanent() -> None:
    delayed = [
        RecipientFailure("b@y.test", Reply(550, "5.7.1", "greylisted, sort of")),
        RecipientFailure("c@y.test", None, reason="no MX answered"),
    ]
    report = dsn(delayed, meta(), kind="delayed")
    assert [b["Status"] for b in blocks(report)[1:]] == ["4.7.1", "4.0.0"]
    assert all("Will-Retry-Until" not in b for b in blocks(report)[1:])


# ------------------------------------------------------------------------------- success


def test_relayed_and_delivered_success_dsn() -> None:
    ok = Reply(250, "2.0.0", "queued as 42")
    successes = [
        RecipientReport("b@y.test", ok, "mx.y.test", action="relayed"),
        RecipientReport("c@y.test", Reply(250, "", "ok"), action="delivered"),
    ]
    report = dsn(successes, meta(), kind="relayed", original_message=MESSAGE)
    assert report["Subject"] == "Successful Mail Delivery Report"
    relayed, delivered = blocks(report)[1:]
    assert (relayed["Action"], relayed["Status"]) == ("relayed", "2.0.0")
    assert relayed["Diagnostic-Code"] == "smtp; 250 2.0.0 queued as 42"
    assert (delivered["Action"], delivered["Status"]) == ("delivered", "2.0.0")
    text = parts(report)[0].get_content()
    assert "Your message was delivered to these recipients:" in text
    assert "no further report" in text and "could not be delivered" not in text
    assert returned(report).get_content_type() == "text/rfc822-headers"
    raw = report.as_bytes()
    assert all_failures(email.message_from_bytes(raw)) == (set(), set())


def test_mixed_report_groups_recipients_by_action() -> None:
    mixed = [
        RecipientReport("b@y.test", Reply(250, "2.0.0", "ok"), action="relayed"),
        RecipientFailure("c@y.test", Reply(550, "5.1.1", "User unknown")),
    ]
    text = parts(dsn(mixed, meta()))[0].get_content()
    failed_at = text.index("could not be delivered")
    assert failed_at < text.index("<c@y.test>") < text.index("passed on") < text.index("<b@y.test>")


@pytest.mark.parametrize(
    ("dsn_passed", "final", "action"),
    [(False, False, "relayed"), (True, False, None), (True, True, "delivered")],
)
def test_success_action(dsn_passed: bool, final: bool, action: str | None) -> None:
    assert success_action(dsn_passed=dsn_passed, final=final) == action


# -------------------------------------------------------------------------------- NOTIFY


@pytest.mark.parametrize(
    ("notify", "success", "failure", "delay"),
    [
        (None, False, True, True),
        ("NEVER", False, False, False),
        ("SUCCESS", True, False, False),
        ("FAILURE", False, True, False),
        ("DELAY,FAILURE", False, True, True),
        ("success,failure,delay", True, True, True),
    ],
)
def test_notify_wants(notify: str | None, success: bool, failure: bool, delay: bool) -> None:
    original = meta(dsn_notify={"b@y.test": notify} if notify else None)
    wants = [notify_wants(original, "b@y.test", e) for e in ("success", "failure", "delay")]
    assert wants == [success, failure, delay]


def test_notify_is_per_recipient() -> None:
    original = meta(dsn_notify={"b@y.test": "NEVER"})
    assert not notify_wants(original, "b@y.test", "failure")
    assert notify_wants(original, "c@y.test", "failure")
    assert not notify_wants(original, "c@y.test", "success")
