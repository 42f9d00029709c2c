"""Least privilege on the real (embedded) PostgreSQL: the server runs as a non-superuser that
can only read and write the data tables, reads can use a SELECT-only role, and only the owner
migrates (``db.migrate_as_owner``); a server whose schema is behind answers 503, never 500.
"""

from __future__ import annotations

import time
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import pytest
from psycopg2 import sql

from datasource import create_app, db
from tests.conftest import TEST_DB

PRIV_DB = f"{TEST_DB}_priv"
RW, READ = f"{TEST_DB}_rw", f"{TEST_DB}_read"  # roles are cluster-wide: named after the run


def _as(url: str, user: str | None = None, dbname: str | None = None) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{user}@{netloc}" if user else parts.netloc,
                                     path="/" + dbname if dbname else parts.path))


def _admin(url: str, *statements) -> None:
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cur:
        for s in statements:
            cur.execute(s)
    conn.close()


@pytest.fixture
def roles(database_url):
    """A fresh database owned by the superuser and two login roles without any privilege."""
    owner_url = _as(database_url, dbname=PRIV_DB)
    drop = [sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(PRIV_DB)),
            *(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(r)) for r in (RW, READ))]
    _admin(database_url, *drop)
    _admin(database_url, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(PRIV_DB)),
           *(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE").format(
               sql.Identifier(r)) for r in (RW, READ)))
    yield owner_url, _as(database_url, RW, PRIV_DB), _as(database_url, READ, PRIV_DB)
    _admin(database_url, *drop)


def _is_superuser(url: str) -> bool:
    conn = psycopg2.connect(url)
    with conn.cursor() as cur:
        cur.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        value = cur.fetchone()[0]
    conn.close()
    return value


def _wait_ready(http, seconds: float = 5.0):
    deadline = time.monotonic() + seconds
    while True:
        r = http.get("/api/v1/models")
        if r.status_code != 503 or time.monotonic() > deadline:
            return r
        time.sleep(0.2)


def test_unmigrated_schema_is_503_until_the_owner_migrates(roles):
    owner_url, rw_url, _ = roles
    app = create_app({"database_url": rw_url, "auto_migrate": 0, "pool_size": 2})
    try:
        http = app.test_client()
        r = http.get("/api/v1/models")
        assert r.status_code == 503 and "schema not migrated" in r.get_json()["message"]
        assert http.post("/query", json={}).status_code == 503  # every endpoint
        # Allowed to migrate but not privileged to: still a 503 that says so, not a 500.
        app2 = create_app({"database_url": rw_url, "auto_migrate": 1, "pool_size": 1})
        r = app2.test_client().get("/")
        assert r.status_code == 503 and "cannot migrate" in r.get_json()["message"]
        app2.extensions["pool"].close()

        assert db.migrate_as_owner(owner_url, rw_role=RW, read_role=READ)  # files applied
        assert _wait_ready(http).status_code == 200
        assert db.migrate_as_owner(owner_url, rw_role=RW, read_role=READ) == []  # idempotent
    finally:
        app.extensions["pool"].close()


def test_server_runs_as_read_write_role_and_reads_with_a_select_only_role(roles):
    owner_url, rw_url, read_url = roles
    db.migrate_as_owner(owner_url, rw_role=RW, read_role=READ)
    assert not _is_superuser(rw_url) and not _is_superuser(read_url)

    app = create_app({"database_url": rw_url, "database_read_url": read_url, "auto_migrate": 0,
                      "pool_size": 2})
    read_only = create_app({"database_url": read_url, "auto_migrate": 0, "pool_size": 2})
    try:
        http = app.test_client()
        assert http.post("/api/v1/models", json={"name": "m", "task": "binary_classification"}
                         ).status_code == 201
        recs = [{"id": f"p{i}", "ts": 1580515200000 + i * 60_000, "score": i / 10} for i in range(10)]
        fb = [{"id": f"p{i}", "ts": 1580515200000 + i * 60_000 + 1000, "label": int(i >= 5)}
              for i in range(10)]
        assert http.post("/api/v1/predictions", json={"model": "m", "records": recs}).status_code == 200
        assert http.post("/api/v1/feedback", json={"model": "m", "records": fb}).status_code == 200
        # Reads through the SELECT-only pool.
        r = http.get("/api/v1/models/m")
        assert r.status_code == 200 and r.get_json()["predictions"] == 10
        body = {"range": {"from": "2020-02-01T00:00:00Z", "to": "2020-02-01T01:00:00Z"},
                "intervalMs": 3_600_000, "maxDataPoints": 10,
                "targets": [{"refId": "A", "target": "accuracy",
                             "payload": {"model": "m", "window": "cumulative"}}]}
        # Oracle: threshold 0.5 on scores 0.0..0.9 against labels i >= 5: all 10 right.
        for client in (http, read_only.test_client()):
            r = client.post("/query", json=body)
            assert r.status_code == 200, r.get_json()
            assert r.get_json()[0]["datapoints"][-1][0] == 1.0

        # The SELECT-only role reads but cannot write: 503 naming the role, nothing written.
        ro = read_only.test_client()
        assert ro.get("/api/v1/models").get_json()[0]["name"] == "m"
        r = ro.post("/api/v1/predictions", json={"model": "m", "records": [
            {"id": "x", "ts": 1580515200000, "score": 0.5}]})
        assert r.status_code == 503 and "role" in r.get_json()["message"]
        assert http.get("/api/v1/models/m").get_json()["predictions"] == 10

        # Neither server role can change the schema.
        for url in (rw_url, read_url):
            conn = psycopg2.connect(url)
            with pytest.raises(psycopg2.errors.InsufficientPrivilege), conn.cursor() as cur:
                cur.execute("ALTER TABLE predictions ADD COLUMN x int")
            conn.close()
    finally:
        app.extensions["pool"].close()
        app.extensions["read_pool"].close()
        read_only.extensions["pool"].close()
