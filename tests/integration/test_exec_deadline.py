"""An exec answers before API Gateway's 29 s integration timeout (after which the client gets a 504 while the command
may still run): whatever its command does (ignores SIGINT and SIGTERM), whatever its host does (never answers),
and whatever the settings say (a configuration that could not is refused). Real stack, real handlers; the
unanswering host is a real listening socket that never replies."""
from __future__ import annotations

import shutil
import socket
import time
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from local.gateway import LocalGateway
from tests.conftest import StackHandle
from tests.integration.test_error_bodies import TinyHost, tiny_host  # noqa: F401 - a fixture used below
from tmuxi.host_client import EXEC_TIMEOUT_MARGIN_S
from tmuxi.routes import INTEGRATION_TIMEOUT_S
from tmuxi.settings import EXEC_API_RESERVE_S, EXEC_HOST_MARGIN_S, Settings, get_settings

needs_tmux = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")
# The longest an exec's answer may take for the API's own work around the host call still to fit in 29 s.
DEADLINE_S = INTEGRATION_TIMEOUT_S - EXEC_API_RESERVE_S


def test_settings_refuse_an_exec_that_could_outlast_api_gateway() -> None:
    assert Settings().exec_worst_case_s <= INTEGRATION_TIMEOUT_S - 1  # the defaults fit, with room to spare
    with pytest.raises(ValidationError, match="gives up after 29 s.*Set TMUXI_EXEC_TIMEOUT_MAX_S to at most 22"):
        Settings(exec_timeout_max_s=25)
    with pytest.raises(ValidationError, match="EXEC_TIMEOUT_MAX_S to at most 17 or TMUXI_HOST_TIMEOUT_S to at most 7"):
        Settings(host_timeout_s=10)
    assert Settings(exec_timeout_max_s=22).exec_worst_case_s == INTEGRATION_TIMEOUT_S  # exactly fits
    # The API waits on the host the exec's timeout plus this margin (host_client.exec); the host answers within
    # it: after the timeout (on_timeout=kill) it stops the command (SIGINT, SIGTERM, SIGKILL, each after its grace
    # period) and answers -- measured with the worst command there is in the test below.
    assert EXEC_TIMEOUT_MARGIN_S == EXEC_HOST_MARGIN_S


@needs_tmux
@pytest.mark.slow
def test_an_exec_of_a_command_that_ignores_signals_answers_in_time(stack: StackHandle) -> None:
    """The longest exec there is: the maximum timeout, stopped when it ends (on_timeout=kill), a command that
    ignores Ctrl-C and SIGTERM (SIGKILL ends it), through the stack's gateway process. A 200 at all says the host
    answered within the API's margin past the timeout (else the API answers 503 itself)."""
    longest = get_settings().exec_timeout_max_s  # the stack's services run with the same settings
    _, user = stack.new_user()
    created = stack.client.post("/sessions", json={"name": "deadline"}, headers=user)
    assert created.status_code == 201, created.text
    sid = created.json()["id"]
    t0 = time.monotonic()
    r = stack.client.post(f"/sessions/{sid}/exec", headers=user, timeout=60, json={
        "command": "echo go; sh -c 'trap \"\" INT TERM; exec sleep 600'", "timeout_s": longest, "on_timeout": "kill"})
    took = time.monotonic() - t0
    assert r.status_code == 200, r.text
    body = r.json()
    ended = (body["timed_out"], body["running"], body["exit_code"], body["session_ended"])
    assert ended == (True, False, 137, False), body
    assert body["stdout"].startswith("go\n"), body  # SIGKILL ended it (128 + 9)
    assert longest <= took < DEADLINE_S, took
    after = stack.client.post(f"/sessions/{sid}/exec", headers=user, json={
        "command": "ps -o args= -s $$ | grep -c '[s]leep 600'", "timeout_s": 5})
    assert after.status_code == 200 and after.json()["stdout"] == "0\n", after.text  # nothing left running


@needs_tmux
@pytest.mark.slow
async def test_an_exec_on_a_host_that_never_answers_is_answered_in_time(stack: StackHandle,
                                                                        tiny_host: TinyHost) -> None:  # noqa: F811
    """The API gives up on the host after the exec's timeout plus its margin and answers itself, before API
    Gateway would (the local gateway answers 504 INTEGRATION_TIMEOUT at 29 s, as API Gateway does)."""
    longest = get_settings().exec_timeout_max_s
    _, user = stack.new_user()
    gw = LocalGateway(max_workers=2)  # the real authorizer and API handlers, in this process
    transport = httpx.ASGITransport(app=gw)  # type: ignore[arg-type]
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost:8080", timeout=60) as c:
            tiny_host.claim()
            created = await c.post("/sessions", json={"name": "silent-host"}, headers=user)
            assert created.status_code == 201 and created.json()["host_id"] == tiny_host.host_id, created.text
            with socket.socket() as silent:  # accepts connections (the kernel does), never answers
                silent.bind(("127.0.0.1", 0))
                silent.listen(8)
                tiny_host.point_at(f"http://127.0.0.1:{silent.getsockname()[1]}")
                t0 = time.monotonic()
                r = await c.post(f"/sessions/{created.json()['id']}/exec", headers=user,
                                 json={"command": "sleep 600", "timeout_s": longest})
                took = time.monotonic() - t0
    finally:
        gw.close()
    assert "x-amzn-errortype" not in r.headers, (r.status_code, r.headers)  # the API's answer, not a 504
    body: Any = r.json()
    assert r.status_code >= 400 and body["error"]["code"], r.text  # 503, or 410 once the host is found dead
    assert longest <= took < DEADLINE_S, took
