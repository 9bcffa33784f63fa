"""``/t/{token}`` and ``/u/{token}``: what recipients' mail programs reach.

Public (a recipient has no API key): the token is the key, signed by the node
(``compose/tracking.py``). A forged or altered token is a 404 and changes nothing.

- ``GET /t/{token}``: an open (a 1x1 GIF) or a click (a redirect to the link); each an Open
  or Click record of the message, which moves its email's status and the analytics.
- ``GET /u/{token}``: a page that asks to confirm; ``POST /u/{token}`` (RFC 8058 one-click:
  ``List-Unsubscribe=One-Click``, or the page's button) makes an Unsubscribe record, which
  puts the address on the tenant's suppression list.
"""

from __future__ import annotations

import base64
import html
from typing import Any

from litestar import MediaType, Request, Response, get, post
from litestar.exceptions import NotFoundException
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath

from epoxi.api.context import ApiContext, context
from epoxi.api.problems import problem_responses
from epoxi.compose.tracking import Kind, Tracked
from epoxi.events.records import Record, RecordType

PIXEL = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
NO_STORE = {"Cache-Control": "no-store, private"}
_PUBLIC: dict[str, Any] = {"opt": {"public": True, "body": "form"}, "tags": ["tracking"]}
_RECORD = {
    Kind.OPEN: RecordType.OPEN,
    Kind.CLICK: RecordType.CLICK,
    Kind.UNSUBSCRIBE: RecordType.UNSUBSCRIBE,
}


@get(
    "/t/{token:str}",
    summary="An open pixel or a click link of tracked mail",
    responses={
        302: ResponseSpec(None, description="a click: on to the link"),
        **problem_responses(400, 404),
    },
    **_PUBLIC,
)
async def track(request: Request[Any, Any, Any], token: FromPath[str]) -> Response[bytes]:
    ctx = context(request)
    tracked = _read(ctx, token, Kind.OPEN, Kind.CLICK)
    await _record(ctx, tracked)
    if tracked.kind is Kind.CLICK:
        return Response(b"", status_code=302, headers={"Location": tracked.url, **NO_STORE})
    return Response(PIXEL, media_type="image/gif", headers=NO_STORE)


@get(
    "/u/{token:str}",
    summary="The unsubscribe page of a message's link",
    media_type=MediaType.HTML,
    responses=problem_responses(400, 404),
    **_PUBLIC,
)
async def unsubscribe_page(request: Request[Any, Any, Any], token: FromPath[str]) -> str:
    tracked = _read(context(request), token, Kind.UNSUBSCRIBE)
    address = html.escape(tracked.recipient)
    return _page(
        "Unsubscribe",
        f"<p>Stop sending mail to <b>{address}</b>?</p>"
        '<form method="post"><input type="hidden" name="List-Unsubscribe" value="One-Click">'
        '<button type="submit">Unsubscribe</button></form>',
    )


@post(
    "/u/{token:str}",
    status_code=200,
    summary="Unsubscribe (RFC 8058 one-click, or the page's button)",
    media_type=MediaType.HTML,
    responses=problem_responses(400, 404),
    **_PUBLIC,
)
async def unsubscribe(request: Request[Any, Any, Any], token: FromPath[str]) -> str:
    ctx = context(request)
    tracked = _read(ctx, token, Kind.UNSUBSCRIBE)
    await _record(ctx, tracked)
    address = html.escape(tracked.recipient)
    return _page("Unsubscribed", f"<p><b>{address}</b> will get no more of this mail.</p>")


def _read(ctx: ApiContext, token: str, *kinds: Kind) -> Tracked:
    tracked = ctx.tracker.read(token) if ctx.tracker is not None else None
    if tracked is None or tracked.kind not in kinds:
        raise NotFoundException("no such link")
    return tracked


async def _record(ctx: ApiContext, tracked: Tracked) -> None:
    """The record of what the recipient did, with its message's tenant and campaign (a link
    of a message the node has forgotten still works, and records nothing)."""
    owner = await ctx.status.owner(tracked.message_id)
    if owner is None:
        return
    tenant, campaign = owner
    ctx.records.emit(
        Record(
            type=_RECORD[tracked.kind],
            message_id=tracked.message_id,
            recipient=tracked.recipient,
            tenant=tenant,
            campaign=campaign,
            url=tracked.url,
            reporter="epoxi",
        )
    )


def _page(title: str, body: str) -> str:
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        '<meta name="viewport" content="width=device-width, initial-scale=1"></head>'
        f"<body><h1>{title}</h1>{body}</body></html>"
    )
