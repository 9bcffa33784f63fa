"""What the spool keeps about a message, encoded with msgspec (msgpack on disk).

The body is stored apart from the metadata so that an attempt, which changes only the
metadata, never rewrites the body.
"""

from __future__ import annotations

import msgspec


class MessageMeta(msgspec.Struct, kw_only=True, gc=False):
    """Envelope, origin and attempt state of one spooled message.

    ``gc=False``: it holds only strings, numbers, a list and a dict of strings, so it can never
    be part of a reference cycle, and a million queued messages save the GC header each.
    """

    id: str
    sender: str  # "" is the null reverse-path <>
    recipients: list[str]  # recipients still to be delivered
    received_at: float  # unix time of the 250
    size: int  # octets of the body as spooled
    origin: str = "smtp"  # "smtp" or "http"
    peer: str = ""  # client address the message came from
    helo: str = ""
    auth_user: str = ""
    smtputf8: bool = False
    body_8bit: bool = False
    tenant: str = ""
    campaign: str = ""
    metadata: dict[str, str] | None = None  # None, not {}: a million queued messages
    attempts: int = 0
    due: float = 0.0  # unix time of the next attempt; 0 means now
    last_response: str = ""


_meta_encoder = msgspec.msgpack.Encoder()
_meta_decoder = msgspec.msgpack.Decoder(MessageMeta)


def encode_meta(meta: MessageMeta) -> bytes:
    return _meta_encoder.encode(meta)


def decode_meta(raw: bytes) -> MessageMeta:
    return _meta_decoder.decode(raw)
