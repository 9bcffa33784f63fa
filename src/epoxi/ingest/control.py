"""``X-Epoxi-*`` control headers: how an SMTP client names the tenant, campaign, egress pool
and priority of a message.

They are always removed (a folded header with its continuation lines), so they are never
delivered. Their values are honoured only from a client allowed to steer Epoxi (a trusted
network or an authenticated user); from anyone else they are dropped unread. A value that is
not a valid name (the same rule as the HTTP API's ``tenant`` and ``campaign``), or a priority
that is not a whole number from -100 to 100, refuses the message from a trusted client, who can
fix it, rather than queueing it under a wrong name.
"""

from __future__ import annotations

import re

from epoxi.errors import MessageRefused
from epoxi.message import PRIORITIES, is_label
from epoxi.smtp.replies import Reply

_PRIORITY = re.compile(r"[+-]?[0-9]{1,3}")
_FIELDS = {
    b"x-epoxi-tenant": "tenant",
    b"x-epoxi-campaign": "campaign",
    b"x-epoxi-pool": "pool",
    b"x-epoxi-priority": "priority",
}


def take_control_headers(body: bytes) -> tuple[bytes, dict[str, str]]:
    """The body without control headers, and their raw values by field (``tenant``, ...).

    Costs one search of the header block when there are none.
    """
    end = body.find(b"\r\n\r\n")
    head = body[: end + 2] if end >= 0 else body
    if b"x-epoxi-" not in head.lower():
        return body, {}
    kept: list[bytes] = []
    found: dict[str, str] = {}
    current: str | None = None  # the control field being read, continuations included
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):  # a continuation belongs to the field above it
            if current is None:
                kept.append(line)
            else:
                found[current] += " " + line.strip().decode("utf-8", "replace")
            continue
        name, colon, value = line.partition(b":")
        current = _FIELDS.get(name.strip().lower()) if colon else None
        if current is None:
            kept.append(line)
        else:
            found[current] = value.strip().decode("utf-8", "replace")  # the last one counts
    rest = body[end + 2 :] if end >= 0 else b""
    return b"\r\n".join(kept) + rest, {field: value.strip() for field, value in found.items()}


def checked_controls(found: dict[str, str]) -> dict[str, str]:
    """The values, or MessageRefused (``550 5.6.0``) naming the first invalid one."""
    for field, value in found.items():
        if field == "priority":
            if parse_priority(value) is None:
                raise MessageRefused(
                    "invalid X-Epoxi-Priority",
                    Reply(550, "5.6.0", "X-Epoxi-Priority must be a whole number, -100 to 100"),
                )
        elif not is_label(value):
            raise MessageRefused(
                f"invalid X-Epoxi-{field.title()}",
                Reply(
                    550,
                    "5.6.0",
                    f"X-Epoxi-{field.title()} must be 1-100 letters, digits, '.', '_', '+' or '-'",
                ),
            )
    return found


def parse_priority(value: str) -> int | None:
    """``value`` as a priority (-100..100), or None when it is not one."""
    if _PRIORITY.fullmatch(value) is None:
        return None
    number = int(value)
    return number if number in PRIORITIES else None
