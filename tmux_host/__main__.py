"""``python -m tmux_host``: serve the tmux host API with uvicorn (configuration from TMUXI_* settings)."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from typing import Any

import uvicorn

from tmux_host.accounts import Cgroups, reduced_capabilities_argv, subtree_name
from tmux_host.app import create_app
from tmux_host.drain import DrainingServer, drain
from tmux_host.ecs import apply_task_identity
from tmuxi.observability import logger
from tmuxi.settings import get_settings


def load_registry() -> Any | None:
    """The host registry (``tmuxi.registry``), imported lazily; None if it is not available."""
    try:
        return importlib.import_module("tmuxi.registry")
    except ImportError as exc:
        logger.warning("tmuxi.registry not available; running without heartbeat/reconcile",
                       extra={"error": str(exc)})
        return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tmux_host", description=__doc__)
    parser.add_argument("--no-registry", action="store_true",
                        help="do not heartbeat or reconcile with the registry (no database needed)")
    args = parser.parse_args(argv)
    apply_task_identity()  # on ECS: the task's id and address (before anything reads the host's id)
    # Keep of root only what isolating users needs: start again under setpriv with just those capabilities.
    reduced = reduced_capabilities_argv([sys.executable, "-m", "tmux_host", *sys.argv[1:]])
    if reduced is not None:
        # A cgroup hierarchy's root is read-only even to root without CAP_DAC_OVERRIDE: make the host's subtree
        # now, while this process still may (the reduced host finds it and makes each account's group in it).
        Cgroups.probe(subtree_name(get_settings()))
        os.execvp(reduced[0], reduced)  # noqa: S606 - fixed argv, same program
    settings = get_settings()
    settings.require_host_secret()  # fail fast, before touching tmux
    registry = None if args.no_registry else load_registry()
    app = create_app(settings, registry=registry)
    engine = app.state.engine
    # On ECS the first SIGTERM drains the host before uvicorn shuts down (drain.py); elsewhere it only detaches.
    # timeout_graceful_shutdown: after the drain (or at once), requests still in flight get 5 s.
    draining = settings.ecs_agent_uri is not None and settings.drain_timeout_s > 0
    server = DrainingServer(
        uvicorn.Config(app, host=settings.host_bind, port=settings.host_port, log_level="warning", access_log=False,
                       lifespan="on", timeout_graceful_shutdown=5),
        on_term=(lambda: drain(engine, settings.drain_timeout_s)) if draining else None)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C, re-raised by uvicorn once it has shut down
        server.run()
    if not server.started:  # as uvicorn.run: the app did not start (its error is logged)
        sys.exit(3)


if __name__ == "__main__":
    main()
