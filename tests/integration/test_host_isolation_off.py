"""Development without isolation: a host told not to switch users still works, runs every shell as its own user,
and says so in /health."""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

from tmux_host.engine import Engine
from tmuxi.settings import Settings


async def test_isolation_off_works_and_says_so() -> None:
    d = Path(tempfile.mkdtemp(dir="/tmp", prefix="to"))
    settings = Settings(socket_dir=d / "s", data_dir=d / "data", host_secret="x" * 40, isolation="off",
                        environment="development", heartbeat_interval_s=60)
    engine = Engine(settings)
    try:
        await engine.start(background=False)
        health = engine.health()
        assert health["status"] == "degraded" and health["isolation"]["enabled"] is False
        assert "off" in health["isolation"]["accounts"]
        sid = uuid.uuid4()
        await engine.create_session(sid, 3, 80, 24)
        r = await engine.exec(sid, "id -u", 10)
        assert r.exit_code == 0 and r.stdout == f"{os.getuid()}\n"
    finally:
        await engine.stop(kill_servers=True)
        shutil.rmtree(d, ignore_errors=True)
