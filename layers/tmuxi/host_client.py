"""Small synchronous client for the tmux host's internal HTTP API (used by the Lambda functions).

HTTP/1.1 over keep-alive sockets, one small pool per host URL (module-level, reused across warm invocations), the
answers parsed by ``httptools`` (llhttp, the C parser uvicorn serves the hosts with). A host call is on every
session route's path, so its client's cost is the handler's: from the API's process, interleaved
(``bench/profile_api.py --clients``), a trivial exec took 2.66 ms p50 with this client, 3.22 with urllib3 (the
client before) and 2.83 with ``http.client``; CPU per call 0.20, 0.77 and 0.38 ms (a trivial route: 0.55, 0.84,
0.62 ms). What a general client adds -- proxies, TLS, redirects, retries, cookies; ``http.client`` parses headers
with the email package -- is not needed: the hosts are this project's own servers, and no request is retried (an
exec must never run twice) or redirected.

An idle connection the host closed (its keep-alive timeout, a restart) is noticed before reuse and replaced.
No connection: :class:`tmuxi.errors.HostUnavailable`. Sent, no whole answer (timeout, the connection dropped,
garbage): ``HostUnavailable`` for a read, :class:`tmuxi.errors.OutcomeUnknown` for a change (it may have taken
effect). Error bodies ``{"error": {"code", "message"}}`` are mapped back to the matching :mod:`tmuxi.errors` class.
The host's own words (its validation text, tmux's messages, its capacity) are kept as the error's internal detail
for the log; what a client may be told comes from ``_PUBLIC`` (4xx) or the class (5xx).
"""
from __future__ import annotations

import base64
import copy
import json as jsonlib
import re
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlencode, urlsplit
from uuid import UUID

from tmuxi import errors
from tmuxi.models import ExecRequest, ExecResult, InputWaitResult, ScreenResponse, WaitSpec
from tmuxi.observability import request_id
from tmuxi.settings import Settings, get_settings
from tmuxi.snapstart import deferred_import

if TYPE_CHECKING:
    import httptools
else:
    # ~5 ms at import: paid by the first request that calls a host (the api's session routes, the ws function's
    # attach), not by every cold start; before a SnapStart snapshot, ahead (tmuxi/snapstart.py)
    httptools = deferred_import("httptools")

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

KEEPALIVE_CONNECTIONS = 8  # per host, kept between requests; more may open at once, and are closed after use
RECV_BYTES = 256 * 1024
_UNSAFE = re.compile(r"[\x00-\x20\x7f]")  # in a request target or a header value: would split the request


class _Unreachable(Exception):
    """No connection to the host (refused, unreachable, timed out connecting): nothing was sent."""


class _NoAnswer(Exception):
    """The request was sent (or may have been) and no whole answer came: a timeout, the connection dropped, bytes
    that are not HTTP."""


class Headers(dict[str, str]):
    """An answer's headers, by lower-case name; ``get``/``[]`` take any case."""

    def __getitem__(self, name: str) -> str:
        return super().__getitem__(name.lower())

    def get(self, name: str, default: Any = None) -> Any:
        return super().get(name.lower(), default)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and super().__contains__(name.lower())


class _Answer:
    """The parser's callbacks for one answer."""

    __slots__ = ("complete", "headers", "keep_alive", "parser", "parts")

    def __init__(self) -> None:
        self.headers = Headers()
        self.parts: list[bytes] = []
        self.complete = False
        self.keep_alive = False
        self.parser = httptools.HttpResponseParser(self)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.parts.append(body)

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()  # only now: the parser forgets it for the next answer


def _still_open(sock: socket.socket) -> bool:
    """An idle connection has nothing to read: anything readable -- the host's FIN (its keep-alive timeout, a
    restart) or bytes it had no business sending -- means it cannot carry another request."""
    try:
        sock.setblocking(False)  # a socket with a timeout would wait for something to read first
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


class _Pool:
    """Keep-alive connections to one host: a request takes an idle one (or opens one), and gives it back after a
    whole answer the host did not close; at most ``KEEPALIVE_CONNECTIONS`` are kept idle."""

    def __init__(self, base_url: str) -> None:
        url = urlsplit(base_url)
        if url.scheme != "http" or not url.hostname:
            raise ValueError(f"a tmux host's URL is http://host:port, not {base_url!r}")
        self.address = (url.hostname, url.port or 80)
        self.host = url.netloc
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()
        self.closed = False

    def request(self, method: str, target: str, body: bytes | None, headers: dict[str, str], timeout_s: float,
                meanwhile: Callable[[], object] | None = None) -> HostResponse:
        """Send the request and read the answer; ``meanwhile`` runs between the two, while the host works."""
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self.host}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        if _UNSAFE.search(target) or any(_UNSAFE.search(v.replace(" ", "")) for v in headers.values()):
            raise ValueError(f"control characters in a host request ({method} {target[:100]!r})")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        sock = self._take()
        if sock is None:
            sock = self._connect(timeout_s)
        else:
            sock.settimeout(timeout_s)
        try:
            sock.sendall(head + body if body else head)  # one write: one packet for a small request
        except OSError as exc:
            sock.close()
            raise _NoAnswer(type(exc).__name__) from exc
        if meanwhile is not None:
            try:
                meanwhile()
            except BaseException:
                sock.close()  # the answer is not read: the connection cannot carry another request
                raise
        try:
            answer, keep = self._read(sock)
        except BaseException as exc:
            sock.close()
            if isinstance(exc, OSError | httptools.HttpParserError):
                raise _NoAnswer(type(exc).__name__) from exc
            raise
        if keep:
            self._give(sock)
        else:
            sock.close()
        return answer

    @staticmethod
    def _read(sock: socket.socket) -> tuple[HostResponse, bool]:
        answer = _Answer()
        while not answer.complete:
            data = sock.recv(RECV_BYTES)
            if not data:
                raise ConnectionResetError("the host closed the connection before its answer was whole")
            answer.parser.feed_data(data)
        return (HostResponse(answer.parser.get_status_code(), b"".join(answer.parts), answer.headers),
                answer.keep_alive)

    def _connect(self, timeout_s: float) -> socket.socket:
        try:
            sock = socket.create_connection(self.address, timeout=timeout_s)
        except TimeoutError as exc:
            raise _Unreachable("timed out connecting") from exc
        except OSError as exc:
            raise _Unreachable(type(exc).__name__) from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _take(self) -> socket.socket | None:
        while True:
            with self._lock:
                if not self._idle:
                    return None
                sock = self._idle.pop()  # the most recently used: the least likely to have timed out
            if _still_open(sock):
                return sock
            sock.close()

    def _give(self, sock: socket.socket) -> None:
        with self._lock:
            if not self.closed and len(self._idle) < KEEPALIVE_CONNECTIONS:
                self._idle.append(sock)
                return
        sock.close()

    def close(self) -> None:
        with self._lock:
            self.closed = True
            idle, self._idle = self._idle, []
        for sock in idle:
            sock.close()


_pools: dict[str, _Pool] = {}
_pools_lock = threading.Lock()


def _pool(base_url: str) -> _Pool:
    with _pools_lock:
        pool = _pools.get(base_url)
        if pool is None:
            pool = _pools[base_url] = _Pool(base_url)
        return pool


def close_all() -> None:
    """Close every pooled connection (tests, shutdown, a restored SnapStart snapshot)."""
    with _pools_lock:
        pools = list(_pools.values())
        _pools.clear()
    for pool in pools:
        pool.close()


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
        self._meanwhile: Callable[[], object] | None = None

    def meanwhile(self, work: Callable[[], object]) -> HostClient:
        """This client, doing ``work`` once its next request is sent and before reading the answer: the caller's
        own round trip (the audit event's commit) overlaps the host's work, in the same thread. ``work`` does not
        run when the request could not be sent (no connection)."""
        client = copy.copy(self)
        client._meanwhile = work
        return client

    def _send(self, method: str, path: str, body: bytes | None, headers: dict[str, str],
              timeout_s: float) -> HostResponse:
        work, self._meanwhile = self._meanwhile, None
        return _pool(self.base_url).request(method, path, body, headers, timeout_s, work)

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
        except _NoAnswer as exc:
            # sent, no answer (or the connection dropped mid-answer): a request that changes something may have
            # taken effect
            cls = errors.HostUnavailable if method in ("GET", "HEAD") else errors.OutcomeUnknown
            raise cls(f"tmux host {self.base_url}: no answer to {method} {path} ({exc})") from exc
        except _Unreachable as exc:
            raise errors.HostUnavailable(f"tmux host {self.base_url} unreachable ({exc}; {method} {path})") from exc
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
        except (_NoAnswer, _Unreachable) as exc:
            raise errors.HostUnavailable(f"tmux host {self.base_url} did not answer its health check ({exc})") from exc
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
