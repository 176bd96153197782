"""The web terminal and the replay page (``local/web/``), served by the local REST gateway under ``/web/``.

``LocalGateway`` hands every ``GET``/``HEAD`` of ``/web`` or ``/web/...`` here before its route matching (no
authorizer: the pages are public; what they show comes from the API with the user's token, sent in the
Authorization header and never in a URL). What can be served:

- the pages' own files, directly in ``local/web/`` (``terminal.html``, ``terminal.js``, ``replay.html``...), by
  suffix (.html, .js, .css): ``package.json`` and anything in a sub-directory never;
- ``/web/vendor/<name>``: the few files the pages use from the npm packages in ``local/web/node_modules``
  (installed by ``scripts/setup.sh`` from ``package-lock.json``), named one by one in ``VENDOR``;
- ``/web/config.json``: where the pages open the WebSocket API (``settings.gateway_ws_port``, on the host the
  browser used).

A name is matched against a strict pattern after percent-decoding, so ``..``, ``%2e%2e``, ``%2f``, dot-files and
sub-directories are refused (404) before any file is looked at; a file that is a symlink, or that resolves
outside ``local/web``, is refused too. Every answer carries a Content-Security-Policy: scripts, styles and
connections from this origin only, plus the WebSocket API's port on the same host.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

WEB_DIR = Path(__file__).resolve().parent / "web"
NODE_MODULES = WEB_DIR / "node_modules"
PREFIX = "/web"
INDEX = "terminal.html"

# what the pages load from the npm packages (exact versions in local/web/package-lock.json)
VENDOR: dict[str, str] = {
    "xterm.js": "@xterm/xterm/lib/xterm.js",
    "xterm.css": "@xterm/xterm/css/xterm.css",
    "addon-fit.js": "@xterm/addon-fit/lib/addon-fit.js",
    "asciinema-player.min.js": "asciinema-player/dist/bundle/asciinema-player.min.js",
    "asciinema-player.css": "asciinema-player/dist/bundle/asciinema-player.css",
}
CONTENT_TYPES: dict[str, str] = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
# asciinema-player runs its terminal emulator as WebAssembly: compiling it needs 'wasm-unsafe-eval' (which
# allows WebAssembly only, never JavaScript's eval); the other pages do without
_WASM_PAGES = frozenset({"replay.html"})
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")
# a Host header: a DNS name, IPv4 address or [IPv6] address, optional port
_HOST = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?)(?::\d{1,5})?")

Headers = list[tuple[bytes, bytes]]


def wants(method: str, path: str) -> bool:
    """Whether the gateway should hand this request here (before its route matching)."""
    return method in ("GET", "HEAD") and (path == PREFIX or path.startswith(PREFIX + "/"))


@dataclass(frozen=True, slots=True)
class _File:
    etag: str
    body: bytes


_CACHE: dict[Path, _File] = {}


def _read(path: Path, root: Path) -> _File | None:
    """The file at ``path`` -- a regular file, no symlink, inside ``root`` -- or None. Kept in memory until it
    changes (its size or modification time)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None  # missing, or a symlink (ELOOP)
    try:
        st = os.fstat(fd)
        # a symlinked directory on the way (node_modules may be one) must not lead outside root either
        if not os.path.isfile(path) or not Path(os.path.realpath(path)).is_relative_to(root.resolve()):
            return None
        etag = f'"{st.st_size:x}-{st.st_mtime_ns:x}"'
        cached = _CACHE.get(path)
        if cached is not None and cached.etag == etag:
            return cached
        with os.fdopen(os.dup(fd), "rb") as f:
            found = _File(etag, f.read())
        _CACHE[path] = found
        return found
    finally:
        os.close(fd)


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for k, v in scope["headers"]:
        if k == name:
            return str(v.decode("latin-1"))
    return None


def ws_url(scope: dict[str, Any], ws_port: int) -> str | None:
    """The WebSocket API's URL on the host the browser used (its Host header, without its port), or None when
    that header is missing or malformed."""
    m = _HOST.fullmatch(_header(scope, b"host") or "")
    if m is None:
        return None
    scheme = "wss" if scope.get("scheme") == "https" else "ws"
    return f"{scheme}://{m['host']}:{ws_port}/"


def csp(ws: str | None, *, wasm: bool = False) -> str:
    script = "script-src 'self'" + (" 'wasm-unsafe-eval'" if wasm else "")
    connect = "connect-src 'self'" + (f" {ws.rstrip('/')}" if ws else "")
    # styles: xterm.js and asciinema-player style their elements from script (style elements and attributes)
    return "; ".join([
        "default-src 'none'", script, "style-src 'self' 'unsafe-inline'", connect, "img-src 'self' data:",
        "font-src 'self'", "base-uri 'none'", "form-action 'none'", "frame-ancestors 'none'",
    ])


def _common(ws: str | None, *, wasm: bool = False) -> Headers:
    return [(b"content-security-policy", csp(ws, wasm=wasm).encode()), (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer"), (b"cache-control", b"no-cache")]


def _error(status: int, code: str, message: str, ws: str | None) -> tuple[int, Headers, bytes]:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    return status, [(b"content-type", b"application/json"), *_common(ws)], body


def respond(scope: dict[str, Any], path: str, ws_port: int) -> tuple[int, Headers, bytes]:
    """The answer to ``GET``/``HEAD`` ``path`` (the raw path, under ``/web``): status, headers, body."""
    ws = ws_url(scope, ws_port)
    if path == PREFIX:
        return 302, [(b"location", f"{PREFIX}/{INDEX}".encode()), *_common(ws)], b""
    name = unquote(path[len(PREFIX) + 1:], errors="strict") if "%" in path else path[len(PREFIX) + 1:]
    if name == "config.json":
        if ws is None:
            return _error(400, "bad_request", "missing or malformed Host header", None)
        return 200, [(b"content-type", b"application/json"), *_common(ws)], json.dumps({"ws_url": ws}).encode()
    vendor = name.startswith("vendor/")
    leaf = name[len("vendor/"):] if vendor else name
    suffix = os.path.splitext(leaf)[1]
    found: _File | None = None
    if _NAME.fullmatch(leaf) and ".." not in leaf and suffix in CONTENT_TYPES:
        if vendor:
            rel = VENDOR.get(leaf)
            found = _read(NODE_MODULES / rel, NODE_MODULES) if rel else None
        else:
            found = _read(WEB_DIR / leaf, WEB_DIR)
    if found is None:
        return _error(404, "not_found", "no such file", ws)
    headers = [(b"content-type", CONTENT_TYPES[suffix].encode()), (b"etag", found.etag.encode()),
               *_common(ws, wasm=not vendor and leaf in _WASM_PAGES)]
    if _header(scope, b"if-none-match") == found.etag:
        return 304, headers, b""
    return 200, headers, found.body


async def serve(scope: dict[str, Any], path: str, send: Any) -> None:
    """Answer one request that ``wants`` (ASGI); the WebSocket API's port is ``settings.gateway_ws_port``."""
    from tmuxi.settings import get_settings

    try:
        status, headers, body = respond(scope, path, get_settings().gateway_ws_port)
    except UnicodeDecodeError:  # a percent-escape that is not UTF-8
        status, headers, body = _error(404, "not_found", "no such file", None)
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})
