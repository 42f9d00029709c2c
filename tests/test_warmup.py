"""The warm-up query a server process answers at start (datasource/warmup.py)."""

from __future__ import annotations

import socket

from datasource import create_app, db, ingest, store
from datasource.records import parse_feedback, parse_predictions

T0_MS = 1_580_515_200_000  # 2020-02-01


def _fill(url: str) -> None:
    conn = db.connect(url)
    try:
        ingest.register_model(conn, {"name": "m", "threshold": 0.5})
        model = store.get_model(conn, "m")
        preds = [{"id": f"p{i}", "ts": T0_MS + 60_000 * i, "score": (i % 10) / 10} for i in range(120)]
        store.write_predictions(conn, model, parse_predictions(preds, model.task, 10**6))
        fbs = [{"id": f"p{i}", "ts": T0_MS + 60_000 * i + 1, "label": i % 2} for i in range(120)]
        store.write_feedback(conn, model, parse_feedback(fbs, model.task, 10**6))
        conn.commit()
    finally:
        conn.close()


def test_a_process_with_data_answers_the_warm_up_before_its_first_request(clean_db):
    _fill(clean_db)
    app = create_app({"database_url": clean_db})
    assert app.extensions["warm_up_ms"] is not None and app.extensions["warm_up_ms"] > 0
    # the connection it warmed is kept idle in the read pool for the first request
    assert app.extensions["pool"]._pool._pool, "no idle connection left in the pool"
    off = create_app({"database_url": clean_db, "warm_up": 0})
    assert off.extensions["warm_up_ms"] is None


def test_no_model_or_no_database_is_no_warm_up_and_no_failure(clean_db):
    assert create_app({"database_url": clean_db}).extensions["warm_up_ms"] is None  # no model
    with socket.socket() as s:  # a port nothing listens on: the database is down
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = create_app({"database_url": f"postgresql://nobody@127.0.0.1:{port}/none"})
    assert down.extensions["warm_up_ms"] is None
    assert down.test_client().get("/api/v1/models").status_code == 503
