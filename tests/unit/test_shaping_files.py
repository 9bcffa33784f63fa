"""Shaping files: parsing with errors that name the file and key, layering across files
(merge and replace_base), provider matching by MX suffix and by domain, and the order in
which the blocks for one destination apply."""

from __future__ import annotations

from pathlib import Path

import pytest

from epoxi.errors import ConfigError
from epoxi.shaping.files import ShapingFiles, load_file, mx_hosts_of, parse

SHIPPED = """
[default]
connection_limit = 10
max_message_rate = "100/s"

[default.sources.out1]
max_connection_rate = "5/s"

[providers.google]
match_mx_suffix = [".google.com", "googlemail.com"]
match_domains = ["gmail.com", "googlemail.com"]
connection_limit = 20
max_message_rate = "2000/h"

[providers.microsoft]
match_mx_suffix = ["mail.protection.outlook.com"]
connection_limit = 5

[sites."aspmx.l.google.com,alt1.aspmx.l.google.com"]
idle_timeout = "30s"

[domains."example.org"]
tls = "required"
[domains."example.org".sources.out1]
connection_limit = 2
"""

OURS = """
[default]
connection_limit = 8

[providers.google]
max_message_rate = "1000/h"

[providers.microsoft]
replace_base = true
max_message_rate = "10/s"
"""

GOOGLE_SITE = "alt1.aspmx.l.google.com,aspmx.l.google.com"


def layered() -> ShapingFiles:
    return ShapingFiles([("shipped", parse(SHIPPED, "shipped")), ("ours", parse(OURS, "ours"))])


def merged(files: ShapingFiles, domain: str, site: str, source: str = "") -> dict[str, object]:
    values: dict[str, object] = {}
    for layer in files.layers(domain, site, source):
        values.update(layer.values)
    return values


def test_a_workspace_domain_gets_its_providers_limits_through_the_mx_suffix() -> None:
    files = layered()
    assert files.provider_of("shop.example", ["aspmx.l.google.com"]) == "google"
    assert files.provider_of("gmail.com", []) == "google"
    assert files.provider_of("notgoogle.com", ["mx.notgoogle.com"]) is None
    assert files.provider_of("a.test", ["google.com.evil.test"]) is None
    assert merged(files, "shop.example", GOOGLE_SITE) == {
        "connection_limit": 20,  # provider over default
        "max_message_rate": "1000/h",  # our file's provider over the shipped one
    }


def test_layers_apply_in_order_with_the_file_each_setting_came_from() -> None:
    files = layered()
    layers = files.layers("example.org", "mx.example.org", "out1")
    assert [layer.label for layer in layers] == [
        "default (shipped)",
        "default (ours)",
        "domain example.org (shipped)",
        "default (shipped) source out1",
        "domain example.org (shipped) source out1",
    ]
    assert merged(files, "example.org", "mx.example.org", "out1") == {
        "connection_limit": 2,
        "max_message_rate": "100/s",
        "max_connection_rate": "5/s",
        "tls": "required",
    }


def test_replace_base_drops_what_earlier_files_said_of_the_block() -> None:
    files = layered()
    site = "acme-com.mail.protection.outlook.com"
    assert files.provider_of("acme.com", [site]) == "microsoft"  # the match is kept
    values = merged(files, "acme.com", site)
    assert values == {"connection_limit": 8, "max_message_rate": "10/s"}


def test_a_site_block_matches_the_queue_name_of_the_site() -> None:
    files = layered()
    shipped_site = "aspmx.l.google.com,alt1.aspmx.l.google.com"
    assert "idle_timeout" in merged(files, "gmail.com", shipped_site)
    assert mx_hosts_of(shipped_site) == ["aspmx.l.google.com", "alt1.aspmx.l.google.com"]
    assert mx_hosts_of("route:10.0.0.1:25") == []


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("[default]\nconnection_limit = 0\n", "shaping.toml: default.connection_limit = 0"),
        ("[default]\nmax_message_rate = 'fast'\n", "default.max_message_rate = 'fast'"),
        (
            "[domains.'a.test']\nconection_limit = 3\n",
            "unknown key 'domains.a.test.conection_limit'",
        ),
        ("[default]\nidle_timeout = 'soon'\n", "default.idle_timeout = 'soon'"),
        ("[default]\ntls = 'maybe'\n", "default.tls = 'maybe'"),
        ("[nonsense]\n", "unknown key 'nonsense'"),
        ("[default\n", "shaping.toml: not valid TOML"),
    ],
)
def test_an_invalid_file_is_refused_naming_the_file_and_the_key(text: str, complaint: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse(text, "shaping.toml")
    assert complaint in str(refused.value)


def test_a_file_that_cannot_be_read_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the shaping file"):
        load_file(tmp_path / "missing.toml")
    good = tmp_path / "good.toml"
    good.write_text(OURS)
    assert ShapingFiles.load([good]).origins == [str(good)]


def test_shaping_check_says_ok_or_exits_1_naming_the_file_and_key(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from epoxi.cli import app

    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text(SHIPPED)
    bad.write_text("[providers.google]\nmatch_domains = ['gmail.com']\nconnection_limit = -1\n")
    runner = CliRunner()
    ok = runner.invoke(app, ["shaping", "check", str(good), str(good)])
    assert ok.exit_code == 0, ok.output
    assert f"{good}: OK (2 providers, 1 sites, 1 domains)" in ok.output
    refused = runner.invoke(app, ["shaping", "check", str(good), str(bad)])
    assert refused.exit_code == 1
    assert f"{bad}: providers.google.connection_limit = -1" in refused.output


def test_the_shipped_default_file_is_valid_and_matches_each_providers_hosts() -> None:
    shipped = Path(__file__).parents[2] / "src/epoxi/shaping/default.toml"
    files = ShapingFiles([("default.toml", load_file(shipped))])
    cases = {
        ("gmail.com", ()): "google",
        ("shop.example", ("aspmx.l.google.com",)): "google",
        ("hotmail.com", ()): "microsoft_consumer",
        ("acme.com", ("acme-com.mail.protection.outlook.com",)): "microsoft_365",
        ("x.example", ("mta5.am0.yahoodns.net",)): "yahoo",
        ("icloud.com", ()): "apple",
        ("a.test", ("google.com.evil.test",)): None,
    }
    for (domain, hosts), provider in cases.items():
        assert files.provider_of(domain, list(hosts)) == provider, (domain, hosts)


def test_the_shipped_files_automation_acts_on_the_providers_published_replies() -> None:
    shipped = Path(__file__).parents[2] / "src/epoxi/shaping/default.toml"
    files = ShapingFiles([("default.toml", load_file(shipped))])
    yahoo = files.rules("yahoo.com", "mta5.am0.yahoodns.net,mta6.am0.yahoodns.net")
    reply = "421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to user complaints"
    assert [rule.action for _, rule in yahoo if rule.pattern.search(reply)] == ["suspend"]
    google = files.adaptive("gmail.com", "aspmx.l.google.com")
    assert google is not None and google.pattern.search("421 4.7.28 unusual rate of mail")
    assert files.rules("a.test", "route:relay.test:25") == []


def test_the_example_default_file_is_the_shipped_one() -> None:
    root = Path(__file__).parents[2]
    shipped = (root / "src/epoxi/shaping/default.toml").read_text()
    assert (root / "examples/shaping-default.toml").read_text() == shipped


def test_the_policy_layers_files_and_the_configuration_kind_by_kind(tmp_path: Path) -> None:
    from epoxi.app import shaping_files, shaping_policy
    from epoxi.config import Settings

    ours = tmp_path / "ours.toml"
    ours.write_text(OURS)
    settings = Settings.model_validate(
        {
            "shaping_files": [str(ours)],
            "delivery": {
                "defaults": {"connection_limit": 3},
                "shaping": {"gmail.com": {"max_recipients_per_transaction": 50}},
            },
        }
    )
    policy = shaping_policy(settings.delivery, shaping_files(settings))
    google = policy.explain(
        "gmail.com", "alt1.gmail-smtp-in.l.google.com,gmail-smtp-in.l.google.com"
    )
    shipped = str(Path(__file__).parents[2] / "src/epoxi/shaping/default.toml")
    # the provider's limit (shipped file) wins over every file's and the config's default...
    assert google.origins["connection_limit"] == f"provider google ({shipped})"
    # ... our file's provider block over the shipped one, the config's domain over both
    assert google.origins["max_message_rate"] == f"provider google ({ours})"
    assert google.shaping.max_message_rate is not None
    assert str(google.shaping.max_message_rate) == "1000/h"
    assert google.origins["max_recipients_per_transaction"] == "domain gmail.com"
    # a static route or the smarthost is the operator's: the shipped file says nothing there
    routed = policy.explain("gmail.com", "route:10.0.0.1:25")
    assert routed.origins["connection_limit"] == "delivery.defaults"
    assert not any(str(shipped) in origin for origin in routed.origins.values())
    off = Settings.model_validate({"shaping_default": False})
    assert shaping_files(off).origins == []


def test_shaping_files_come_from_the_environment_too() -> None:
    from epoxi.config import load_settings

    settings = load_settings(None, env={"EPOXI_SHAPING_FILES": "/a.toml, /b.toml"})
    assert settings.shaping_files == (Path("/a.toml"), Path("/b.toml"))


def test_config_check_reads_the_shaping_files(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from epoxi.cli import app

    bad = tmp_path / "bad.toml"
    bad.write_text("[default]\nconnection_limit = 'many'\n")
    config = tmp_path / "epoxi.toml"
    config.write_text(f'shaping_files = ["{bad}"]\n')
    result = CliRunner().invoke(app, ["config", "check", "-c", str(config)])
    assert result.exit_code == 2
    assert f"{bad}: default.connection_limit = 'many'" in result.output
