"""A small client of Epoxi's HTTP API for the CLI: one method per call, errors made readable.

Replies are decoded into the daemon's own types (``epoxi.api_types``), so the CLI and the
daemon agree on every field by construction.
"""

from __future__ import annotations

from typing import Any, TypeVar

import httpx
import msgspec

from epoxi.api_types import (
    BounceResponse,
    Health,
    MessageDetails,
    Pipelines,
    ResumeResponse,
    RetryResponse,
    SelectorIn,
    SendResponse,
    SuspendRequest,
    SuspendResponse,
)
from epoxi.errors import EpoxiError
from epoxi.store.status import MessageStatus

T = TypeVar("T")

DEFAULT_URL = "http://127.0.0.1:4000"


class ApiCallError(EpoxiError):
    """The API refused, or could not be reached; the message says what to do."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ApiClient:
    def __init__(
        self, url: str = DEFAULT_URL, key: str | None = None, timeout: float = 120
    ) -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
    ) -> Any:
        reply = self._request(
            method, path, json=json, params=params, headers=headers, content=content
        )
        if reply.headers.get("content-type", "").startswith("application/json"):
            return reply.json()
        return reply.text

    def octets(self, method: str, path: str) -> bytes:
        """A call whose answer is taken as it is (a message, say), not decoded."""
        return self._request(method, path).content

    def _request(self, method: str, path: str, **options: Any) -> httpx.Response:
        try:
            reply = self._http.request(method, path, **options)
        except httpx.HTTPError as exc:
            raise ApiCallError(
                f"cannot reach Epoxi at {self.url} ({exc}); is `epoxi serve` running? "
                "Set --url or EPOXI_URL."
            ) from exc
        if reply.status_code >= 400:
            raise ApiCallError(_describe(reply), reply.status_code)
        return reply

    def typed(self, kind: type[T], method: str, path: str, **options: Any) -> T:
        """A call whose JSON reply is decoded into ``kind``, one of the daemon's own types."""
        reply = self.call(method, path, **options)
        try:
            return msgspec.convert(reply, kind, strict=False)
        except msgspec.ValidationError as exc:
            raise ApiCallError(f"unexpected reply from {self.url}{path}: {exc}") from exc

    # ----------------------------------------------------------------- calls

    def send(self, request: dict[str, Any], idempotency_key: str | None = None) -> SendResponse:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self.typed(SendResponse, "POST", "/messages", json=request, headers=headers)

    def send_raw(self, request: dict[str, Any], idempotency_key: str | None = None) -> SendResponse:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self.typed(SendResponse, "POST", "/messages/raw", json=request, headers=headers)

    def status(self, message_id: str) -> MessageStatus:
        return self.typed(MessageStatus, "GET", f"/messages/{message_id}")

    def pipelines(self, routing_key: str | None = None) -> Pipelines:
        path = f"/admin/pipelines/{routing_key}" if routing_key else "/admin/pipelines"
        return self.typed(Pipelines, "GET", path)

    def health(self) -> Health:
        return self.typed(Health, "GET", "/admin/pipelines/health")

    def suspend(self, request: SuspendRequest) -> SuspendResponse:
        body = msgspec.to_builtins(request)
        return self.typed(SuspendResponse, "POST", "/admin/suspend", json=body)

    def resume(self, target: dict[str, str]) -> ResumeResponse:
        return self.typed(ResumeResponse, "DELETE", "/admin/suspend", params=target)

    def bounce(self, selector: SelectorIn) -> BounceResponse:
        body = msgspec.to_builtins(selector)
        return self.typed(BounceResponse, "POST", "/admin/bounce", json=body)

    def retry(self, selector: SelectorIn) -> RetryResponse:
        body = msgspec.to_builtins(selector)
        return self.typed(RetryResponse, "POST", "/admin/retry", json=body)

    def admin_message(self, message_id: str) -> MessageDetails:
        return self.typed(MessageDetails, "GET", f"/admin/messages/{message_id}")


def _describe(reply: httpx.Response) -> str:
    try:
        problem = reply.json()
    except ValueError:
        return f"{reply.status_code} {reply.reason_phrase}: {reply.text[:500]}"
    detail = problem.get("detail") or problem.get("title") or ""
    text = f"{reply.status_code} {reply.reason_phrase}: {detail}"
    if reply.status_code == 401:
        text += " (give a key with --key or EPOXI_API_KEY)"
    return text
