"""The Litestar application: routes, problem details, API keys, OpenAPI 3.1 and its docs."""

from __future__ import annotations

import functools
from typing import Any

import msgspec
import msgspec.inspect
from litestar import Litestar, MediaType, Request, Response, get
from litestar.datastructures import State
from litestar.exceptions import ClientException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import ScalarRenderPlugin, SwaggerRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme

from epoxi import __version__
from epoxi.api.admin_routes import admin_router
from epoxi.api.auth import authorize
from epoxi.api.bulk_routes import bulk_progress, send_bulk
from epoxi.api.context import ApiContext, context
from epoxi.api.dead_letter_routes import dead_letter, dead_letters, resend
from epoxi.api.email_routes import analytics, email
from epoxi.api.messages import cancel, send, send_raw, status
from epoxi.api.platform_routes import template_router, tenant_router
from epoxi.api.problems import EXCEPTION_HANDLERS, problem, problem_responses
from epoxi.api.provider_routes import provider_events
from epoxi.api.quarantine_routes import admin_quarantine_router
from epoxi.api.send_routes import send_template
from epoxi.api.sink_routes import admin_sink_router
from epoxi.api.suppressions import suppressions_router
from epoxi.api.tracking_routes import track, unsubscribe, unsubscribe_page
from epoxi.api.webhook_routes import admin_webhook_router, webhook_router
from epoxi.api_types import ReadyStatus, Strict
from epoxi.errors import InvalidField
from epoxi.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from epoxi.metrics import sum_metrics
from epoxi.store.keys import Scope

DESCRIPTION = """\
Send mail through Epoxi, follow each message, and steer the queues.

Authenticate with `Authorization: Bearer <key>` (create keys with `epoxi keys create`).
While no key exists, only loopback clients are served. Errors are RFC 9457 problem details.
"""


@get("/ping", media_type=MediaType.TEXT, tags=["health"], security=[{}], summary="Answers pong")
async def ping() -> str:
    return "pong"


@get(
    "/health/live",
    tags=["health"],
    security=[{}],
    summary="The process is up and its event loop turns",
)
async def live() -> dict[str, str]:
    return {"status": "ok"}


@get(
    "/health/ready",
    tags=["health"],
    security=[{}],
    responses=problem_responses(503),
    summary="Ready to take mail: spool writable, listeners up",
)
async def ready(request: Request[Any, Any, Any]) -> Response[Any]:
    checks = context(request).readiness()
    failing = {name: state for name, state in checks.items() if state != "ok"}
    if failing:
        detail = "; ".join(f"{name}: {state}" for name, state in failing.items())
        return problem(request, 503, f"not ready: {detail}", headers={"Retry-After": "5"})
    return Response(ReadyStatus(status="ready", checks=checks))


@get(
    "/metrics",
    opt={"scope": Scope.READ},
    media_type=METRICS_CONTENT_TYPE,
    tags=["health"],
    responses=problem_responses(401, 403),
    summary="Prometheus metrics",
)
async def metrics(request: Request[Any, Any, Any]) -> bytes:
    ctx = context(request)
    return sum_metrics([ctx.metrics_text(), *await ctx.peers.ask_raw(request)])


async def _require_json_body(request: Request[Any, Any, Any]) -> None:
    """Bodies are JSON objects, said so by Content-Type (a browser cannot send that cross-site
    without asking first, which keeps web pages from sending mail through a keyless API)."""
    if request.method not in ("POST", "PUT", "PATCH"):
        return
    if request.route_handler.opt.get("body") in ("text/csv", "form"):
        return  # a route that takes CSV or a form checks its own body
    if not await request.body():
        raise ClientException("the request body is empty: send a JSON object", status_code=400)
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise ClientException(
            f"send the body as Content-Type: application/json (got {media_type or 'none'!r})",
            status_code=415,
        )
    _check_types(request.route_handler, await request.body())


def _check_types(handler: Any, body: bytes) -> None:
    """Litestar converts bodies leniently: that is meant for numbers (``send_at`` in Unix
    seconds, a duration as ``"5"``), not for true and false, so a 0 or a "yes" where the schema
    says boolean is a 422 here, naming the field."""
    data = handler.parsed_fn_signature.parameters.get("data")
    kind = data.annotation if data is not None else None
    if not (isinstance(kind, type) and issubclass(kind, Strict) and _has_booleans(kind)):
        return  # nothing to check: the body is not decoded a second time
    try:
        msgspec.json.decode(body, type=kind, strict=True)
    except msgspec.ValidationError as exc:
        message, _, where = str(exc).partition(" - at `$.")
        if message.startswith("Expected `bool"):
            raise InvalidField(where.rstrip("`") or "body", message) from exc
    except msgspec.DecodeError:
        return  # not JSON at all: Litestar's own answer (400) says so


@functools.cache
def _has_booleans(kind: type) -> bool:
    """Whether a body type has a boolean anywhere in it (then ``_check_types`` reads it)."""
    seen: set[int] = set()

    def walk(info: msgspec.inspect.Type) -> bool:
        if isinstance(info, msgspec.inspect.BoolType):
            return True
        if id(info) in seen:
            return False
        seen.add(id(info))
        if isinstance(info, msgspec.inspect.StructType):
            return any(walk(f.type) for f in info.fields)
        if isinstance(info, msgspec.inspect.UnionType):
            return any(walk(t) for t in info.types)
        if isinstance(info, msgspec.inspect.ListType | msgspec.inspect.SetType):
            return walk(info.item_type)
        if isinstance(info, msgspec.inspect.DictType):
            return walk(info.value_type)
        return False

    return walk(msgspec.inspect.type_info(kind))


def build_app(ctx: ApiContext) -> Litestar:
    app = Litestar(
        route_handlers=[
            ping,
            live,
            ready,
            metrics,
            send,
            send_raw,
            status,
            cancel,
            admin_router,
            webhook_router,
            admin_webhook_router,
            admin_sink_router,
            admin_quarantine_router,
            suppressions_router,
            provider_events,
            tenant_router,
            template_router,
            send_template,
            send_bulk,
            bulk_progress,
            email,
            analytics,
            dead_letters,
            dead_letter,
            resend,
            track,
            unsubscribe_page,
            unsubscribe,
        ],
        guards=[authorize],
        before_request=_require_json_body,
        exception_handlers=EXCEPTION_HANDLERS,
        request_max_body_size=ctx.settings.api.max_body_size,
        state=State({"ctx": ctx}),
        openapi_config=OpenAPIConfig(
            title="Epoxi",
            version=__version__,
            description=DESCRIPTION,
            path="/docs",
            render_plugins=[ScalarRenderPlugin(), SwaggerRenderPlugin(path="/swagger")],
            components=Components(
                security_schemes={"bearer": SecurityScheme(type="http", scheme="bearer")}
            ),
            # a key, or none at all: loopback clients need none while no key exists
            security=[{"bearer": []}, {}],
        ),
        debug=False,
        logging_config=None,  # Epoxi configures logging; Litestar must not replace it
    )
    _forbid_unknown_fields(app)
    return app


def _forbid_unknown_fields(app: Litestar) -> None:
    """Request bodies refuse unknown fields; say so in the schema (Litestar does not)."""
    strict = {cls.__name__ for cls in _subclasses(Strict)}
    components = app.openapi_schema.components
    for name, schema in (components.schemas or {}).items():
        if name in strict:
            schema.additional_properties = False


def _subclasses(cls: type) -> list[type]:
    return [sub for direct in cls.__subclasses__() for sub in (direct, *_subclasses(direct))]
