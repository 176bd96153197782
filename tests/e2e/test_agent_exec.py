"""The agent's terminal, end to end through the local gateway (issue 12): commands that outlive a request (exec ids,
cursors, stdin, signals, stop), output fit for agents (stdout/stderr apart, head and tail kept under a cap, bytes
that are not UTF-8), one view with humans (the screen and the history show the command; typed input reaches it),
background jobs bounded by their session, and send-and-wait."""
from __future__ import annotations

import base64
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def user(stack: Any) -> dict[str, str]:
    return stack.new_user()[1]


@pytest.fixture()
def sid(stack: Any, user: dict[str, str]) -> str:
    return str(stack.create_session(user, name="agent")["id"])


def _exec(stack: Any, user: dict[str, str], sid: str, command: str, **body: Any) -> dict[str, Any]:
    r = stack.client.post(f"/sessions/{sid}/exec", json={"command": command, **body}, headers=user)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def _poll(stack: Any, user: dict[str, str], sid: str, xid: str, cursor: str, wait_s: float = 5) -> dict[str, Any]:
    r = stack.client.get(f"/sessions/{sid}/execs/{xid}", params={"cursor": cursor, "wait_s": wait_s}, headers=user,
                         timeout=wait_s + 30)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def _until_done(stack: Any, user: dict[str, str], sid: str, xid: str) -> dict[str, Any]:
    """Poll from the start to the end; the answers' output joined (each poll gives only what is new)."""
    cursor, out, err = "", "", ""
    for _ in range(30):
        r = _poll(stack, user, sid, xid, cursor, wait_s=5)
        cursor, out, err = r["cursor"], out + r["stdout"], err + r["stderr"]
        if not r["running"]:
            return {**r, "stdout": out, "stderr": err}
    raise AssertionError(f"exec {xid} still running")


def _ticks(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"tick (\d+)", text)]


def test_a_long_command_is_polled_fed_and_stopped(stack: Any, user: dict[str, str], sid: str) -> None:
    # 60 s of work: a line a second, and whatever it is given on stdin echoed back
    command = "for i in $(seq 60); do echo tick $i; if read -t 1 line; then echo got:$line; fi; done"
    first = _exec(stack, user, sid, command, timeout_s=1.5)
    assert first["running"] and first["timed_out"] and first["exit_code"] is None and first["exec_id"]
    xid, cursor = first["exec_id"], first["cursor"]
    seen = _ticks(first["stdout"])
    for _ in range(3):  # polled three times: only what is new each time, never a line twice
        time.sleep(1.2)
        more = _poll(stack, user, sid, xid, cursor)
        assert more["running"], more
        new = _ticks(more["stdout"])
        assert new and (not seen or new[0] == seen[-1] + 1), (seen, new)
        seen += new
        cursor = more["cursor"]
    assert seen == list(range(1, len(seen) + 1))
    # the session's foreground is taken: another exec is told which one holds it
    r = stack.client.post(f"/sessions/{sid}/exec", json={"command": "true"}, headers=user)
    assert r.status_code == 409 and xid in r.json()["error"]["message"], r.text
    # a line on its stdin (the terminal, as typed there)
    r = stack.client.post(f"/sessions/{sid}/execs/{xid}/input", json={"text": "hello agent", "enter": True},
                          headers=user)
    assert r.status_code == 204, r.text
    got = ""
    for _ in range(10):
        more = _poll(stack, user, sid, xid, cursor, wait_s=2)
        got += more["stdout"]
        cursor = more["cursor"]
        if "got:hello agent" in got:
            break
    assert "got:hello agent" in got
    listed = stack.client.get(f"/sessions/{sid}/execs", headers=user).json()["execs"]
    assert [e["running"] for e in listed if e["exec_id"] == xid] == [True]
    # stopped: its final answer, well before its 60 s
    started = time.monotonic()
    r = stack.client.delete(f"/sessions/{sid}/execs/{xid}", params={"grace_s": 1}, headers=user, timeout=60)
    assert r.status_code == 200, r.text
    final = r.json()
    assert not final["running"] and final["exit_code"] in (130, 143, 137), \
        (final, stack.client.get(f"/sessions/{sid}/screen", headers=user).json()["text"])
    assert time.monotonic() - started < 10 and final["duration_ms"] < 40_000
    # the terminal shows the interrupted command and a prompt, not how the host learnt its status
    screen = stack.client.get(f"/sessions/{sid}/screen", headers=user).json()["text"]
    assert "^C" in screen and "\\." not in screen and ".rc'" not in screen, screen
    # and the session is usable again
    assert _exec(stack, user, sid, "echo after")["stdout"] == "after\n"


def test_a_signal_reaches_a_running_program(stack: Any, user: dict[str, str], sid: str) -> None:
    first = _exec(stack, user, sid, "trap 'echo got-usr1; exit 7' USR1; sleep 30 & wait", timeout_s=0.5,
                  background=True)
    assert first["running"], first
    r = stack.client.post(f"/sessions/{sid}/execs/{first['exec_id']}/signal", json={"signal": "USR1"}, headers=user)
    assert r.status_code == 204, r.text
    final = _until_done(stack, user, sid, first["exec_id"])
    assert final["exit_code"] == 7 and "got-usr1" in final["stdout"], final
    bad = stack.client.post(f"/sessions/{sid}/execs/{first['exec_id']}/signal", json={"signal": "SEGV"}, headers=user)
    assert bad.status_code == 422 and "signal" in bad.text


def test_stdout_and_stderr_apart_or_merged_in_order(stack: Any, user: dict[str, str], sid: str) -> None:
    split = _exec(stack, user, sid, "echo out1; echo err1 >&2; echo out2; exit_code() { return 3; }; exit_code")
    assert (split["stdout"], split["stderr"], split["exit_code"]) == ("out1\nout2\n", "err1\n", 3)
    assert split["output"] is None and split["stdout_bytes"] == 10 and split["stderr_bytes"] == 5
    merged = _exec(stack, user, sid, "echo a; echo b >&2; echo c", streams="merged")
    assert merged["output"] == "a\nb\nc\n" and merged["stdout"] == merged["stderr"] == ""


def test_bytes_that_are_not_utf8_are_flagged_or_returned_exactly(stack: Any, user: dict[str, str], sid: str) -> None:
    text = _exec(stack, user, sid, r"printf 'ok \377\376 é\n'")
    assert text["lossy"] and text["stdout"] == "ok \ufffd\ufffd é\n"
    exact = _exec(stack, user, sid, r"printf 'ok \377\376 é\n'", encoding="base64")
    assert not exact["lossy"] and base64.b64decode(exact["stdout"]) == b"ok \xff\xfe \xc3\xa9\n"


def test_fifty_megabytes_keep_head_and_tail_and_leave_the_host_within_the_cap(
        stack: Any, user: dict[str, str], sid: str) -> None:
    session = stack.get_session(user, sid)
    host = stack.stack.host_procs[session["host_id"]]
    rss_before = _rss_kb(host.pid)
    disk_before = _disk_bytes(stack.stack.data_dir)
    command = "echo FIRST; head -c 50000000 /dev/zero | tr '\\0' 'x' | fold -w 99; echo; echo LAST"
    r = _exec(stack, user, sid, command, timeout_s=20, max_output_bytes=65536)
    assert r["exit_code"] == 0, {k: v for k, v in r.items() if k not in ("stdout", "stderr")}
    total = 6 + 50_000_000 + 50_000_000 // 99 + 1 + 5  # FIRST, the x lines with their newlines, echo, LAST
    assert r["truncated"] and r["stdout_bytes"] == total
    out = r["stdout"]
    assert out.startswith("FIRST\nxxx") and out.endswith("\nLAST\n") and len(out) <= 65536 + 100
    marker = re.search(r"\[tmuxi: (\d+) bytes omitted; (\d+) in all\]", out)
    assert marker and int(marker.group(2)) == total and int(marker.group(1)) >= total - 65536
    # cut at line ends: every line around the marker is whole
    assert all(line in ("FIRST", "LAST", "") or line == "x" * 99 or line.startswith("[tmuxi:") or
               set(line) == {"x"} and len(line) == 50_000_000 % 99 for line in out.split("\n"))
    # nothing of it on the host's disk, and its memory did not take the 50 MB
    assert _disk_bytes(stack.stack.data_dir) - disk_before < 5_000_000
    assert _rss_kb(host.pid) - rss_before < 30_000


def test_the_screen_and_history_show_the_command_not_machinery(stack: Any, user: dict[str, str], sid: str) -> None:
    assert _exec(stack, user, sid, "echo hello-from-$((6 * 7))")["stdout"] == "hello-from-42\n"
    screen = stack.client.get(f"/sessions/{sid}/screen", headers=user).json()["text"]
    lines = screen.splitlines()
    typed = [i for i, line in enumerate(lines) if line.endswith("echo hello-from-$((6 * 7))")]
    assert typed and lines[typed[-1] + 1] == "hello-from-42", screen
    assert ".w'" not in screen and "\\." not in screen, screen
    history = _exec(stack, user, sid, "history 3")["stdout"]
    assert "echo hello-from-$((6 * 7))" in history and "\\." not in history, history


def test_input_typed_during_an_exec_reaches_the_command(stack: Any, user: dict[str, str], sid: str) -> None:
    first = _exec(stack, user, sid, "read -r line; echo got:$line", timeout_s=0.5)
    assert first["running"], first
    r = stack.client.post(f"/sessions/{sid}/input", json={"text": "typed by a person", "enter": True}, headers=user)
    assert r.status_code == 204, r.text
    final = _until_done(stack, user, sid, first["exec_id"])
    assert final["exit_code"] == 0 and final["stdout"] == "got:typed by a person\n"
    # nothing of it was left to run as a command later
    assert _exec(stack, user, sid, "echo next")["stdout"] == "next\n"


def test_background_execs_run_side_by_side_and_take_stdin(stack: Any, user: dict[str, str], sid: str) -> None:
    slow = _exec(stack, user, sid, "sleep 1; echo slow-done", background=True, timeout_s=0.2)
    cat = _exec(stack, user, sid, "tr a-z A-Z", background=True, timeout_s=0.2)
    assert slow["running"] and cat["running"]
    assert _exec(stack, user, sid, "echo foreground-free")["stdout"] == "foreground-free\n"  # the shell is free
    r = stack.client.post(f"/sessions/{sid}/execs/{cat['exec_id']}/input",
                          json={"text": "shout\n", "eof": True}, headers=user)
    assert r.status_code == 204, r.text
    done = _until_done(stack, user, sid, cat["exec_id"])
    assert (done["exit_code"], done["stdout"]) == (0, "SHOUT\n")
    final = _until_done(stack, user, sid, slow["exec_id"])
    assert final["stdout"] == "slow-done\n" and final["exit_code"] == 0


def test_a_background_job_ends_with_its_session(stack: Any, user: dict[str, str]) -> None:
    sid = str(stack.create_session(user)["id"])
    marker = f"sleep 3{os.getpid() % 1000}1"
    r = _exec(stack, user, sid, f"{marker}", background=True, timeout_s=0.3)
    assert r["running"]
    assert _pids_running(marker)
    assert stack.client.delete(f"/sessions/{sid}", headers=user).status_code == 204
    deadline = time.monotonic() + 10
    while _pids_running(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _pids_running(marker)


def test_another_users_exec_is_not_found(stack: Any, user: dict[str, str], sid: str) -> None:
    first = _exec(stack, user, sid, "sleep 5", timeout_s=0.2)
    _, other = stack.new_user()
    for method, path, body in [("GET", "", None), ("DELETE", "", None), ("POST", "/input", {"text": "x"}),
                               ("POST", "/signal", {"signal": "KILL"})]:
        r = stack.client.request(method, f"/sessions/{sid}/execs/{first['exec_id']}{path}", json=body, headers=other)
        assert r.status_code == 404, (method, path, r.text)
    assert _poll(stack, user, sid, first["exec_id"], "", wait_s=0)["running"]  # untouched
    r = stack.client.get(f"/sessions/{sid}/execs/0123456789abcdef", headers=user)
    assert r.status_code == 404 and "no exec" in r.json()["error"]["message"]
    assert stack.get_session(user, sid)["state"] == "active"  # an unknown exec is not a session gone
    r = stack.client.get(f"/sessions/{sid}/execs/{first['exec_id']}", params={"cursor": "x"}, headers=user)
    assert r.status_code == 422 and "cursor" in r.text


def test_an_exec_and_its_input_are_audited_and_a_refusal_as_an_error(stack: Any, user: dict[str, str],
                                                                       sid: str) -> None:
    import uuid

    from tmuxi.db import repo

    done = _exec(stack, user, sid, "true")
    held = _exec(stack, user, sid, "sleep 5", timeout_s=0.2)
    assert held["running"]
    r = stack.client.post(f"/sessions/{sid}/exec", json={"command": "echo refused"}, headers=user)
    assert r.status_code == 409, r.text
    events = [e for e in repo.audit_events(uuid.UUID(sid), None, 100) if e["action"] == "session.exec"]
    # the events name the ids the answers gave (the API gives them; the host takes them)
    assert [(e["detail"]["exec_id"], e["status"]) for e in reversed(events[1:])] == \
        [(done["exec_id"], "ok"), (held["exec_id"], "ok")], events
    refused = events[0]  # written while the host was asked, then settled with its refusal
    assert refused["status"] == "error" and refused["detail"]["error"] == "session_busy", refused
    assert refused["detail"]["bytes"] == len("echo refused")
    assert refused["detail"]["exec_id"] not in (done["exec_id"], held["exec_id"])
    # input, likewise: audited as it is sent, settled when the host refuses it
    r = stack.client.post(f"/sessions/{sid}/execs/0123456789abcdef/input", json={"text": "x"}, headers=user)
    assert r.status_code == 404, r.text
    r = stack.client.post(f"/sessions/{sid}/execs/{held['exec_id']}/input", json={"text": "y"}, headers=user)
    assert r.status_code == 204, r.text
    r = stack.client.post(f"/sessions/{sid}/execs/{held['exec_id']}/input", content=b'{"text": "\\ud800"}',
                          headers={**user, "content-type": "application/json"})
    assert r.status_code == 422 and "data_b64" in r.text, r.text  # refused before anything: not audited
    inputs = [(e["detail"]["exec_id"], e["status"], e["detail"].get("error"))
              for e in repo.audit_events(uuid.UUID(sid), None, 100) if e["action"] == "session.exec_input"]
    assert inputs == [(held["exec_id"], "ok", None), ("0123456789abcdef", "error", "exec_not_found")], inputs


def test_output_a_command_leaves_running_never_reaches_a_later_exec(stack: Any, user: dict[str, str],
                                                                    sid: str) -> None:
    # each exec has FIFOs of its own (made ahead, never reused): a process left writing to the first exec's
    # stdout loses it (SIGPIPE once the host has let go) instead of writing into the next ones
    first = _exec(stack, user, sid, "(for i in $(seq 50); do echo leak-$i; sleep 0.05; done) & echo started")
    assert first["stdout"].startswith("started") and first["exit_code"] == 0, first
    for i in range(5):
        later = _exec(stack, user, sid, f"sleep 0.1; echo mine-{i}")
        # (bash may tell, on stderr, that the job it left got the broken pipe: its own word, not the job's output)
        assert later["stdout"] == f"mine-{i}\n" and not re.search(r"leak-\d", later["stderr"]), later


def test_send_and_wait_for_the_prompt_for_quiet_and_for_a_pattern(stack: Any, user: dict[str, str], sid: str) -> None:
    def send(text: str, **wait: Any) -> dict[str, Any]:
        r = stack.client.post(f"/sessions/{sid}/input", json={"text": text, "enter": True, "wait": wait},
                              headers=user, timeout=40)
        assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        return out

    prompt = send("sleep 0.4; echo back-at-$((40 + 2))", until="prompt", timeout_s=10)
    lines = prompt["screen"]["text"].rstrip("\n").splitlines()
    assert prompt["matched"] and prompt["waited_ms"] >= 400 and lines[-2] == "back-at-42", lines[-3:]
    quiet = send("for i in 1 2 3; do echo q$i; sleep 0.1; done", until="quiet", quiet_ms=400, timeout_s=10)
    assert quiet["matched"] and "q3" in quiet["screen"]["text"] and quiet["waited_ms"] >= 600
    found = send("sleep 0.3; echo READY-$((7 * 6))", until="pattern", pattern=r"READY-\d+", timeout_s=10)
    assert found["matched"] and "READY-42" in found["screen"]["text"]
    missed = send("true", until="pattern", pattern="never-printed-here", timeout_s=0.5)
    assert not missed["matched"] and 450 <= missed["waited_ms"] < 5000
    r = stack.client.post(f"/sessions/{sid}/input", json={"text": "x", "wait": {"until": "pattern"}}, headers=user)
    assert r.status_code == 422 and "pattern" in r.text
    r = stack.client.post(f"/sessions/{sid}/input", json={"text": "x", "wait": {"until": "pattern", "pattern": "("}},
                          headers=user)
    assert r.status_code == 422 and "regular expression" in r.text
    # a pattern that backtracks without end on what the screen shows is cut off, with a message saying so
    r = stack.client.post(f"/sessions/{sid}/input", headers=user, timeout=40, json={
        "text": "printf 'a%.0s' {1..60}; echo '!'", "enter": True,
        "wait": {"until": "pattern", "pattern": "(a|aa)+$", "timeout_s": 10}})
    assert r.status_code == 422 and "too long" in r.text, r.text


def test_a_command_as_large_as_a_file(stack: Any, user: dict[str, str], sid: str) -> None:
    body = "x" * 3_000_000
    r = _exec(stack, user, sid, f"cat > big.txt <<'EOF'\n{body}\nEOF\nwc -c < big.txt")
    assert r["exit_code"] == 0 and r["stdout"].strip() == str(len(body) + 1)


# --- helpers ------------------------------------------------------------------------------------------------------
def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _disk_bytes(path: Path) -> int:
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=False).stdout
    return int(out.split()[0]) if out else 0


def _pids_running(cmdline: str) -> bool:
    return subprocess.run(["pgrep", "-f", f"^{cmdline}$"], capture_output=True, check=False).returncode == 0
