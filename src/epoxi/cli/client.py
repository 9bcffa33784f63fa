"""A small client of Epoxi's HTTP API for the CLI: one method per call, errors made readable."""

from __future__ import annotations

from typing import Any

import httpx

from epoxi.errors import EpoxiError

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
    ) -> Any:
        try:
            reply = self._http.request(method, path, json=json, params=params, headers=headers)
        except httpx.HTTPError as exc:
            raise ApiCallError(
                f"cannot reach Epoxi at {self.url} ({exc}); is `epoxi serve` running? "
                "Set --url or EPOXI_URL."
            ) from exc
        if reply.status_code >= 400:
            raise ApiCallError(_describe(reply), reply.status_code)
        if reply.headers.get("content-type", "").startswith("application/json"):
            return reply.json()
        return reply.text

    # ----------------------------------------------------------------- calls

    def send(self, request: dict[str, Any], idempotency_key: str | None = None) -> Any:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self.call("POST", "/messages", json=request, headers=headers)

    def send_raw(self, request: dict[str, Any], idempotency_key: str | None = None) -> Any:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self.call("POST", "/messages/raw", json=request, headers=headers)

    def status(self, message_id: str) -> Any:
        return self.call("GET", f"/messages/{message_id}")

    def pipelines(self, routing_key: str | None = None) -> Any:
        return self.call(
            "GET", f"/admin/pipelines/{routing_key}" if routing_key else "/admin/pipelines"
        )

    def health(self) -> Any:
        return self.call("GET", "/admin/pipelines/health")

    def suspend(self, target: dict[str, Any]) -> Any:
        return self.call("POST", "/admin/suspend", json=target)

    def resume(self, target: dict[str, str]) -> Any:
        return self.call("DELETE", "/admin/suspend", params=target)

    def bounce(self, selector: dict[str, Any]) -> Any:
        return self.call("POST", "/admin/bounce", json=selector)

    def retry(self, selector: dict[str, Any]) -> Any:
        return self.call("POST", "/admin/retry", json=selector)

    def admin_message(self, message_id: str) -> Any:
        return self.call("GET", f"/admin/messages/{message_id}")


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
