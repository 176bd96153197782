"""Cold start and Lambda SnapStart: what a function imports before its first request, and what is re-established
after a SnapStart restore.

The functions run on python3.12 (arm64) with SnapStart on: Lambda initialises an environment once when a version
is published (the handler module's import), snapshots it, and restores copies of that snapshot for cold starts.
A restored copy must not share what has to be unique or fresh per environment: connections, randomness, cached
secrets and AWS credentials.

* ``deferred_import(name)``: the one lazy-import point of the core. A heavy library that only some requests
  use is imported on first attribute access instead of at module import. Measured on this project's machine
  (bench/bench_coldstart.py): redis ~100 ms (redis-py imports its asyncio client whatever is used), psycopg
  ~110 ms (its libpq lookup imports ctypes.util), httptools ~5 ms, boto3 ~150 ms. Without SnapStart (the local
  stack, a function without it) this takes them off every cold start of a function that does not need them.
* ``install()``, which every handler calls at module level: with SnapStart (``snapshot_restore_py``, which
  Lambda's Python runtime provides; absent elsewhere, where this does nothing) the deferred libraries are
  imported *before the snapshot* -- imports are safe to share, so restored environments never pay them -- and
  after each restore the per-environment state is dropped, to be re-created on first use:
  ``random`` is reseeded (restored copies would otherwise draw the same numbers; ``secrets``/``uuid4`` read
  os.urandom and need nothing), the PostgreSQL pool, the Redis client and the tmux hosts' HTTP clients are closed, and
  cached secrets (with the Secrets Manager client and its credentials) are forgotten. Nothing of that exists at
  import (the pools are lazy by design: tests/unit/test_coldstart_imports.py asserts it), so the reset is a safety
  net for anything a future change creates at init (tests/unit/test_snapstart_hooks.py).
"""
from __future__ import annotations

import importlib
import random
import sys
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

_primers: list[Callable[[], object]] = []
_installed = False
_lock = threading.Lock()


class DeferredModule:
    """A module imported on first attribute access (thread-safe: ``importlib.import_module`` holds the import
    lock). Use it as the module itself: ``psycopg.connect(...)``, ``except redis.RedisError``. Type it with the
    real module: ``if TYPE_CHECKING: import redis`` / ``else: redis = deferred_import("redis")``."""

    __slots__ = ("_name", "_module")

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def load(self) -> ModuleType:
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return self._module

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._module or self.load(), attr)

    def __repr__(self) -> str:
        return f"<deferred module {self._name!r}{' (loaded)' if self._module is not None else ''}>"


def deferred_import(name: str) -> Any:
    """``name``, imported on first use (and before a SnapStart snapshot)."""
    module = DeferredModule(name)
    _primers.append(module.load)
    return module


def prime_before_snapshot(fn: Callable[[], object]) -> None:
    """Run ``fn`` before a SnapStart snapshot: pure in-memory work that every restored copy may share."""
    _primers.append(fn)


def prime() -> None:
    """Import every deferred library (the before-snapshot hook). No I/O, no connection, no secret."""
    # the secrets' libraries too (boto3): in AWS every function reads a secret on its first request
    importlib.import_module("tmuxi.secrets")
    i = 0
    while i < len(_primers):  # a primer may import a module that defers more
        _primers[i]()
        i += 1


def after_restore() -> None:
    """Drop what a restored copy must not share with its siblings (the after-restore hook). Only modules already
    imported can hold anything, so nothing is imported here."""
    random.seed()  # from os.urandom, fresh in each restored copy
    for module, reset in (("tmuxi.db.pool", "close_pool"), ("tmuxi.cache", "reset"),
                          ("tmuxi.secrets", "clear"), ("tmuxi.host_client", "close_all")):
        loaded = sys.modules.get(module)
        fn = getattr(loaded, reset, None) if loaded is not None else None
        if callable(fn):
            fn()


def install() -> bool:
    """Register the hooks with the runtime (once per process). False where the runtime has no SnapStart hooks
    (the local stack, the tests without the dev extra): then nothing is registered and nothing changes."""
    global _installed
    try:
        from snapshot_restore_py import register_after_restore, register_before_snapshot
    except ImportError:
        return False
    with _lock:
        if not _installed:
            register_before_snapshot(prime)
            register_after_restore(after_restore)
            _installed = True
    return True
