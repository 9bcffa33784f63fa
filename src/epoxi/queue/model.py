"""Messages and jobs as the queues hold them in memory.

A spooled message may have recipients in several domains. Each domain's share is a
:class:`Job`: the unit that is scheduled, routed to a ready queue and delivered in one
SMTP transaction (or a few, when there are many recipients).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from epoxi.message import MessageMeta


@dataclass(eq=False, slots=True)
class Message:
    """A spooled message and how many of its jobs are still under way."""

    meta: MessageMeta
    body: bytes | None  # kept until the first attempt; re-read from the spool after that
    open_jobs: int = 0
    held: int = 0  # octets of its body counted in the HeldBodies limit


class HeldBodies:
    """The bodies of messages not yet tried, kept in memory for their first attempt, up to
    ``limit`` octets in all. Past it (a backlog: a campaign larger than its destination takes
    at once), a message keeps no body and its first attempt reads it from the spool, so memory
    stays bounded while the spool holds the rest."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0  # octets kept now

    def message(self, meta: MessageMeta, body: bytes | None) -> Message:
        """The message as the queues hold it: with its body if it fits under the limit."""
        if body is None or self.held + len(body) > self.limit:
            return Message(meta, None)
        self.held += len(body)
        return Message(meta, body, held=len(body))

    def release(self, message: Message) -> None:
        """Stop counting the message's body (tried, or finished: it goes with the message)."""
        self.held -= message.held
        message.held = 0


@dataclass(eq=False, slots=True)
class Job:
    """The recipients of one message in one domain."""

    message: Message
    domain: str
    recipients: list[str]
    queue: str  # scheduled queue name: campaign:tenant@domain
    attempts: int = 0
    due: float = 0.0
    site: str = ""  # set once routed
    source: str = ""  # the egress source, set once routed
    pool: str = ""  # the pool the source was picked from
    seq: int = field(default=0, compare=False)

    @property
    def id(self) -> str:
        return self.message.meta.id


def queue_name(domain: str, tenant: str = "", campaign: str = "") -> str:
    """``campaign:tenant@domain``, each part optional (KumoMTA's scheduled queue naming).

    Interned: a million queued jobs share a few thousand names.
    """
    name = f"{tenant}@{domain}" if tenant else domain
    return sys.intern(f"{campaign}:{name}" if campaign else name)


def tenant_campaign(queue: str) -> tuple[str, str]:
    """The tenant and campaign of a scheduled queue name, ``campaign:tenant@domain``."""
    campaign, _, rest = queue.rpartition(":")
    return rest.rpartition("@")[0], campaign


def recipient_domain(recipient: str) -> str:
    """The domain part, lower-cased; ``postmaster`` alone has none."""
    at = recipient.rfind("@")
    return sys.intern(recipient[at + 1 :].lower().rstrip(".")) if at >= 0 else ""


def split_by_domain(recipients: list[str]) -> dict[str, list[str]]:
    """Recipients by domain; one domain keeps the list it was given (no copy per message)."""
    if len(recipients) == 1:
        return {recipient_domain(recipients[0]): recipients}
    by_domain: dict[str, list[str]] = {}
    for recipient in recipients:
        by_domain.setdefault(recipient_domain(recipient), []).append(recipient)
    return by_domain
