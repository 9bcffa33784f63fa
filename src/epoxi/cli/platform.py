"""``epoxi tenants`` and ``epoxi templates``: the sending platform from the command line, over
the same API (docs/platform.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from epoxi.api_types import Rendering, TemplateDeleted, TemplateList, TemplateVersions, TenantList
from epoxi.cli.client import DEFAULT_URL
from epoxi.cli.common import PLAIN_HELP
from epoxi.cli.remote import AsJson, Key, Url, _api
from epoxi.cli.show import echo, print_json
from epoxi.store.platform import TemplateVersion, Tenant

tenants_app = typer.Typer(
    help="Tenants of the sending platform: create, list, show, change, suspend, reactivate.",
    no_args_is_help=True,
    rich_markup_mode=PLAIN_HELP,
)
templates_app = typer.Typer(
    help="Stored templates: versions of subject, HTML and text (Jinja2), one active.",
    no_args_is_help=True,
    rich_markup_mode=PLAIN_HELP,
)

TenantId = Annotated[str, typer.Argument(help="The tenant's id (letters, digits, . _ + -).")]
TemplateId = Annotated[str, typer.Argument(help="The template's id (tpl_...; `templates ls`).")]


# --------------------------------------------------------------------- tenants


@tenants_app.command("add")
def tenant_add(
    tenant_id: TenantId,
    name: Annotated[str, typer.Option(help="What people call it.")],
    sender: Annotated[
        str | None, typer.Option(help="The From of its /send mail when a send names none.")
    ] = None,
    pool: Annotated[str | None, typer.Option(help="Its default egress pool.")] = None,
    url: Url = DEFAULT_URL,
    key: Key = None,
    as_json: AsJson = False,
) -> None:
    """Create a tenant (an operator's key)."""
    body: dict[str, Any] = {"id": tenant_id, "name": name}
    body |= {k: v for k, v in (("sender", sender), ("default_pool", pool)) if v}
    with _api(url, key) as client:
        made = client.typed(Tenant, "POST", "/tenants", json=body)
    _show_tenant(made, as_json)


@tenants_app.command("ls")
def tenant_ls(url: Url = DEFAULT_URL, key: Key = None, as_json: AsJson = False) -> None:
    """List the tenants this key may see."""
    with _api(url, key) as client:
        found = client.typed(TenantList, "GET", "/tenants")
    if as_json:
        print_json(found)
        return
    for tenant in found.tenants:
        echo(f"{tenant.id}  {tenant.status.value}  {tenant.name}")
    if not found.tenants:
        echo("no tenants")


@tenants_app.command("show")
def tenant_show(
    tenant_id: TenantId, url: Url = DEFAULT_URL, key: Key = None, as_json: AsJson = False
) -> None:
    """One tenant, with its settings."""
    with _api(url, key) as client:
        found = client.typed(Tenant, "GET", f"/tenants/{tenant_id}")
    _show_tenant(found, as_json)


@tenants_app.command("suspend")
def tenant_suspend(
    tenant_id: TenantId, url: Url = DEFAULT_URL, key: Key = None, as_json: AsJson = False
) -> None:
    """Refuse the tenant's sends (403) and hold its queued mail until it is reactivated."""
    _patch(tenant_id, {"status": "suspended"}, url, key, as_json)


@tenants_app.command("reactivate")
def tenant_reactivate(
    tenant_id: TenantId, url: Url = DEFAULT_URL, key: Key = None, as_json: AsJson = False
) -> None:
    """Take the tenant's sends again and release its held mail."""
    _patch(tenant_id, {"status": "active"}, url, key, as_json)


def _patch(tenant_id: str, body: dict[str, Any], url: str, key: str | None, as_json: bool) -> None:
    with _api(url, key) as client:
        changed = client.typed(Tenant, "PATCH", f"/tenants/{tenant_id}", json=body)
    _show_tenant(changed, as_json)


def _show_tenant(tenant: Tenant, as_json: bool) -> None:
    if as_json:
        print_json(tenant)
        return
    echo(f"{tenant.id}  {tenant.status.value}  {tenant.name}")
    for label, value in (
        ("sender", tenant.sender),
        ("default pool", tenant.default_pool),
        ("DKIM domain", tenant.dkim_domain),
    ):
        if value:
            echo(f"  {label}: {value}")


# --------------------------------------------------------------------- templates


Source = Annotated[
    Path | None, typer.Option(exists=True, dir_okay=False, help="A file with the template.")
]


@templates_app.command("add")
def template_add(
    name: Annotated[str, typer.Argument(help="Its name, unique within the tenant.")],
    subject: Annotated[str, typer.Option(help="The subject template, e.g. 'Hi {{ name }}'.")],
    html: Source = None,
    text: Source = None,
    tenant: Annotated[str | None, typer.Option(help="The tenant (a tenant key: its own).")] = None,
    url: Url = DEFAULT_URL,
    key: Key = None,
    as_json: AsJson = False,
) -> None:
    """Store a template from files: version 1, active. Without --text, the text part is made
    from the HTML when mail is sent."""
    body = {
        "name": name,
        "subject_template": subject,
        "html_template": html.read_text() if html else "",
        "text_template": text.read_text() if text else None,
        **({"tenant_id": tenant} if tenant else {}),
    }
    with _api(url, key) as client:
        made = client.typed(TemplateVersion, "POST", "/templates", json=body)
    _show_version(made, as_json)


@templates_app.command("ls")
def template_ls(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's.")] = None,
    url: Url = DEFAULT_URL,
    key: Key = None,
    as_json: AsJson = False,
) -> None:
    """List templates with their active and latest versions."""
    with _api(url, key) as client:
        found = client.typed(
            TemplateList, "GET", "/templates", params={"tenant_id": tenant} if tenant else None
        )
    if as_json:
        print_json(found)
        return
    for item in found.templates:
        echo(
            f"{item.id}  {item.tenant_id}  {item.name}  active v{item.active_version}"
            f"  latest v{item.latest_version}"
        )
    if not found.templates:
        echo("no templates")


@templates_app.command("versions")
def template_versions(
    template_id: TemplateId, url: Url = DEFAULT_URL, key: Key = None, as_json: AsJson = False
) -> None:
    """Every version of a template; * marks the active one."""
    with _api(url, key) as client:
        found = client.typed(TemplateVersions, "GET", f"/templates/{template_id}/versions")
    if as_json:
        print_json(found)
        return
    for version in found.versions:
        mark = "*" if version.is_active else " "
        echo(f"{mark} v{version.version}  {version.subject_template}")


@templates_app.command("activate")
def template_activate(
    template_id: TemplateId,
    version: Annotated[int, typer.Argument(help="The version to make active.", min=1)],
    url: Url = DEFAULT_URL,
    key: Key = None,
    as_json: AsJson = False,
) -> None:
    """Make a version the one sends use."""
    with _api(url, key) as client:
        made = client.typed(
            TemplateVersion,
            "POST",
            f"/templates/{template_id}/activate",
            json={"version": version},
        )
    _show_version(made, as_json)


@templates_app.command("render")
def template_render(
    template_id: TemplateId,
    variables: Annotated[
        str, typer.Option("--vars", help="The variables as a JSON object.")
    ] = "{}",
    version: Annotated[int | None, typer.Option(min=1, help="Not the active one.")] = None,
    url: Url = DEFAULT_URL,
    key: Key = None,
    as_json: AsJson = False,
) -> None:
    """Preview a template with variables; lists the ones it uses that were not given."""
    try:
        given = json.loads(variables)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"not JSON: {exc}", param_hint="--vars") from exc
    body = {"variables": given, **({"version": version} if version else {})}
    with _api(url, key) as client:
        shown = client.typed(Rendering, "POST", f"/templates/{template_id}/render", json=body)
    if as_json:
        print_json(shown)
        return
    echo(f"Subject: {shown.subject}")
    echo("--- text" + (" (made from the HTML)" if shown.text_from_html else ""))
    echo(shown.text.rstrip("\n"))
    if shown.missing:
        echo(f"missing: {', '.join(shown.missing)}")


@templates_app.command("rm")
def template_rm(template_id: TemplateId, url: Url = DEFAULT_URL, key: Key = None) -> None:
    """Delete a template and all its versions."""
    with _api(url, key) as client:
        gone = client.typed(TemplateDeleted, "DELETE", f"/templates/{template_id}")
    plural = "" if gone.versions == 1 else "s"
    echo(f"removed {gone.id} ({gone.versions} version{plural})")


def _show_version(version: TemplateVersion, as_json: bool) -> None:
    if as_json:
        print_json(version)
        return
    active = "active" if version.is_active else "not active"
    echo(f"{version.id}  {version.tenant_id}  {version.name}  v{version.version} ({active})")
