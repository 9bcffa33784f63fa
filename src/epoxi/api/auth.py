"""Who may call what: bearer API keys with scopes, or loopback clients while no key exists.

A request on a worker's own unix socket (only its peers and its supervisor's user can reach
the private directory it is in) is the machine asking itself: without a key it may do
anything; with one, that key's scopes and tenant apply as anywhere else.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers import BaseRouteHandler

from epoxi.api.context import context
from epoxi.store.keys import ApiKey, Scope

STATE_KEY = "api_key"


async def authorize(
    connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
) -> None:
    """The app-wide guard; a route names the scope it needs in ``opt["scope"]``."""
    if handler.opt.get("signed") or handler.opt.get("public"):
        return  # a provider's webhook, a tracked link: a signature the handler checks is the key
    keys = context(connection).keys
    scope: Scope | None = handler.opt.get("scope")
    if scope is None:  # health, ping and the API docs: open, unless only loopback is served
        if not keys.any_active():
            _require_loopback(connection)
        return
    token = _bearer(connection.headers.get("authorization"))
    if token is None and connection.client is None:
        return  # a worker's unix socket, in its supervisor's private directory: the machine
    if token is not None:
        key = keys.authenticate(token)
        if key is None:
            raise NotAuthorizedException(
                "unknown or revoked API key", headers={"WWW-Authenticate": "Bearer"}
            )
        if not key.allows(scope):
            raise PermissionDeniedException(f"this API key lacks the {scope.value!r} scope")
        if scope is Scope.ADMIN and key.tenant:
            raise PermissionDeniedException("a tenant's key cannot administer the queues")
        connection.state[STATE_KEY] = key
        return
    if keys.any_active():
        raise NotAuthorizedException(
            "send an API key: Authorization: Bearer epx_...",
            headers={"WWW-Authenticate": "Bearer"},
        )
    _require_loopback(connection)


def _require_loopback(connection: ASGIConnection[Any, Any, Any, Any]) -> None:
    if connection.client is None:  # a unix socket: another worker, through a private directory
        return
    if not _is_loopback(connection.client.host):
        raise PermissionDeniedException(
            "no API key exists, so only loopback clients are served; "
            "create one with `epoxi keys create`"
        )
    origin = connection.headers.get("origin")
    own = f"{connection.url.scheme}://{connection.headers.get('host', '')}"
    cross_site = connection.headers.get("sec-fetch-site") == "cross-site"
    if cross_site or (origin is not None and origin != own):
        raise PermissionDeniedException(
            "cross-site browser requests are refused while no API key exists"
        )


def api_key(connection: ASGIConnection[Any, Any, Any, Any]) -> ApiKey | None:
    """The key the request was made with (None for a loopback client without keys)."""
    key: ApiKey | None = connection.state.get(STATE_KEY)
    return key


def acting_tenant(
    connection: ASGIConnection[Any, Any, Any, Any], asked: str | None, acts: str = "is for"
) -> str:
    """The tenant a request acts for: a tenant's key its own (naming another is a 403), any
    other key the one ``asked``, or "" for none."""
    key = api_key(connection)
    if key is not None and key.tenant:
        if asked and asked != key.tenant:
            raise PermissionDeniedException(f"this API key {acts} tenant {key.tenant!r} only")
        return key.tenant
    return asked or ""


def _bearer(header: str | None) -> str | None:
    if not header:
        return None
    kind, _, token = header.partition(" ")
    if kind.lower() != "bearer" or not token.strip():
        raise NotAuthorizedException(
            "the Authorization header must be 'Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return token.strip()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
