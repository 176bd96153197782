"""Recordings (tmux_host/recorder.py) into a real directory (tmuxi.storage.LocalStore), read back by the real
``asciinema cat`` (2.4). S3 (a moto server), failed uploads and their retry: tests/integration/
test_recordings_storage.py."""
from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest

from tmux_host.recorder import TRUNCATED_NOTICE, Recorder
from tmuxi.errors import NotFound, PayloadTooLarge
from tmuxi.storage import RECORDING_NAME, LocalStore, Store

ASCIINEMA = Path(sys.executable).parent / "asciinema"
START = 1_700_000_000.123456  # 2023-11-14T22:13:20.123456Z
EVENT_TIME = re.compile(rb"\A\[\d+\.\d{6}, ")

# Output as a pane emits it: colours, an OSC title, a screen clear, control characters, and multi-byte characters
# cut between chunks ("é" in two, "€" in three, the first two parts being no text on their own).
CHUNKS = [
    b"\x1b[1;32mgreen\x1b[0m plain\r\n",
    "héllo ".encode()[:2], "héllo ".encode()[2:],
    "€".encode()[:1], "€".encode()[1:2], "€".encode()[2:] + b"\r\n",
    "🙂 wide\r\n".encode(),
    b"\x1b]0;title\x07\x1b[2J\x1b[H",
    b"tab\tbell\x07 nul\x00 del\x7f\r\n",
]


class Clock:
    """Wall-clock time that advances 1 ms a reading."""

    def __init__(self, start: float = START) -> None:
        self.now = start

    def __call__(self) -> float:
        self.now += 0.001
        return self.now


def asciinema_cat(path: Path) -> bytes:
    """What ``asciinema cat`` prints for the file. No controlling terminal (it would switch one to raw mode)."""
    done = subprocess.run([str(ASCIINEMA), "cat", str(path)], capture_output=True, timeout=60,
                          start_new_session=True, env={**os.environ, "PYTHONIOENCODING": "utf-8"}, check=False)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


def stored(store: LocalStore, key: str, tmp: Path) -> Path:
    """The stored object, fetched through the store, as a file for asciinema."""
    path = tmp / ("fetched-" + key.replace("/", "_"))
    path.write_bytes(store.get(key, 1 << 30))
    return path


def events(data: bytes) -> tuple[dict[str, Any], list[list[Any]]]:
    lines = data.split(b"\n")
    assert lines[-1] == b"", "the file ends with a newline"
    for line in lines[1:-1]:
        assert EVENT_TIME.match(line), line  # seconds with 6 decimals
    return json.loads(lines[0]), [json.loads(line) for line in lines[1:-1]]


def record(tmp: Path, chunks: list[bytes], store: Store | None = None, max_bytes: int = 1 << 20,
           between: Callable[[Recorder, int], None] | None = None) -> tuple[Recorder, LocalStore | Store, str]:
    store = store or LocalStore(tmp / "store")
    rec = Recorder(tmp / "spool", store, "host-1", max_bytes, clock=Clock(), term="tmux-256color",
                   user_shell="/bin/zsh")
    rec.start("sess-1", 80, 24)
    for i, chunk in enumerate(chunks):
        rec.output("sess-1", chunk)
        if between is not None:
            between(rec, i)
    key = rec.finish("sess-1")
    assert key is not None
    return rec, store, key


def test_a_recording_reads_back_byte_for_byte(tmp_path: Path) -> None:
    def resize_midway(rec: Recorder, i: int) -> None:
        if i == 3:
            rec.resize("sess-1", 100, 30)
            rec.resize("sess-1", 100, 30)  # unchanged: no event

    rec, store, key = record(tmp_path, CHUNKS, between=resize_midway)
    assert isinstance(store, LocalStore)

    assert key == "recordings/sess-1/host-1-20231114T221320124456Z.cast"  # the first clock reading: start
    assert RECORDING_NAME.match(key.rsplit("/", 1)[1])
    path = stored(store, key, tmp_path)
    header, evs = events(path.read_bytes())
    assert header == {"version": 2, "width": 80, "height": 24, "timestamp": 1_700_000_000,
                      "env": {"TERM": "tmux-256color", "SHELL": "/bin/zsh"}}
    assert [i for i, e in enumerate(evs) if e[1] == "r"] == [3] and evs[3][2] == "100x30"
    times = [e[0] for e in evs]
    assert times == sorted(times) and times[0] > 0
    texts = [e[2] for e in evs if e[1] == "o"]
    assert "llo " in texts[2] and texts[2].startswith("é")  # the cut character arrives whole, with its rest
    assert "€\r\n" in texts
    assert all("\ufffd" not in t for t in texts)

    assert asciinema_cat(path) == b"".join(CHUNKS)

    # the spool is empty once the recording is stored; the spool is the host's alone
    assert stat.S_IMODE(os.stat(tmp_path / "spool").st_mode) == 0o700
    assert list((tmp_path / "spool" / "live").iterdir()) == []
    assert list((tmp_path / "spool" / "done").iterdir()) == []


def test_invalid_bytes_become_replacement_characters(tmp_path: Path) -> None:
    # an invalid byte, a sequence cut short by the next chunk, and an incomplete one when the session ends
    chunks = [b"ok \xff\xfe", b" cut \xe2\x82", b"x", b" end \xf0\x9f"]
    _, store, key = record(tmp_path, chunks)
    assert isinstance(store, LocalStore)
    out = asciinema_cat(stored(store, key, tmp_path))
    assert out.decode() == b"".join(chunks).decode("utf-8", "replace")
    assert out.decode() == "ok \ufffd\ufffd cut \ufffdx end \ufffd"


def test_a_recording_stops_at_its_size_limit_with_a_notice(tmp_path: Path) -> None:
    chunks = [b"line %03d: " % i + b"x" * 80 + b"\r\n" for i in range(200)]

    def late_resize(rec: Recorder, i: int) -> None:
        if i == 150:
            rec.resize("sess-1", 132, 50)  # past the limit: dropped too

    _, store, key = record(tmp_path, chunks, max_bytes=4096, between=late_resize)
    assert isinstance(store, LocalStore)
    path = stored(store, key, tmp_path)
    data = path.read_bytes()
    assert len(data) <= 4096
    _, evs = events(data)
    assert evs[-1][1:] == ["o", TRUNCATED_NOTICE]
    assert [e for e in evs if e[1] == "r"] == []
    kept = len(evs) - 1
    assert 20 < kept < 200
    assert asciinema_cat(path) == b"".join(chunks[:kept]) + TRUNCATED_NOTICE.encode()


def test_a_left_over_spool_file_is_uploaded_by_recover(tmp_path: Path) -> None:
    """A host that died: what it flushed is recovered, cut back to its last whole event; the events it still
    buffered are lost."""
    spool, root = tmp_path / "spool", tmp_path / "store"
    crash = textwrap.dedent("""
        import os, sys
        from pathlib import Path
        from tmux_host.recorder import Recorder
        from tmuxi.storage import LocalStore
        rec = Recorder(Path(sys.argv[1]), LocalStore(sys.argv[2]), "host-1", 1 << 20)
        rec.start("sess-1", 80, 24)
        rec.output("sess-1", b"flushed\\r\\n")
        rec.flush()
        rec.output("sess-1", b"buffered, never written\\r\\n")
        os._exit(1)  # a crash: nothing more is flushed
    """)
    subprocess.run([sys.executable, "-c", crash, str(spool), str(root)], check=False, timeout=60)
    [left] = list((spool / "live").iterdir())
    with open(left, "ab") as f:
        f.write(b'[0.5, "o", "a torn')  # a write the crash cut short
    assert list(root.glob("**/*.cast")) == []

    again = Recorder(spool, LocalStore(root), "host-1", 1 << 20)
    assert again.recover() == 1

    store = LocalStore(root)
    [obj] = store.list("recordings/sess-1/")
    assert obj.key == "recordings/sess-1/" + left.name.split("@", 1)[1]
    assert obj.modified.tzinfo == UTC
    assert asciinema_cat(stored(store, obj.key, tmp_path)) == b"flushed\r\n"
    assert list((spool / "live").iterdir()) == [] and list((spool / "done").iterdir()) == []
    assert again.recover() == 0


def test_a_write_error_ends_that_recording_logs_once_and_never_raises(tmp_path: Path) -> None:
    """A real write failure: the child may write files of at most 64 KiB (RLIMIT_FSIZE; EFBIG as on a full
    disk). Output goes on being offered long after; none of it raises, one error is logged, and what reached
    the file up to its last whole event is stored."""
    child = textwrap.dedent("""
        import json, resource, signal, sys
        from pathlib import Path
        from tmux_host.recorder import Recorder
        from tmuxi.storage import LocalStore
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
        rec = Recorder(Path(sys.argv[1]), LocalStore(sys.argv[2]), "host-1", 1 << 20)
        rec.start("sess-1", 80, 24)
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.RLIM_INFINITY))
        raised = 0
        for i in range(5000):
            try:
                rec.output("sess-1", b"line %04d " % i + b"y" * 60 + b"\\r\\n")
                if i % 100 == 0:
                    rec.flush()
            except BaseException:
                raised += 1
        key = rec.finish("sess-1")
        print("RESULT " + json.dumps({"raised": raised, "key": key}), flush=True)
    """)
    done = subprocess.run([sys.executable, "-c", child, str(tmp_path / "spool"), str(tmp_path / "store")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    result = json.loads(next(line for line in lines if line.startswith("RESULT "))[7:])
    assert result["raised"] == 0
    errors = [json.loads(line) for line in lines if "spool file failed" in line]
    assert len(errors) == 1 and errors[0]["level"] == "ERROR" and "File too large" in errors[0]["error"]

    store = LocalStore(tmp_path / "store")
    path = stored(store, result["key"], tmp_path)
    assert len(path.read_bytes()) <= 65536
    out = asciinema_cat(path)
    full = b"".join(b"line %04d " % i + b"y" * 60 + b"\r\n" for i in range(5000))
    assert len(out) > 10_000 and full.startswith(out) and out.endswith(b"\r\n")


def test_output_of_a_session_not_recorded_is_ignored_and_start_twice_only_resizes(tmp_path: Path) -> None:
    rec = Recorder(tmp_path / "spool", LocalStore(tmp_path / "store"), "host-1", 1 << 20, clock=Clock())
    rec.output("other", b"nobody records this")
    assert rec.finish("other") is None
    rec.start("sess-1", 80, 24)
    rec.output("sess-1", b"one ")
    rec.start("sess-1", 90, 24)  # the host streams it again (a reconnect): the same recording goes on
    rec.output("sess-1", b"two")
    key = rec.finish("sess-1")
    assert key is not None
    store = LocalStore(tmp_path / "store")
    _, evs = events(store.get(key, 1 << 20))
    assert [e[1:] for e in evs] == [["o", "one "], ["r", "90x24"], ["o", "two"]]
    with pytest.raises(ValueError):
        Recorder(tmp_path / "spool", store, "../host", 1 << 20)


# --- LocalStore ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["../x", "a/../../x", "/etc/passwd", "a//b", "", "a/./b", "a/", "x\\y", "a\0b",
                                 "recordings/.x.0123456789abcdef.tmp"])
def test_local_store_refuses_keys_that_leave_or_blur_its_root(tmp_path: Path, key: str) -> None:
    store = LocalStore(tmp_path / "root")
    with pytest.raises(ValueError):
        store.put_bytes(key, b"data")
    with pytest.raises(ValueError):
        store.get(key, 100)
    assert list(tmp_path.iterdir()) == []  # nothing written, inside the root or out of it


def test_local_store_get_refuses_a_too_large_object_without_reading_it(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root")
    store.put_bytes("recordings/s/big.cast", b"")
    big = tmp_path / "root" / "recordings" / "s" / "big.cast"
    os.truncate(big, 1 << 40)  # 1 TiB, sparse: reading it would take hours and more memory than there is
    with pytest.raises(PayloadTooLarge) as raised:
        store.get("recordings/s/big.cast", 1 << 20)
    assert raised.value.details == {"size": 1 << 40, "max_bytes": 1 << 20}
    store.put_bytes("recordings/s/exact.cast", b"x" * 100)
    assert store.get("recordings/s/exact.cast", 100) == b"x" * 100
    with pytest.raises(PayloadTooLarge):
        store.get("recordings/s/exact.cast", 99)
    with pytest.raises(NotFound):
        store.get("recordings/s/missing.cast", 100)
    with pytest.raises(NotFound):
        store.get("recordings/s", 100)  # a directory is no object


def test_local_store_writes_privately_and_lists_by_prefix(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root")
    for key in ("recordings/b/2.cast", "recordings/a/1.cast", "recordings/ab/3.cast", "other/x"):
        store.put_bytes(key, key.encode())
    src = tmp_path / "src"
    src.write_bytes(b"from a file")
    store.put_file("recordings/a/0.cast", src)
    store.put_bytes("recordings/a/1.cast", b"replaced")

    assert [o.key for o in store.list("recordings/a/")] == ["recordings/a/0.cast", "recordings/a/1.cast"]
    assert [o.key for o in store.list("recordings/a")] == ["recordings/a/0.cast", "recordings/a/1.cast",
                                                          "recordings/ab/3.cast"]
    assert [o.key for o in store.list("")] == ["other/x", "recordings/a/0.cast", "recordings/a/1.cast",
                                               "recordings/ab/3.cast", "recordings/b/2.cast"]
    assert store.list("recordings/zzz/") == []
    [one] = [o for o in store.list("recordings/a/") if o.key.endswith("1.cast")]
    assert one.size == len(b"replaced") and store.get(one.key, 100) == b"replaced"
    assert store.get("recordings/a/0.cast", 100) == b"from a file"

    for path in (tmp_path / "root").glob("**/*"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), path
        assert not path.name.endswith(".tmp"), "a temporary file was left behind"
