"""Containment, tried as an attacker would: every command below runs inside user A's session (an exec through
the gateway, as any user can), against the real local stack. User B, on the same host, must notice nothing, and
no secret of the services may be reachable (README, "Security model")."""
from __future__ import annotations

import base64
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import redis

from tests.conftest import StackHandle
from tests.hosting import wait_for
from tmux_host.accounts import HOST_CAPABILITIES

ROOT = Path(__file__).resolve().parents[2]


class User:
    def __init__(self, stack: StackHandle, host_id: str | None = None) -> None:
        self.stack = stack
        self.name, self.h = stack.new_user()
        self.sid = self.create(host_id)

    def create(self, host_id: str | None = None) -> str:
        """A session, on ``host_id`` when given (placement goes by free capacity: the next one lands on the other
        host, so create until one is there, then delete the others)."""
        elsewhere: list[str] = []
        try:
            for _ in range(4):
                r = self.stack.client.post("/sessions", json={}, headers=self.h)
                assert r.status_code == 201, r.text
                body = r.json()
                if host_id is None or body["host_id"] == host_id:
                    return str(body["id"])
                elsewhere.append(body["id"])
        finally:
            for sid in elsewhere:
                self.stack.client.delete(f"/sessions/{sid}", headers=self.h)
        raise AssertionError(f"could not place a session on {host_id}")

    def exec(self, cmd: str, timeout_s: float = 20, sid: str | None = None, **options: Any) -> dict[str, Any]:
        r = self.stack.client.post(f"/sessions/{sid or self.sid}/exec",
                                   json={"command": cmd, "timeout_s": timeout_s, **options}, headers=self.h)
        assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        return out

    def session(self, sid: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = self.stack.client.get(f"/sessions/{sid or self.sid}", headers=self.h).json()
        return body

    def host_dir(self) -> Path:
        assert self.stack.stack.socket_dir is not None
        return self.stack.stack.socket_dir / self.session()["host_id"]

    def account(self) -> int:
        uid = int(self.exec("id -u")["stdout"])
        return uid - 200_000


@pytest.fixture
def pair(stack: StackHandle) -> tuple[User, User]:
    a = User(stack)
    b = User(stack, host_id=a.session()["host_id"])  # same host: the interesting case
    return a, b


def secrets_of(stack: StackHandle) -> dict[str, str]:
    env = stack.stack.env
    db, rd = urlsplit(env["TMUXI_DATABASE_URL"]), urlsplit(env["TMUXI_REDIS_URL"])
    redis_pw = rd.password or parse_qs(rd.query).get("password", [""])[0]
    found = {"jwt": env["TMUXI_JWT_SECRET"], "host": env["TMUXI_HOST_SECRET"],
             "postgres": unquote(db.password or ""), "redis": unquote(redis_pw)}
    assert all(len(v) >= 16 for v in found.values()), "every data store must have a password"
    return found


def split(secret: str) -> str:
    """Shell that rebuilds ``secret`` without it ever appearing whole on a command line or in the script."""
    half = len(secret) // 2
    return f"printf '%s%s\\n' {shlex.quote(secret[:half])} {shlex.quote(secret[half:])}"


# --- nothing secret is reachable --------------------------------------------------------------------------------
def test_shells_run_as_their_own_account_with_a_fresh_environment(pair: tuple[User, User]) -> None:
    a, b = pair
    ida, idb = a.exec("id -u; id -g; id -G; echo $HOME; stat -c %a:%u $HOME; pwd"), b.exec("id -u")
    uid, gid, groups, home, mode, cwd = ida["stdout"].split("\n")[:6]
    assert int(uid) >= 200_000 and uid == gid == groups and uid != idb["stdout"].strip()
    assert mode == f"700:{uid}" and cwd == home and home != os.environ.get("HOME")
    env = a.exec("env")["stdout"]
    assert "TMUXI_SESSION_ID" in env and not any(
        line.split("=", 1)[0].startswith("TMUXI_") and not line.startswith("TMUXI_SESSION_ID=")
        for line in env.splitlines())
    # no privilege to gain from a setuid binary; every process in the account's own cgroups
    assert a.exec("grep NoNewPrivs /proc/self/status")["stdout"].split() == ["NoNewPrivs:", "1"]
    groups = a.exec("grep -E ':(memory|pids):' /proc/self/cgroup")["stdout"].split()
    assert len(groups) == 2 and all(re.search(rf"/tmuxi-{a.session()['host_id']}-[0-9a-f]{{8}}/a{a.account()}$", g)
                                    for g in groups)


def test_no_secret_in_any_environment_command_line_or_readable_file(stack: StackHandle,
                                                                     pair: tuple[User, User]) -> None:
    a, _ = pair
    data_dir = stack.stack.data_dir
    # the services' environments and command lines, as the attacker sees them
    dump = a.exec("for p in /proc/[0-9]*; do cat $p/environ $p/cmdline; echo; done 2>/dev/null | base64 -w0")
    seen = base64.b64decode(dump["stdout"])
    assert len(seen) > 1000 and b"tmux" in seen  # it did read the command lines it may read
    assert b"TMUXI_" not in seen.replace(b"TMUXI_SESSION_ID", b"")
    for name, secret in secrets_of(stack).items():
        assert secret.encode() not in seen, f"{name} secret readable in /proc"
        # every file the attacker can read where the stack or the tests keep anything
        # (not into virtualenvs, npm packages, build output or cloned repositories' objects: gigabytes that no
        # service writes to, which made the search outlast its timeout on a machine with old clones in /tmp)
        skip = " ".join(f"--exclude-dir={d}" for d in (".venv", "node_modules", "build", "cdk.out", ".git"))
        hits = a.exec(f"grep -rlsF {skip} -f <({split(secret)}) {data_dir} /tmp /var/tmp /dev/shm {ROOT}/.data; true",
                      timeout_s=20, streams="merged")
        assert not hits["timed_out"] and hits["output"] == "", f"{name} secret readable in {hits['output']}"
    denied = a.exec(f"cat {data_dir}/secrets.json; ls {data_dir}/logs")
    assert "Permission denied" in denied["stderr"] and denied["exit_code"] != 0


def test_data_stores_refuse_the_shell(stack: StackHandle, pair: tuple[User, User]) -> None:
    a, _ = pair
    rd = urlsplit(stack.stack.env["TMUXI_REDIS_URL"])
    port = stack.stack.redis.port
    tcp = a.exec(f"redis-cli -p {port} --no-auth-warning set session:x owned; redis-cli -p {port} keys '*'",
                 streams="merged")
    assert "NOAUTH" in tcp["output"] and "owned" not in tcp["output"]
    sock = a.exec(f"redis-cli -s {rd.path} ping", streams="merged")
    assert "PONG" not in sock["output"]
    db = urlsplit(stack.stack.env["TMUXI_DATABASE_URL"])
    host = parse_qs(db.query).get("host", [db.hostname or ""])[0]
    pg = a.exec(f"psql -w 'host={host} user=postgres dbname=postgres' -c 'select 1'; "
                "psql -w 'host=127.0.0.1 user=postgres dbname=postgres' -c 'select 1'", streams="merged")
    assert pg["exit_code"] != 0 and "(1 row)" not in pg["output"]


def test_a_forged_cache_entry_or_host_address_grants_nothing(stack: StackHandle, pair: tuple[User, User]) -> None:
    """Even with Redis itself compromised (the test holds its password), what is in it cannot grant access."""
    a, b = pair
    r = redis.Redis.from_url(stack.stack.env["TMUXI_REDIS_URL"], decode_responses=True)
    a_id = a.session()["owner_id"]
    row = {**b.session(), "owner_id": a_id, "_g": int(r.get("cache:gen") or 0)}
    r.set(f"session:{b.sid}", json.dumps(row), ex=60)
    assert stack.client.get(f"/sessions/{b.sid}", headers=a.h).status_code == 404
    assert stack.client.post(f"/sessions/{b.sid}/exec", json={"command": "id"}, headers=a.h).status_code == 404
    # a host address in Redis is not where the API sends the host secret
    got: list[bytes] = []
    trap = socket.create_server(("127.0.0.1", 0))
    trap.settimeout(3)

    def listen() -> None:
        try:
            conn, _ = trap.accept()
            got.append(conn.recv(65536))
            conn.close()
        except OSError:
            pass

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    host_id = b.session()["host_id"]
    r.set(f"host:{host_id}", json.dumps({"url": f"http://127.0.0.1:{trap.getsockname()[1]}"}), ex=60)
    r.delete(f"session:{b.sid}")
    assert b.exec("echo still-mine")["stdout"] == "still-mine\n"
    trap.close()
    t.join(5)
    assert got == []


# --- other users' sessions are out of reach ------------------------------------------------------------------
def test_another_users_tmux_server_is_out_of_reach(pair: tuple[User, User]) -> None:
    a, b = pair
    b_sock = b.host_dir() / f"a{b.account()}" / "tmux"
    out = a.exec(f"ls {b.host_dir()}; S=${{TMUX%%,*}}; echo own=$S; tmux -S {b_sock} list-sessions; "
                 f"tmux -S {b_sock} capture-pane -p; tmux -S {b_sock} kill-server; ls -la {b_sock.parent}",
                 streams="merged")
    text = out["output"]
    assert f"own={a.host_dir()}/a{a.account()}/tmux" in text
    assert text.count("Permission denied") >= 4 and str(b.sid).replace("-", "") not in text
    # a server-wide hook and options on A's own server reach nobody else
    hook = a.exec("tmux set-hook -g session-created 'run-shell \"touch /tmp/hooked-$(id -u)\"' && "
                  "tmux set -g status-left PWNED && tmux set-hook -g after-send-keys 'run-shell \"echo x\"' && echo ok")
    assert hook["stdout"] == "ok\n"
    other = b.create()
    assert b.exec("echo fine", sid=other)["stdout"] == "fine\n"
    assert not list(Path("/tmp").glob("hooked-*"))
    assert b.exec("tmux show -gv status-left")["stdout"].strip() != "PWNED"
    assert b.exec("echo alive")["stdout"] == "alive\n"


def test_exchange_files_cannot_be_replaced_and_a_stopped_shell_delays_nobody(stack: StackHandle,
                                                                           pair: tuple[User, User]) -> None:
    a, b = pair
    uid = 200_000 + a.account()
    xdir = a.host_dir() / "x" / f"a{a.account()}"
    tried = a.exec(f"ls {xdir}; mkfifo {xdir}/f; ln -s /etc/shadow {xdir}/l; touch {xdir}/t; echo done")
    assert tried["stderr"].count("Permission denied") >= 3
    # A stops a command mid-exec (tmux itself continues a stopped shell; the shell takes a stopped job back to
    # its prompt), then stops its own tmux server: B's work and the host's heartbeat go on
    t0 = time.monotonic()
    assert a.exec("sh -c 'kill -STOP $$'; echo after", timeout_s=5)["stdout"].endswith("after\n")
    assert time.monotonic() - t0 < 5
    spare = a.create(host_id=a.session()["host_id"])  # on the same tmux server as A's first session
    stopped = a.exec("kill -STOP $(tmux display -p '#{pid}') && echo stopped", sid=spare)  # (the shell answers)
    assert stopped["stdout"] == "stopped\n"
    try:
        t0 = time.monotonic()
        for _ in range(5):
            assert b.exec("echo quick")["stdout"] == "quick\n"
            assert stack.client.get(f"/sessions/{b.sid}/screen", headers=b.h).status_code == 200
        assert time.monotonic() - t0 < 3, "another user's stopped processes delayed B"
        t0 = time.monotonic()
        slow = stack.client.get(f"/sessions/{a.sid}/screen", headers=a.h)
        assert slow.status_code == 503 and time.monotonic() - t0 < 10  # bounded by control_timeout_s
        time.sleep(3.5)  # past the time without a heartbeat after which a host counts as dead (host_dead_after_s)
        assert stack.client.get("/health").json()["checks"]["hosts"] == "2 live"
    finally:
        subprocess.run(["pkill", "-CONT", "-u", str(uid)], check=False)


def test_sessions_made_from_a_shell_count_against_that_users_quota_only(stack: StackHandle,
                                                                      pair: tuple[User, User]) -> None:
    a, b = pair
    host = a.session()["host_id"]
    made = a.exec("for i in $(seq 25); do tmux new -d -s t$(cat /proc/sys/kernel/random/uuid | tr -d -) "
                  "|| exit 1; done; tmux new -d -s mine; echo made")
    assert made["stdout"] == "made\n"
    # not adopted: the host's count of its sessions is unchanged, B can still create there
    assert stack.client.get(f"/sessions/{a.sid}", headers=a.h).json()["state"] == "active"
    b.create(host_id=host)
    # ... but A's quota (20 by default) is spent once the host has reported them (with its next heartbeat)
    def refused() -> bool:
        r = stack.client.post("/sessions", json={}, headers=a.h)
        if r.status_code == 201:  # not reported yet: give it back
            assert stack.client.delete(f"/sessions/{r.json()['id']}", headers=a.h).status_code == 204
        return r.status_code == 429 and r.json()["error"]["code"] == "quota_exceeded"

    wait_for(refused, timeout=10, what="A's quota to count the sessions made from a shell")
    assert [s["id"] for s in stack.client.get("/sessions", headers=a.h).json()["sessions"]] == [a.sid]


# --- limits ---------------------------------------------------------------------------------------------------
def test_a_process_storm_stops_at_the_users_limit(stack: StackHandle, pair: tuple[User, User]) -> None:
    a, b = pair
    uid = 200_000 + a.account()
    stack.client.post(f"/sessions/{a.sid}/exec", json={"command": "for i in $(seq 2000); do sleep 30 & done",
                                                        "timeout_s": 8, "on_timeout": "kill"}, headers=a.h)
    assert len(_processes_of(uid)) <= 128  # TMUXI_USER_MAX_PROCESSES in the tests
    assert b.exec("echo unaffected")["stdout"] == "unaffected\n"
    subprocess.run(["pkill", "-KILL", "-u", str(uid), "sleep"], check=False)


def test_a_memory_hog_is_stopped_at_the_users_limit(pair: tuple[User, User]) -> None:
    a, b = pair
    hog = a.exec("python3 -c 'b = b\"x\" * (3 << 30); print(\"allocated\")'; echo rc=$?", timeout_s=20,
                 streams="merged")
    assert "allocated" not in hog["output"] and "rc=0" not in hog["output"]
    assert b.exec("echo unaffected")["stdout"] == "unaffected\n"
    assert a.exec("echo survived")["stdout"] == "survived\n"  # the hog died, not the shell


def test_disk_writers_stop_at_their_caps(stack: StackHandle, pair: tuple[User, User]) -> None:
    a, b = pair
    t0 = time.monotonic()
    bg = a.exec("(head -c 2G /dev/zero; sleep 25) & disown; echo started")
    assert bg["exit_code"] == 0 and time.monotonic() - t0 < 15
    # once the exec is over its output has nowhere to go: the writer got SIGPIPE, no file grows anywhere
    wait_for(lambda: "head -c 2G" not in a.exec("ps -u $(id -u) -o args")["stdout"], timeout=10,
             what="the background writer to end")
    big = a.exec("head -c 2G /dev/zero > ~/big; echo rc=$?; stat -c %s ~/big; rm -f ~/big", timeout_s=20)
    lines = big["stdout"].split()
    assert "rc=153" in lines and int(lines[-1]) == 64 << 20  # SIGXFSZ at TMUXI_USER_MAX_FILE_MB (tests: 64)
    assert b.exec("echo unaffected")["stdout"] == "unaffected\n"


def test_input_a_program_does_not_read_is_bounded(stack: StackHandle, pair: tuple[User, User]) -> None:
    a, b = pair
    uid = 200_000 + a.account()
    assert stack.client.post(f"/sessions/{a.sid}/input", json={"text": "sleep 600", "enter": True},
                             headers=a.h).status_code == 204
    wait_for(lambda: any((p / "cmdline").read_bytes() == b"sleep\x00600\x00" for p in _processes_of(uid)),
             what="sleep (which never reads its input) in the foreground")
    # whole lines (random bytes would hold a ^C or ^D for the shell; one endless line the kernel itself drops)
    chunk = base64.b64encode((b"a" * 99 + b"\n") * 600).decode()
    last = None
    for _ in range(3000):
        last = stack.client.post(f"/sessions/{a.sid}/input", json={"data_b64": chunk}, headers=a.h)
        if last.status_code != 204:
            break
    assert last is not None and last.status_code == 409 and last.json()["error"]["code"] == "input_backlog", last
    server = _tmux_server_of(a, uid - 200_000)
    rss_mb = int((server / "statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20
    assert rss_mb < 16 + 16  # TMUXI_USER_TMUX_MEMORY_MB (tests: 16), plus what one sampling interval lets by
    # keys still pass (C-c stops the program); B never noticed
    assert stack.client.post(f"/sessions/{a.sid}/input", json={"keys": ["C-c"]}, headers=a.h).status_code == 204
    assert stack.client.post(f"/sessions/{b.sid}/input", json={"text": "echo ok"}, headers=b.h).status_code == 204
    # deleting A's last session ends A's tmux server: its memory is back
    assert stack.client.delete(f"/sessions/{a.sid}", headers=a.h).status_code == 204
    wait_for(lambda: not server.exists(), timeout=10, what="A's tmux server to end with its last session")


def _processes_of(uid: int) -> list[Path]:
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if int((proc / "status").read_text().split("Uid:")[1].split()[0]) == uid:
                    out.append(proc)
            except (OSError, IndexError, ValueError):
                continue
    return out


def _tmux_server_of(user: User, account: int) -> Path:
    sock = user.host_dir() / f"a{account}" / "tmux"
    pid = subprocess.run(["tmux", "-S", str(sock), "display", "-p", "#{pid}"], capture_output=True, text=True,
                         timeout=5, check=True).stdout.strip()
    return Path("/proc") / pid


# --- the host says what it enforces, and refuses to run without it where it must ---------------------------------
def test_host_health_names_the_mechanisms_in_force(stack: StackHandle) -> None:
    import httpx

    health = httpx.get(stack.stack.host_url("host-1") + "/health", timeout=5).json()
    iso = health["isolation"]
    assert iso["enabled"] and iso["cgroups"] and iso["no_new_privs"]
    assert iso["rlimits"]["nproc"] == 128 and iso["oom_score_adj"] > 0
    # the host kept of root only what switching users needs (no dac_override, sys_admin, net_raw, ...)
    assert set(iso["host_capabilities"]) == set(HOST_CAPABILITIES)


def test_staging_refuses_to_start_without_isolation(tmp_path: Path) -> None:
    tmp_path.chmod(0o777)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{ROOT / 'layers'}:{ROOT}",
           "TMUXI_ENVIRONMENT": "staging", "TMUXI_JWT_SECRET": "j" * 40, "TMUXI_HOST_SECRET": "h" * 40,
           "TMUXI_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none", "TMUXI_DATA_DIR": str(tmp_path),
           "TMUXI_SOCKET_DIR": str(tmp_path / "s"), "TMUXI_HOST_PORT": "0", "TMUXI_LOG_LEVEL": "WARNING"}
    # a host that cannot switch users: run it as an unprivileged user
    proc = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable,
                           "-m", "tmux_host", "--no-registry"], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode != 0
    assert "cannot switch users" in proc.stdout + proc.stderr
    # and the setting cannot be turned off there either
    from pydantic import ValidationError

    from tmuxi.settings import Settings

    with pytest.raises(ValidationError, match="development only"):
        Settings(environment="staging", isolation="off", jwt_secret="j" * 40, host_secret="h" * 40,
                 database_url="postgresql://x@y/z")
