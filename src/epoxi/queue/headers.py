"""The ``X-Epoxi-Tenant`` and ``X-Epoxi-Campaign`` headers: read at reception, never delivered."""

from __future__ import annotations

_NAMES = (b"x-epoxi-tenant", b"x-epoxi-campaign")


def take_epoxi_headers(body: bytes) -> tuple[bytes, dict[str, str]]:
    """Return the body without Epoxi's control headers, and their values by short name.

    Cheap when the headers are absent (one search of the header block). Folded values are
    not supported: these headers are written by applications, one line each.
    """
    end = body.find(b"\r\n\r\n")
    head = body[: end + 2] if end >= 0 else body
    if b"x-epoxi-" not in head.lower():
        return body, {}
    kept: list[bytes] = []
    found: dict[str, str] = {}
    for line in head.split(b"\r\n"):
        name, colon, value = line.partition(b":")
        key = name.strip().lower()
        if colon and key in _NAMES:
            found[key.decode()[len("x-epoxi-") :]] = value.strip().decode("utf-8", "replace")
        else:
            kept.append(line)
    rest = body[end + 2 :] if end >= 0 else b""
    return b"\r\n".join(kept) + rest, found
