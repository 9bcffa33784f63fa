"""Wire formats of the egress hops: SOCKS5 (RFC 1928, with RFC 1929 username/password) and
HAProxy's PROXY protocol version 2. Pure: bytes in, typed values out; the sockets are in
:mod:`epoxi.delivery.hops`.

A malformed answer raises :class:`~epoxi.errors.SourceUnusable` saying what was wrong; the
caller adds which proxy said it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from epoxi.errors import SourceUnusable

# ----------------------------------------------------------------- SOCKS5 (RFC 1928)

SOCKS_VERSION = 5
NO_AUTH = 0x00
USERNAME_PASSWORD = 0x02  # RFC 1929
NO_ACCEPTABLE_METHOD = 0xFF
CONNECT = 0x01
ATYP_IPV4, ATYP_DOMAIN, ATYP_IPV6 = 0x01, 0x03, 0x04
AUTH_VERSION = 0x01  # of the RFC 1929 subnegotiation
REPLY_HEAD = 5  # VER REP RSV ATYP and one more octet: enough to know the reply's length

SOCKS5_REPLIES = {
    0: "succeeded",
    1: "general SOCKS server failure",
    2: "connection not allowed by ruleset",
    3: "network unreachable",
    4: "host unreachable",
    5: "connection refused",
    6: "TTL expired",
    7: "command not supported",
    8: "address type not supported",
}
# Replies about the destination, not the proxy: the site's failure, as on a direct connection.
# Unreachable network or host, refused, TTL expired, and an address type the proxy cannot
# reach (an IPv6 MX through an IPv4-only proxy): the destination's failure, not the source's.
DESTINATION_FAULTS = frozenset({3, 4, 5, 6, 8})


@dataclass(frozen=True, slots=True)
class Socks5Reply:
    """The proxy's answer to CONNECT: ``code`` 0 for success, and the address it bound."""

    code: int
    bound: tuple[str, int]

    @property
    def meaning(self) -> str:
        return SOCKS5_REPLIES.get(self.code, "unassigned reply code")

    @property
    def destination_fault(self) -> bool:
        """True when the destination, not the proxy, failed (unreachable, refused)."""
        return self.code in DESTINATION_FAULTS


def socks5_greeting(with_password: bool) -> bytes:
    """The methods we offer: no authentication, and username/password when we have them."""
    methods = (NO_AUTH, USERNAME_PASSWORD) if with_password else (NO_AUTH,)
    return bytes((SOCKS_VERSION, len(methods), *methods))


def parse_method_choice(data: bytes, with_password: bool) -> int:
    """The method the proxy chose (two octets); one we did not offer is refused."""
    if len(data) != 2 or data[0] != SOCKS_VERSION:
        raise SourceUnusable(f"not a SOCKS5 method choice: {data.hex()}")
    offered = (NO_AUTH, USERNAME_PASSWORD) if with_password else (NO_AUTH,)
    if data[1] == NO_ACCEPTABLE_METHOD:
        wanted = "no authentication or username/password" if with_password else "no authentication"
        raise SourceUnusable(f"no acceptable authentication method (offered {wanted})")
    if data[1] not in offered:
        raise SourceUnusable(f"chose authentication method {data[1]}, which was not offered")
    return data[1]


def socks5_auth(username: str, password: str) -> bytes:
    """The RFC 1929 request; each of the two is 1 to 255 octets of UTF-8."""
    user, secret = username.encode(), password.encode()
    if not (1 <= len(user) <= 255 and 1 <= len(secret) <= 255):
        raise ValueError("SOCKS5 username and password are 1 to 255 octets each")
    return bytes((AUTH_VERSION, len(user))) + user + bytes((len(secret),)) + secret


def check_auth_reply(data: bytes) -> None:
    """Raise unless the RFC 1929 answer (two octets) says success."""
    if len(data) != 2 or data[0] not in (AUTH_VERSION, SOCKS_VERSION):  # some answer with 5
        raise SourceUnusable(f"not a username/password answer: {data.hex()}")
    if data[1] != 0:
        raise SourceUnusable(f"username/password refused (status {data[1]})")


def socks5_connect(address: str, port: int) -> bytes:
    """CONNECT to an IPv4 or IPv6 address and port."""
    ip = ipaddress.ip_address(address)
    atyp = ATYP_IPV4 if ip.version == 4 else ATYP_IPV6
    return bytes((SOCKS_VERSION, CONNECT, 0, atyp)) + ip.packed + port.to_bytes(2, "big")


def socks5_reply_length(head: bytes) -> int:
    """The whole reply's length in octets, from its first :data:`REPLY_HEAD` octets."""
    if len(head) < REPLY_HEAD or head[0] != SOCKS_VERSION:
        raise SourceUnusable(f"not a SOCKS5 reply: {head.hex()}")
    address_length = {ATYP_IPV4: 4, ATYP_IPV6: 16}.get(head[3])
    if address_length is None:
        if head[3] != ATYP_DOMAIN:
            raise SourceUnusable(f"SOCKS5 reply with unknown address type {head[3]}")
        address_length = 1 + head[4]
    return 4 + address_length + 2


def parse_socks5_reply(data: bytes) -> Socks5Reply:
    """The whole reply (as long as :func:`socks5_reply_length` says)."""
    if len(data) != socks5_reply_length(data):
        raise SourceUnusable(f"SOCKS5 reply of the wrong length: {data.hex()}")
    raw, port = data[4:-2], int.from_bytes(data[-2:], "big")
    if data[3] == ATYP_DOMAIN:
        bound = raw[1:].decode("ascii", "replace")
    else:
        bound = str(ipaddress.ip_address(raw))
    return Socks5Reply(data[1], (bound, port))


# ----------------------------------------------------------------- PROXY protocol v2

PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
PROXY_V2_COMMAND = 0x21  # version 2 (high nibble), command PROXY (low nibble)
TCP_OVER_IPV4, TCP_OVER_IPV6 = 0x11, 0x21  # address family (high nibble), STREAM (low nibble)


def proxy_v2_header(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """The PROXY v2 header of a TCP connection from ``source`` to ``destination`` (both IPv4
    or both IPv6): signature, version and command, family and transport, the length of what
    follows, then source address, destination address, source port, destination port."""
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if src.version != dst.version:
        raise ValueError(f"PROXY header from {src} to {dst}: the addresses' families differ")
    family = TCP_OVER_IPV4 if src.version == 4 else TCP_OVER_IPV6
    addresses = src.packed + dst.packed + source[1].to_bytes(2, "big")
    addresses += destination[1].to_bytes(2, "big")
    head = PROXY_V2_SIGNATURE + bytes((PROXY_V2_COMMAND, family))
    return head + len(addresses).to_bytes(2, "big") + addresses
