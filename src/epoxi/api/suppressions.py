"""``/suppressions``: each tenant's suppression list (``*``: the operator's global one).

A tenant-bound key sees and changes its own tenant's list only; a key for any tenant every
list, and the global one with the admin scope. The lists live in the store all workers share:
a change made here holds on this worker at once and on the others within a second.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
from collections.abc import AsyncIterator
from typing import Annotated, Any

import msgspec
from litestar import Request, Router, delete, get, post
from litestar.exceptions import ClientException, NotFoundException, PermissionDeniedException
from litestar.params import FromPath, JSONBody, QueryParameter
from litestar.response import Stream

from epoxi.api.auth import api_key
from epoxi.api.context import context
from epoxi.api.problems import problem_responses
from epoxi.api_types import (
    SuppressionIn,
    SuppressionPage,
    SuppressionRemoved,
    SuppressionsAdded,
)
from epoxi.errors import InvalidField
from epoxi.message import is_label
from epoxi.smtp.parser import CommandError, parse_mailbox
from epoxi.store.keys import Scope
from epoxi.store.suppressions import GLOBAL, Reason, Suppression, normal

MAX_PAGE = 1000
EXPORT_PAGE = 5000  # rows read from the store per step of an export
_REASONS = frozenset(reason.value for reason in Reason)
CSV_FIELDS = ("tenant", "address", "reason", "detail", "created_at")

Tenant = Annotated[
    str | None,
    QueryParameter(
        description="the tenant's list (* the global one); a tenant-bound key's own by default"
    ),
]


@get(
    "/",
    opt={"scope": Scope.READ},
    responses=problem_responses(400, 401, 403, 422),
    summary="A page of a suppression list (without a tenant, a key for any tenant: every list)",
)
async def list_suppressions(
    request: Request[Any, Any, Any],
    tenant: Tenant = None,
    after: Annotated[str | None, QueryParameter(description="the `next` of the last page")] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=MAX_PAGE)] = 100,
) -> SuppressionPage:
    name = _readable(request, tenant)
    store = context(request).suppressions.store
    entries = await store.page(name, _cursor(after), limit)
    last = entries[-1] if len(entries) == limit else None
    return SuppressionPage(suppressions=entries, next=_next(last))


@post(
    "/",
    opt={"scope": Scope.SEND},
    status_code=201,
    responses=problem_responses(400, 401, 403, 415, 422),
    summary="Add one address, or a list, to a suppression list",
)
async def add_suppressions(
    request: Request[Any, Any, Any], data: JSONBody[SuppressionIn | list[SuppressionIn]]
) -> SuppressionsAdded:
    items = data if isinstance(data, list) else [data]
    entries = [
        Suppression(
            tenant=_writable(request, item.tenant),
            address=_address(f"[{index}].address" if data is items else "address", item.address),
            reason=item.reason,
            detail=item.detail,
        )
        for index, item in enumerate(items)
    ]
    added = await context(request).suppressions.add(entries)
    return SuppressionsAdded(
        added=len(added), already=len(entries) - len(added), suppressions=added
    )


@delete(
    "/{address:str}",
    opt={"scope": Scope.SEND},
    status_code=200,
    responses=problem_responses(400, 401, 403, 404, 422),
    summary="Take an address off a suppression list: mail to it is sent again",
)
async def remove_suppression(
    request: Request[Any, Any, Any], address: FromPath[str], tenant: Tenant = None
) -> SuppressionRemoved:
    name = _writable(request, tenant)
    if not await context(request).suppressions.remove(name, address):
        raise NotFoundException(f"{address!r} is not on the suppression list of {name!r}")
    return SuppressionRemoved(tenant=name, address=normal(address), removed=True)


@post(
    "/import",
    opt={"scope": Scope.SEND, "body": "text/csv"},
    status_code=200,
    responses=problem_responses(400, 401, 403, 415, 422),
    summary="Add the addresses of a CSV body (address[,reason], or with a header row naming "
    "address and reason columns, as the export writes): all, or none if one is invalid",
)
async def import_suppressions(
    request: Request[Any, Any, Any], tenant: Tenant = None
) -> SuppressionsAdded:
    name = _writable(request, tenant)
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "text/csv":
        raise ClientException(
            f"send the list as Content-Type: text/csv (got {media_type or 'none'!r})",
            status_code=415,
        )
    try:
        text = (await request.body()).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ClientException("the CSV body is not UTF-8", status_code=400) from exc
    entries = _read_csv(text, name)
    added = await context(request).suppressions.add(entries)
    return SuppressionsAdded(added=len(added), already=len(entries) - len(added), suppressions=[])


@get(
    "/export",
    opt={"scope": Scope.READ},
    media_type="text/csv",
    responses=problem_responses(400, 401, 403, 422),
    summary="A suppression list as CSV (tenant,address,reason,detail,created_at)",
)
async def export_suppressions(request: Request[Any, Any, Any], tenant: Tenant = None) -> Stream:
    name = _readable(request, tenant)
    store = context(request).suppressions.store

    async def rows() -> AsyncIterator[str]:
        yield _csv_line(CSV_FIELDS)
        after = ("", "")
        while entries := await store.page(name, after, EXPORT_PAGE):
            yield "".join(_csv_line(_row(entry)) for entry in entries)
            after = (entries[-1].tenant, entries[-1].address)

    return Stream(rows(), media_type="text/csv; charset=utf-8")


suppressions_router = Router(
    path="/suppressions",
    route_handlers=[
        list_suppressions,
        add_suppressions,
        remove_suppression,
        import_suppressions,
        export_suppressions,
    ],
    tags=["suppressions"],
)


# --------------------------------------------------------------------- helpers


def _readable(request: Request[Any, Any, Any], asked: str | None) -> str | None:
    """The list a reader may see: its key's tenant's, the one asked for, or None: every list
    (a key for any tenant that asked for none)."""
    key = api_key(request)
    if asked is None and (key is None or not key.tenant):
        return None
    return _writable(request, asked)


def _writable(request: Request[Any, Any, Any], asked: str | None) -> str:
    """The list a request may use: its key's tenant's, or the one asked for ("" when none
    is: the list of mail sent without a tenant)."""
    key = api_key(request)
    if key is not None and key.tenant:
        if asked not in (None, key.tenant):
            raise PermissionDeniedException(
                f"this API key manages the suppression list of tenant {key.tenant!r} only"
            )
        return key.tenant
    if asked == GLOBAL:
        if key is not None and not key.allows(Scope.ADMIN):
            raise PermissionDeniedException("the global suppression list needs the 'admin' scope")
        return GLOBAL
    if asked and not is_label(asked):
        raise InvalidField("tenant", f"not a tenant name: {asked!r}")
    return asked or ""


def _address(where: str, address: str) -> str:
    address = address.strip()
    wrong = InvalidField(where, f"not a valid address: {address!r}")
    if not address.isprintable() or any(c in address for c in "<> ,;"):
        raise wrong
    try:
        parse_mailbox(address)
    except CommandError as exc:
        raise wrong from exc
    return normal(address)


def _cursor(after: str | None) -> tuple[str, str]:
    if not after:
        return ("", "")
    try:
        tenant, _, address = base64.urlsafe_b64decode(after.encode()).decode().partition("\n")
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise InvalidField("after", "not a `next` this API gave") from exc
    return (tenant, address)


def _next(last: Suppression | None) -> str | None:
    if last is None:
        return None
    return base64.urlsafe_b64encode(f"{last.tenant}\n{last.address}".encode()).decode()


def _read_csv(text: str, tenant: str) -> list[Suppression]:
    """The entries of a CSV list; InvalidField naming the first bad lines."""
    rows = [row for row in csv.reader(io.StringIO(text)) if any(cell.strip() for cell in row)]
    columns = {"address": 0, "reason": 1}
    if rows and "address" in (header := [cell.strip().lower() for cell in rows[0]]):
        columns = {name: header.index(name) for name in ("address", "reason") if name in header}
        rows = rows[1:]
    entries, errors = [], []
    for number, row in enumerate(rows, 1):
        try:
            entries.append(_csv_entry(row, columns, tenant, number))
        except InvalidField as exc:
            errors.append(f"row {number}: {exc}")
    if errors:
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise InvalidField("body", "; ".join(errors[:5]) + more + ": nothing was imported")
    return entries


def _csv_entry(row: list[str], columns: dict[str, int], tenant: str, number: int) -> Suppression:
    def cell(name: str) -> str:
        index = columns.get(name)
        return row[index].strip() if index is not None and index < len(row) else ""

    reason = cell("reason") or Reason.MANUAL.value
    if reason not in _REASONS:
        raise InvalidField(f"row {number}", f"unknown reason {reason!r}")
    address = _address(f"row {number}", cell("address"))
    return Suppression(tenant=tenant, address=address, reason=Reason(reason), detail="imported")


def _row(entry: Suppression) -> tuple[str, ...]:
    created = msgspec.json.encode(entry.created_at).decode()
    return (entry.tenant, entry.address, entry.reason.value, entry.detail, created)


def _csv_line(cells: tuple[str, ...]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerow(cells)
    return out.getvalue()
