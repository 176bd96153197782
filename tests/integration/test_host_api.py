"""The tmux host through its HTTP API (real tmux, real uvicorn, the real sync host client)."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.hosting import SECRET, free_port, temp_host, wait_for
from tmux_host.control import tmux_binary
from tmuxi import errors
from tmuxi.host_client import HostClient
from tmuxi.models import ExecRequest
from tmuxi.settings import Settings

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")


@pytest.fixture(scope="module")
def host() -> Iterator[tuple[HostClient, Settings]]:
    with temp_host("th", host_id="test-host", max_input_bytes=4096, host_capacity=50) as (client, settings):
        yield client, settings


@pytest.fixture
def client(host: tuple[HostClient, Settings]) -> HostClient:
    return host[0]


@pytest.fixture
def session(client: HostClient) -> Iterator[uuid.UUID]:
    sid = uuid.uuid4()
    client.create_session(sid, 1 + sid.int % 1000, 100, 30)
    yield sid
    with contextlib.suppress(errors.NotFound):
        client.kill_session(sid)


def tmux(settings: Settings, account: int, *args: str) -> str:
    sock = settings.resolved_socket_dir / settings.host_id / f"a{account}" / "tmux"
    return subprocess.run([tmux_binary(), "-S", str(sock), *args], capture_output=True, text=True,
                          check=True, timeout=10).stdout


def info_of(client: HostClient, sid: uuid.UUID) -> dict:
    return next(s for s in client.list_sessions() if s["session_id"] == str(sid))


def wait_screen(client: HostClient, sid: uuid.UUID, needle: str, **kw) -> str:  # type: ignore[no-untyped-def]
    def found() -> str | None:
        text = client.screen(sid, **kw).text
        return text if needle in text else None

    return wait_for(found, what=needle)


def test_create_list_kill(client: HostClient, host: tuple[HostClient, Settings]) -> None:
    settings = host[1]
    sid = uuid.uuid4()
    created = client.create_session(sid, 4242, 90, 20)
    assert created["session_id"] == str(sid) and created["tmux_name"] == "t" + sid.hex
    assert created["pane_id"].startswith("%") and created["pid"] > 0 and created["account"] == 4242
    with pytest.raises(errors.Conflict):
        client.create_session(sid, 4242, 90, 20)
    listed = info_of(client, sid)
    assert listed["account"] == 4242 and listed["tmux_name"] == "t" + sid.hex
    other = uuid.uuid4()
    client.create_session(other, 4242, 90, 20)  # same owner: same tmux server
    names = tmux(settings, 4242, "list-sessions", "-F", "#{session_name}").split()
    assert {"t" + sid.hex, "t" + other.hex} <= set(names)
    client.kill_session(sid)
    client.kill_session(other)
    assert str(sid) not in {s["session_id"] for s in client.list_sessions()}
    with pytest.raises(errors.SessionGone) as gone:  # the host remembers how its sessions ended
        client.kill_session(sid)
    assert gone.value.details == {"state": "deleted", "end_reason": "it was deleted"}
    h = client.health()
    assert h["status"] == "ok" and h["host_id"] == "test-host" and h["isolation"]["enabled"]


def test_unknown_session_is_404(client: HostClient) -> None:
    sid = uuid.uuid4()
    for call in (lambda: client.screen(sid), lambda: client.send_input(sid, data=b"x"),
                 lambda: client.exec(sid, "true", 1), lambda: client.resize(sid, 50, 20)):
        with pytest.raises(errors.NotFound):
            call()


def test_input_is_literal(client: HostClient, session: uuid.UUID, host: tuple[HostClient, Settings]) -> None:
    settings = host[1]
    account = info_of(client, session)["account"]
    target = settings.resolved_home_dir / f"a{account}" / "out.bin"  # the account's own home: it may write there
    before_sessions = tmux(settings, account, "list-sessions", "-F", "#{session_id} #{session_name}")
    before_windows = tmux(settings, account, "list-windows", "-a", "-F", "#{window_id}")
    payload = (
        b"a;b ; kill-server \\; new-window #{session_name} #(touch /tmp/pwned) -t '%0' \"dq\" 'sq' "
        b"$(echo sub) `echo bq` $HOME %end 1 2 1\nsecond line \\\n\xff\xfe\xc3\x28 end\n"
    )
    client.send_input(session, data=f"cat > {target}\n".encode())
    pane = info_of(client, session)["pane_id"]
    wait_for(lambda: tmux(settings, account, "display", "-p", "-t", pane, "#{pane_current_command}").strip() == "cat",
             what="cat in foreground")
    client.send_input(session, data=payload)  # small: send-keys -H
    # large (> 256 bytes): load-buffer from a private file + paste-buffer -r; every non-control byte value
    big = b"".join(bytes(range(0x20, 0x7f)) + bytes(range(0x80, 0x100)) + b"#{q:x} ;\n" for _ in range(12))
    assert len(big) > 2000
    client.send_input(session, data=big)
    client.send_input(session, keys=["C-d"])
    wait_for(lambda: tmux(settings, account, "display", "-p", "-t", pane, "#{pane_current_command}").strip() == "bash",
             what="shell back")
    assert target.read_bytes() == payload + big
    assert tmux(settings, account, "list-sessions", "-F", "#{session_id} #{session_name}") == before_sessions
    assert tmux(settings, account, "list-windows", "-a", "-F", "#{window_id}") == before_windows
    assert not Path("/tmp/pwned").exists()
    # metacharacters inside exec too: the command is run by the shell, never parsed by tmux
    r = client.exec(session, "printf '%s|' '#{session_name}' 'a;b' \"$((6*7))\"; echo", 10)
    assert r.exit_code == 0 and r.stdout == "#{session_name}|a;b|42|\n"
    with pytest.raises(errors.BadRequest):
        client.send_input(session, keys=["C-c", "kill-server"])


def test_oversize_input_is_413(client: HostClient, session: uuid.UUID, host: tuple[HostClient, Settings]) -> None:
    with pytest.raises(errors.PayloadTooLarge):
        client.send_input(session, data=b"x" * (host[1].max_input_bytes + 1))
    client.send_input(session, data=b"y" * host[1].max_input_bytes)  # at the limit is fine
    client.send_input(session, data=b"zz", keys=["C-u"])  # bytes then keys, one request
    client.send_input(session)  # nothing to send: no-op


def test_screen_plain_escapes_history_resize(client: HostClient, session: uuid.UUID) -> None:
    client.send_input(session, data=b"clear; seq 1 120; printf '\\033[31mRED\\033[0m\\n'\n")
    text = wait_screen(client, session, "RED\n")
    plain = client.screen(session)
    assert "\x1b" not in plain.text and plain.cols == 100 and plain.rows == 30 and not plain.escapes
    assert len(plain.text.split("\n")) == 30 and "120" in text
    assert 0 <= plain.cursor_y < 30 and plain.cursor_x >= 0
    colored = client.screen(session, escapes=True)
    assert colored.escapes and "\x1b[31mRED" in colored.text
    hist = client.screen(session, history=200)
    lines = hist.text.split("\n")
    assert "1" in lines and "120" in lines and len(lines) > 100
    client.resize(session, 60, 15)
    small = client.screen(session)
    assert (small.cols, small.rows) == (60, 15) and len(small.text.split("\n")) == 15


def test_exec(client: HostClient, session: uuid.UUID) -> None:
    r = client.exec(session, "echo out; echo err >&2; (exit 3)", 10)
    assert (r.exit_code, r.timed_out, r.truncated) == (3, False, False)
    assert (r.stdout, r.stderr, r.output) == ("out\n", "err\n", None) and r.duration_ms > 0
    assert client.exec(session, "false", 10).exit_code == 1
    # state is the session's own shell: cd and variables persist between execs
    client.exec(session, "cd /tmp && export TMUXI_T=42", 10)
    r = client.exec(session, 'pwd; echo "$TMUXI_T $TMUXI_SESSION_ID"', 10)
    assert r.stdout == f"/tmp\n42 {session}\n"
    multi = client.exec(session, "for i in 1 2 3; do\n  echo line$i\ndone", 10)
    assert multi.stdout == "line1\nline2\nline3\n" and multi.exit_code == 0


def test_exec_output_truncated(client: HostClient, session: uuid.UUID, host: tuple[HostClient, Settings]) -> None:
    limit = host[1].exec_max_output_bytes
    r = client.exec(session, f"head -c {limit + 100} /dev/zero | tr '\\0' a", 20)
    assert r.truncated and r.exit_code == 0 and r.stdout_bytes == limit + 100
    # the first and last halves are kept, the 100 bytes between them counted in a marker
    assert r.stdout == "a" * (limit // 2) + f"\n[tmuxi: 100 bytes omitted; {limit + 100} in all]\n" + \
        "a" * (limit - limit // 2)


def test_exec_timeout_then_usable(client: HostClient, session: uuid.UUID) -> None:
    t = time.monotonic()
    r = client.exec(session, ExecRequest(command="echo started; sleep 1000", timeout_s=0.5, on_timeout="kill"))
    assert r.timed_out and not r.running and r.exit_code == 130 and r.stdout == "started\n"  # Ctrl-C ended it
    assert time.monotonic() - t < 5
    after = client.exec(session, "echo ok", 10)
    assert after.exit_code == 0 and after.stdout == "ok\n" and not after.timed_out


def test_busy_pane_is_409(client: HostClient, session: uuid.UUID, host: tuple[HostClient, Settings]) -> None:
    settings = host[1]
    info = info_of(client, session)
    client.send_input(session, data=b"sleep 30\n")
    wait_for(lambda: tmux(settings, info["account"], "display", "-p", "-t", info["pane_id"],
                          "#{pane_current_command}").strip() == "sleep", what="sleep running")
    with pytest.raises(errors.SessionBusy):
        client.exec(session, "echo hi", 5)
    client.send_input(session, keys=["C-c"])
    wait_for(lambda: client.exec(session, "echo back", 5).stdout == "back\n", what="exec after C-c")


def test_secret_required(host: tuple[HostClient, Settings]) -> None:
    client, settings = host
    url = client.base_url
    with httpx.Client(base_url=url) as http:
        assert http.get("/v1/sessions").status_code == 401
        wrong = http.get("/v1/sessions", headers={"X-Tmuxi-Host-Secret": "nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "unauthorized"
        assert http.post(f"/v1/sessions/{uuid.uuid4()}/exec", json={"command": "id"}).status_code == 401
        assert http.get("/metrics").status_code == 401
        assert http.get("/health").status_code == 200
    with pytest.raises(errors.HostUnavailable):  # the service's misconfiguration, never the API caller's 401
        HostClient(url, secret="wrong", settings=settings).list_sessions()


def test_metrics(client: HostClient, session: uuid.UUID) -> None:
    client.screen(session)
    with httpx.Client(base_url=client.base_url, headers={"X-Tmuxi-Host-Secret": SECRET}) as http:
        text = http.get("/metrics").text
    assert 'tmux_active_sessions{host="test-host"}' in text
    assert 'route="/v1/sessions/{sid}/screen"' in text
    assert str(session) not in text


def test_host_unreachable_maps_to_host_unavailable(host: tuple[HostClient, Settings]) -> None:
    dead = HostClient(f"http://127.0.0.1:{free_port()}", secret=SECRET, settings=host[1])
    with pytest.raises(errors.HostUnavailable):
        dead.list_sessions()


def test_control_client_death_is_repaired(client: HostClient, session: uuid.UUID,
                                          host: tuple[HostClient, Settings]) -> None:
    settings = host[1]
    info = info_of(client, session)
    sock = str(settings.resolved_socket_dir / settings.host_id / f"a{info['account']}" / "tmux")
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if sock.encode() in argv and b"-C" in argv and b"_ctl" in argv and ppid == os.getpid():
                    pids.append(int(proc.name))  # our command client (the host runs in this process)
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGKILL)
    # the supervisor (or the next call) reconnects; the session and its shell are untouched
    wait_for(lambda: client.exec(session, "echo healed", 5).stdout == "healed\n", what="exec after reconnect")
    assert client.health()["status"] == "ok"
    assert str(session) in {s["session_id"] for s in client.list_sessions()}


# --- an exec tells the truth about its command --------------------------------------------------------------------
def test_exec_ended_by_ctrl_c_answers_130_at_once(client: HostClient, session: uuid.UUID,
                                                  host: tuple[HostClient, Settings]) -> None:
    import threading

    host_settings = host[1]
    got: list[Any] = []
    def run() -> None:
        try:
            got.append(client.exec(session, "echo started; sleep 30", 20))
        except Exception as exc:  # shown by the assertion below
            got.append(exc)

    t = threading.Thread(target=run)
    t0 = time.monotonic()
    t.start()
    wait_for(lambda: info_of(client, session) and tmux(
        host_settings, info_of(client, session)["account"], "display", "-p", "-t",
        info_of(client, session)["pane_id"], "#{pane_current_command}").strip() == "sleep", what="sleep running")
    client.send_input(session, keys=["C-c"])
    t.join(15)
    assert got, "the exec did not answer"
    r = got[0]
    assert (r.exit_code, r.timed_out, r.session_ended) == (130, False, False), r
    assert r.stdout == "started\n" and time.monotonic() - t0 < 10
    assert_no_exit_trap(client, session)


def assert_no_exit_trap(client: HostClient, sid: uuid.UUID) -> None:
    """No EXIT trap of an exec is left in the shell (asked outside an exec, which sets its own)."""
    client.send_input(sid, data=b"trap -p EXIT >~/traps; echo checked >>~/traps\r")
    wait_for(lambda: client.exec(sid, "cat ~/traps", 5).stdout == "checked\n", what="no EXIT trap left")


def test_exec_that_ends_the_shell_answers_its_output_and_status(client: HostClient) -> None:
    for command, code in (("echo bye; exit 3", 3), ("set -e; echo before; false; echo never", 1),
                          ("echo gone; kill -9 $$", None)):
        sid = uuid.uuid4()
        client.create_session(sid, 77, 80, 24)
        r = client.exec(sid, command, 10)
        assert r.session_ended and not r.timed_out and r.exit_code == code, (command, r)
        assert r.stdout.split("\n")[0] in ("bye", "before", "gone")
        wait_for(lambda sid=sid: str(sid) not in {s["session_id"] for s in client.list_sessions()},  # type: ignore[misc]
                 what="the session to be gone")


def test_exec_timeout_escalates_to_sigterm_and_sigkill(client: HostClient, session: uuid.UUID) -> None:
    for ignores, least in (("INT", 1.0), ("INT TERM", 2.0)):
        t0 = time.monotonic()
        r = client.exec(session, ExecRequest(command=f"echo go; sh -c 'trap \"\" {ignores}; exec sleep 60'",
                                             timeout_s=0.5, on_timeout="kill"))
        took = time.monotonic() - t0
        assert r.timed_out and not r.running and r.stdout.startswith("go\n"), r
        assert r.exit_code == (143 if ignores == "INT" else 137), r  # SIGTERM ended it, or SIGKILL
        assert least <= took < least + 3, took  # SIGINT ignored: SIGTERM after 1 s; also ignored: SIGKILL 1 s later
        after = client.exec(session, "ps -o args= -s $$ | grep -c '[s]leep 60'", 5)
        assert after.stdout == "0\n" and after.exit_code == 1  # nothing left running
        assert_no_exit_trap(client, session)
