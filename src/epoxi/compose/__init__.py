"""Templates and MIME (pure): a send request becomes one RFC 5322 message per recipient.

Used by the HTTP API; the CLI, the console and stored templates build on it too.
"""

from epoxi.compose.render import (
    Attachment,
    ComposeError,
    Composer,
    Draft,
    MessageTooLarge,
    Rendered,
    checked_address,
)

__all__ = [
    "Attachment",
    "ComposeError",
    "Composer",
    "Draft",
    "MessageTooLarge",
    "Rendered",
    "checked_address",
]
