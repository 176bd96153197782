"""The web terminal and the replay page (local/web/, served by local/web.py) in a real browser: Debian's chromium
driven by Playwright, against the whole local stack (REST gateway, WebSocket gateway, ws function, tmux hosts,
recordings). Everything the test does in the page it does through the page's own controls; it reads the
terminal through xterm's buffer (``window.tmuxi``) and checks the far side through the REST API."""
from __future__ import annotations

import functools
import json
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, Route, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from local import web
from tests.hosting import wait_for

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
WAIT_S = 20.0
WAIT_MS = int(WAIT_S * 1000)


# --- the static pages -------------------------------------------------------------------------------------


def test_pages_and_vendor_files_are_served_with_their_types_and_csp(stack: Any) -> None:
    c: httpx.Client = stack.client
    r = c.get("/web/terminal.html")
    assert r.status_code == 200 and r.headers["content-type"] == "text/html; charset=utf-8"
    csp = r.headers["content-security-policy"]
    assert "script-src 'self';" in csp and "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    host = httpx.URL(stack.gateway_url).host
    ws = c.get("/web/config.json").json()["ws_url"]
    port = stack.stack.gateway_ws_port  # the stack's (a free port in the tests), given to the gateway's settings
    assert ws == f"ws://{host}:{port}/"
    assert f"connect-src 'self' ws://{host}:{port};" in csp
    # the host the browser used, not the gateway's own address; a malformed Host is refused
    assert c.get("/web/config.json", headers={"host": "term.example:1234"}).json() == {
        "ws_url": f"ws://term.example:{port}/"}
    assert c.get("/web/config.json", headers={"host": "a b;c"}).status_code == 400
    # the player's WebAssembly terminal needs 'wasm-unsafe-eval' on the replay page, nowhere else
    assert "script-src 'self' 'wasm-unsafe-eval';" in c.get("/web/replay.html").headers["content-security-policy"]
    for path, kind in [("/web/terminal.js", "text/javascript"), ("/web/web.css", "text/css"),
                       ("/web/vendor/xterm.js", "text/javascript"), ("/web/vendor/addon-fit.js", "text/javascript"),
                       ("/web/vendor/asciinema-player.min.js", "text/javascript"),
                       ("/web/vendor/asciinema-player.css", "text/css"), ("/web/vendor/xterm.css", "text/css")]:
        r = c.get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind), (path, r.status_code)
        assert r.headers["x-content-type-options"] == "nosniff" and len(r.content) > 100
        assert c.get(path, headers={"if-none-match": r.headers["etag"]}).status_code == 304
    assert c.head("/web/replay.html").headers["content-length"] == str(len(c.get("/web/replay.html").content))
    r = c.get("/web/", follow_redirects=False)
    assert r.status_code == 302 and r.headers["location"] == "/web/terminal.html"


@pytest.mark.parametrize("path", [
    "/web/package.json", "/web/package-lock.json", "/web/%2e%2e/gateway.py", "/web/..%2fgateway.py",
    "/web/%2E%2E%2Fweb.py", "/web/vendor/..%2f..%2fweb.py", "/web/vendor/%2e%2e", "/web/vendor/package.json",
    "/web/node_modules/@xterm/xterm/lib/xterm.js", "/web/node_modules%2f@xterm%2fxterm%2flib%2fxterm.js",
    "/web/%ff.js", "/web/.installed.js", "/web/nothing.html", "/web/vendor/xterm.js.map",
])
def test_nothing_else_is_served(stack: Any, path: str) -> None:
    r = stack.client.get(path)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (path, r.text)
    assert b"import" not in r.content and b"{" in r.content


def test_only_regular_files_inside_the_web_directory(tmp_path: Path) -> None:
    root = tmp_path / "web"
    root.mkdir()
    (root / "page.js").write_text("ok")
    (tmp_path / "secret.js").write_text("secret")
    (root / "link.js").symlink_to(tmp_path / "secret.js")
    (root / "inner").symlink_to(tmp_path)
    (root / "dir.js").mkdir()
    found = web._read(root / "page.js", root)
    assert found is not None and found.body == b"ok"
    assert web._read(root / "link.js", root) is None  # a symlink, even to a file
    assert web._read(root / "inner" / "secret.js", root) is None  # through a symlinked directory: outside root
    assert web._read(root / "dir.js", root) is None
    assert web._read(root / "missing.js", root) is None


# --- the browser ------------------------------------------------------------------------------------------


@dataclass
class Watched:
    """What a page did that it must not: console errors (a CSP refusal is one), failed requests, and every
    URL it asked for (to look for the token in)."""

    errors: list[str] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: scripts/setup.sh installs Debian's chromium")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield b
        finally:
            b.close()


def _open(browser: Browser, stack: Any) -> tuple[BrowserContext, Page, Watched]:
    context = browser.new_context(base_url=stack.gateway_url, viewport={"width": 1200, "height": 800})
    page = context.new_page()
    watched = Watched()
    page.on("console", lambda m: watched.errors.append(f"{m.text} ({m.location.get('url')})")
            if m.type == "error" else None)
    page.on("pageerror", lambda e: watched.errors.append(str(e)))
    page.on("request", lambda r: watched.urls.append(r.url))
    page.on("websocket", lambda ws: watched.urls.append(ws.url))
    page.set_default_timeout(WAIT_MS)
    return context, page, watched


@dataclass
class User:
    name: str
    password: str
    headers: dict[str, str]


def _user(stack: Any) -> User:
    name = f"w{uuid.uuid4().hex[:10]}"
    password = "pw-" + uuid.uuid4().hex
    stack.create_user(name, password)
    return User(name, password, {"authorization": f"Bearer {stack.login(name, password)}"})


def _log_in(page: Page, user: User) -> None:
    page.fill("#login input[name=username]", user.name)
    page.fill("#login input[name=password]", user.password)
    page.click("#login button[type=submit]")
    page.wait_for_selector("#app", state="visible")


def _token_kept_out_of_urls(page: Page, watched: Watched) -> None:
    token = page.evaluate("sessionStorage.getItem('tmuxi.token')")
    assert token and len(token) > 20
    assert watched.urls and not [u for u in watched.urls if token in u]


def test_login_lists_and_creates_sessions(browser: Browser, stack: Any) -> None:
    user = _user(stack)
    listed = f"listed-{uuid.uuid4().hex[:6]}"
    r = stack.client.post("/sessions", json={"name": listed}, headers=user.headers)
    assert r.status_code == 201, r.text
    context, page, watched = _open(browser, stack)
    try:
        page.goto("/web/terminal.html")
        page.fill("#login input[name=username]", user.name)
        page.fill("#login input[name=password]", "not-the-password")
        page.click("#login button[type=submit]")
        page.wait_for_selector("#error:has-text('Wrong username or password')")
        assert page.is_hidden("#app") and page.input_value("#login input[name=password]") == "not-the-password"
        watched.errors.clear()  # the browser reports the 401 as a failed resource
        _log_in(page, user)
        assert page.input_value("#login input[name=password]") == ""  # not kept in the form
        page.wait_for_selector(f"#sessions button:has-text('{listed}')")
        made = f"made-{uuid.uuid4().hex[:6]}"
        page.fill("#create input[name=name]", made)
        page.click("#create button[type=submit]")
        page.wait_for_selector(f"#sessions button[aria-current=true]:has-text('{made}')")
        sessions = stack.client.get("/sessions", headers=user.headers).json()["sessions"]
        assert sorted(s["name"] for s in sessions) == sorted([listed, made])
        # a reload in the same tab stays logged in (sessionStorage) and goes back to the session it showed
        page.reload()
        page.wait_for_selector(f"#sessions button[aria-current=true]:has-text('{made}')")
        _token_kept_out_of_urls(page, watched)
        assert page.url.endswith("#" + next(s["id"] for s in sessions if s["name"] == made))
        page.click("#logout")
        page.wait_for_selector("#login", state="visible")
        assert page.evaluate("sessionStorage.getItem('tmuxi.token')") is None
        # (the live terminal is the tests' below: here its connection may come and go)
        assert not [e for e in watched.errors if "WebSocket" not in e], watched.errors
    finally:
        context.close()


# --- the live terminal ------------------------------------------------------------------------------------


@dataclass
class Attached:
    page: Page
    watched: Watched
    user: User
    session_id: str


@pytest.fixture(scope="module")
def attached(browser: Browser, stack: Any) -> Iterator[Attached]:
    """A page logged in through its form, attached to a session it created with its button."""
    user = _user(stack)
    context, page, watched = _open(browser, stack)
    try:
        page.goto("/web/terminal.html")
        _log_in(page, user)
        page.click("#create button[type=submit]")
        page.wait_for_function("() => window.tmuxi.state.attached")
        sid = page.evaluate("tmuxi.state.session.id")
        yield Attached(page, watched, user, sid)
    finally:
        context.close()


def _lines(page: Page) -> list[str]:
    return [line.rstrip() for line in page.evaluate("tmuxi.bufferText()").split("\n")]


def _wait_line(page: Page, line: str) -> None:
    page.wait_for_function("line => tmuxi.bufferText().split('\\n').some(l => l.trimEnd() === line)", arg=line)


def test_typing_runs_in_the_pane_and_its_output_shows(attached: Attached, stack: Any) -> None:
    page = attached.page
    tag = uuid.uuid4().hex[:8]
    page.click("#terminal")
    page.keyboard.type(f"echo hello-$((6*7))-{tag}")
    page.keyboard.press("Enter")
    # the shell expanded it: only the pane, never a local echo, can have written this line
    _wait_line(page, f"hello-42-{tag}")
    screen = stack.client.get(f"/sessions/{attached.session_id}/screen", headers=attached.user.headers).json()
    assert f"hello-42-{tag}" in screen["text"].splitlines()


def _size(page: Page) -> tuple[int, int]:
    cols, rows = page.evaluate("[tmuxi.term.cols, tmuxi.term.rows]")
    return int(cols), int(rows)


def _pane_size(stack: Any, a: Attached) -> tuple[int, int]:
    s = stack.client.get(f"/sessions/{a.session_id}/screen", headers=a.user.headers).json()
    return int(s["cols"]), int(s["rows"])


def _pane_is(stack: Any, a: Attached, size: tuple[int, int]) -> bool:
    return _pane_size(stack, a) == size


def test_the_pane_follows_the_window_size(attached: Attached, stack: Any) -> None:
    page = attached.page
    before = _size(page)
    # attach sent the page's size: the pane has it
    wait_for(functools.partial(_pane_is, stack, attached, before), WAIT_S, 0.1, f"the pane at {before}")
    for width, height in [(760, 420), (1100, 700)]:
        was = _size(page)
        page.set_viewport_size({"width": width, "height": height})
        page.wait_for_function("was => tmuxi.term.cols !== was[0] && tmuxi.term.rows !== was[1]", arg=list(was))
        # the size shown follows the terminal's (a resize can land in two steps: wait for the last, do not race it)
        page.wait_for_function("() => document.getElementById('size').textContent === "
                               "`${tmuxi.term.cols}x${tmuxi.term.rows}`", timeout=WAIT_S * 1000)
        now = _size(page)
        wait_for(functools.partial(_pane_is, stack, attached, now), WAIT_S, 0.1, f"the pane resized to {now}")


def test_a_dropped_connection_resumes_without_losing_output(attached: Attached, stack: Any) -> None:
    page = attached.page
    tag = uuid.uuid4().hex[:8]
    count = 2500  # ~25 KB: more than a screen and more than one frame; all of it missed while disconnected
    connects = page.evaluate("tmuxi.state.connects")
    pos = page.evaluate("tmuxi.state.pos")

    failed: list[BaseException] = []

    def output_meanwhile(route: Route) -> None:
        # the page lost its connection and asks for a new ticket: before it gets one, the session writes
        try:
            r = stack.client.post(f"/sessions/{attached.session_id}/input", headers=attached.user.headers,
                                  json={"text": f"for i in $(seq 1 {count}); do echo {tag}-$i; done; "
                                                f"echo done-$((1+1))-{tag}", "enter": True})
            assert r.status_code == 204, r.text
            wait_for(lambda: f"done-2-{tag}" in _screen_lines(stack, attached), WAIT_S, 0.1, "the output in the pane")
        except BaseException as exc:  # raised here it would be lost in Playwright's dispatcher
            failed.append(exc)
        route.continue_()

    page.route("**/ws/tickets", output_meanwhile, times=1)
    page.evaluate("tmuxi.ws.close()")  # the connection drops (the page did not ask for it)
    try:
        _wait_line(page, f"done-2-{tag}")
    finally:
        if failed:
            raise failed[0]
    marks = [line for line in _lines(page) if re.fullmatch(f"{tag}-[0-9]+", line)]
    assert marks == [f"{tag}-{i}" for i in range(1, count + 1)]  # every line, once, in order
    state = page.evaluate("({connects: tmuxi.state.connects, gaps: tmuxi.state.gaps, pos: tmuxi.state.pos,"
                          " attached: tmuxi.state.attached})")
    assert state["connects"] == connects + 1 and state["attached"]
    assert state["gaps"] == 0 and page.is_hidden("#error")  # resumed from last_seq, not redrawn from a snapshot
    assert state["pos"] > pos + count * len(f"{tag}-1\r\n")
    # and it is live again
    page.keyboard.type(f"echo again-$((2+3))-{tag}")
    page.keyboard.press("Enter")
    _wait_line(page, f"again-5-{tag}")
    assert not attached.watched.errors
    _token_kept_out_of_urls(page, attached.watched)
    tickets = [u for u in attached.watched.urls if u.startswith("ws")]
    assert len(tickets) == 2 and all(re.search(r"\?ticket=[A-Za-z0-9_-]{20,}$", u) for u in tickets), tickets


def _screen_lines(stack: Any, a: Attached) -> list[str]:
    s = stack.client.get(f"/sessions/{a.session_id}/screen", headers=a.user.headers).json()
    return [line.rstrip() for line in s["text"].splitlines()]


# --- the replay page --------------------------------------------------------------------------------------


def test_the_replay_page_plays_a_finished_sessions_recording(browser: Browser, stack: Any) -> None:
    user = _user(stack)
    tag = uuid.uuid4().hex[:8]
    r = stack.client.post("/sessions", json={"name": f"rec-{tag}"}, headers=user.headers)
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    r = stack.client.post(f"/sessions/{sid}/input", json={"text": f"echo replay-$((6*7))-{tag}", "enter": True},
                          headers=user.headers)
    assert r.status_code == 204, r.text
    wait_for(lambda: f"replay-42-{tag}" in stack.client.get(f"/sessions/{sid}/screen", headers=user.headers).json()[
        "text"].splitlines(), WAIT_S, 0.1, "the output in the pane")
    assert stack.client.delete(f"/sessions/{sid}", headers=user.headers).status_code == 204
    context, page, watched = _open(browser, stack)
    try:
        page.goto(f"/web/replay.html#{sid}")
        _log_in(page, user)
        page.wait_for_function("sid => document.getElementById('session').value === sid", arg=sid)
        recording = page.locator("#recordings button.recording").first

        def listed() -> bool:  # the recording is finished (stored) shortly after the session ends
            try:
                recording.wait_for(timeout=1000)
            except PlaywrightTimeout:
                page.click("#refresh")
                return False
            return True

        wait_for(listed, 30, 0, "the recording in the list")
        names = json.loads(page.evaluate("JSON.stringify([...document.querySelectorAll('#recordings button')]"
                                         ".map(b => b.dataset.name))"))
        api = stack.client.get(f"/sessions/{sid}/recordings", headers=user.headers).json()
        assert names == [rec["name"] for rec in api["recordings"]]
        recording.click()
        page.wait_for_selector(".ap-player")
        page.wait_for_function("tag => document.getElementById('player').innerText.split('\\n')"
                               ".some(l => l.trim() === 'replay-42-' + tag)", arg=tag, timeout=60_000)
        assert page.is_hidden("#error") and not watched.errors, watched.errors
        _token_kept_out_of_urls(page, watched)
    finally:
        context.close()
