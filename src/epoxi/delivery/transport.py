"""The transport port: how a ready queue's dispatcher reaches a destination.

A :class:`Transport` opens a :class:`Connection` to a destination from an egress source; a
connection carries one transaction at a time and answers with a reply per recipient. SMTP is
the transport today (:class:`SmtpTransport`); LMTP, Maildir and HTTP are coming, and
``epoxi.testing.fakes.FakeTransport`` answers from a script in unit tests.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from epoxi.config import TimeoutSettings
from epoxi.delivery.client import DsnEnvelope, SmtpClient, TlsInfo, TlsPolicy
from epoxi.delivery.hops import hop_of
from epoxi.delivery.hosttls import HostTls
from epoxi.errors import (
    ConnectionFailed,
    DnsError,
    DnsPermanent,
    EpoxiError,
    MailLoop,
    SourceUnusable,
    TlsFailed,
)
from epoxi.message import MessageMeta
from epoxi.smtp.replies import Reply

if TYPE_CHECKING:
    from epoxi.config import SourceSettings
    from epoxi.delivery.routing import Destination
    from epoxi.dns.resolver import Resolver

log = logging.getLogger(__name__)


class Connection(Protocol):
    """One open connection to a destination."""

    @property
    def peer(self) -> str:
        """The address that answers (recorded with each outcome)."""
        ...

    @property
    def is_usable(self) -> bool:
        """Whether another transaction may follow."""
        ...

    @property
    def dsn_passed(self) -> bool:
        """Whether the last transaction handed the DSN request on (the next hop reports)."""
        ...

    @property
    def tls(self) -> TlsInfo:
        """What TLS the connection got, and under which policy (recorded with each attempt)."""
        ...

    async def send(
        self, meta: MessageMeta, recipients: list[str], body: bytes
    ) -> list[tuple[str, Reply]]:
        """One transaction: each recipient's reply. Raises DeliveryError if it broke off."""
        ...

    async def quit(self) -> None: ...


class Transport(Protocol):
    async def connect(self, destination: Destination, source: SourceSettings) -> Connection:
        """Open a connection to some host of ``destination``, or raise why none could be.

        Raises DnsPermanent when no host of the destination can exist (nothing to retry),
        another EpoxiError or OSError otherwise.
        """
        ...


def own_sender(sender: str, message_id: str, recipients: list[str]) -> str:
    """The envelope sender of a delivery when there is no bounce domain: the message's own."""
    return sender


# (the message's sender, its id, the transaction's recipients) -> MAIL FROM's address
EnvelopeSender = Callable[[str, str, list[str]], str]


class SmtpConnection:
    """An :class:`SmtpClient` seen as a :class:`Connection`."""

    __slots__ = ("_client", "_sender", "dsn_passed")

    def __init__(self, client: SmtpClient, sender: EnvelopeSender = own_sender) -> None:
        self._client = client
        self._sender = sender
        self.dsn_passed = False

    @property
    def peer(self) -> str:
        return self._client.peer[0]

    @property
    def tls(self) -> TlsInfo:
        return self._client.tls_info

    @property
    def is_usable(self) -> bool:
        return self._client.is_usable

    async def send(
        self, meta: MessageMeta, recipients: list[str], body: bytes
    ) -> list[tuple[str, Reply]]:
        result = await self._client.send(
            self._sender(meta.sender, meta.id, recipients),
            recipients,
            body,
            smtputf8=meta.smtputf8,
            body_8bit=meta.body_8bit,
            dsn=DsnEnvelope.of(meta),
        )
        self.dsn_passed = result.dsn_passed
        return result.outcomes()

    async def quit(self) -> None:
        await self._client.quit()


class SmtpTransport:
    """SMTP to the destination's hosts, in preference order, each of their addresses in turn.

    ``tls`` decides each connection's TLS policy (DANE, MTA-STS, hosts with broken TLS:
    :mod:`epoxi.delivery.hosttls`); without it, the destination's policy as it is.
    ``sender`` picks each transaction's MAIL FROM (VERP: :meth:`epoxi.bounce.verp.Verp.sender_for`).
    """

    def __init__(
        self,
        resolver: Resolver,
        hostname: str,
        timeouts: TimeoutSettings,
        *,
        tls: HostTls | None = None,
        sender: EnvelopeSender = own_sender,
    ) -> None:
        self._sender = sender
        self._resolver = resolver
        self._hostname = hostname
        self._timeouts = timeouts
        self.tls = tls or HostTls()

    async def connect(self, destination: Destination, source: SourceSettings) -> Connection:
        """Try each host (and each of its addresses) in order; raise the last failure."""
        last: Exception = ConnectionFailed(f"no hosts for {destination.site}")
        hosts_without_address = 0
        order = destination.attempt_order()
        for host, port in order:
            try:
                addresses = await self._resolver.addresses(host)
            except DnsError as exc:
                last = exc
                hosts_without_address += isinstance(exc, DnsPermanent)
                continue
            for address in _reachable_from(source, addresses):
                try:
                    client = await self._open(destination, source, host, address, port)
                except SourceUnusable:
                    raise  # the source's own way out is broken: no other host would do better
                except (ConnectionFailed, EpoxiError) as exc:
                    log.info("[%s] %s:%d (%s): %s", destination.site, host, port, address, exc)
                    last = exc
                else:
                    return await self._not_ourselves(client, destination)
        if order and hosts_without_address == len(order):  # as Postfix: no host can exist
            raise DnsPermanent(f"no address for any mail host of {destination.site}")
        raise last

    async def _not_ourselves(self, client: SmtpClient, destination: Destination) -> Connection:
        """As Postfix: a server that greets us with our own name is us, and mail sent there
        would come straight back (a local domain routed by MX to this host, say)."""
        if client.greeting_name.lower() != self._hostname.lower():
            return SmtpConnection(client, self._sender)
        await client.quit()
        raise MailLoop(
            f"mail for {destination.site} loops back to myself: {client.peer[0]} greeted us "
            f"with our own name {client.greeting_name}"
        )

    async def _open(
        self, destination: Destination, source: SourceSettings, host: str, address: str, port: int
    ) -> SmtpClient:
        """Connect under the host's TLS policy; after a TLS failure, again as the policy
        allows (plain text for opportunistic TLS, relaxed for an MTA-STS testing policy)."""
        tls: TlsPolicy | None = await self.tls.policy(destination, host, address)
        for _ in range(3):
            assert tls is not None
            try:
                return await self._connect(destination, source, host, address, port, tls)
            except TlsFailed as exc:
                tls = self.tls.after_failure(destination, tls, address, exc)
                if tls is None:
                    raise
        raise ConnectionFailed(f"{host} ({address}): no TLS policy left to try")

    async def _connect(
        self,
        destination: Destination,
        source: SourceSettings,
        host: str,
        address: str,
        port: int,
        tls: TlsPolicy,
    ) -> SmtpClient:
        return await SmtpClient.connect(
            address,
            port,
            server_name=tls.server_name or host,
            ehlo_name=source.ehlo or self._hostname,
            source_address=source.local_bind,
            tls=tls,
            auth=destination.auth,
            timeouts=self._timeouts,
            hop=hop_of(source),
        )


def _reachable_from(source: SourceSettings, addresses: list[str]) -> list[str]:
    """The addresses a source bound to an IPv4 (or IPv6) address can reach: the same family."""
    if source.bind is None:
        return addresses
    ipv6 = ":" in source.bind
    return [address for address in addresses if (":" in address) == ipv6]
