"""``/tenants`` and ``/templates``: the sending platform's tenants and stored templates.

Operators (a key for any tenant with the admin scope) create and change tenants; a
tenant-bound key reads its own tenant only. Templates belong to a tenant: a tenant-bound key
sees and changes its own only (another tenant's template is a 404 to it, as if it did not
exist); a key for any tenant names the tenant when it creates one.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any

import msgspec
from litestar import Request, Router, delete, get, patch, post
from litestar.exceptions import NotFoundException
from litestar.params import FromPath, JSONBody, QueryParameter

from epoxi.api.auth import acting_tenant, api_key
from epoxi.api.context import context
from epoxi.api.problems import problem_responses
from epoxi.api_types import (
    ActivateIn,
    RenderIn,
    Rendering,
    TemplateDeleted,
    TemplateIn,
    TemplateList,
    TemplateVersionIn,
    TemplateVersions,
    TenantIn,
    TenantList,
    TenantPatch,
)
from epoxi.compose.stored import Parts, check, preview
from epoxi.errors import InvalidField
from epoxi.store.keys import Scope
from epoxi.store.platform import PlatformStore, TemplateVersion, Tenant, TenantStatus

# --------------------------------------------------------------------- tenants


@post(
    "/",
    status_code=201,
    opt={"scope": Scope.ADMIN},
    responses=problem_responses(400, 401, 403, 409, 415, 422),
    summary="Create a tenant (operators)",
)
async def create_tenant(request: Request[Any, Any, Any], data: JSONBody[TenantIn]) -> Tenant:
    now = time.time()
    tenant = Tenant(
        id=data.id,
        name=data.name,
        default_pool=data.default_pool or "",
        dkim_domain=data.dkim_domain,
        sender=data.sender or "",
        requests_per_second=data.requests_per_second,
        recipients_per_day=data.recipients_per_day,
        tracking=data.tracking,
        created_at=now,
        updated_at=now,
    )
    return await _platform(request).create_tenant(tenant)


@get("/", opt={"scope": Scope.READ}, responses=problem_responses(401, 403), summary="The tenants")
async def list_tenants(request: Request[Any, Any, Any]) -> TenantList:
    own = _bound_tenant(request)
    tenants = await _platform(request).tenants()
    return TenantList(tenants=[t for t in tenants if own is None or t.id == own])


@get(
    "/{tenant_id:str}",
    opt={"scope": Scope.READ},
    responses=problem_responses(401, 403, 404),
    summary="One tenant",
)
async def show_tenant(request: Request[Any, Any, Any], tenant_id: FromPath[str]) -> Tenant:
    return await _tenant(request, tenant_id)


@patch(
    "/{tenant_id:str}",
    opt={"scope": Scope.ADMIN},
    responses=problem_responses(400, 401, 403, 404, 415, 422),
    summary="Change a tenant: its name, status (active, suspended), pool, DKIM domain, limits",
)
async def update_tenant(
    request: Request[Any, Any, Any], tenant_id: FromPath[str], data: JSONBody[TenantPatch]
) -> Tenant:
    changes = {k: v for k, v in msgspec.structs.asdict(data).items() if v is not None}
    if not changes:
        raise InvalidField("body", "name at least one field to change")
    ctx = context(request)
    forwarded = ctx.peers.is_forwarded(request)  # another worker wrote it: hold or release here
    store = ctx.platform
    changed = await (
        store.tenant(tenant_id) if forwarded else store.update_tenant(tenant_id, changes)
    )
    if changed is None:
        raise NotFoundException(f"no tenant {tenant_id!r}")
    ctx.tenant_states.pop(tenant_id, None)  # this worker's sends see its status and limits now
    if data.status is not None:
        ctx.admin.hold_tenant(changed.id, held=changed.status is TenantStatus.SUSPENDED)
        if not forwarded:
            await ctx.peers.ask(request, Tenant)  # every worker holds (or releases) its mail
    return changed


# --------------------------------------------------------------------- templates


@post(
    "/",
    status_code=201,
    opt={"scope": Scope.SEND},
    responses=problem_responses(400, 401, 403, 409, 415, 422),
    summary="Store a template: version 1, active",
)
async def create_template(
    request: Request[Any, Any, Any], data: JSONBody[TemplateIn]
) -> TemplateVersion:
    tenant_id = acting_tenant(request, data.tenant_id, acts="makes templates for")
    if not tenant_id:
        raise InvalidField("tenant_id", "name the tenant the template is for")
    store = _platform(request)
    if await store.tenant(tenant_id) is None:
        raise InvalidField("tenant_id", f"no tenant {tenant_id!r}: create it with POST /tenants")
    parts = _checked(data)
    first = TemplateVersion(
        id=f"tpl_{uuid.uuid4().hex[:20]}",
        tenant_id=tenant_id,
        name=data.name,
        version=1,
        subject_template=parts.subject_template,
        html_template=parts.html_template,
        text_template=parts.text_template,
        is_active=True,
        created_at=time.time(),
    )
    return await store.create_template(first)


@get(
    "/",
    opt={"scope": Scope.READ},
    responses=problem_responses(401, 403),
    summary="Templates: a tenant's, or every tenant's for a key for any tenant",
)
async def list_templates(
    request: Request[Any, Any, Any],
    tenant_id: Annotated[str | None, QueryParameter(description="only this tenant's")] = None,
) -> TemplateList:
    asked = acting_tenant(request, tenant_id, acts="reads templates of")
    return TemplateList(templates=await _platform(request).templates(asked or None))


@get(
    "/{template_id:str}",
    opt={"scope": Scope.READ},
    responses=problem_responses(400, 401, 403, 404, 422),
    summary="A template's active version (or ?version=N)",
)
async def show_template(
    request: Request[Any, Any, Any],
    template_id: FromPath[str],
    version: Annotated[int | None, QueryParameter(ge=1, le=1_000_000_000)] = None,
) -> TemplateVersion:
    return await _template(request, template_id, version)


@get(
    "/{template_id:str}/versions",
    opt={"scope": Scope.READ},
    responses=problem_responses(401, 403, 404),
    summary="Every version of a template",
)
async def list_versions(
    request: Request[Any, Any, Any], template_id: FromPath[str]
) -> TemplateVersions:
    await _template(request, template_id)  # the key may see it
    return TemplateVersions(versions=await _platform(request).versions(template_id))


@post(
    "/{template_id:str}/versions",
    status_code=201,
    opt={"scope": Scope.SEND},
    responses=problem_responses(400, 401, 403, 404, 415, 422),
    summary="A new version (active at once only with activate: true)",
)
async def add_version(
    request: Request[Any, Any, Any], template_id: FromPath[str], data: JSONBody[TemplateVersionIn]
) -> TemplateVersion:
    current = await _template(request, template_id)
    parts = _checked(data)
    draft = msgspec.structs.replace(
        current,
        subject_template=parts.subject_template,
        html_template=parts.html_template,
        text_template=parts.text_template,
        created_at=time.time(),
    )
    made = await _platform(request).add_version(draft, activate=data.activate)
    if made is None:
        raise NotFoundException(f"no template {template_id!r}")
    return made


@post(
    "/{template_id:str}/activate",
    status_code=200,
    opt={"scope": Scope.SEND},
    responses=problem_responses(400, 401, 403, 404, 415, 422),
    summary="Make a version the active one",
)
async def activate(
    request: Request[Any, Any, Any], template_id: FromPath[str], data: JSONBody[ActivateIn]
) -> TemplateVersion:
    await _template(request, template_id)
    made = await _platform(request).activate(template_id, data.version)
    if made is None:
        raise NotFoundException(f"template {template_id!r} has no version {data.version}")
    return made


@post(
    "/{template_id:str}/render",
    status_code=200,
    opt={"scope": Scope.SEND},
    responses=problem_responses(400, 401, 403, 404, 415, 422),
    summary="Preview a version with variables; the ones missing are listed",
)
async def render(
    request: Request[Any, Any, Any], template_id: FromPath[str], data: JSONBody[RenderIn]
) -> Rendering:
    version = await _template(request, template_id, data.version)
    parts = Parts(version.subject_template, version.html_template, version.text_template)
    shown = preview(parts, data.variables)
    return Rendering(
        template_id=version.id,
        version=version.version,
        subject=shown.subject,
        html=shown.html,
        text=shown.text,
        text_from_html=shown.text_from_html,
        missing=shown.missing,
    )


@delete(
    "/{template_id:str}",
    status_code=200,
    opt={"scope": Scope.SEND},
    responses=problem_responses(401, 403, 404),
    summary="Delete a template and all its versions",
)
async def delete_template(
    request: Request[Any, Any, Any], template_id: FromPath[str]
) -> TemplateDeleted:
    await _template(request, template_id)
    store = _platform(request)
    versions = len(await store.versions(template_id))
    if not await store.delete_template(template_id):
        raise NotFoundException(f"no template {template_id!r}")
    return TemplateDeleted(id=template_id, versions=versions)


# --------------------------------------------------------------------- helpers


def _checked(data: TemplateIn | TemplateVersionIn) -> Parts:
    """The request's template parts, each compiled once to check it (422 naming the part)."""
    parts = Parts(data.subject_template, data.html_template, data.text_template)
    check(parts)
    return parts


def _platform(request: Request[Any, Any, Any]) -> PlatformStore:
    return context(request).platform


def _bound_tenant(request: Request[Any, Any, Any]) -> str | None:
    """The tenant a tenant-bound key is for; None for a key for any tenant (or none)."""
    key = api_key(request)
    return key.tenant if key is not None and key.tenant else None


async def _tenant(request: Request[Any, Any, Any], tenant_id: str) -> Tenant:
    own = _bound_tenant(request)
    found = None if own not in (None, tenant_id) else await _platform(request).tenant(tenant_id)
    if found is None:
        raise NotFoundException(f"no tenant {tenant_id!r}")
    return found


async def _template(
    request: Request[Any, Any, Any], template_id: str, version: int | None = None
) -> TemplateVersion:
    """The version asked for (or the active one), if the key may see the template."""
    found = await _platform(request).template(template_id, version)
    own = _bound_tenant(request)
    if found is None or (own is not None and found.tenant_id != own):
        what = f"version {version} of template" if version is not None else "template"
        raise NotFoundException(f"no {what} {template_id!r}")
    return found


tenant_router = Router(
    path="/tenants",
    route_handlers=[create_tenant, list_tenants, show_tenant, update_tenant],
    tags=["tenants"],
)
template_router = Router(
    path="/templates",
    route_handlers=[
        create_template,
        list_templates,
        show_template,
        list_versions,
        add_version,
        activate,
        render,
        delete_template,
    ],
    tags=["templates"],
)
