"""DKIM signing, verified by dkimpy's verifier against the published records."""

from __future__ import annotations

from pathlib import Path

import dkim
import pytest

from epoxi.dkim import DkimKey, Signer, generate, load_key
from epoxi.dkim.keys import parse_record
from epoxi.dkim.signer import from_domain, header_fields, relaxed_body, sign_list
from epoxi.errors import ConfigError

MESSAGE = (
    b"From: Ann <ann@mail.example.com>\r\nTo: bob@x.test\r\nSubject: hello\r\n"
    b"Date: Tue, 1 Dec 2026 00:00:00 +0000\r\nMessage-ID: <1@mail.example.com>\r\n\r\n"
    b"Hello Bob,\r\n\r\n.. a line with dots\r\n" + b"x" * 2000 + b"\r\n"
)


def make_key(
    tmp_path: Path, kind: str, domain: str = "example.com", selector: str = "s1"
) -> DkimKey:
    path = tmp_path / f"{domain}.{selector}.pem"
    path.write_bytes(generate(kind))  # type: ignore[arg-type]
    return load_key(domain, selector, path)


def verifier(*keys: DkimKey):  # type: ignore[no-untyped-def]
    records = {f"{k.dns_name}.".encode(): k.txt_record().encode() for k in keys}
    return lambda name, timeout=5: records.get(name)


def verifies(message: bytes, index: int, *keys: DkimKey) -> bool:
    try:
        return bool(dkim.DKIM(message).verify(index, dnsfunc=verifier(*keys)))
    except dkim.ValidationError:
        return False


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_a_signature_verifies_and_a_change_breaks_it(tmp_path: Path, kind: str) -> None:
    key = make_key(tmp_path, kind)
    signed = Signer([key]).sign(MESSAGE)
    assert signed.signatures == [f"d=example.com s=s1 a={key.algorithm}"]
    assert verifies(signed.body, 0, key)
    assert not verifies(signed.body.replace(b"Hello Bob", b"Hello Eve"), 0, key)
    assert not verifies(signed.body.replace(b"Subject: hello", b"Subject: hullo"), 0, key)
    added = signed.body.replace(b"\r\nFrom: Ann", b"\r\nFrom: evil@x.test\r\nFrom: Ann", 1)
    assert not verifies(added, 0, key)  # From is over-signed: a second one breaks it


def test_rsa_and_ed25519_sign_one_message_side_by_side(tmp_path: Path) -> None:
    rsa_key = make_key(tmp_path, "rsa", selector="r1")
    ed_key = make_key(tmp_path, "ed25519", selector="e1")
    signed = Signer([rsa_key, ed_key]).sign(MESSAGE)
    assert signed.body.count(b"DKIM-Signature:") == 2
    assert verifies(signed.body, 0, rsa_key, ed_key) and verifies(signed.body, 1, rsa_key, ed_key)


def test_the_signing_domain_is_the_from_domain_or_its_parent_or_the_tenants(tmp_path: Path) -> None:
    main = make_key(tmp_path, "ed25519")
    other = make_key(tmp_path, "ed25519", domain="acme.test")
    signer = Signer([main, other], tenants={"acme": "acme.test", "quiet": ""})
    assert signer.keys_for("", "mail.example.com") == ([main], "")  # a parent, aligned
    assert signer.keys_for("", "example.org") == ([], "no key for example.org")
    assert signer.keys_for("acme", "example.com") == ([other], "")
    assert signer.keys_for("quiet", "example.com") == ([], "tenant quiet is not signed")
    unsigned = signer.sign(MESSAGE.replace(b"mail.example.com>", b"example.org>", 1))
    assert unsigned.signatures == [] and unsigned.unsigned_reason == "no key for example.org"
    assert b"DKIM-Signature" not in unsigned.body


def test_from_domain_reads_folded_and_bare_addresses() -> None:
    assert from_domain(header_fields(b"From: Ann\r\n <ann@A.Example.COM>\r\n")) == ("a.example.com")
    assert from_domain(header_fields(b"Subject: x\r\nfrom: bob@b.test\r\n")) == "b.test"
    assert from_domain(header_fields(b"Subject: x\r\n")) == ""


def test_relaxed_body_follows_rfc_6376() -> None:
    assert relaxed_body(b" C \r\nD \t E\r\n\r\n\r\n") == b" C\r\nD E\r\n"  # its 3.4.6
    assert relaxed_body(b"") == b"" and relaxed_body(b"\r\n\r\n") == b""
    assert relaxed_body(b"no line end  ") == b"no line end\r\n"


def test_an_expiry_is_signed_and_honoured(tmp_path: Path) -> None:
    key = make_key(tmp_path, "ed25519")
    fresh = Signer([key], expire=3600).sign(MESSAGE)
    assert b"; x=" in fresh.body and verifies(fresh.body, 0, key)
    old = Signer([key], expire=60).sign(MESSAGE, now=1_000_000_000)
    assert not verifies(old.body, 0, key)  # expired long ago


def test_the_header_list_oversigns_what_a_reader_sees() -> None:
    names = sign_list(["received", "from", "to", "subject", "x-mailer"])
    assert names[:3] == ["from", "to", "subject"] and "received" not in names
    assert names.count("from") == 2 and names.count("reply-to") == 1  # absent: none may be added


def test_the_dns_record_carries_the_public_key(tmp_path: Path) -> None:
    key = make_key(tmp_path, "rsa")
    tags = parse_record(key.txt_record())
    assert tags["v"] == "DKIM1" and tags["k"] == "rsa" and tags["p"] == key.public_value()


def test_an_unusable_key_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.pem: cannot read"):
        load_key("a.test", "s", tmp_path / "missing.pem")
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(ConfigError, match=r"junk\.pem: not an unencrypted PEM"):
        load_key("a.test", "s", tmp_path / "junk.pem")
