"""What Epoxi remembers beside the spool: message status and history, idempotency, API keys."""

from epoxi.store.db import store_path
from epoxi.store.keys import ApiKey, KeyStore, Scope, check_http_exposure
from epoxi.store.status import MessageStatus, State, StatusStore

__all__ = [
    "ApiKey",
    "KeyStore",
    "MessageStatus",
    "Scope",
    "State",
    "StatusStore",
    "check_http_exposure",
    "store_path",
]
