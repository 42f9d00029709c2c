"""The ingest HTTP API through the real Flask app: good batches, every bad input, auth."""

from __future__ import annotations

import json

import pytest

from datasource import store
from datasource.records import BatchError
from tests.conftest import STORED_LABELS, empty_database, with_settings

GOOD_P = {"id": "a", "ts": "2020-02-01T00:00:00Z", "score": 0.7, "segments": {"b": "x"}, "features": {"f": 1.5}}


def _count(app):
    with app.extensions["pool"].connection() as conn, conn.cursor() as cur:
        cur.execute(f"SELECT (SELECT count(*) FROM predictions), (SELECT count(*) FROM {STORED_LABELS}),"
                    " (SELECT count(*) FROM rollup)")
        return cur.fetchone()


@pytest.fixture
def models(http):
    assert http.post("/api/v1/models", json={"name": "clf", "task": "binary_classification"}).status_code == 201
    assert http.post("/api/v1/models", json={"name": "reg", "task": "regression"}).status_code == 201
    return http


def test_register_model_and_update(http):
    r = http.post("/api/v1/models", json={"name": "clf", "task": "binary_classification", "threshold": 0.4})
    assert r.status_code == 201 and r.get_json()["threshold"] == 0.4
    r = http.post("/api/v1/models", json={"name": "clf", "threshold": 0.6})
    assert r.status_code == 200 and r.get_json()["threshold"] == 0.6
    assert [m["name"] for m in http.get("/api/v1/models").get_json()] == ["clf"]


@pytest.mark.parametrize("body,field", [
    ({"task": "binary_classification"}, "name"),
    ({"name": "x", "task": "ranking"}, "task"),
    ({"name": "x", "threshold": 1.5}, "threshold"),
    ({"name": "x", "task": "regression", "threshold": 0.5}, "threshold"),
])
def test_bad_model_registration(http, body, field):
    r = http.post("/api/v1/models", json=body)
    assert r.status_code == 400
    assert r.get_json()["errors"][0]["field"] == field


def test_json_and_ndjson_batches(models, app):
    r = models.post("/api/v1/predictions", json={"model": "clf", "records": [GOOD_P]})
    assert r.status_code == 200 and r.get_json() == {"written": 1}
    lines = "\n".join(json.dumps({**GOOD_P, "id": f"n{i}", "ts": 1580515200000 + i}) for i in range(5))
    r = models.post("/api/v1/predictions?model=clf", data=lines, content_type="application/x-ndjson")
    assert r.status_code == 200 and r.get_json() == {"written": 5}
    r = models.post("/api/v1/feedback", json={"model": "clf", "records": [{"id": "a", "ts": 1580600000000, "label": 1}]})
    assert r.status_code == 200
    assert _count(app)[:2] == (6, 1)


BAD_PREDICTIONS = [
    ({**GOOD_P, "id": ""}, "id", "empty"),
    ({k: v for k, v in GOOD_P.items() if k != "id"}, "id", "missing"),
    ({**GOOD_P, "id": "x" * 300}, "id", "longer"),
    ({**GOOD_P, "ts": "yesterday"}, "ts", "parse"),
    ({k: v for k, v in GOOD_P.items() if k != "ts"}, "ts", "missing"),
    ({**GOOD_P, "score": 1.5}, "score", "[0, 1]"),
    ({**GOOD_P, "score": -0.1}, "score", "[0, 1]"),
    ({**GOOD_P, "score": "0.5"}, "score", "number"),
    ({k: v for k, v in GOOD_P.items() if k != "score"}, "score", "missing"),
    ({**GOOD_P, "features": {"f": "high"}}, "features.f", "number"),
    ({**GOOD_P, "segments": {"b": 3}}, "segments.b", "string"),
    ({**GOOD_P, "segments": {"b": "v" * 200}}, "segments.b", "longer"),
    ("not an object", "", "object"),
]


@pytest.mark.parametrize("bad,field,words", BAD_PREDICTIONS)
def test_bad_prediction_rejects_whole_batch(models, app, bad, field, words):
    r = models.post("/api/v1/predictions", json={"model": "clf", "records": [GOOD_P, bad, {**GOOD_P, "id": "c"}]})
    assert r.status_code == 400, r.get_json()
    err = r.get_json()["errors"][0]
    assert err["index"] == 1 and err["field"] == field and words in err["message"]
    assert _count(app) == (0, 0, 0)


def test_non_finite_score_is_rejected(app):
    # JSON has no NaN, but Python's json emits it and some clients send it.
    from datasource import ingest

    with app.extensions["pool"].connection() as conn:
        ingest.register_model(conn, {"name": "clf"})
    with pytest.raises(BatchError) as e, app.extensions["pool"].connection() as conn:
        ingest.write_predictions(conn, "clf", [{**GOOD_P, "score": float("nan")}], 10)
    assert e.value.errors[0]["field"] == "score"


@pytest.mark.parametrize("label", [2, 0.5, "1", None])
def test_bad_classifier_label(models, app, label):
    models.post("/api/v1/predictions", json={"model": "clf", "records": [GOOD_P]})
    r = models.post("/api/v1/feedback", json={"model": "clf", "records": [
        {"id": "a", "ts": 1580600000000, "label": 1}, {"id": "b", "ts": 1580600000000, "label": label}]})
    assert r.status_code == 400
    assert r.get_json()["errors"][0]["field"] == "label"
    assert _count(app)[1] == 0


def test_regression_accepts_any_finite_score_and_label(models, app):
    r = models.post("/api/v1/predictions", json={"model": "reg", "records": [{**GOOD_P, "score": 42.5}]})
    assert r.status_code == 200
    r = models.post("/api/v1/feedback", json={"model": "reg", "records": [{"id": "a", "ts": 1580600000000, "label": -3.25}]})
    assert r.status_code == 200


def test_unknown_model(models, app):
    r = models.post("/api/v1/predictions", json={"model": "nope", "records": [GOOD_P]})
    assert r.status_code == 404 and "unknown model" in r.get_json()["message"]
    assert _count(app) == (0, 0, 0)


def test_too_many_records(models, app):
    with_settings(app, max_batch_records=3)
    r = models.post("/api/v1/predictions", json={"model": "clf", "records": [
        {**GOOD_P, "id": str(i)} for i in range(4)]})
    assert r.status_code == 413 and "too many records" in r.get_json()["message"]
    assert _count(app) == (0, 0, 0)


def test_malformed_json_and_wrong_content_type(models, app):
    r = models.post("/api/v1/predictions", data='{"model": "clf", "records": [', content_type="application/json")
    assert r.status_code == 400 and "malformed JSON" in r.get_json()["message"]
    r = models.post("/api/v1/predictions", data="model=clf", content_type="application/x-www-form-urlencoded")
    assert r.status_code == 415
    r = models.post("/api/v1/predictions?model=clf", data='{"id": "a"}\n{oops', content_type="application/x-ndjson")
    assert r.status_code == 400 and "line 2" in r.get_json()["message"]
    assert _count(app) == (0, 0, 0)


def test_token_required_for_writes_not_reads(app, http):
    with_settings(app, ingest_token="s3cret")
    r = http.post("/api/v1/models", json={"name": "clf"})
    assert r.status_code == 401 and "Bearer" in r.get_json()["message"]
    r = http.post("/api/v1/models", json={"name": "clf"}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    r = http.post("/api/v1/models", json={"name": "clf"}, headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 201
    assert http.get("/api/v1/models").status_code == 200
    assert http.get("/").status_code == 200


def test_events_and_model_detail(models, app):
    r = models.post("/api/v1/events", json={"model": "clf", "ts": "2020-02-01T00:00:00Z", "title": "Retrained",
                                            "tags": ["training"]})
    assert r.status_code == 201
    r = models.post("/api/v1/events", json={"model": "clf", "ts": "soon", "title": ""})
    assert r.status_code == 400 and {e["field"] for e in r.get_json()["errors"]} == {"ts", "title"}
    detail = models.get("/api/v1/models/clf").get_json()
    assert detail["predictions"] == 0 and detail["latest_prediction_ts"] is None
    assert models.get("/api/v1/models/nope").status_code == 404


def test_local_and_remote_client_paths_agree(clean_db, app):
    """The bulk (COPY) client and Client.remote over real HTTP leave identical tables."""
    import threading

    from werkzeug.serving import make_server

    from datasource.client import Client

    recs = [{"id": f"r{i}", "ts": 1580515200000 + i * 7000, "score": (i % 10) / 10,
             "segments": {"b": "xy"[i % 2]}, "features": {"f": i / 7}} for i in range(200)]
    fb = [{"id": f"r{i}", "ts": 1580600000000, "label": i % 3 == 0} for i in range(0, 200, 3)]
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    snapshots = []
    try:
        for c in (lambda: Client.local(database_url=clean_db),
                  lambda: Client.remote(f"http://127.0.0.1:{server.server_port}")):
            empty_database(clean_db)
            with c() as client:
                client.register_model("m")
                assert client.write_predictions("m", recs) == 200
                assert client.write_feedback("m", fb) == len(fb)
                assert client.set_reference("m", {"f": [0.5, None, 2.0], "b": ["x", "y"]}) == 2
                latest = client.latest_prediction_ts("m")
                assert latest is not None and latest.timestamp() * 1000 == recs[-1]["ts"]
            with app.extensions["pool"].connection() as conn, conn.cursor() as cur:
                cur.execute("SELECT output_id, ts, score, segset_id, features FROM predictions ORDER BY 1")
                p = cur.fetchall()
                cur.execute(f"SELECT output_id, ts, label FROM {STORED_LABELS} ORDER BY 1")
                f = cur.fetchall()
                cur.execute(f"SELECT segset_id, bucket_end, {', '.join(store.PARTIALS)} FROM rollup ORDER BY 1, 2")
                r = cur.fetchall()
                cur.execute("SELECT column_name, num_values::text, cat_values FROM reference_columns ORDER BY 1")
                refs = cur.fetchall()
            snapshots.append((p, f, r, refs))
    finally:
        server.shutdown()
    assert snapshots[0] == snapshots[1]
    assert len(snapshots[0][0]) == 200 and len(snapshots[0][3]) == 2


def test_remote_client_waits_for_a_server_that_comes_back(app, clean_db):
    """The live replay survives a datasource restart: Client.remote retries while nothing
    listens (then 503s would be retried alike), and the upserts make a resend harmless."""
    import socket
    import threading
    import time

    from werkzeug.serving import make_server

    from datasource.client import Client

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    servers = []

    def start_later():
        time.sleep(1.5)
        server = make_server("127.0.0.1", port, app, threaded=True)
        servers.append(server)
        server.serve_forever()

    threading.Thread(target=start_later, daemon=True).start()
    t0 = time.monotonic()
    c = Client.remote(f"http://127.0.0.1:{port}", retries=6)
    try:
        c.register_model("m", threshold=0.5)
        assert time.monotonic() - t0 >= 1.4  # it waited for the server
        assert c.write_predictions("m", [{"id": "a", "ts": 1580515200000, "score": 0.4}]) == 1
        assert c.write_predictions("m", [{"id": "a", "ts": 1580515200000, "score": 0.4}]) == 1
    finally:
        c.close()
        for server in servers:
            server.shutdown()
    body = app.test_client().get("/api/v1/models/m").get_json()
    assert body["predictions"] == 1
