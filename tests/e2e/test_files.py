"""Files in a session's home through the real stack (gateway, authorizer, API Lambda, tmux host, the user's OS
account): written and read back byte-exact, owner and mode the user's, a directory listed; the refusals (404, 400,
403, 413) and that they change nothing; another user's session; paths and links that lead out of the home."""
from __future__ import annotations

import base64
import hashlib
import os
import threading
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tmuxi.db import repo
from tmuxi.settings import get_settings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def user(stack: Any) -> dict[str, str]:
    headers: dict[str, str] = stack.new_user()[1]
    return headers


@pytest.fixture(scope="module")
def session(stack: Any, user: dict[str, str]) -> str:
    sid: str = stack.create_session(user, name="files")["id"]
    return sid


def _err(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"]["code"] == code, body
    message: str = body["error"]["message"]
    return message


def _put(stack: Any, h: dict[str, str], sid: str, **body: Any) -> httpx.Response:
    r: httpx.Response = stack.client.put(f"/sessions/{sid}/files", json=body, headers=h)
    return r


def _write(stack: Any, h: dict[str, str], sid: str, **body: Any) -> dict[str, Any]:
    r = _put(stack, h, sid, **body)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def _get(stack: Any, h: dict[str, str], sid: str, path: str, **params: str) -> httpx.Response:
    r: httpx.Response = stack.client.get(f"/sessions/{sid}/files", params={"path": path, **params}, headers=h)
    return r


def _read(stack: Any, h: dict[str, str], sid: str, path: str, **params: str) -> tuple[bytes, dict[str, Any]]:
    r = _get(stack, h, sid, path, **params)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    data = out["content"].encode() if out["encoding"] == "utf-8" else base64.b64decode(out["content"])
    return data, out


def _list(stack: Any, h: dict[str, str], sid: str, path: str | None = None) -> httpx.Response:
    r: httpx.Response = stack.client.get(f"/sessions/{sid}/files/list",
                                         params={"path": path} if path is not None else {}, headers=h)
    return r


def _sh(stack: Any, h: dict[str, str], sid: str, command: str) -> str:
    """A command run in the session's shell (exec); its output."""
    r = stack.client.post(f"/sessions/{sid}/exec", json={"command": command, "timeout_s": 15}, headers=h)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["exit_code"] == 0, out
    return str(out.get("stdout") or "") + str(out.get("output") or "")


# --- written, read back, listed ------------------------------------------------------------------------------


def test_write_then_read_back_byte_exact(stack: Any, user: dict[str, str], session: str) -> None:
    text = "héllo, wörld ✓\n\ttabs, \"quotes\", \\backslashes\\ and a NUL \x00 byte\n" * 3
    binary = bytes(range(256)) * 4 + os.urandom(1000)
    big = os.urandom(3 << 20)
    cases = [("notes/text.txt", text.encode(), {"content": text}, "utf-8"),
             ("bin.dat", binary, {"content_b64": base64.b64encode(binary).decode()}, "base64"),
             ("big.bin", big, {"content_b64": base64.b64encode(big).decode()}, "base64"),
             ("empty", b"", {"content": ""}, "utf-8")]
    for path, data, body, encoding in cases:
        written = _write(stack, user, session, path=path, **body)
        assert written == {"path": path, "size": len(data), "mode": "0644",
                           "sha256": hashlib.sha256(data).hexdigest()}, written
        back, out = _read(stack, user, session, path)
        assert back == data and out["encoding"] == encoding, path
        assert (out["path"], out["size"], out["mode"], out["sha256"]) == (path, len(data), "0644", written["sha256"])
        # what the shell sees on disk is the same file
        assert _sh(stack, user, session, f"sha256sum {path}").split()[0] == written["sha256"]
    # text asked for as base64 comes as base64; a 3 MiB text file round-trips as text
    back, out = _read(stack, user, session, "notes/text.txt", encoding="base64")
    assert out["encoding"] == "base64" and back == text.encode()
    long_text = ("line of text " * 8 + "\n") * ((3 << 20) // 105)
    _write(stack, user, session, path="long.txt", content=long_text)
    back, out = _read(stack, user, session, "long.txt")
    assert out["encoding"] == "utf-8" and back == long_text.encode()
    # an absolute path inside the home, and one through "..", are the same file
    home = _sh(stack, user, session, "printf %s \"$HOME\"")
    back, out = _read(stack, user, session, f"{home}/notes/../notes/text.txt")
    assert back == text.encode() and out["path"] == "notes/text.txt"


def test_owner_and_mode_are_the_users(stack: Any, user: dict[str, str], session: str) -> None:
    uid = _sh(stack, user, session, "id -u").strip()
    assert uid != "0"
    _write(stack, user, session, path="owned.txt", content="mine")
    assert _sh(stack, user, session, "stat -c '%u %g %a' owned.txt").split() == [uid, uid, "644"]
    # a mode given is set; an overwrite without one keeps the file's
    assert _write(stack, user, session, path="owned.txt", content="secret", mode="0600")["mode"] == "0600"
    assert _sh(stack, user, session, "stat -c '%u %a' owned.txt").split() == [uid, "600"]
    assert _write(stack, user, session, path="owned.txt", content="secret 2")["mode"] == "0600"
    assert _sh(stack, user, session, "stat -c '%a' owned.txt; cat owned.txt").split() == ["600", "secret", "2"]
    _write(stack, user, session, path="run.sh", content="#!/bin/sh\necho ran\n", mode="755")
    assert _sh(stack, user, session, "stat -c '%a' run.sh; ./run.sh").split() == ["755", "ran"]
    # directories the write made on the way are the user's too
    _write(stack, user, session, path="made/on/the/way.txt", content="x")
    assert _sh(stack, user, session, "stat -c '%u %a' made/on").split() == [uid, "755"]
    # a mode with setuid or other than octal permission bits is refused
    for mode in ("4755", "0x1ff", "rw-r--r--", "999"):
        r = _put(stack, user, session, path="owned.txt", content="no", mode=mode)
        assert r.status_code == 422 and "body.mode" in r.text, r.text
    assert _sh(stack, user, session, "cat owned.txt") == "secret 2"


def test_a_reader_never_sees_half_a_file(stack: Any, user: dict[str, str], session: str) -> None:
    """Writes of two different 2 MiB files over one another, read meanwhile: every read is one of them whole."""
    versions = [os.urandom(2 << 20), os.urandom(2 << 20)]
    bodies = [base64.b64encode(v).decode() for v in versions]
    digests = {hashlib.sha256(v).hexdigest() for v in versions}
    _write(stack, user, session, path="swap.bin", content_b64=bodies[0])
    stop = threading.Event()
    seen: list[str] = []

    def reader() -> None:
        with httpx.Client(base_url=stack.gateway_url, timeout=30) as c:
            while not stop.is_set():
                r = c.get(f"/sessions/{session}/files", params={"path": "swap.bin"}, headers=user)
                assert r.status_code == 200, r.text
                seen.append(hashlib.sha256(base64.b64decode(r.json()["content"])).hexdigest())

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for i in range(12):
            _write(stack, user, session, path="swap.bin", content_b64=bodies[i % 2])
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert len(seen) >= 4 and set(seen) <= digests, (len(seen), set(seen) - digests)
    # and no temporary file is left behind
    names = [e["name"] for e in _list(stack, user, session).json()["entries"]]
    assert not [n for n in names if n.startswith(".tmuxi-")], names


def test_list_a_directory(stack: Any, user: dict[str, str], session: str) -> None:
    _sh(stack, user, session, "mkdir -p tree/sub && printf 12345 > tree/five && chmod 640 tree/five && "
                              "ln -s five tree/link && mkfifo tree/pipe && touch -d @1700000000 tree/five && "
                              "touch -d @1099511627776 tree/far")
    r = _list(stack, user, session, "tree")
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["path"] == "tree" and out["truncated"] is False
    by_name = {e["name"]: e for e in out["entries"]}
    assert [e["name"] for e in out["entries"]] == ["far", "five", "link", "pipe", "sub"]
    assert (by_name["five"]["type"], by_name["five"]["size"], by_name["five"]["mode"]) == ("file", 5, "0640")
    assert by_name["five"]["mtime"].startswith("2023-11-14T22:13:20")
    # 2**40 s: year 36812, past what a date holds (the last one is answered), unless the file system clamps it
    assert by_name["far"]["mtime"][:4] >= "2400"
    assert (by_name["link"]["type"], by_name["sub"]["type"], by_name["pipe"]["type"]) == ("link", "dir", "other")
    # the home by default, absolute or relative
    names = {e["name"] for e in _list(stack, user, session).json()["entries"]}
    assert {"tree", "notes", "bin.dat"} <= names
    home = _sh(stack, user, session, "printf %s \"$HOME\"")
    assert _list(stack, user, session, home).json()["path"] == "."
    # a file or something missing is not a directory
    assert "not a directory" in _err(_list(stack, user, session, "tree/five"), 400, "bad_path")
    _err(_list(stack, user, session, "tree/nothing"), 404, "file_not_found")
    # a FIFO is not read (nothing blocks on it): refused at once
    assert "not a regular file" in _err(_get(stack, user, session, "tree/pipe"), 400, "bad_path")


# --- refusals ---------------------------------------------------------------------------------------------------


def test_missing_directory_and_oversize_files(stack: Any, user: dict[str, str], session: str) -> None:
    cap = get_settings().max_file_bytes
    assert "no such file" in _err(_get(stack, user, session, "does/not/exist"), 404, "file_not_found")
    _sh(stack, user, session, "mkdir -p adir")
    assert "is a directory" in _err(_get(stack, user, session, "adir"), 400, "bad_path")
    assert "is a directory" in _err(_put(stack, user, session, path="adir", content="x"), 400, "bad_path")
    assert "home directory" in _err(_put(stack, user, session, path=".", content="x"), 400, "bad_path")
    # a file over the cap is refused before anything is written ...
    over = base64.b64encode(b"\x01" * (cap + 1)).decode()
    message = _err(_put(stack, user, session, path="over.bin", content_b64=over), 413, "payload_too_large")
    assert str(cap + 1) in message and str(cap) in message
    # ... and one that grew past it in the shell is not read, the answer naming both sizes
    _sh(stack, user, session, f"head -c {cap + 10} /dev/zero > big.zero")
    message = _err(_get(stack, user, session, "big.zero"), 413, "file_too_large")
    assert f"is {cap + 10} bytes" in message and f"limit is {cap}" in message
    # nothing was written by any of these
    assert _sh(stack, user, session, "ls -A adir; ls over.bin 2>/dev/null; echo end").split() == ["end"]
    # bad bodies
    for body in ({"path": "x"}, {"path": "x", "content": "a", "content_b64": "YQ=="}):
        assert _put(stack, user, session, **body).status_code == 422
    _err(_put(stack, user, session, path="x", content_b64="not base64!"), 400, "bad_request")


def test_paths_that_leave_the_home_are_400(stack: Any, user: dict[str, str], session: str) -> None:
    home = _sh(stack, user, session, "printf %s \"$HOME\"")
    escapes = ["../x", "a/../../x", "/etc/passwd", f"{home}/../x", f"{home}x/y", "//etc/passwd"]
    for path in escapes:
        assert "outside the home" in _err(_put(stack, user, session, path=path, content="x"), 400, "bad_path"), path
        assert "outside the home" in _err(_get(stack, user, session, path), 400, "bad_path"), path
        assert "outside the home" in _err(_list(stack, user, session, path), 400, "bad_path"), path
    assert "NUL" in _err(_put(stack, user, session, path="a\x00b", content="x"), 400, "bad_path")
    assert "NUL" in _err(_get(stack, user, session, "a\x00b"), 400, "bad_path")
    assert "longest is 4096" in _err(_get(stack, user, session, "a/" * 2100), 400, "bad_path")
    assert "longest is 255" in _err(_put(stack, user, session, path="n" * 256, content="x"), 400, "bad_path")
    assert "empty" in _err(_get(stack, user, session, ""), 400, "bad_path")
    # nothing was created anywhere on the way
    assert _sh(stack, user, session, "ls -d ../x x 2>/dev/null; echo end").split() == ["end"]


def test_links_out_of_the_home_fail_as_the_user(stack: Any, user: dict[str, str], session: str) -> None:
    """Links planted in the home, as an attacker in the shell would: followed with the account's rights only (the
    host itself could read /etc/shadow), so reading or writing through them fails and changes nothing."""
    _, victim = stack.new_user()
    vsid = stack.create_session(victim)["id"]
    _write(stack, victim, vsid, path="secret.txt", content="the victim's secret")
    vhome = _sh(stack, victim, vsid, "printf %s \"$HOME\"")
    _sh(stack, user, session, f"ln -sfn /etc/shadow shadow && ln -sfn /etc/passwd passwd && ln -sfn {vhome} victim"
                              f" && ln -sfn {vhome}/secret.txt vsecret")
    assert "permission denied" in _err(_get(stack, user, session, "shadow"), 403, "permission_denied")
    for path in ("vsecret", "victim/secret.txt"):
        r = _get(stack, user, session, path)
        _err(r, 403, "permission_denied")
        assert "the victim's secret" not in r.text
    _err(_list(stack, user, session, "victim"), 403, "permission_denied")
    for path in ("victim/planted.txt", "vsecret", "passwd", "shadow"):
        _err(_put(stack, user, session, path=path, content="pwned"), 403, "permission_denied")
    # the victim's files and /etc are as they were
    assert "planted.txt" not in _sh(stack, victim, vsid, "ls -A")
    assert _sh(stack, victim, vsid, "cat secret.txt") == "the victim's secret"
    assert "pwned" not in Path("/etc/passwd").read_text()
    # a link inside the home is followed (as `cat` would): a write goes to its target, the link stays
    _sh(stack, user, session, "printf old > target.txt && ln -sfn target.txt alias")
    _write(stack, user, session, path="alias", content="new")
    assert _sh(stack, user, session, "cat target.txt; echo; test -L alias && echo link").split() == ["new", "link"]


def test_another_users_session_is_404(stack: Any, user: dict[str, str], session: str) -> None:
    _, other = stack.new_user()
    _write(stack, user, session, path="private.txt", content="only mine")
    for r in (_put(stack, other, session, path="private.txt", content="overwritten"),
              _get(stack, other, session, "private.txt"), _list(stack, other, session)):
        _err(r, 404, "not_found")
        assert "private" not in r.text and "files" not in r.text
    assert _read(stack, user, session, "private.txt")[0] == b"only mine"


def test_writes_and_reads_are_audited_with_path_and_size_never_content(stack: Any) -> None:
    _, h = stack.new_user()
    sid = stack.create_session(h)["id"]
    _write(stack, h, sid, path="./audited.txt", content="audited content")
    _read(stack, h, sid, "audited.txt")
    rows = repo.audit_events(uuid.UUID(sid), None, 100)
    found = [(r["action"], r["detail"]) for r in rows if r["action"].startswith("session.file_")]
    assert sorted(found) == [("session.file_read", {"path": "audited.txt", "bytes": 15}),
                             ("session.file_write", {"path": "audited.txt", "bytes": 15})], found
    assert "audited content" not in str(rows)


# --- the host's side: every wait bounded ---------------------------------------------------------------------


def test_the_accounts_process_is_ended_at_its_deadline_or_cap_and_the_host_runs_on() -> None:
    """A file operation's process that hangs (a FIFO swapped in after the look, a hung disk) is ended, its whole
    group, at the deadline (503); one that writes more than is kept is ended at the cap; the host's event loop
    runs on meanwhile."""
    import asyncio
    import shutil
    import tempfile
    import time

    from tmux_host.accounts import Isolation
    from tmux_host.files import run
    from tmuxi import errors
    from tmuxi.settings import Settings

    base = Path(tempfile.mkdtemp(dir="/tmp", prefix="tf"))
    base.chmod(0o711)
    s = Settings(socket_dir=base / "s", data_dir=base / "data", host_secret="x" * 40, environment="test")
    iso = Isolation(s, accounts=os.geteuid() == 0, cgroups=None, no_new_privs=shutil.which("setpriv") is not None)
    account = iso.account(900_000 + os.getpid() % 1000)
    iso.prepare(account)

    def theirs() -> list[int]:
        return [int(p) for p in os.listdir("/proc") if p.isdigit() and os.path.exists(f"/proc/{p}/status")
                and f"\nUid:\t{account.uid}\t" in Path(f"/proc/{p}/status").read_text()]

    async def scenario() -> tuple[float, float, float, bytes]:
        gaps: list[float] = []

        async def ticker() -> None:
            last = time.monotonic()
            while True:
                await asyncio.sleep(0.005)
                gaps.append(time.monotonic() - last)
                last = time.monotonic()

        tick = asyncio.get_running_loop().create_task(ticker())
        started = time.monotonic()
        with pytest.raises(errors.HostUnavailable, match="did not finish in 0.5 s"):
            await run(iso, account, "sleep 30 & sleep 30", [], out_cap=16, timeout_s=0.5)
        hung = time.monotonic() - started
        started = time.monotonic()
        outcome = await run(iso, account, "exec yes", [], out_cap=1000, timeout_s=10)
        capped = time.monotonic() - started
        tick.cancel()
        assert outcome.over and outcome.code < 0
        return hung, capped, max(gaps), outcome.out

    try:
        hung, capped, gap, out = asyncio.run(scenario())
        assert 0.5 <= hung < 2.5 and capped < 2.5 and out == b"y\n" * 500
        assert gap < 0.25, f"the event loop stood still for {gap:.3f} s"
        if iso.accounts:
            from tests.hosting import wait_for

            wait_for(lambda: not theirs(), timeout=5, what="the account's processes to be gone")
    finally:
        shutil.rmtree(base, ignore_errors=True)
