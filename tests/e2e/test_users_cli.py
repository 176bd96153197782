"""`python -m local.users`: create an admin from the command line, log in with the printed password."""
from __future__ import annotations

import os
import subprocess
import sys
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
