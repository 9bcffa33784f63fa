"""Settings: file, environment overrides, and errors that name the key and the value."""

from __future__ import annotations

from pathlib import Path

import pytest

from epoxi.config import load_settings, parse_duration, parse_size
from epoxi.errors import ConfigError


def test_defaults_without_a_file() -> None:
    settings = load_settings(None, env={})
    assert settings.smtp.listeners[0].address == "127.0.0.1:2525"
    assert settings.trusted_networks == ("127.0.0.0/8", "::1/128")
    assert settings.relay is None


def test_environment_overrides(tmp_path: Path) -> None:
    settings = load_settings(
        None,
        env={
            "EPOXI_SMTP_LISTEN": "127.0.0.1:25,[::1]:2525",
            "EPOXI_DATA_DIR": str(tmp_path),
            "EPOXI_HOSTNAME": "mx.example",
            "EPOXI_TRUSTED_NETWORKS": "10.0.0.0/8",
            "EPOXI_LOCAL_DOMAINS": "Example.com,b.example",
            "EPOXI_SMTP_RELAY": "relay.example",
            "EPOXI_SMTP_PORT": "587",
            "EPOXI_SMTP_USERNAME": "u",
            "EPOXI_SMTP_PASSWORD": "hunter2",
            "EPOXI_DNS_NAMESERVERS": "127.0.0.1:5353",
            "EPOXI_HTTP_LISTEN": "0.0.0.0:8080",
        },
    )
    assert [x.host_port for x in settings.smtp.listeners] == [("127.0.0.1", 25), ("::1", 2525)]
    assert settings.data_dir == tmp_path and settings.hostname == "mx.example"
    assert settings.local_domains == ("example.com", "b.example")
    assert settings.relay is not None and settings.relay.port == 587
    assert "hunter2" not in repr(settings.relay)
    assert settings.dns.nameservers == ("127.0.0.1:5353",)


def test_listener_settings_survive_env_address_override(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[[smtp.listeners]]\naddress = "0.0.0.0:25"\ntls = "none"\n')
    settings = load_settings(path, env={"EPOXI_SMTP_LISTEN": "127.0.0.1:2600"})
    assert settings.smtp.listeners[0].tls == "none"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("bogus = 1", "unknown key 'bogus' (value 1)"),
        ("[smtp]\nmax_recipients = 0", "smtp.max_recipients = 0"),
        ('[smtp]\nidle_timeout = "fast"', "smtp.idle_timeout = 'fast'"),
        ('trusted_networks = ["not-a-net"]', "trusted_networks = ['not-a-net']"),
        (
            '[[smtp.listeners]]\naddress = "nowhere:port"',
            "smtp.listeners.0.address = 'nowhere:port'",
        ),
        (
            '[delivery.defaults]\nmax_message_rate = "lots"',
            "delivery.defaults.max_message_rate = 'lots'",
        ),
        ("this is not toml", "not valid TOML"),
    ],
)
def test_errors_name_key_and_value(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert expected in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_settings(tmp_path / "nope.toml", env={})


def test_units() -> None:
    assert (
        parse_duration("5m") == 300 and parse_duration(2) == 2 and parse_duration("250ms") == 0.25
    )
    assert parse_size("25MiB") == 25 * 1024 * 1024 and parse_size("512k") == 512 * 1024


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[delivery.source_shaping.nope]\nconnection_limit = 2\n", "names no source ['nope']"),
        ('[[delivery.sources]]\nname = "a"\n[[delivery.sources]]\nname = "a"\n', "unique"),
        ('[delivery.shaping."x.test"]\ntls = "implicit"\n', "delivery.shaping.x.test.tls"),
        (
            '[[dkim.keys]]\ndomain = "a.test"\nselector = "s"\nkey_file = "one.pem"\n'
            '[[dkim.keys]]\ndomain = "A.test."\nselector = "s"\nkey_file = "two.pem"\n',
            "selector s of a.test has two keys: one.pem and two.pem",
        ),
    ],
)
def test_sources_and_shaping_are_checked(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert expected in str(info.value)


def test_passwords_deep_in_a_table_are_hidden_from_errors(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[[delivery.sources]]\nname = "a"\nsocks5 = "127.0.0.1:1080"\n'
        'socks5_username = "u"\nsocks5_password = "hunter2-SECRET"\n'
        '[[delivery.routes]]\ndomains = ["*"]\nhosts = ["127.0.0.1:25"]\n'
        'username = "u"\npassword = "route-SECRET"\n'
        '[[delivery.pools]]\nname = "default"\nsources = ["nope"]\n'
    )
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert "names no source ['nope']" in str(info.value)
    assert "SECRET" not in str(info.value)
