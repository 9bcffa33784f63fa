"""Every error the API returns is RFC 9457 problem details saying what was wrong and where."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi.datastructures import ResponseSpec
from litestar.types import ExceptionHandlersMap

from epoxi.api_types import Problem
from epoxi.compose import MessageTooLarge
from epoxi.errors import (
    AlreadyExists,
    DatabaseUnavailable,
    InvalidField,
    MessageRefused,
    SignatureRefused,
    SpoolUnavailable,
    UnknownProvider,
)

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
RETRY_AFTER = 30  # seconds a client should wait when the spool cannot take more


def problem(
    request: Request[Any, Any, Any],
    status: int,
    detail: str,
    *,
    errors: list[dict[str, str]] | None = None,
    headers: dict[str, str] | None = None,
) -> Response[Problem]:
    body = Problem(
        title=HTTPStatus(status).phrase,
        status=status,
        detail=detail,
        instance=request.url.path,
        errors=errors or [],
    )
    return Response(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _on_http_exception(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Problem]:
    if isinstance(exc, ValidationException):
        return _on_validation(request, exc)
    headers = dict(exc.headers or {})
    detail = str(exc.detail)
    if exc.status_code == 413 and detail == HTTPStatus(413).phrase:
        limit = request.app.state.ctx.settings.api.max_body_size
        detail = f"the request body is over api.max_body_size ({limit} octets)"
    return problem(request, exc.status_code, detail, headers=headers)


def _on_validation(request: Request[Any, Any, Any], exc: ValidationException) -> Response[Problem]:
    """Unparseable JSON is 400; JSON that does not fit the schema is 422, naming the field."""
    extra = exc.extra if isinstance(exc.extra, list) else []
    errors = [
        {"field": _field(item.get("key")), "message": str(item.get("message", ""))}
        for item in extra
        if isinstance(item, dict)
    ]
    malformed = "malformed" in str(exc.detail).lower() or any(
        "malformed" in e["message"].lower() for e in errors
    )
    status = 400 if malformed else 422
    detail = errors[0]["message"] if errors else str(exc.detail)
    if detail.startswith("data: "):  # Litestar's name for the body
        detail = detail[len("data: ") :]
    if errors and errors[0]["field"] and errors[0]["field"] not in detail:
        detail = f"{errors[0]['field']}: {detail}"
    return problem(request, status, detail, errors=errors)


_PARAMETERS = {"data": "", "idempotency_key": "Idempotency-Key"}  # handler names -> wire names


def _field(key: Any) -> str:
    """Litestar names body fields ``$.message.to[0]``; callers see ``message.to[0]``."""
    text = str(key or "")
    text = text[2:] if text.startswith("$.") else text.lstrip("$")
    return _PARAMETERS.get(text, text)


def _on_invalid_field(request: Request[Any, Any, Any], exc: InvalidField) -> Response[Problem]:
    error = {"field": exc.field, "message": str(exc)}
    if exc.recipient is not None:
        error["recipient"] = exc.recipient
    status = 413 if isinstance(exc, MessageTooLarge) else 422
    return problem(request, status, f"{exc.field}: {exc}", errors=[error])


def _on_spool_unavailable(
    request: Request[Any, Any, Any], exc: SpoolUnavailable
) -> Response[Problem]:
    return problem(
        request,
        503,
        f"the spool cannot take more mail now ({exc}); retry later",
        headers={"Retry-After": str(RETRY_AFTER)},
    )


def _on_recursion(request: Request[Any, Any, Any], exc: RecursionError) -> Response[Problem]:
    return problem(request, 400, "the JSON body is nested too deeply")


def _on_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[Problem]:
    log.exception("%s %s failed", request.method, request.url.path)
    return problem(request, 500, "internal error; the server log has the details")


def _on_signature(request: Request[Any, Any, Any], exc: SignatureRefused) -> Response[Problem]:
    """A provider webhook call that is not signed, or not lately: nothing was applied."""
    detail = f"{exc}; nothing was applied"
    return problem(request, 401, detail, headers={"WWW-Authenticate": "Webhook-Signature"})


def _on_unknown_provider(
    request: Request[Any, Any, Any], exc: UnknownProvider
) -> Response[Problem]:
    return problem(request, 404, str(exc))


def _on_exists(request: Request[Any, Any, Any], exc: AlreadyExists) -> Response[Problem]:
    return problem(request, 409, str(exc))


def _on_database(request: Request[Any, Any, Any], exc: DatabaseUnavailable) -> Response[Problem]:
    log.warning("%s %s: %s", request.method, request.url.path, exc)
    return problem(request, 503, f"{exc}; retry later", headers={"Retry-After": str(RETRY_AFTER)})


def _on_refused(request: Request[Any, Any, Any], exc: MessageRefused) -> Response[Problem]:
    """Ingest refused the message (a mail loop, a hook): 422 with the SMTP reply it gives."""
    return problem(request, 422, f"message refused: {exc.reply}")


EXCEPTION_HANDLERS: ExceptionHandlersMap = {
    HTTPException: _on_http_exception,
    MessageRefused: _on_refused,
    InvalidField: _on_invalid_field,
    SignatureRefused: _on_signature,
    AlreadyExists: _on_exists,
    DatabaseUnavailable: _on_database,
    UnknownProvider: _on_unknown_provider,
    SpoolUnavailable: _on_spool_unavailable,
    RecursionError: _on_recursion,
    Exception: _on_unexpected,
}


def problem_responses(*statuses: int) -> dict[int, ResponseSpec]:
    """OpenAPI entries for the problem responses a route may give."""
    return {
        status: ResponseSpec(
            data_container=Problem,
            description=HTTPStatus(status).phrase,
            media_type=PROBLEM_JSON,
            generate_examples=False,
        )
        for status in statuses
    }


__all__ = ["EXCEPTION_HANDLERS", "PROBLEM_JSON", "problem", "problem_responses"]
