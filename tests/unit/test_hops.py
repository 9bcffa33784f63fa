"""Egress hops, pure part: SOCKS5 (RFC 1928, RFC 1929) and PROXY v2 bytes, byte for byte
against the specifications' layouts; the hop settings; a hop failure as the source's own."""

from __future__ import annotations

import socket
import tomllib
from pathlib import Path

import pytest

from epoxi.config import SourceSettings, load_settings
from epoxi.delivery.hops import ProxyProtocolHop, Socks5Hop, hop_of
from epoxi.errors import ConfigError, ConnectionFailed, SourceUnusable
from epoxi.smtp.hops import (
    Socks5Reply,
    check_auth_reply,
    parse_method_choice,
    parse_socks5_reply,
    proxy_v2_header,
    socks5_auth,
    socks5_connect,
    socks5_greeting,
    socks5_reply_length,
)
from tests.unit.test_pools import pooled, pools_of

# --------------------------------------------------------------------- SOCKS5


def test_the_greeting_offers_no_authentication_and_username_password_when_configured() -> None:
    assert socks5_greeting(False) == b"\x05\x01\x00"  # VER NMETHODS METHODS
    assert socks5_greeting(True) == b"\x05\x02\x00\x02"


def test_the_method_choice_must_be_one_we_offered() -> None:
    assert parse_method_choice(b"\x05\x00", False) == 0
    assert parse_method_choice(b"\x05\x02", True) == 2
    with pytest.raises(SourceUnusable, match="no acceptable authentication method"):
        parse_method_choice(b"\x05\xff", True)
    with pytest.raises(SourceUnusable, match="method 2, which was not offered"):
        parse_method_choice(b"\x05\x02", False)
    with pytest.raises(SourceUnusable, match="not a SOCKS5 method choice: 0400"):
        parse_method_choice(b"\x04\x00", False)


def test_username_password_request_and_answer() -> None:
    # RFC 1929: VER=1, ULEN, UNAME, PLEN, PASSWD.
    assert socks5_auth("mta", "s3cret") == b"\x01\x03mta\x06s3cret"
    assert socks5_auth("é", "p") == b"\x01\x02\xc3\xa9\x01p"
    with pytest.raises(ValueError):
        socks5_auth("u" * 256, "p")
    check_auth_reply(b"\x01\x00")
    check_auth_reply(b"\x05\x00")  # a version 5 answer, as some proxies send
    with pytest.raises(SourceUnusable, match=r"username/password refused \(status 1\)"):
        check_auth_reply(b"\x01\x01")
    with pytest.raises(SourceUnusable, match="not a username/password answer"):
        check_auth_reply(b"\x01")


def test_connect_requests_carry_ipv4_and_ipv6_addresses() -> None:
    # VER CMD RSV ATYP DST.ADDR DST.PORT (network order)
    assert socks5_connect("127.0.0.2", 25) == b"\x05\x01\x00\x01\x7f\x00\x00\x02\x00\x19"
    assert socks5_connect("2001:db8::1", 587) == (
        b"\x05\x01\x00\x04" + socket.inet_pton(socket.AF_INET6, "2001:db8::1") + b"\x02\x4b"
    )


def test_replies_of_each_address_type_are_parsed() -> None:
    ipv4 = b"\x05\x00\x00\x01\x7f\x00\x00\x1e\xc9\xf2"
    assert socks5_reply_length(ipv4[:5]) == 10
    assert parse_socks5_reply(ipv4) == Socks5Reply(0, ("127.0.0.30", 51698))
    ipv6 = b"\x05\x05\x00\x04" + bytes(15) + b"\x01\x00\x19"
    assert socks5_reply_length(ipv6[:5]) == 22
    assert parse_socks5_reply(ipv6) == Socks5Reply(5, ("::1", 25))
    domain = b"\x05\x00\x00\x03\x0bproxy.local\x04\x38"
    assert socks5_reply_length(domain[:5]) == 18
    assert parse_socks5_reply(domain).bound == ("proxy.local", 1080)


def test_malformed_replies_are_the_proxys_fault() -> None:
    with pytest.raises(SourceUnusable, match="not a SOCKS5 reply"):
        socks5_reply_length(b"HTTP/")
    with pytest.raises(SourceUnusable, match="unknown address type 9"):
        socks5_reply_length(b"\x05\x00\x00\x09\x00")
    with pytest.raises(SourceUnusable, match="wrong length"):
        parse_socks5_reply(b"\x05\x00\x00\x01\x7f\x00\x00\x1e\xc9")


@pytest.mark.parametrize(
    ("code", "meaning", "destination_fault"),
    [
        (1, "general SOCKS server failure", False),
        (2, "connection not allowed by ruleset", False),
        (3, "network unreachable", True),
        (4, "host unreachable", True),
        (5, "connection refused", True),
        (6, "TTL expired", True),
        (7, "command not supported", False),
        (8, "address type not supported", True),
        (42, "unassigned reply code", False),
    ],
)
def test_reply_codes_have_names_and_say_whose_fault(
    code: int, meaning: str, destination_fault: bool
) -> None:
    reply = Socks5Reply(code, ("0.0.0.0", 0))
    assert (reply.meaning, reply.destination_fault) == (meaning, destination_fault)


# --------------------------------------------------------------------- PROXY v2


def test_the_proxy_v2_header_over_ipv4_follows_the_spec_layout() -> None:
    header = proxy_v2_header(("127.0.0.30", 40000), ("127.0.0.2", 25))
    assert header == bytes(
        [
            *b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a",  # the 12-octet signature
            0x21,  # version 2, command PROXY
            0x11,  # AF_INET, STREAM
            0x00, 0x0C,  # 12 octets of addresses follow
            127, 0, 0, 30,  # source address
            127, 0, 0, 2,  # destination address
            0x9C, 0x40,  # source port 40000
            0x00, 0x19,  # destination port 25
        ]
    )  # fmt: skip


def test_the_proxy_v2_header_over_ipv6_follows_the_spec_layout() -> None:
    header = proxy_v2_header(("2001:db8::30", 1), ("2001:db8::2", 465))
    assert header[:12] == b"\r\n\r\n\x00\r\nQUIT\n"
    assert header[12:16] == b"\x21\x21\x00\x24"  # PROXY, AF_INET6 + STREAM, 36 octets
    assert header[16:32] == socket.inet_pton(socket.AF_INET6, "2001:db8::30")
    assert header[32:48] == socket.inet_pton(socket.AF_INET6, "2001:db8::2")
    assert header[48:] == b"\x00\x01\x01\xd1"
    assert len(header) == 16 + 36


def test_a_proxy_v2_header_needs_one_family() -> None:
    with pytest.raises(ValueError, match="families differ"):
        proxy_v2_header(("127.0.0.30", 1), ("::1", 25))


# --------------------------------------------------------------------- settings


def source(**values: str) -> SourceSettings:
    return SourceSettings.model_validate({"name": "hop", **values})


def test_each_hop_setting_becomes_its_hop() -> None:
    assert hop_of(source(bind="127.0.0.10")) is None
    socks = hop_of(source(socks5="127.0.0.1:1080", socks5_username="u", socks5_password="pw"))
    assert socks == Socks5Hop(("127.0.0.1", 1080), "u", "pw")
    assert str(socks) == "socks5 proxy 127.0.0.1:1080"
    haproxy = hop_of(source(bind="2001:db8::30", proxy_protocol="[::1]:8443"))
    assert haproxy == ProxyProtocolHop(("::1", 8443), "2001:db8::30")
    assert str(haproxy) == "haproxy [::1]:8443"


def test_the_socks5_password_never_shows() -> None:
    settings = source(socks5="127.0.0.1:1080", socks5_username="u", socks5_password="hunter2")
    assert "hunter2" not in repr(settings)
    assert "hunter2" not in repr(hop_of(settings))
    assert settings.hop == "socks5 127.0.0.1:1080"


def test_with_proxy_protocol_bind_is_written_in_the_header_not_bound() -> None:
    settings = source(bind="127.0.0.30", proxy_protocol="127.0.0.1:8443")
    assert (settings.bind, settings.local_bind) == ("127.0.0.30", None)
    assert source(bind="127.0.0.10").local_bind == "127.0.0.10"


@pytest.mark.parametrize(
    ("keys", "complaint"),
    [
        ('socks5 = "127.0.0.1:1080"\nproxy_protocol = "127.0.0.1:8443"\nbind = "127.0.0.30"',
         "socks5 or proxy_protocol, not both"),
        ('socks5 = "127.0.0.1:1080"\nbind = "127.0.0.30"', "bind is not used with socks5"),
        ('proxy_protocol = "127.0.0.1:8443"', "proxy_protocol needs bind"),
        ('socks5 = "127.0.0.1"', "with a port"),
        ('bind = "127.0.0.30"\nproxy_protocol = "haproxy:x"', "expected host:port"),
        ('socks5 = "127.0.0.1:1080"\nsocks5_username = "u"', "go together"),
        ('socks5_username = "u"\nsocks5_password = "hunter2"', "socks5_username without socks5"),
        ('socks5 = "127.0.0.1:1080"\nsocks5_username = ""\nsocks5_password = "hunter2"',
         "1 to 255 octets"),
    ],
)  # fmt: skip
def test_hop_settings_are_checked_and_passwords_stay_hidden(
    tmp_path: Path, keys: str, complaint: str
) -> None:
    path = tmp_path / "epoxi.toml"
    path.write_text(f'[[delivery.sources]]\nname = "hop"\n{keys}\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert complaint in str(info.value)
    assert "hunter2" not in str(info.value)


# --------------------------------------------------------------------- health


def test_a_hop_failure_makes_its_source_failing_at_once() -> None:
    pools, _ = pools_of(pooled())
    dead = SourceUnusable("cannot reach socks5 proxy 127.0.0.1:1: connection refused")
    assert pools.connect_failed("ip11", "site-a", dead)
    assert not pools.usable("ip11")
    refused = ConnectionFailed("socks5 proxy 127.0.0.1:1080 refused CONNECT to 127.0.0.2:25")
    assert not pools.connect_failed("ip10", "site-a", refused)  # the destination's fault
    assert pools.usable("ip10")


def test_the_readme_example_of_hops_is_valid() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    [example] = [b for b in readme.split("```toml\n")[1:] if "socks5 =" in b.split("```")[0]]
    sources = tomllib.loads(example.split("```")[0])["delivery"]["sources"]
    settings = [SourceSettings.model_validate(s) for s in sources]
    assert [s.hop for s in settings] == ["socks5 10.0.0.5:1080", "proxy_protocol 10.0.0.6:2525"]
