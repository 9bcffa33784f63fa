"""DKIM end to end: Epoxi signs what it accepts over SMTP; independent verifiers check what
reached the sink, fetching the keys from the loopback DNS server where they are published:
dkimpy and OpenDKIM (C, libopendkim; Debian's ``opendkim``) for RSA and Ed25519, Perl's
Mail::DKIM for RSA (Debian 12's predates Ed25519)."""

from __future__ import annotations

import asyncio
import re
import smtplib
import subprocess
import sys
from pathlib import Path

import dkim
import dns.resolver
import httpx

from epoxi.dkim import DkimKey, generate, load_key
from epoxi.testing.dnsserver import DnsServer, Zone
from epoxi.testing.sink import Sink
from tests.conftest import EpoxiProcess

EPOXI = [sys.executable, "-m", "epoxi"]
OPENDKIM = Path("/usr/sbin/opendkim")  # Debian's opendkim; scripts/bootstrap installs it
# opendkim -t reports one signature a message, as "FILE: verification (s=S, d=D, ...) succeeded"
# or "... failed: REASON" (no comma after s= then).
OPENDKIM_RESULT = re.compile(
    r"verification \(s=([^,\s]+),? d=([^,\s]+),.*\) (?:(succeeded)|failed: (.*))"
)
PERL_VERIFIER = r"""
use strict;
use Mail::DKIM::Verifier;
use Net::DNS::Resolver;
Mail::DKIM::DNS::resolver(
    Net::DNS::Resolver->new(nameservers => ['127.0.0.1'], port => $ARGV[0], recurse => 1));
my $verifier = Mail::DKIM::Verifier->new();
binmode STDIN;
while (my $line = <STDIN>) { $line =~ s/\r?\n\z//; $verifier->PRINT("$line\015\012"); }
$verifier->CLOSE;
print join(" ", $_->domain, $_->selector, $_->result_detail), "\n" for $verifier->signatures;
"""

MESSAGE = (
    "From: Ann <ann@example.com>\r\nTo: bob@local.test\r\nSubject: signed\r\n"
    "Date: Tue, 1 Dec 2026 00:00:00 +0000\r\nMessage-ID: <dkim-1@example.com>\r\n\r\n"
    "Hello,\r\n.leading dot\r\n" + "body line\r\n" * 50
)


def publish(zone: Zone, key: DkimKey) -> None:
    text = key.txt_record()
    chunks = " ".join(f'"{text[i : i + 250]}"' for i in range(0, len(text), 250))
    zone.add(key.dns_name, "TXT", chunks)


def dkimpy_verdicts(message: bytes, dns_port: int) -> list[bool]:
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers, resolver.port = ["127.0.0.1"], dns_port

    def lookup(name: bytes, timeout: int = 5) -> bytes:
        answer = resolver.resolve(name.decode(), "TXT")
        return b"".join(b"".join(r.strings) for r in answer)

    verdicts = []
    for index in range(message.count(b"DKIM-Signature:")):
        try:
            verdicts.append(bool(dkim.DKIM(message).verify(index, dnsfunc=lookup)))
        except dkim.ValidationError:
            verdicts.append(False)
    return verdicts


def perl_verdicts(message: bytes, dns_port: int) -> list[str]:
    result = subprocess.run(
        ["perl", "-e", PERL_VERIFIER, str(dns_port)],
        input=message,
        capture_output=True,
        timeout=60,
        check=True,
    )
    return sorted(result.stdout.decode().split("\n"))[1:]


def one_signature_each(message: bytes) -> list[bytes]:
    """The message once per DKIM-Signature field, with that field alone kept."""
    head, _, body = message.partition(b"\r\n\r\n")
    fields = re.split(rb"\r\n(?![ \t])", head)
    signatures = [f for f in fields if f.lower().startswith(b"dkim-signature:")]
    others = [f for f in fields if f not in signatures]
    return [b"\r\n".join([s, *others]) + b"\r\n\r\n" + body for s in signatures]


def opendkim_verdicts(message: bytes, dns_port: int, workdir: Path) -> list[str]:
    """OpenDKIM's test mode (``opendkim -t``) on each signature, its resolver (libunbound)
    forwarding every query to the loopback DNS server. Test mode reports the first signature
    of a message only, so each signature goes in a file of its own, all in one run."""
    assert OPENDKIM.exists(), f"{OPENDKIM} is missing: run ./scripts/bootstrap test as root"
    workdir.mkdir(exist_ok=True)
    (workdir / "unbound.conf").write_text(
        "server:\n  do-not-query-localhost: no\n"
        f'forward-zone:\n  name: "."\n  forward-addr: 127.0.0.1@{dns_port}\n'
    )
    (workdir / "opendkim.conf").write_text(
        f"Mode v\nSyslog no\nResolverConfiguration {workdir / 'unbound.conf'}\n"
        f"TemporaryDirectory {workdir}\n"
    )
    files = []
    for index, single in enumerate(one_signature_each(message)):
        files.append(workdir / f"message-{index}.eml")
        files[-1].write_bytes(single)
    result = subprocess.run(
        [OPENDKIM, "-x", workdir / "opendkim.conf", "-t", ",".join(map(str, files))],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    verdicts = []
    for match in OPENDKIM_RESULT.finditer(result.stdout + result.stderr):
        selector, domain, passed, reason = match.groups()
        verdicts.append(f"{domain} {selector} " + ("pass" if passed else f"fail ({reason})"))
    assert len(verdicts) == len(files), result
    return sorted(verdicts)


async def test_signed_mail_verifies_with_dkimpy_opendkim_and_mail_dkim(tmp_path: Path) -> None:
    keys = []
    for kind, selector in (("rsa", "r2026"), ("ed25519", "e2026")):
        path = tmp_path / f"{selector}.pem"
        path.write_bytes(generate(kind))  # type: ignore[arg-type]
        keys.append(load_key("example.com", selector, path))
    config = tmp_path / "epoxi.toml"
    config.write_text(
        "".join(
            f'[[dkim.keys]]\ndomain = "example.com"\nselector = "{k.selector}"\n'
            f'key_file = "{k.path}"\n'
            for k in keys
        )
    )
    zone = Zone()
    for key in keys:
        publish(zone, key)
    async with DnsServer(zone) as dns_server, Sink("127.0.0.1") as sink:
        process = EpoxiProcess(tmp_path / "data", env={"EPOXI_SMTP_PORT": str(sink.port)})
        await asyncio.to_thread(process.start, config)
        try:

            def send() -> str:
                with smtplib.SMTP("127.0.0.1", process.port, timeout=30) as smtp:
                    smtp.ehlo("client.test")
                    smtp.mail("ann@example.com")
                    smtp.rcpt("bob@local.test")
                    code, text = smtp.data(MESSAGE.encode())
                    assert code == 250, text
                    return text.split()[-1].decode()

            message_id = await asyncio.to_thread(send)
            await sink.wait_for(1, timeout=30)
            received = sink.messages[0].data
            assert received.count(b"DKIM-Signature:") == 2
            assert await asyncio.to_thread(dkimpy_verdicts, received, dns_server.port) == [
                True,
                True,
            ]
            assert await asyncio.to_thread(
                opendkim_verdicts, received, dns_server.port, tmp_path / "opendkim"
            ) == ["example.com e2026 pass", "example.com r2026 pass"]
            # Debian 12's Mail::DKIM (1.20230212) predates Ed25519: it checks the RSA one.
            assert await asyncio.to_thread(perl_verdicts, received, dns_server.port) == [
                "example.com e2026 invalid (unsupported algorithm ed25519-sha256)",
                "example.com r2026 pass",
            ]
            # A changed body breaks the body hash; a changed header leaves it right, so the
            # signature itself must fail.
            tampered = received.replace(b"Hello,", b"Hullo,")
            forged = received.replace(b"Subject: signed", b"Subject: signed!")
            for altered in (tampered, forged):
                assert await asyncio.to_thread(dkimpy_verdicts, altered, dns_server.port) == [
                    False,
                    False,
                ]
                assert await asyncio.to_thread(
                    opendkim_verdicts, altered, dns_server.port, tmp_path / "opendkim"
                ) == [
                    "example.com e2026 fail (signature verification failed)",
                    "example.com r2026 fail (signature verification failed)",
                ]
            assert "example.com r2026 fail (body has been altered)" in await asyncio.to_thread(
                perl_verdicts, tampered, dns_server.port
            )
            url = f"http://127.0.0.1:{process.http_port}/messages/{message_id}"
            status = (await asyncio.to_thread(httpx.get, url)).json()
            (reception,) = [e for e in status["events"] if e["type"] == "Reception"]
            assert "d=example.com s=r2026 a=rsa-sha256" in reception["dkim"]
            assert "d=example.com s=e2026 a=ed25519-sha256" in reception["dkim"]
            checked = await asyncio.to_thread(
                subprocess.run,
                [
                    *EPOXI,
                    "dkim",
                    "check",
                    "example.com",
                    "r2026",
                    "--key-file",
                    str(keys[0].path),
                    "--nameserver",
                    f"127.0.0.1:{dns_server.port}",
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert checked.returncode == 0, checked.stderr
            assert "matches" in checked.stdout
        finally:
            await asyncio.to_thread(process.stop)


def test_keygen_prints_the_record_last_and_a_bad_key_stops_config_check(tmp_path: Path) -> None:
    out = tmp_path / "k.pem"
    made = subprocess.run(
        [
            *EPOXI,
            "dkim",
            "keygen",
            "--domain",
            "a.test",
            "--selector",
            "s1",
            "--type",
            "ed25519",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    record = made.stdout.strip().splitlines()[-1]
    assert record == load_key("a.test", "s1", out).txt_record()
    assert out.stat().st_mode & 0o077 == 0  # the key is the owner's alone
    config = tmp_path / "epoxi.toml"
    missing = tmp_path / "missing.pem"
    config.write_text(
        f'[[dkim.keys]]\ndomain = "a.test"\nselector = "s1"\nkey_file = "{missing}"\n'
    )
    checked = subprocess.run(
        [*EPOXI, "config", "check", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 2 and "missing.pem" in checked.stderr, checked.stderr
    assert "Traceback" not in checked.stderr
