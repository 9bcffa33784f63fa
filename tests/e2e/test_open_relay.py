"""No open relay, and no secrets where they do not belong, over real sockets.

From a client that is neither trusted nor authenticated (plain, after STARTTLS, and after a
failed AUTH), every way of writing a foreign address is refused at RCPT and nothing is queued.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import smtplib
import ssl
from pathlib import Path

import pytest

from tests.e2e.conftest import PASSWORD, MakeServer, Running

RELAY_FORMS = [
    "<x@elsewhere.test>",  # plain foreign address
    "<X@ELSEWHERE.TEST>",  # mixed case
    "<x@elsewhere.test.>",  # trailing dot
    "<@local.test:x@elsewhere.test>",  # source route through a local domain
    "<@local.test,@mx.test:x@elsewhere.test>",  # longer source route
    "<x%elsewhere.test@local.test>",  # percent hack
    "<elsewhere.test!x@local.test>",  # bang path
    '<"x@elsewhere.test"@local.test>',  # quoted local part with an @
    '<"x%elsewhere.test"@local.test>',  # quoted percent hack
    "<x@[192.0.2.1]>",  # IP literal
    "<x@[IPv6:2001:db8::1]>",  # IPv6 literal
    "<x@local.test@elsewhere.test>",  # user@domain@relay
    "<x@xn--lcal-8qa.test>",  # punycode that is not the local domain
    "<x@local.test.elsewhere.test>",  # local domain as a prefix
    "<x@sub.local.test>",  # a subdomain is not the domain
]
LOCAL = "<postmaster@local.test>"


def relay_attempt(server: Running, mode: str, form: str) -> tuple[int, bytes]:
    """RCPT of ``form`` from the untrusted listener, in a session of its own (rejected
    recipients count as errors, and a session closes after too many)."""
    with smtplib.SMTP("127.0.0.1", server.ports.untrusted, timeout=10) as smtp:
        smtp.ehlo("client.test")
        if mode in ("starttls", "failed-auth"):
            smtp.starttls(context=server.client_tls())
            smtp.ehlo("client.test")
        if mode == "failed-auth":
            token = base64.b64encode(b"\0alice\0wrong").decode()
            code, _ = smtp.docmd("AUTH", f"PLAIN {token}")
            assert code == 535
        smtp.docmd("MAIL", "FROM:<someone@remote.test>")
        return smtp.docmd("RCPT", f"TO:{form}")


@pytest.mark.parametrize("mode", ["plain", "starttls", "failed-auth"])
async def test_no_relay_address_form_gets_through(make_server: MakeServer, mode: str) -> None:
    server: Running = await make_server(smtp={"auth_max_failures": 1000})
    replies = {
        form: await asyncio.to_thread(relay_attempt, server, mode, form) for form in RELAY_FORMS
    }
    assert all(500 <= code < 600 for code, _ in replies.values()), replies
    local = await asyncio.to_thread(relay_attempt, server, mode, LOCAL)
    assert local[0] == 250  # the local domain itself is still served
    assert await server.spooled() == []


def authenticate(server: Running, password: str) -> int:
    with smtplib.SMTP("127.0.0.1", server.ports.submission, timeout=10) as smtp:
        smtp.ehlo("client.test")
        smtp.starttls(context=server.client_tls())
        smtp.ehlo("client.test")
        try:
            smtp.login("alice", password)
        except smtplib.SMTPAuthenticationError as exc:
            return exc.smtp_code
        smtp.sendmail("alice@local.test", ["x@elsewhere.test"], b"Subject: ok\r\n\r\nok\r\n")
        return 235


async def test_credentials_never_reach_logs_records_or_repr(
    make_server: MakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server: Running = await make_server(log_level="debug")
    assert await asyncio.to_thread(authenticate, server, "not-the-password-42") == 535
    assert await asyncio.to_thread(authenticate, server, PASSWORD) == 235
    await server.app.records.flush()
    secrets = [PASSWORD, "not-the-password-42", base64.b64encode(b"\0alice\0" + PASSWORD.encode())]
    records = (server.data_dir / "logs" / "records.jsonl").read_text()
    settings = server.app.settings
    places = {
        "log": caplog.text,
        "records": records,
        "settings repr": repr(settings) + repr(settings.smtp),
        "users repr": str(settings.model_dump(exclude={"users"})),
    }
    for secret in secrets:
        text = secret.decode() if isinstance(secret, bytes) else secret
        for where, content in places.items():
            assert text not in content, f"{text!r} found in the {where}"
    assert settings.users["alice"] not in repr(settings)  # nor the hash


async def test_auth_failures_are_throttled_per_user_across_addresses(
    make_server: MakeServer,
) -> None:
    """Guessing one user's password from many client addresses is throttled too."""
    server: Running = await make_server(smtp={"auth_max_failures": 3})

    def guess(source: str, password: str = "guess") -> int:
        smtp = smtplib.SMTP(
            "127.0.0.1", server.ports.submission, timeout=10, source_address=(source, 0)
        )
        try:
            smtp.ehlo("client.test")
            context = ssl.create_default_context(cafile=str(Path(server.data_dir) / "tls-cert.pem"))
            context.check_hostname = False
            smtp.starttls(context=context)
            smtp.ehlo("client.test")
            token = base64.b64encode(f"\0alice\0{password}".encode()).decode()
            code, _ = smtp.docmd("AUTH", f"PLAIN {token}")
            return code
        finally:
            smtp.close()

    codes = [await asyncio.to_thread(guess, f"127.0.0.{10 + i}") for i in range(3)]
    assert codes == [535, 535, 535]
    # alice is now blocked: from a fourth address even her right password is refused, with
    # the same reply, so a guesser learns nothing
    assert await asyncio.to_thread(guess, "127.0.0.20", PASSWORD) == 535
