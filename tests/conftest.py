"""Fixtures: one real PostgreSQL per test session, emptied before each test.

The server is DATABASE_URL's when set (tests use a separate database
``mlsli_test`` on it, never the one named in the URL), else the embedded one
under ``.data/test-pg``.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import pytest

from datasource import create_app, db

ROOT = Path(__file__).resolve().parent.parent
# Tests read their writes back at once: raw-path values exact after every write (servers they
# start inherit it). test_cache_staleness.py covers the server's default of 10 s.
os.environ.setdefault("RAW_CACHE_STALE_S", "0")
TEST_DB = os.environ.get("MLSLI_TEST_DB", "mlsli_test")  # separate runs may share a server
# Every label stored: on its prediction's row, or in feedback while it waits for its prediction
# (migration 015). As a FROM item with the columns of feedback.
STORED_LABELS = ("(SELECT model_id, output_id, label_ts AS ts, label FROM predictions WHERE label IS NOT NULL"
                 " UNION ALL SELECT model_id, output_id, ts, label FROM feedback) stored_labels")


def _with_dbname(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


@pytest.fixture(scope="session")
def database_url() -> str:
    server_url = os.environ.get("DATABASE_URL") or db.embedded_url(ROOT / ".data" / "test-pg")
    admin = psycopg2.connect(server_url)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {TEST_DB} WITH (FORCE)")
        cur.execute(f"CREATE DATABASE {TEST_DB}")
    admin.close()
    url = _with_dbname(server_url, TEST_DB)
    conn = db.connect(url)
    db.migrate(conn)
    conn.close()
    return url


def empty_database(url: str) -> None:
    """Remove every model, its rows and the raw tables' partitions (the tables without a foreign
    key are named)."""
    conn = psycopg2.connect(url)
    with conn.cursor() as cur:
        cur.execute("TRUNCATE rollup, rollup_5m, rollup_1h, rollup_1d, score_bins_5m,"
                    " score_bins_1h, score_bins_1d, model_events, feedback, predictions, segment_sets, models,"
                    " raw_horizon, retention_counts, dropped_keys"
                    " RESTART IDENTITY CASCADE")
        # and the weekly partitions of the raw tables, so that each test starts with none
        cur.execute("SELECT string_agg(format('%I', c.relname), ', ') FROM pg_inherits i"
                    " JOIN pg_class c ON c.oid = i.inhrelid"
                    " WHERE i.inhparent IN ('predictions'::regclass, 'feedback'::regclass)")
        parts = cur.fetchone()[0]
        if parts:
            cur.execute(f"DROP TABLE {parts}")
    conn.commit()
    conn.close()


@pytest.fixture
def clean_db(database_url):
    empty_database(database_url)
    return database_url


@pytest.fixture
def conn(clean_db):
    c = db.connect(clean_db)
    yield c
    c.rollback()
    c.close()


@pytest.fixture(scope="session")
def _app(database_url):
    os.environ.pop("INGEST_TOKEN", None)
    return create_app({"database_url": database_url, "pool_size": 4})


@pytest.fixture
def app(_app, clean_db):
    """The session's app with its original settings (tests may replace them)."""
    original = _app.extensions["settings"]
    yield _app
    _app.extensions["settings"] = original


def with_settings(app, **changes):
    """Replace some of the app's settings for the current test."""
    from dataclasses import replace

    app.extensions["settings"] = replace(app.extensions["settings"], **changes)


@pytest.fixture
def http(app):
    return app.test_client()


@pytest.fixture
def client(clean_db):
    from datasource.client import Client

    c = Client.local(database_url=clean_db)
    yield c
    c.close()
