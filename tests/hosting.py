"""Test helpers for the tmux host: run one in a thread, wait for a condition (poll, never sleep blindly),
free ports, kill tmux servers."""
from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn

from local.services import free_port  # noqa: F401 - re-exported for the tests
from tmux_host.app import create_app
from tmux_host.control import kill_tmux_servers  # noqa: F401 - re-exported for the tests
from tmuxi.host_client import HostClient, close_all
from tmuxi.settings import Settings

if TYPE_CHECKING:
    import pytest

SECRET = "s3cr3t-" + "x" * 32


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            last = predicate()
            if last:
                return last
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what} (last={last!r})")


@contextlib.contextmanager
def host_in_thread(settings: Settings, registry: object | None = None) -> Iterator[str]:
    """Serve a host app with uvicorn on ``settings.host_port`` in a thread; yields its base URL."""
    app = create_app(settings, registry=registry)  # type: ignore[arg-type]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=settings.host_port,
                                           log_level="warning", access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True, name="tmux-host")
    thread.start()
    try:
        wait_for(lambda: server.started, timeout=15, what="host start")
        yield f"http://127.0.0.1:{settings.host_port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextlib.contextmanager
def temp_host(prefix: str, **settings: Any) -> Iterator[tuple[HostClient, Settings]]:
    """A tmux host in a thread on a directory of its own under /tmp (0711: users' accounts reach theirs below),
    with the test secret and a free port; a client to it. Its tmux servers and directory go afterwards."""
    d = Path(tempfile.mkdtemp(dir="/tmp", prefix=prefix))
    d.chmod(0o711)
    s = Settings(socket_dir=d / "s", data_dir=d / "data", host_secret=SECRET, host_port=free_port(),
                 heartbeat_interval_s=60, **settings)
    try:
        with host_in_thread(s) as url:
            yield HostClient(url, secret=SECRET, settings=s), s
    finally:
        close_all()
        kill_tmux_servers(d)
        shutil.rmtree(d, ignore_errors=True)


def isolated_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """boto3's own configuration for a moto server: test credentials, never real ones or a profile from the
    machine."""
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_SESSION_TOKEN": "testing", "AWS_CONFIG_FILE": str(tmp_path / "none"),
                        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
