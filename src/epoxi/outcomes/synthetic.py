"""Replies no server gave: the one table of what Epoxi records when an attempt had no answer.

Every failure without a remote reply (DNS, connecting, a lost connection, expiry, a loop) gets
its reply here, so records, DSNs and the bounce rules see one vocabulary. The shipped bounce
rules classify each of them as its code says (tests/unit/test_outcomes.py checks it).
"""

from __future__ import annotations

import enum

from epoxi.errors import DeliveryError, DnsPermanent, MailLoop, NullMx
from epoxi.smtp.replies import Reply


class Synthetic(enum.Enum):
    """Each reason, with the code and enhanced status code it is recorded with."""

    DOMAIN_UNKNOWN = (550, "5.1.2", "domain cannot receive mail")
    NULL_MX = (556, "5.1.10", "domain does not accept mail (null MX)")
    NO_MAIL_HOST = (550, "5.4.4", "no address for any mail host")
    DNS_TEMPORARY = (451, "4.4.3", "DNS lookup failed")
    CONNECT_FAILED = (451, "4.4.1", "connection failed")
    SITE_REFUSED = (451, "4.4.1", "the server refused the connection")  # a 5xx banner
    CONNECTION_LOST = (451, "4.4.2", "connection lost")
    TLS_UNAVAILABLE = (421, "4.7.4", "TLS required but not offered")  # Postfix says 4.7.4
    BODY_UNREADABLE = (451, "4.3.0", "message body unreadable")
    EXPIRED = (451, "4.4.7", "message expired")
    TOO_MANY_HOPS = (554, "5.4.6", "too many hops")
    LOOP = (554, "5.4.6", "mail loop")
    UNKNOWN_POOL = (550, "5.3.5", "unknown egress pool")  # not in delivery.pools

    def __init__(self, code: int, enhanced: str, summary: str) -> None:
        self.code = code
        self.enhanced = enhanced
        self.summary = summary

    def reply(self, detail: object = "") -> Reply:
        """The reply, with ``detail`` after the summary when given."""
        text = f"{self.summary}: {detail}" if detail != "" else self.summary
        return Reply(self.code, self.enhanced, text)


def routing_failure(domain: str, exc: Exception) -> Reply:
    """The reply for jobs whose domain could not be routed."""
    if isinstance(exc, NullMx):
        return Synthetic.NULL_MX.reply(exc)
    if isinstance(exc, DnsPermanent):
        return Synthetic.DOMAIN_UNKNOWN.reply(exc)
    return Synthetic.DNS_TEMPORARY.reply(f"{domain}: {exc}")


def connect_failure(exc: Exception) -> Reply:
    """The reply for jobs no host of their site could be reached for.

    No mail host has an address at all (``DnsPermanent``): a bounce, as in Postfix. A server
    that refused us in its banner or EHLO (a 5xx) is the site's trouble, not the message's:
    retried later.
    """
    if isinstance(exc, DnsPermanent):
        return Synthetic.NO_MAIL_HOST.reply(exc)
    if isinstance(exc, MailLoop):
        return Synthetic.LOOP.reply(exc)
    if isinstance(exc, DeliveryError) and exc.reply is not None:
        if exc.reply.is_permanent:
            return Synthetic.SITE_REFUSED.reply(exc.reply)
        return exc.reply
    return Synthetic.CONNECT_FAILED.reply(exc)


def transaction_failure(exc: DeliveryError) -> Reply:
    """The reply for recipients whose transaction broke off (at worst a duplicate later)."""
    return exc.reply if exc.reply is not None else Synthetic.CONNECTION_LOST.reply(exc)
