"""The one exception tree of Epoxi.

::

    EpoxiError
     +-- ConfigError            a setting is unknown or has a bad value (names key and value)
     +-- MessageRefused         ingest will not take a message (too many hops, a hook): its reply
     +-- InvalidField           a request field is wrong (``field`` names it)
     +-- AlreadyExists          a create names an id or name that is taken (409)
     |    +-- ComposeError      a send request cannot become a message (epoxi.compose)
     +-- SpoolError             the durable store failed
     |    +-- SpoolUnavailable  the spool cannot take more now (disk low, writer behind): answer 4xx
     +-- BrokerUnavailable      a broker sink's broker cannot take events now (they wait)
     +-- DatabaseUnavailable    PostgreSQL (EPOXI_DATABASE_URL) cannot be reached
     +-- SignatureRefused       a provider's webhook call is not signed with its secret (401)
     +-- UnknownProvider        no secret is configured for a provider's webhook calls (404)
     +-- MtaStsError            an MTA-STS policy could not be fetched or is not valid (RFC 8461)
     +-- DnsError               a lookup could not be answered
     |    +-- DnsTransient      SERVFAIL, timeout: try again later
     |    +-- DnsPermanent      NXDOMAIN, no address: the domain cannot receive mail
     |         +-- NullMx       RFC 7505: the domain says it takes no mail
     +-- DeliveryError          talking to a remote server failed
          +-- ConnectionFailed  connect, banner or TLS failed: the attempt is retried later;
          |    |                counts against the source's health unless a subclass says not
          |    +-- MailLoop     the server greeted us with our own name: it is us (not counted)
          |    +-- SourceUnusable  the source's own way out failed (its SOCKS5 proxy or HAProxy
          |    |                   cannot be reached or refuses us): the source is failing at once
          |    +-- TlsFailed    the TLS handshake failed, or the peer failed the TLS policy
          |                     (the site's or its policy's doing: not counted)
          +-- ProtocolError     the server broke the protocol (garbage, early close)

Foreign errors are translated at the boundary with ``raise ... from exc``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from epoxi.smtp.replies import Reply


class EpoxiError(Exception):
    """Base of every error Epoxi raises on purpose."""


class ConfigError(EpoxiError):
    """A configuration key is unknown or its value is invalid."""


class MessageRefused(EpoxiError):
    """The ingest stage refuses a message; ``reply`` is what the client is told."""

    def __init__(self, message: str, reply: Reply) -> None:
        super().__init__(message)
        self.reply = reply


class InvalidField(EpoxiError):
    """A field of a request is wrong; ``field`` names it, ``recipient`` the recipient if any."""

    def __init__(self, field: str, message: str, recipient: str | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.recipient = recipient


class AlreadyExists(EpoxiError):
    """A tenant id, or a template name within its tenant, is taken."""


class SpoolError(EpoxiError):
    """The spool failed to store, load or remove a message."""


class SpoolUnavailable(SpoolError):
    """The spool is refusing new work for now (disk nearly full, writer behind, closed)."""


class DatabaseUnavailable(EpoxiError):
    """PostgreSQL cannot be reached, or refused the connection."""


class SignatureRefused(EpoxiError):
    """A provider webhook call is not signed with the provider's secret, or not lately."""


class UnknownProvider(EpoxiError):
    """No secret is configured for the provider a webhook call names."""


class MtaStsError(EpoxiError):
    """An MTA-STS policy could not be fetched, or what was fetched is not a valid policy."""


class DnsError(EpoxiError):
    """A DNS lookup failed."""


class DnsTransient(DnsError):
    """A DNS lookup failed in a way that may succeed later (SERVFAIL, timeout)."""


class DnsPermanent(DnsError):
    """A DNS answer says the domain cannot receive mail (NXDOMAIN, null MX)."""


class NullMx(DnsPermanent):
    """The domain publishes a null MX (RFC 7505): it accepts no mail."""


class DeliveryError(EpoxiError):
    """Talking to a remote SMTP server failed; ``reply`` is the server's answer, if any."""

    def __init__(self, message: str, reply: Reply | None = None) -> None:
        super().__init__(message)
        self.reply = reply


class ConnectionFailed(DeliveryError):
    """Connecting, reading the banner or the TLS handshake failed."""


class MailLoop(ConnectionFailed):
    """The server greeted us with our own host name: the mail would loop back to us."""


class SourceUnusable(ConnectionFailed):
    """The egress source itself cannot be used: its SOCKS5 proxy or HAProxy cannot be reached,
    refuses us or breaks its protocol. Counts against the source's health, not the site's."""


class TlsFailed(ConnectionFailed):
    """The TLS handshake failed, TLS was required but not offered, or the server failed the
    policy (verification, DANE, MTA-STS); ``reply`` is the 4.7.x reply to record when the
    policy forbids plain text, ``policy`` names the policy ("required", "dane", ...)."""

    def __init__(self, message: str, reply: Reply | None = None, *, policy: str = "") -> None:
        super().__init__(message, reply)
        self.policy = policy


class ProtocolError(DeliveryError):
    """The remote server sent something that is not SMTP, or closed unexpectedly."""


class BrokerUnavailable(EpoxiError):
    """A broker sink cannot reach its broker, or the broker did not acknowledge a batch: the
    events stay in the sink's backlog for the next try."""
