"""`python -m local.users`: create an admin from the command line, log in with the printed password; disable,
enable, end all tokens, change the role or password, delete -- each ending the user's tokens (but enable)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

from tests.conftest import StackHandle

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "layers"), str(ROOT)])}
    return subprocess.run([sys.executable, "-m", "local.users", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=60, check=False)


def test_add_admin_then_login_and_passwd(stack: StackHandle) -> None:
    name = f"cli{uuid.uuid4().hex[:8]}"
    out = _cli("add", name, "--role", "admin")
    assert out.returncode == 0, out.stderr
    password = out.stdout.strip()
    token = stack.login(name, password)
    me = stack.client.get("/validate", headers={"authorization": f"Bearer {token}"}).json()
    assert me["username"] == name and me["role"] == "admin"

    again = _cli("add", name)
    assert again.returncode == 1 and "already exists" in again.stderr

    new = _cli("passwd", name)
    assert new.returncode == 0 and new.stdout.strip() != password
    assert stack.client.post("/auth/token", json={"username": name, "password": password}).status_code == 401
    stack.login(name, new.stdout.strip())

    assert _cli("passwd", "nobody-" + name).returncode == 1


def _until_refused(stack: StackHandle, token: str, what: str) -> None:
    """Poll until ``token`` is refused (401), within the documented bound (plus request latency)."""
    from tmuxi.settings import get_settings

    deadline = time.monotonic() + get_settings().user_state_ttl_s + 3
    while stack.client.get("/validate", headers={"authorization": f"Bearer {token}"}).status_code != 401:
        assert time.monotonic() < deadline, f"token still accepted: {what}"
        time.sleep(0.05)


def _login_status(stack: StackHandle, name: str, password: str) -> int:
    return stack.client.post("/auth/token", json={"username": name, "password": password}).status_code


def test_disable_enable_revoke_role_passwd_delete_end_tokens(stack: StackHandle) -> None:
    name = f"cli{uuid.uuid4().hex[:8]}"
    password = _cli("add", name).stdout.strip()
    first = stack.login(name, password)
    _, helper = stack.new_user()  # owns nothing of name's: must not be affected
    sid = stack.client.post("/sessions", json={"name": "cli"},
                            headers={"authorization": f"Bearer {first}"}).json()["id"]

    out = _cli("disable", name)
    assert out.returncode == 0 and "disabled" in out.stdout, out.stderr
    _until_refused(stack, first, "after disable")
    assert _login_status(stack, name, password) == 401

    out = _cli("enable", name)
    assert out.returncode == 0 and "enabled" in out.stdout, out.stderr
    second = stack.login(name, password)
    assert stack.client.get("/validate", headers={"authorization": f"Bearer {first}"}).status_code == 401

    assert _cli("revoke", name).returncode == 0
    _until_refused(stack, second, "after revoke")
    third = stack.login(name, password)

    out = _cli("role", name, "admin")
    assert out.returncode == 0 and "admin" in out.stdout, out.stderr
    _until_refused(stack, third, "after the role change")
    fourth = stack.login(name, password)
    me = stack.client.get("/validate", headers={"authorization": f"Bearer {fourth}"}).json()
    assert me["role"] == "admin"

    new = _cli("passwd", name)
    assert new.returncode == 0
    _until_refused(stack, fourth, "after passwd")
    fifth = stack.login(name, new.stdout.strip())

    out = _cli("delete", name)
    assert out.returncode == 0 and "1 live session" in out.stdout, (out.stdout, out.stderr)
    _until_refused(stack, fifth, "after delete")
    assert _login_status(stack, name, new.stdout.strip()) == 401
    assert stack.client.get(f"/sessions/{sid}", headers={"authorization": f"Bearer {stack.login(*_admin(stack))}"}
                            ).json()["state"] == "deleted"
    assert stack.client.get("/validate", headers=helper).status_code == 200

    for cmd in (("enable", name), ("disable", name), ("revoke", name), ("role", name, "user"), ("passwd", name),
                ("delete", name), ("disable", "nobody-" + name)):
        out = _cli(*cmd)
        assert out.returncode == 1 and "no user" in out.stderr, (cmd, out.stdout, out.stderr)
    assert _cli("role", name, "root").returncode == 2  # argparse: not a role


def _admin(stack: StackHandle) -> tuple[str, str]:
    name = f"cliadm{uuid.uuid4().hex[:8]}"
    stack.create_user(name, "pw-" + name, "admin")
    return name, "pw-" + name
