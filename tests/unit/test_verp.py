"""VERP return paths: tokens round-trip, fit a local part, and cannot be forged."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any, cast

import pytest

from epoxi.bounce.verp import KEY_FILE, ForgedToken, Verp, load_key
from epoxi.config import load_settings
from epoxi.delivery.client import SmtpClient, TransactionResult
from epoxi.delivery.transport import SmtpConnection
from epoxi.errors import ConfigError
from epoxi.ids import new_message_id
from epoxi.message import MessageMeta
from epoxi.smtp.replies import OK

VERP = Verp("bounce.example", b"k" * 32)
ID = new_message_id()


def test_single_recipient_round_trip() -> None:
    sender = VERP.sender(ID, ["Ann@Mail.Example"])
    local, _, domain = sender.partition("@")
    assert domain == "bounce.example" and local.startswith("b+") and len(local) <= 64
    assert local == local.lower()
    decoded = VERP.decode(sender)
    assert decoded.message_id == ID
    assert decoded.names("ann@mail.example") and not decoded.names("bob@mail.example")
    assert not decoded.per_message


def test_several_recipients_token_names_the_message() -> None:
    decoded = VERP.decode(VERP.sender(ID, ["a@x.example", "b@x.example"]))
    assert decoded.message_id == ID and decoded.per_message


def test_case_changed_by_a_relay_still_verifies() -> None:
    assert VERP.decode(VERP.sender(ID, ["a@x.example"]).upper()).message_id == ID


def flip(text: str, at: int) -> str:
    return text[:at] + ("a" if text[at] != "a" else "b") + text[at + 1 :]


@pytest.mark.parametrize("at", [2, 10, 21, 22, 25, 41])
def test_altered_token_is_refused(at: int) -> None:
    with pytest.raises(ForgedToken):
        VERP.decode(flip(VERP.sender(ID, ["a@x.example"]), at))


@pytest.mark.parametrize(
    "address",
    [
        "b+short@bounce.example",
        f"x+{VERP.token(ID)}@bounce.example",
        f"b+{VERP.token(ID)}@other.example",
        f"b+{Verp('bounce.example', b'another key').token(ID)}@bounce.example",
        "postmaster@bounce.example",
    ],
)
def test_forged_or_foreign_addresses_are_refused(address: str) -> None:
    with pytest.raises(ForgedToken):
        VERP.decode(address)


def test_repr_hides_the_key() -> None:
    assert "kkkk" not in repr(VERP)


def test_key_is_made_once_private(tmp_path: Path) -> None:
    first = load_key("", tmp_path)
    assert len(first) == 64
    assert stat.S_IMODE((tmp_path / KEY_FILE).stat().st_mode) == 0o600
    assert load_key("", tmp_path) == first
    assert load_key("configured", tmp_path) == b"configured"
    assert [p.name for p in tmp_path.iterdir()] == [KEY_FILE]


# ----------------------------------------------------------------- the delivery's MAIL FROM


class RecordingClient:
    """Stands in for SmtpClient: remembers each transaction's envelope sender."""

    def __init__(self) -> None:
        self.senders: list[str] = []

    async def send(self, sender: str, recipients: list[str], body: bytes, **_: object) -> Any:
        self.senders.append(sender)
        return TransactionResult(OK, [(r, OK) for r in recipients], OK)


def meta(sender: str) -> MessageMeta:
    return MessageMeta(id=ID, sender=sender, recipients=["a@x.example"], received_at=0, size=1)


async def test_deliveries_use_verp_senders_and_dsns_keep_null() -> None:
    client = RecordingClient()
    connection = SmtpConnection(cast(SmtpClient, client), VERP.sender_for)
    await connection.send(meta("news@shop.example"), ["a@x.example"], b"body")
    await connection.send(meta(""), ["a@x.example"], b"body")
    verp, null = client.senders
    assert VERP.decode(verp).names("a@x.example")
    assert null == ""


async def test_without_bounce_domain_the_sender_is_the_messages() -> None:
    client = RecordingClient()
    await SmtpConnection(cast(SmtpClient, client)).send(meta("news@shop.example"), ["a@x"], b"b")
    assert client.senders == ["news@shop.example"]


def test_bounce_settings_from_env() -> None:
    settings = load_settings(env={"EPOXI_BOUNCE_DOMAIN": "Bounce.Example."})
    assert settings.bounce_domain == "bounce.example"
    assert settings.bounce_secret == "" and settings.fbl_addresses == ()


def test_bounce_secret_is_hidden(tmp_path: Path) -> None:
    config = tmp_path / "epoxi.toml"
    config.write_text(
        'bounce_domain = "b.example"\nbounce_secret = "s3cr3t"\nfbl_addresses = "FBL@Shop.Example"\n'
    )
    settings = load_settings(config, env={})
    assert settings.fbl_addresses == ("fbl@shop.example",)
    assert "s3cr3t" not in repr(settings)
    config.write_text("bounce_secret = 42\n")
    with pytest.raises(ConfigError) as error:
        load_settings(config, env={})
    assert "42" not in str(error.value) and "<hidden>" in str(error.value)


def test_fbl_addresses_need_a_bounce_domain(tmp_path: Path) -> None:
    config = tmp_path / "epoxi.toml"
    config.write_text('fbl_addresses = ["fbl@x.example"]\n')
    with pytest.raises(ConfigError, match="fbl_addresses needs bounce_domain"):
        load_settings(config, env={})
