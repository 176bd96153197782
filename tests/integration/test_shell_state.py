"""How the host tells that a pane's shell is at its prompt: the terminal's foreground process group, from /proc."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tmux_host.engine import shell_state


def _until(pred, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False


def test_prompt_busy_and_starting_states() -> None:
    d = Path(tempfile.mkdtemp(prefix="ss", dir="/tmp"))
    sock = str(d / "s")
    shell = os.environ.get("TMUXI_SHELL", "/bin/bash")
    try:
        subprocess.run(["tmux", "-S", sock, "-f", "/dev/null", "new-session", "-d", "-s", "t", shell], check=True)
        pid = int(subprocess.run(["tmux", "-S", sock, "display", "-p", "-t", "=t:", "#{pane_pid}"],
                                 capture_output=True, text=True, check=True).stdout)
        assert _until(lambda: shell_state(pid) == "prompt")
        subprocess.run(["tmux", "-S", sock, "send-keys", "-t", "=t:", "-l", "sleep 30\r"], check=True)
        assert _until(lambda: shell_state(pid) == "busy")
        subprocess.run(["tmux", "-S", sock, "send-keys", "-t", "=t:", "C-c"], check=True)
        assert _until(lambda: shell_state(pid) == "prompt")
    finally:
        subprocess.run(["tmux", "-S", sock, "kill-server"], capture_output=True, check=False)
        shutil.rmtree(d, ignore_errors=True)
    # a process with no controlling terminal yet (what a pane's process is right after the fork)
    detached = subprocess.Popen(["sleep", "30"], start_new_session=True, stdin=subprocess.DEVNULL)
    try:
        assert shell_state(detached.pid) == "starting"
    finally:
        detached.kill()
        detached.wait()
    assert shell_state(2**22 + 12345) == "busy"  # no such process
