"""What the spool keeps about a message, encoded with msgspec (msgpack on disk).

The body is stored apart from the metadata so that an attempt, which changes only the
metadata, never rewrites the body.
"""

from __future__ import annotations

import msgspec

from epoxi.message import MessageMeta

_meta_encoder = msgspec.msgpack.Encoder()
_meta_decoder = msgspec.msgpack.Decoder(MessageMeta)


def encode_meta(meta: MessageMeta) -> bytes:
    return _meta_encoder.encode(meta)


def decode_meta(raw: bytes) -> MessageMeta:
    return _meta_decoder.decode(raw)
