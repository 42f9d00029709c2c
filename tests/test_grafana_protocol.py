"""Every endpoint with the request shapes the plugin really sends, validated against its OpenAPI."""

from __future__ import annotations

import re

import pytest

from datasource import create_app
from datasource import metrics as registry
from tests import openapi

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

RANGE = {"from": "2020-02-01T00:00:00.000Z", "to": "2020-02-01T06:00:00.000Z",
         "raw": {"from": "now-6h", "to": "now"}}


@pytest.fixture
def loaded(http):
    for name, task in (("taxi-high-tip", "binary_classification"), ("fare.v2", "regression")):
        assert http.post("/api/v1/models", json={"name": name, "task": task}).status_code == 201
    recs = [{"id": f"p{i}", "ts": 1580515200000 + i * 20_000, "score": (i * 37 % 100) / 100,
             "segments": {"borough": ["Manhattan", "Queens", "Brooklyn"][i % 3], "vendor": str(1 + i % 2)}}
            for i in range(1000)]
    fb = [{"id": f"p{i}", "ts": 1580515200000 + i * 20_000 + 600_000, "label": int(i % 5 < 3)}
          for i in range(0, 1000, 1) if i % 7]
    assert http.post("/api/v1/predictions", json={"model": "taxi-high-tip", "records": recs}).status_code == 200
    assert http.post("/api/v1/feedback", json={"model": "taxi-high-tip", "records": fb}).status_code == 200
    reg = [{**r, "score": r["score"] * 40} for r in recs[:300]]
    assert http.post("/api/v1/predictions", json={"model": "fare.v2", "records": reg}).status_code == 200
    assert http.post("/api/v1/feedback", json={"model": "fare.v2", "records": [
        {"id": r["id"], "ts": r["ts"] + 1000, "label": 20.0} for r in reg]}).status_code == 200
    assert http.post("/api/v1/events", json={"model": "taxi-high-tip", "ts": "2020-02-01T01:00:00Z",
                                             "title": "Retrained", "text": "on January", "tags": ["training"]}
                     ).status_code == 201
    return http


def _query(http, targets, **extra):
    body = {"app": "dashboard", "requestId": "Q100", "timezone": "browser", "panelId": 2,
            "dashboardUID": "abc", "range": RANGE, "rangeRaw": RANGE["raw"], "interval": "1m",
            "intervalMs": 60_000, "maxDataPoints": 1200, "targets": targets,
            "scopedVars": {"__interval": {"text": "1m", "value": "1m"},
                           "__interval_ms": {"text": "60000", "value": 60000}},
            "startTime": 1700000000000, **extra}
    r = http.post("/query", json=body)
    if r.status_code == 200:
        openapi.validate("/query", r.get_json())
    return r


def test_openapi_definition_is_available():
    if not openapi.available():
        pytest.skip("the plugin's OpenAPI file (../shared/reference) is absent: responses were "
                    "checked for shape but not validated against it")
    assert openapi.response_schema("/query")["type"] == "array"


def test_health(http):
    r = http.get("/")
    assert r.status_code == 200 and r.get_json()["status"] == "ok"


def test_a_killed_pooled_connection_is_replaced_before_use(database_url):
    """Kill the app's only connection from outside: the pool's check replaces it, no 503.

    (A database that is down answers 503: tests/test_faults.py.)"""
    import psycopg2

    app = create_app({"database_url": database_url, "pool_size": 1})
    try:
        http = app.test_client()
        assert http.get("/").status_code == 200
        with app.extensions["pool"].connection() as conn:
            pid = conn.get_backend_pid()
        with psycopg2.connect(database_url) as admin, admin.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(%s)", (pid,))
            assert cur.fetchone()[0] is True
        assert http.get("/").status_code == 200  # the dead connection was replaced, not used
    finally:
        app.extensions["pool"].close()


def test_metrics_lists_every_metric_with_payloads(loaded):
    r = loaded.post("/metrics", json={})
    openapi.validate("/metrics", r.get_json())
    names = {m["value"] for m in r.get_json()}
    assert set(registry.REGISTRY) <= names and "annotations" in names
    acc = next(m for m in r.get_json() if m["value"] == "accuracy")
    fields = {p["name"]: p for p in acc["payloads"]}
    assert set(fields) == {"model", "window", "mode", "threshold", "group_by", "as_of"}
    assert [o["value"] for o in fields["window"]["options"]] == ["5m", "15m", "1h", "6h", "1d", "7d", "cumulative"]
    delay = next(m for m in r.get_json() if m["value"] == "label_delay")
    assert "quantile" in {p["name"] for p in delay["payloads"]}
    # builder mode: the selected model narrows the list to its task
    reg = loaded.post("/metrics", json={"metric": "mae", "payload": {"model": "fare\\.v2"}}).get_json()
    assert "mae" in {m["value"] for m in reg} and "accuracy" not in {m["value"] for m in reg}


def test_metric_payload_options(loaded):
    for name, expect in (("model", ["fare.v2", "taxi-high-tip"]), ("group_by", ["none", "borough", "vendor"]),
                         ("mode", ["sliding", "tumbling"])):
        r = loaded.post("/metric-payload-options", json={"metric": "accuracy", "payload": {"model": "taxi-high-tip"},
                                                         "name": name})
        openapi.validate("/metric-payload-options", r.get_json())
        assert [o["value"] for o in r.get_json()] == expect


def test_code_mode_payload_and_scoped_vars(loaded):
    # Code mode: the plugin interpolates $vars in the JSON string and parses it; a string
    # that reaches us unparsed is parsed here; leftover $vars come from scopedVars.
    targets = [
        {"refId": "A", "target": "accuracy", "editorMode": "code", "datasource": {"type": "simpod-json-datasource"},
         "payload": {"model": "taxi-high-tip", "window": "$window", "threshold": "${threshold}"}},
        {"refId": "B", "target": "f1", "editorMode": "code", "payload": '{"model": "taxi-high-tip", "window": "1h"}'},
        {"refId": "C", "target": "recall", "hide": True, "payload": {"model": "taxi-high-tip"}},
        {"refId": "D", "target": "$metric", "payload": {"model": "taxi-high-tip"}, "unknownKey": 1},
    ]
    scoped = {"window": {"selected": False, "text": "15m", "value": "15m"},
              "threshold": {"text": "0.3", "value": "0.3"},
              "metric": {"text": "Precision", "value": "precision"},
              "__sceneObject": {"text": "__sceneObject"}}
    r = _query(loaded, targets, scopedVars=scoped)
    assert r.status_code == 200, r.get_json()
    out = r.get_json()
    assert [s["refId"] for s in out] == ["A", "B", "D"]
    assert [s["target"] for s in out] == ["accuracy", "f1", "precision"]
    pts = out[0]["datapoints"]
    assert len(pts) == 361 and pts[0][1] == 1580515200000 and pts[-1][1] == 1580536800000
    assert any(v is not None for v, _ in pts)


def test_builder_mode_regex_escaped_and_multi_values(loaded):
    targets = [{"refId": "A", "target": "mean_score", "editorMode": "builder",
                "payload": {"model": "(taxi-high-tip|fare\\.v2)", "window": "1h", "mode": "tumbling"}},
               {"refId": "B", "target": "accuracy", "editorMode": "builder",
                "payload": {"model": "taxi-high-tip", "threshold": "0\\.35", "group_by": "borough"}}]
    out = _query(loaded, targets).get_json()
    assert [s["target"] for s in out[:2]] == ["taxi-high-tip mean_score", "fare.v2 mean_score"]
    assert out[0]["tags"] == {"model": "taxi-high-tip"}
    groups = [s for s in out if s["refId"] == "B"]
    assert [s["target"] for s in groups] == [f"accuracy borough={b}" for b in ("Brooklyn", "Manhattan", "Queens")]
    # tumbling 1h on a 1m step: every point is its own 1-minute window
    assert len(out[0]["datapoints"]) == 361


def test_adhoc_filters_restrict_every_query(loaded):
    t = [{"refId": "A", "target": "prediction_count", "payload": {"model": "taxi-high-tip", "window": "cumulative"}}]

    def last(out):  # a stat panel's "last non-null": cumulative lines end after the data
        return [v for v, _ in out[0]["datapoints"] if v is not None][-1]

    all_ = last(_query(loaded, t).get_json())
    only = _query(loaded, t, filters=[{"key": "borough", "operator": "=", "value": "Queens"}]).get_json()
    rx = _query(loaded, t, filters=[{"key": "borough", "operator": "=~", "value": "Q.*|B.*"},
                                    {"key": "vendor", "operator": "!=", "value": "1"}]).get_json()
    assert all_ == 1000 and last(only) == 333
    assert last(rx) == sum(1 for i in range(1000) if i % 3 in (1, 2) and i % 2 == 1)


def test_tables_and_annotations(loaded):
    targets = [{"refId": "A", "target": "confusion_matrix", "payload": {"model": "taxi-high-tip"}},
               {"refId": "B", "target": "calibration", "payload": {"model": "taxi-high-tip"}},
               {"refId": "Anno", "target": "annotations", "payload": {"model": "taxi-high-tip"}}]
    out = _query(loaded, targets).get_json()
    assert out[0]["type"] == "table" and out[0]["rows"][2][0] == "total"
    assert len(out[1]["rows"]) == 10
    anno = out[2]
    assert [c["text"] for c in anno["columns"]] == ["time", "timeEnd", "title", "text", "tags"]
    titles = [row[2] for row in anno["rows"]]
    assert "Retrained" in titles and anno["rows"][titles.index("Retrained")][4] == "training"


def test_max_data_points_and_epoch_alignment(loaded):
    t = [{"refId": "A", "target": "accuracy", "payload": {"model": "taxi-high-tip", "window": "1h"}}]
    out = _query(loaded, t, intervalMs=1000, maxDataPoints=100).get_json()[0]["datapoints"]
    times = [p[1] for p in out]
    assert len(times) <= 100 and all(tt % (times[1] - times[0]) == 0 for tt in times)


def test_variables_tags_and_search(loaded):
    def var(target):
        r = loaded.post("/variable", json={"payload": {"target": target}, "range": RANGE})
        assert r.status_code == 200, r.get_json()
        openapi.validate("/variable", r.get_json())
        return [i["__value"] for i in r.get_json()]

    assert var("models") == ["fare.v2", "taxi-high-tip"]
    assert "accuracy" in var("metrics taxi-high-tip") and "mae" not in var("metrics taxi-high-tip")
    assert var("windows")[-1] == "cumulative"
    assert var("modes") == ["sliding", "tumbling"]
    assert var("group_by taxi-high-tip") == ["none", "borough", "vendor"]
    assert var("segment_values borough") == ["Brooklyn", "Manhattan", "Queens"]
    item = loaded.post("/variable", json={"payload": {"target": "models"}}).get_json()[0]
    assert set(item) == {"__text", "__value", "text", "value"}
    keys = loaded.post("/tag-keys", json={}).get_json()
    openapi.validate("/tag-keys", keys)
    assert keys == [{"type": "string", "text": "borough"}, {"type": "string", "text": "vendor"}]
    assert loaded.post("/tag-values", json={"key": "vendor"}).get_json() == [{"text": "1"}, {"text": "2"}]
    assert "accuracy" in loaded.post("/search", json={"target": ""}).get_json()
    assert loaded.post("/variable", json={"payload": {"target": "bogus"}}).status_code == 400


@pytest.mark.parametrize("mutate,words", [
    (lambda b: b["targets"][0].update(target="accuracy_typo"), "unknown metric"),
    (lambda b: b["targets"][0]["payload"].update(model="nope"), "unknown model"),
    (lambda b: b["targets"][0]["payload"].update(window="5 minutes"), "window"),
    (lambda b: b["targets"][0]["payload"].update(window="0m"), "window"),
    (lambda b: b["targets"][0]["payload"].update(mode="hopping"), "mode"),
    (lambda b: b["targets"][0]["payload"].update(threshold="1.5"), "threshold"),
    (lambda b: b["targets"][0]["payload"].update(threshold="high"), "threshold"),
    (lambda b: b.update(range={"from": "2020-02-02T00:00:00Z", "to": "2020-02-01T00:00:00Z"}), "after"),
    (lambda b: b.update(range={"from": "2010-01-01T00:00:00Z", "to": "2020-01-01T00:00:00Z"},
                        intervalMs=1000, maxDataPoints=None), "exceed"),
    (lambda b: b.update(range={"from": "yesterday", "to": "now"}), "range.from"),
    (lambda b: b["targets"][0].update(target="mae"), "does not apply"),
    (lambda b: b["targets"][0]["payload"].update(quantile="2", window="1h") or b["targets"][0].update(
        target="label_delay"), "quantile"),
    (lambda b: b.update(filters=[{"key": "borough", "operator": "=~", "value": "("}]), "regex"),
    (lambda b: b.update(filters="borough=Queens"), "filters"),
])
def test_bad_queries_get_400_with_message(loaded, mutate, words):
    body = {"range": RANGE, "intervalMs": 60_000, "maxDataPoints": 500,
            "targets": [{"refId": "A", "target": "accuracy", "payload": {"model": "taxi-high-tip"}}]}
    mutate(body)
    body = {k: v for k, v in body.items() if v is not None}
    r = loaded.post("/query", json=body)
    assert r.status_code == 400, r.get_json()
    assert words in r.get_json()["message"]


def test_non_json_body_gets_400(loaded):
    for path in ("/query", "/metrics", "/variable", "/metric-payload-options", "/tag-values"):
        r = loaded.post(path, data="{not json", content_type="application/json")
        assert r.status_code == 400 and "JSON" in r.get_json()["message"], path


def test_user_metric_error_is_confined_to_its_target(loaded):
    @registry.metric("always_fails")
    def always_fails(y_true, y_score):
        raise RuntimeError("boom")

    @registry.metric("share_above_08", input="score", tasks=("binary_classification",))
    def share_above(y_true, y_score):
        return float((y_score > 0.8).mean())

    try:
        targets = [{"refId": "A", "target": "always_fails", "payload": {"model": "taxi-high-tip"}},
                   {"refId": "B", "target": "share_above_08", "payload": {"model": "taxi-high-tip", "window": "1h"}},
                   {"refId": "C", "target": "sklearn.roc_auc_score", "payload": {"model": "taxi-high-tip"}}]
        out = _query(loaded, targets).get_json()
        assert out[0]["refId"] == "A" and out[0]["datapoints"] == [] and "boom" in out[0]["error"]
        assert any(v is not None for v, _ in out[1]["datapoints"])
        assert any(v is not None for v, _ in out[2]["datapoints"])
    finally:
        registry.REGISTRY.pop("always_fails")
        registry.REGISTRY.pop("share_above_08")


def test_metrics_modules_setting_registers_user_functions(database_url):
    app = create_app({"database_url": database_url, "metrics_modules": ("tests.user_metrics",), "pool_size": 1})
    try:
        names = {m["value"] for m in app.test_client().post("/metrics", json={}).get_json()}
        assert "top_decile_hit_rate" in names
    finally:
        registry.REGISTRY.pop("top_decile_hit_rate", None)
        app.extensions["pool"].close()


def test_statement_timeout_answers_503_instead_of_hanging(database_url, loaded):
    app = create_app({"database_url": database_url, "statement_timeout_ms": 1, "pool_size": 1})
    try:
        body = {"range": {"from": "2020-01-01T00:00:00Z", "to": "2020-03-01T00:00:00Z"}, "intervalMs": 60_000,
                "maxDataPoints": 100_000,
                "targets": [{"refId": "A", "target": "roc_auc", "payload": {"model": "taxi-high-tip", "window": "7d"}}]}
        statuses = set()
        for _ in range(5):
            r = app.test_client().post("/query", json=body)
            statuses.add(r.status_code)
            if r.status_code == 503:  # a statement cut by the timeout, or the request's deadline
                assert re.search("statement timeout|time budget", r.get_json()["message"])
        assert 503 in statuses
    finally:
        app.extensions["pool"].close()


def test_slow_python_metric_is_stopped_by_the_time_budget(database_url, loaded):
    import time

    @registry.metric("slow_metric")
    def slow_metric(y_true, y_score):
        time.sleep(0.02)
        return 0.0

    app = create_app({"database_url": database_url, "statement_timeout_ms": 300, "pool_size": 1})
    try:
        body = {"range": RANGE, "intervalMs": 60_000, "maxDataPoints": 1000,
                "targets": [{"refId": "A", "target": "slow_metric", "payload": {"model": "taxi-high-tip"}}]}
        started = time.monotonic()
        r = app.test_client().post("/query", json=body)
        assert r.status_code == 503 and "time budget" in r.get_json()["message"]
        assert time.monotonic() - started < 2.0
    finally:
        registry.REGISTRY.pop("slow_metric")
        app.extensions["pool"].close()


def test_values_are_read_from_scoped_vars_first(loaded):
    """A model named 'eu,v1' would split into two by the CSV rule; scopedVars says it is one."""
    assert loaded.post("/api/v1/models", json={"name": "eu,v1(b)"}).status_code == 201
    assert loaded.post("/api/v1/predictions", json={"model": "eu,v1(b)", "records": [
        {"id": "a", "ts": "2020-02-01T00:30:00Z", "score": 0.4}]}).status_code == 200
    targets = [{"refId": "A", "target": "prediction_count", "editorMode": "builder",
                "payload": {"model": "eu,v1\\(b\\)", "window": "1h"}}]
    scoped = {"model": {"text": "eu,v1(b)", "value": "eu,v1(b)"}}
    r = _query(loaded, targets, scopedVars=scoped)
    assert r.status_code == 200, r.get_json()
    assert [s["target"] for s in r.get_json()] == ["prediction_count"]
    assert _query(loaded, targets).status_code == 400  # without scopedVars the CSV rule splits it
