"""The PostgreSQL connection pool: created lazily, once per process (a Lambda container or the host), and
migrated on first use."""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from tmuxi.errors import DependencyUnavailable
from tmuxi.settings import env_name, get_settings

_pool: ConnectionPool[psycopg.Connection[dict[str, Any]]] | None = None
_lock = threading.Lock()


def database_url() -> str:
    s = get_settings()
    if s.database_url is None:
        raise RuntimeError(
            f"{env_name('database_url')} is not set: run the local stack (`make run`) which starts an embedded "
            "PostgreSQL, or point it at a server"
        )
    return s.database_url.get_secret_value()


def get_pool() -> ConnectionPool[psycopg.Connection[dict[str, Any]]]:
    global _pool
    if _pool is not None:
        return _pool
    with _lock:
        if _pool is None:
            from tmuxi.db.migrate import migrate

            s = get_settings()
            url = database_url()
            migrate(url)
            pool: ConnectionPool[psycopg.Connection[dict[str, Any]]] = ConnectionPool(
                url,
                min_size=s.db_pool_min,
                max_size=s.db_pool_max,
                timeout=s.db_timeout_s,
                kwargs={"autocommit": True, "row_factory": dict_row, "connect_timeout": max(1, int(s.db_timeout_s))},
                open=True,
                name="tmuxi",
            )
            _pool = pool
    return _pool


def close_pool() -> None:
    global _pool
    with _lock:
        if _pool is not None:
            _pool.close()
            _pool = None


@contextmanager
def connection() -> Iterator[psycopg.Connection[dict[str, Any]]]:
    """A pooled connection (autocommit; use ``conn.transaction()`` for multi-statement writes).
    A database that cannot be reached becomes a clean 503, never a hang."""
    try:
        with get_pool().connection() as conn:
            yield conn
    except (psycopg.OperationalError, PoolTimeout) as exc:
        raise DependencyUnavailable("database unavailable; retry shortly") from exc
