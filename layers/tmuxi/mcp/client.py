"""The REST API as the MCP tools call it: an ``httpx.AsyncClient`` with the REST API's base URL, the caller's token,
and a refusal raised with the API's own words (``{"error": {"code", "message"}}``).

No ``mcp`` import here: this is plain HTTP.
"""
from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import httpx

# The longest a call may wait: an exec waits up to 25 s (routes.EXEC_TIMEOUT_MAX_S) and API Gateway answers within
# 29 s (504 past that); connecting is quick or not at all.
TIMEOUT = httpx.Timeout(35.0, connect=5.0)


class ApiError(Exception):
    """The REST API refused a call (``status`` and ``code`` from its answer), or could not be reached
    (``status`` None)."""

    def __init__(self, status: int | None, code: str, message: str, details: dict[str, Any] | None = None,
                 retry_after: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}
        self.retry_after = retry_after

    def __str__(self) -> str:
        if self.status is None:
            return self.message
        extra = [f"HTTP {self.status} {self.code}"]
        if self.details:
            extra.append(json.dumps(self.details, separators=(",", ":"), default=str))
        if self.retry_after:
            extra.append(f"retry after {self.retry_after} s")
        return f"{self.message} ({'; '.join(extra)})"


def segment(value: str) -> str:
    """``value`` as one path segment: an id from the caller never changes the route (``/``, ``?``, ``#`` and a
    lone ``.`` or ``..`` are escaped; the API then refuses what is not an id)."""
    if value in (".", ".."):
        return "%2E" * len(value)
    return quote(value, safe="")


def given(**fields: Any) -> dict[str, Any]:
    """The fields that were given (not None): what a tool sends, so the API's own defaults apply to the rest."""
    return {k: v for k, v in fields.items() if v is not None}


def _refusal(resp: httpx.Response) -> ApiError:
    code, message, details = "error", resp.reason_phrase or f"HTTP {resp.status_code}", None
    try:
        body = resp.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        code = str(error.get("code") or code)
        message = str(error.get("message") or message)
        details = error.get("details") if isinstance(error.get("details"), dict) else None
    elif resp.text:
        message = resp.text[:300]
    return ApiError(resp.status_code, code, message, details, resp.headers.get("retry-after"))


class RestClient:
    """Calls the REST API over ``http`` (its ``base_url`` is the API's). ``authorization``: the header to send
    with each call, for a client shared by several callers (the mcp function: one client per event loop, each
    request with its caller's token); None when ``http`` carries it already (the stdio server)."""

    __slots__ = ("http", "authorization")

    def __init__(self, http: httpx.AsyncClient, authorization: str | None = None) -> None:
        self.http = http
        self.authorization = authorization

    async def call(self, method: str, path: str, *, json: dict[str, Any] | None = None,
                   params: dict[str, Any] | None = None) -> Any:
        """The answer's JSON (None for 204); ApiError for any status from 400 up, or no answer."""
        headers = {"Authorization": self.authorization} if self.authorization else None
        try:
            resp = await self.http.request(method, path, json=json, params=params, headers=headers)
        except httpx.TimeoutException as exc:
            raise ApiError(None, "timeout", f"the REST API ({self.http.base_url}) did not answer in time; an "
                                            f"exec or a send-and-wait may still have taken effect") from exc
        except httpx.HTTPError as exc:
            raise ApiError(None, "unreachable",
                           f"the REST API ({self.http.base_url}) could not be reached: {exc}") from exc
        if resp.status_code >= 400:
            raise _refusal(resp)
        if resp.status_code == 204 or not resp.content:
            return None
        return resp.json()


def new_http_client(api_url: str, token: str | None = None) -> httpx.AsyncClient:
    """A client for the REST API at ``api_url`` (with ``token`` on every request when given)."""
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return httpx.AsyncClient(base_url=api_url.rstrip("/"), headers=headers, timeout=TIMEOUT, follow_redirects=False)
