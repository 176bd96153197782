"""A host on ECS takes its id and advertised URL from the task metadata endpoint (every task runs the same image
and settings), and publishes its session count as an EMF line for the service's autoscaling. The metadata
endpoint is ECS's: a small HTTP server here plays it."""
from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tmux_host.ecs import apply_task_identity, emit_sessions_metric, task_identity
from tmuxi.settings import get_settings

TASK = {"Cluster": "tmuxi-prod", "TaskARN": "arn:aws:ecs:us-east-1:123456789012:task/tmuxi-prod/"
        "0123456789abcdef0123456789abcdef",
        "Containers": [{"Name": "tmux-host", "Networks": [{"NetworkMode": "awsvpc", "IPv4Addresses": ["10.0.3.17"]}]}]}


@pytest.fixture()
def metadata() -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            body = json.dumps(TASK).encode() if self.path == "/v4/abc/task" else b"{}"
            self.send_response(200 if self.path == "/v4/abc/task" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/v4/abc"
    server.shutdown()


def test_task_identity_is_the_task_id_and_its_private_address(metadata: str) -> None:
    assert task_identity(metadata, 7001) == ("0123456789abcdef0123456789abcdef", "http://10.0.3.17:7001")


def test_settings_take_the_task_identity_unless_given(metadata: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TMUXI_HOST_ID", "TMUXI_HOST_URL"):
        # set, then removed: monkeypatch then removes what apply_task_identity writes there when the test ends
        # (a delenv of an absent variable records nothing to undo, and the task's URL would outlive the test)
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)
    monkeypatch.setenv("ECS_CONTAINER_METADATA_URI_V4", metadata)
    get_settings.cache_clear()
    try:
        s = apply_task_identity()
        assert (s.host_id, s.advertised_host_url) == ("0123456789abcdef0123456789abcdef", "http://10.0.3.17:7001")
        monkeypatch.setenv("TMUXI_HOST_ID", "given-1")
        monkeypatch.setenv("TMUXI_HOST_URL", "http://10.9.9.9:7001")
        get_settings.cache_clear()
        s = apply_task_identity()
        assert (s.host_id, s.host_url) == ("given-1", "http://10.9.9.9:7001")
    finally:
        get_settings.cache_clear()


def test_the_identity_does_not_outlive_the_test_that_applied_it() -> None:
    import os

    assert "10.0.3.17" not in os.environ.get("TMUXI_HOST_URL", "")


def test_an_unreachable_metadata_endpoint_names_the_fix() -> None:
    with pytest.raises(RuntimeError, match="TMUXI_HOST_ID and TMUXI_HOST_URL"):
        task_identity("http://127.0.0.1:9/v4/none", 7001, attempts=2, timeout_s=0.2)


def test_the_session_count_is_one_emf_line_with_the_autoscaling_dimensions(
        capsys: pytest.CaptureFixture[str]) -> None:
    emit_sessions_metric(get_settings(), 7)
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    (directive,) = line["_aws"]["CloudWatchMetrics"]
    assert directive["Namespace"] == "Tmuxi"
    assert sorted(directive["Dimensions"][0]) == ["environment", "service"]
    assert line["service"] == "tmux-host" and line["tmux_active_sessions"] in (7, [7])
