"""The hand-off from a finished SMTP transaction to the spool, and the ``Received:`` header."""

from __future__ import annotations

import time
from email.utils import formatdate
from typing import Protocol

from epoxi.message import MessageMeta


class Ingest(Protocol):
    """Where accepted mail goes. The app wires the spool and the queue behind it."""

    def unhealthy_reason(self) -> str | None:
        """Why new mail cannot be taken now, or None. Must be cheap: no I/O."""

    async def accept(self, meta: MessageMeta, body: bytes, *, trusted: bool) -> None:
        """Return only once the message is durable; raise SpoolError/SpoolUnavailable if not,
        MessageRefused with the reply to give if the message is refused. ``trusted``: the
        client may set ``X-Epoxi-*`` control headers (a trusted network or an AUTH user)."""


class _DateCache:
    """RFC 5322 date of the current second, formatted once per second."""

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def now(self) -> str:
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._text = formatdate(second, localtime=False, usegmt=False)
        return self._text


_dates = _DateCache()


def received_header(
    *, helo: str, peer_ip: str, hostname: str, protocol: str, queue_id: str, recipient: str | None
) -> bytes:
    """A trace header (RFC 5321 §4.4); ``for`` is given only for a single recipient."""
    helo = helo.replace("\r", "").replace("\n", "")[:255] or "unknown"
    for_clause = f"\r\n\tfor <{recipient}>" if recipient else ""
    text = (
        f"Received: from {helo} ([{peer_ip}])\r\n\tby {hostname} (Epoxi) with {protocol}"
        f" id {queue_id}{for_clause};\r\n\t{_dates.now()}\r\n"
    )
    return text.encode("utf-8", "replace")
