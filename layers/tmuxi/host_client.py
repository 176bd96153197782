"""Small synchronous client for the tmux host's internal HTTP API (used by the Lambda functions).

One pooled keep-alive ``urllib3.HTTPConnectionPool`` per host URL (module-level cache, reused across warm
invocations; a connection the host closed while idle is noticed before reuse and replaced). urllib3, not httpx:
the same pooled keep-alive request costs 0.63 ms p50 against httpx's 1.09 ms on this project's machine (a trivial
host route, both from one process, interleaved), and every session route pays it once; botocore already ships it.
Connection errors and timeouts become :class:`tmuxi.errors.HostUnavailable`; error bodies
``{"error": {"code", "message"}}`` are mapped back to the matching :mod:`tmuxi.errors` class. The host's own
words (its validation text, tmux's messages, its capacity) are kept as the error's internal detail for the log;
what a client may be told comes from ``_PUBLIC`` (4xx) or the class (5xx).
"""
from __future__ import annotations

import base64
import json as jsonlib
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlencode
from uuid import UUID

from tmuxi import errors
from tmuxi.models import ExecRequest, ExecResult, InputWaitResult, ScreenResponse, WaitSpec
from tmuxi.observability import request_id
from tmuxi.settings import Settings, get_settings
from tmuxi.snapstart import deferred_import

if TYPE_CHECKING:
    import urllib3
else:
    # ~55 ms at import: paid by the first request that calls a host (the api's session routes, the ws
    # function's attach), not by every cold start; before a SnapStart snapshot, ahead (tmuxi/snapstart.py)
    urllib3 = deferred_import("urllib3")

SECRET_HEADER = "X-Tmuxi-Host-Secret"  # noqa: S105 - a header name, not a secret
# The id of the API request a host call serves (API Gateway's requestId): the host logs under it.
REQUEST_ID_HEADER = "X-Request-Id"
EXEC_TIMEOUT_MARGIN_S = 5.0
# A file read's answer: the path relative to the home (percent-encoded UTF-8) and the mode ("0644") beside the bytes
FILE_PATH_HEADER = "X-Tmuxi-File-Path"
FILE_MODE_HEADER = "X-Tmuxi-File-Mode"
FILE_TIMEOUT_MARGIN_S = 2.0  # the host gives a file operation host_timeout_s - 1; this is for the bytes' transfer


@dataclass(frozen=True)
class HostInfo:
    """What a host advertises in the registry (heartbeat)."""

    host_id: str
    url: str
    capacity: int
    active_sessions: int
    started_at: float  # unix time (seconds) the host process started
    # account number -> tmux sessions its user made from a shell on this host (they count against the quota)
    extra_sessions: dict[int, int] = field(default_factory=dict)


class HostFull(errors.HostUnavailable):
    """The host is at capacity (503 ``host_full``): place the session on another host."""

    code = "host_full"
    public_message = "the terminal service cannot take a new session right now; retry shortly"


# --- files (tmux_host/files.py) -------------------------------------------------------------------------------
class FileError(errors.AppError):
    """A file operation refused for a reason in the request itself (the path, the file, its size). Not a
    NotFound: the session is there (sessions.on_host reads a 404 ``not_found`` from a host as the session gone).
    The host builds the message from what the request gave (the path relative to the home, sizes) and the OS's
    reason, so it is passed on to the caller as is."""

    status = 400
    code = "file_error"


class FileBadPath(FileError):
    code = "bad_path"  # leaves the home, NUL, too long; a directory where a file is expected, or the reverse


MAX_PATH_BYTES = 4096  # PATH_MAX


def check_path(path: str) -> None:
    """What is refused of a path before anything is looked up (400 ``bad_path``): empty, a NUL, not UTF-8, longer
    than the OS takes. The API checks it before sending; the host again, then that it stays in the home."""
    if not path:
        raise FileBadPath("path is empty")
    if "\x00" in path:
        raise FileBadPath("path contains a NUL character")
    try:
        size = len(path.encode())
    except UnicodeEncodeError:
        raise FileBadPath("path is not valid UTF-8 (a lone surrogate)") from None
    if size > MAX_PATH_BYTES:
        raise FileBadPath(f"path is {size} bytes; the longest is {MAX_PATH_BYTES}")


class FileMissing(FileError):
    status = 404
    code = "file_not_found"


class FileDenied(FileError):
    status = 403
    code = "permission_denied"  # the user's OS account may not (a link to another account's home, /etc/shadow)


class FileTooLarge(FileError):
    status = 413
    code = "file_too_large"


class FileNoSpace(FileError):
    status = 507
    code = "no_space"
    public_message = "no space left in the session's home to write the file"


def _error_classes() -> dict[str, type[errors.AppError]]:
    found: dict[str, type[errors.AppError]] = {}
    stack: list[type[errors.AppError]] = [errors.AppError]
    while stack:
        cls = stack.pop()
        found.setdefault(cls.code, cls)
        stack.extend(cls.__subclasses__())
    found["host_full"] = HostFull
    return found


_BY_STATUS: dict[int, type[errors.AppError]] = {
    400: errors.BadRequest, 404: errors.NotFound, 409: errors.Conflict, 413: errors.PayloadTooLarge,
    410: errors.SessionGone, 422: errors.BadRequest, 429: errors.RateLimited, 503: errors.HostUnavailable,
}
# The host refusing our secret is this service's fault (configuration), never the caller's: 503.
_OURS = {401, 403}

# What a caller is told when the host refuses a request (its own message goes to the log).
# 4xx whose message the host writes for the caller: which exec holds the session, why input was not taken
_PASSED_ON = frozenset({"session_busy", "exec_not_found", "conflict", "input_backlog"})
_PUBLIC: dict[str, str] = {
    "not_found": "session not found",
    "session_busy": "the session is busy (a command or program is running in it); retry when it is done",
    "session_not_active": "the session is not active",
    "session_gone": "the session has ended",
    "input_backlog": "a program in the session is not reading its input and too much is waiting; send keys "
                     "(C-c) to stop it, or delete sessions",
    "payload_too_large": "the input or command is too large",
    "conflict": "the request conflicts with the session's state",
    "bad_request": "the request is not valid for this session",
    "rate_limited": "too many requests; slow down",
}

_clients: dict[str, urllib3.HTTPConnectionPool] = {}
_clients_lock = threading.Lock()
KEEPALIVE_CONNECTIONS = 8  # per host, kept between requests; more may open at once, and are closed after use


def _pooled(base_url: str) -> urllib3.HTTPConnectionPool:
    with _clients_lock:
        client = _clients.get(base_url)
        if client is None or client.pool is None:
            # retries=False: a request is sent once (an exec must never run twice); redirects are not followed
            client = urllib3.connection_from_url(base_url, maxsize=KEEPALIVE_CONNECTIONS, block=False,
                                                 retries=False)
            _clients[base_url] = client
        return client


def close_all() -> None:
    """Close every pooled connection (tests, shutdown)."""
    with _clients_lock:
        for client in _clients.values():
            client.close()
        _clients.clear()


@dataclass(frozen=True)
class HostResponse:
    """A host's answer: status, headers (case-insensitive), body."""

    status_code: int
    content: bytes
    headers: Any = field(default_factory=dict)

    def json(self) -> Any:
        return jsonlib.loads(self.content)

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")


def _obj(resp: HostResponse) -> dict[str, Any]:
    body = resp.json()
    if not isinstance(body, dict):
        raise ValueError("expected a JSON object")
    return body


class HostClient:
    """Mirror of the host routes. ``HostClient(url)`` uses ``settings.require_host_secret()``."""

    def __init__(
        self,
        base_url: str,
        *,
        secret: str | None = None,
        timeout_s: float | None = None,
        settings: Settings | None = None,
    ) -> None:
        self.settings = settings or get_settings()
        self.base_url = base_url.rstrip("/")
        self._secret = secret if secret is not None else self.settings.require_host_secret()
        self.timeout_s = timeout_s if timeout_s is not None else self.settings.host_timeout_s

    def _send(self, method: str, path: str, body: bytes | None, headers: dict[str, str],
              timeout_s: float) -> HostResponse:
        r = _pooled(self.base_url).request(
            method, path, body=body, headers=headers, timeout=urllib3.Timeout(connect=timeout_s, read=timeout_s),
            redirect=False, preload_content=True)
        return HostResponse(r.status, r.data, r.headers)

    # --- plumbing ----------------------------------------------------------------------------------
    def _request(
        self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None,
        timeout_s: float | None = None, content: bytes | None = None,
    ) -> HostResponse:
        headers = {SECRET_HEADER: self._secret}
        body = content
        if content is not None:
            headers["Content-Type"] = "application/octet-stream"
        elif json is not None:
            headers["Content-Type"] = "application/json"
            body = jsonlib.dumps(json, separators=(",", ":")).encode()  # ASCII: a lone surrogate escaped
        rid = request_id()
        if rid is not None:
            headers[REQUEST_ID_HEADER] = rid
        if params:
            path = f"{path}?{urlencode(params)}"
        try:
            resp = self._send(method, path, body, headers, timeout_s if timeout_s is not None else self.timeout_s)
        except (urllib3.exceptions.ReadTimeoutError, urllib3.exceptions.ProtocolError) as exc:
            # sent, no answer (or the connection dropped mid-answer): a request that changes something may have
            # taken effect
            cls = errors.HostUnavailable if method in ("GET", "HEAD") else errors.OutcomeUnknown
            raise cls(f"tmux host {self.base_url}: no answer to {method} {path} ({type(exc).__name__})") from exc
        except urllib3.exceptions.TimeoutError as exc:
            raise errors.HostUnavailable(f"tmux host {self.base_url} timed out ({method} {path})") from exc
        except urllib3.exceptions.HTTPError as exc:
            raise errors.HostUnavailable(f"tmux host {self.base_url} unreachable: {type(exc).__name__}") from exc
        if resp.status_code >= 400:
            raise self._to_error(resp, self.base_url)
        return resp

    @staticmethod
    def _to_error(resp: HostResponse, base_url: str = "") -> errors.AppError:
        code, message = None, ""
        details: Any = {}
        body: Any = {}
        try:
            body = resp.json()["error"]
            code, message = body.get("code"), str(body.get("message") or "")
            details = body.get("details") or {}
        except Exception:  # noqa: S110 - not JSON: keep the status-based mapping
            pass
        detail = f"tmux host {base_url or '?'} answered {resp.status_code} {code}: {message}"
        cls = _error_classes().get(code or "") if code else None
        if resp.status_code in _OURS and not (cls is not None and issubclass(cls, FileError)):
            cls = errors.HostUnavailable
        elif cls is None or cls.status != resp.status_code:
            cls = _BY_STATUS.get(resp.status_code, errors.AppError)
        if cls.status >= 500:
            return cls(detail)  # 5xx: the message is for the log; the body says busy/unavailable
        if issubclass(cls, FileError):
            return cls(message[:5000] or "the file operation was refused", internal=detail)
        if cls is errors.InvalidField:
            fields = body.get("fields") if isinstance(body, dict) else None
            first = fields[0] if isinstance(fields, list) and fields and isinstance(fields[0], dict) else {}
            return errors.InvalidField(str(first.get("field", "body"))[:100], str(first.get("message", message))[:1000])
        if cls.code in _PASSED_ON:  # the host's own words about the exec (ids, counts), never a path
            return cls(message[:1000] or _PUBLIC.get(cls.code, "the request was refused"), internal=detail)
        if cls is errors.SessionGone and isinstance(details, dict):  # how it ended, in the host's words
            kept = {k: str(details[k])[:200] for k in ("state", "end_reason") if k in details}
            return cls(_PUBLIC[cls.code], internal=detail, **kept)
        return cls(_PUBLIC.get(cls.code, "the request was refused"), internal=detail)

    # --- routes ------------------------------------------------------------------------------------
    def create_session(self, session_id: UUID, account: int, cols: int, rows: int) -> dict[str, Any]:
        """Create the session on the tmux server of ``account`` (the owner's ``users.account_no``)."""
        body = {"session_id": str(session_id), "account": account, "cols": cols, "rows": rows}
        return _obj(self._request("POST", "/v1/sessions", json=body))

    def list_sessions(self) -> list[dict[str, Any]]:
        return list(_obj(self._request("GET", "/v1/sessions"))["sessions"])

    def kill_session(self, session_id: UUID) -> None:
        self._request("DELETE", f"/v1/sessions/{session_id}")

    def send_input(self, session_id: UUID, data: bytes | None = None, keys: list[str] | None = None) -> None:
        """Send raw bytes and/or tmux key names (bytes first). Nothing to send is a no-op."""
        body: dict[str, Any] = {}
        if data:
            body["data_b64"] = base64.b64encode(data).decode("ascii")
        if keys:
            body["keys"] = keys
        if body:
            self._request("POST", f"/v1/sessions/{session_id}/input", json=body)

    def send_and_wait(self, session_id: UUID, data: bytes | None, keys: list[str] | None,
                      wait: WaitSpec) -> InputWaitResult:
        body: dict[str, Any] = {"wait": wait.model_dump(exclude_none=True)}
        if data:
            body["data_b64"] = base64.b64encode(data).decode("ascii")
        if keys:
            body["keys"] = keys
        resp = self._request("POST", f"/v1/sessions/{session_id}/input", json=body,
                             timeout_s=wait.timeout_s + max(EXEC_TIMEOUT_MARGIN_S, self.timeout_s))
        return InputWaitResult.model_validate(resp.json())

    def screen(self, session_id: UUID, escapes: bool = False, history: int = 0) -> ScreenResponse:
        params = {"escapes": int(escapes), "history": history}
        return ScreenResponse.model_validate(
            self._request("GET", f"/v1/sessions/{session_id}/screen", params=params).json()
        )

    def resize(self, session_id: UUID, cols: int, rows: int) -> None:
        self._request("POST", f"/v1/sessions/{session_id}/resize", json={"cols": cols, "rows": rows})

    def exec(self, session_id: UUID, command: str | ExecRequest, timeout_s: float | None = None, *,
             exec_id: str | None = None) -> ExecResult:
        """Run a command (``exec_id``: the id it gets, 16 hex digits; the host picks one without)."""
        req = command if isinstance(command, ExecRequest) else ExecRequest(command=command, timeout_s=timeout_s)
        t = req.timeout_s if req.timeout_s is not None else self.settings.exec_timeout_default_s
        body = req.model_dump(exclude_none=True)
        body["timeout_s"] = min(t, self.settings.exec_timeout_max_s)
        if exec_id is not None:
            body["exec_id"] = exec_id
        resp = self._request("POST", f"/v1/sessions/{session_id}/exec", json=body,
                             timeout_s=body["timeout_s"] + max(EXEC_TIMEOUT_MARGIN_S, self.timeout_s))
        return ExecResult.model_validate(resp.json())

    def list_execs(self, session_id: UUID) -> list[dict[str, Any]]:
        return list(_obj(self._request("GET", f"/v1/sessions/{session_id}/execs"))["execs"])

    def poll_exec(self, session_id: UUID, exec_id: str, cursor: str = "", wait_s: float = 0.0) -> ExecResult:
        resp = self._request("GET", f"/v1/sessions/{session_id}/execs/{exec_id}",
                             params={"cursor": cursor, "wait_s": wait_s},
                             timeout_s=wait_s + max(EXEC_TIMEOUT_MARGIN_S, self.timeout_s))
        return ExecResult.model_validate(resp.json())

    def exec_input(self, session_id: UUID, exec_id: str, data: bytes, eof: bool = False) -> None:
        self._request("POST", f"/v1/sessions/{session_id}/execs/{exec_id}/input",
                      json={"data_b64": base64.b64encode(data).decode("ascii"), "eof": eof})

    def signal_exec(self, session_id: UUID, exec_id: str, signal: str) -> None:
        self._request("POST", f"/v1/sessions/{session_id}/execs/{exec_id}/signal", json={"signal": signal})

    def stop_exec(self, session_id: UUID, exec_id: str, grace_s: float) -> ExecResult:
        resp = self._request("DELETE", f"/v1/sessions/{session_id}/execs/{exec_id}", params={"grace_s": grace_s},
                             timeout_s=grace_s + 2 * max(EXEC_TIMEOUT_MARGIN_S, self.timeout_s))
        return ExecResult.model_validate(resp.json())

    def health(self) -> dict[str, Any]:
        """``/health`` (no secret needed). Returns the body even when the host says 503."""
        try:
            resp = self._send("GET", "/health", None, {}, self.timeout_s)
        except urllib3.exceptions.TimeoutError as exc:
            raise errors.HostUnavailable(f"tmux host {self.base_url} timed out (health)") from exc
        except urllib3.exceptions.HTTPError as exc:
            raise errors.HostUnavailable(f"tmux host {self.base_url} unreachable: {type(exc).__name__}") from exc
        try:
            return _obj(resp)
        except ValueError as exc:
            raise errors.HostUnavailable(f"tmux host {self.base_url} health answered {resp.status_code}") from exc

    # --- live viewers (docs/websocket.md): the host sends a viewer's output to its WebSocket connection ----------
    def attach_viewer(self, session_id: UUID, connection_id: str, *, read_only: bool, stream: str | None,
                      last_seq: int | None, share_id: UUID | None, expires_at: float | None) -> dict[str, Any]:
        """Attach connection ``connection_id`` to a session as a viewer (another attach of the same connection
        replaces it). ``stream`` + ``last_seq``: resume where the client was; ``expires_at`` (unix seconds): when
        a share viewer's share expires, and the host detaches it. Returns ``{"stream": str, "seq": int}``."""
        body = {"connection_id": connection_id, "read_only": read_only, "stream": stream, "last_seq": last_seq,
                "share_id": str(share_id) if share_id is not None else None, "expires_at": expires_at}
        out = _obj(self._request("POST", f"/v1/sessions/{session_id}/viewers", json=body))
        stream_id, seq = out.get("stream"), out.get("seq")
        if not isinstance(stream_id, str) or not isinstance(seq, int) or isinstance(seq, bool):
            raise errors.HostUnavailable(f"tmux host {self.base_url} answered an attach without a stream and seq")
        return {"stream": stream_id, "seq": seq}

    def detach_viewer(self, connection_id: str, reason: str, *, notify: bool = True) -> None:
        """Detach a connection's viewer, wherever on this host it is (a host that has none answers 204 too).
        ``notify``: the host tells the client (``detached`` with ``reason``)."""
        self._request("DELETE", f"/v1/viewers/{quote(connection_id, safe='')}",
                      params={"reason": reason, "notify": 1 if notify else 0})

    # --- files in the session's home (tmux_host/files.py): raw bytes both ways, no base64 between API and host ---
    def write_file(self, session_id: UUID, path: str, data: bytes, mode: str | None) -> dict[str, Any]:
        """Write ``data`` to ``path`` (``mode``: "0644"; None keeps an existing file's). ``{"path", "size",
        "mode"}`` with the path relative to the home."""
        params = {"path": path, **({"mode": mode} if mode is not None else {})}
        return _obj(self._request("PUT", f"/v1/sessions/{session_id}/files", params=params, content=data,
                                  timeout_s=self.timeout_s + FILE_TIMEOUT_MARGIN_S))

    def read_file(self, session_id: UUID, path: str) -> tuple[bytes, str, str]:
        """(the file's bytes, its path relative to the home, its mode "0644")."""
        resp = self._request("GET", f"/v1/sessions/{session_id}/files", params={"path": path},
                             timeout_s=self.timeout_s + FILE_TIMEOUT_MARGIN_S)
        return (resp.content, unquote(resp.headers.get(FILE_PATH_HEADER, path)),
                resp.headers.get(FILE_MODE_HEADER, ""))

    def list_files(self, session_id: UUID, path: str) -> dict[str, Any]:
        """``{"path", "entries": [{name, type, size, mode, mtime (unix seconds)}], "truncated"}``."""
        return _obj(self._request("GET", f"/v1/sessions/{session_id}/files/list", params={"path": path},
                                  timeout_s=self.timeout_s + FILE_TIMEOUT_MARGIN_S))
