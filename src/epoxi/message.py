"""The envelope and metadata every stage passes: reception, ingest, queues, delivery, outcomes.

It is the domain's record of one accepted message, not a spool detail: the spool only encodes it.
"""

from __future__ import annotations

import re

import msgspec

# Tenant and campaign names: they become parts of queue names (``campaign:tenant@domain``),
# log lines and the operator's terminal, so only letters, digits and ``. _ + -``.
LABEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,99}$"
_LABEL = re.compile(LABEL_PATTERN)


def is_label(value: str) -> bool:
    """Whether ``value`` may name a tenant or a campaign."""
    return _LABEL.fullmatch(value) is not None


PRIORITIES = range(-100, 101)  # a message's, a tenant's or a destination's priority


class MessageMeta(msgspec.Struct, kw_only=True, gc=False):
    """Envelope, origin and attempt state of one accepted message.

    ``gc=False``: it holds only strings, numbers, lists and dicts of strings, so it can never
    be part of a reference cycle, and a million queued messages save the GC header each.
    """

    id: str
    sender: str  # "" is the null reverse-path <>
    recipients: list[str]  # recipients still to be delivered
    received_at: float  # unix time of the 250
    size: int  # octets of the body as spooled
    origin: str = "smtp"  # "smtp", "http" or "dsn"
    peer: str = ""  # client address the message came from
    helo: str = ""
    auth_user: str = ""
    smtputf8: bool = False
    body_8bit: bool = False
    tenant: str = ""
    campaign: str = ""
    template: str = ""  # the stored template it was made from (POST /send, /send/bulk)
    metadata: dict[str, str] | None = None  # None, not {}: a million queued messages
    attempts: int = 0
    due: float = 0.0  # unix time of the next attempt; 0 means now
    last_response: str = ""
    not_before: float = 0.0  # send_at: max_age counts from here when later than received_at
    pool: str = ""  # the egress pool asked for (API ip_pool, X-Epoxi-Pool); "" for the default
    priority: int | None = None  # -100..100, higher first (API, X-Epoxi-Priority); None: tenant's
    dkim: str = ""  # the signatures added ("d=... s=... a=..."), or "unsigned: why"
    # RFC 3461 (the DSN extension). Empty and None mean "not given": the defaults apply.
    dsn_ret: str = ""  # "FULL" or "HDRS"
    dsn_envid: str = ""  # ENVID, decoded from xtext
    dsn_notify: dict[str, str] | None = None  # recipient -> "NEVER" or e.g. "SUCCESS,FAILURE"
    dsn_orcpt: dict[str, str] | None = None  # recipient -> ORCPT as "rfc822;addr" (decoded)

    @property
    def age_origin(self) -> float:
        """When the message's life began for ``max_age``: its send_at, if later than its receipt."""
        return max(self.received_at, self.not_before)
