"""GET /api/v1/series (Infinity, curl) answers the same points as POST /query, and both equal
scikit-learn on the window's rows.

The flat endpoint is checked on its own terms too: rows sorted by time, labels as strings,
CSV with a header, tables one row per table row, annotations, variables, and 4xx JSON
errors for bad parameters.
"""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest

from tests.test_metrics_oracle import (
    CLF_METRICS,
    FILTERS,
    INTERVALS_MS,
    SPAN_MS,
    T0_MS,
    THRESHOLDS,
    WINDOWS,
    _check_series,
    _load,
    _matches,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

_OPS = {"=": "=", "!=": "!=", "=~": "=~", "!~": "!~"}


def _filter_params(filters: list[dict]) -> list[tuple[str, str]]:
    return [("filter", f"{f['key']}{_OPS[f['operator']]}{f['value']}") for f in filters]


def _as_items(rows: list[dict], group_by: str | None) -> dict[str, list]:
    """Flat rows back into per-series datapoints, keyed by the series label."""
    out: dict[str, list] = {}
    for row in rows:
        out.setdefault(row["series"], []).append([row["value"], row["time"]])
    return out


@pytest.fixture
def loaded_clf(http):
    rng = np.random.default_rng(23)
    return _load(http, rng, "binary_classification", threshold=0.5)


def test_series_equals_query_and_sklearn(http, loaded_clf):
    truth = loaded_clf
    rng = np.random.default_rng(29)
    metrics = CLF_METRICS + ["sklearn.f1_score"]
    failures: list[str] = []
    checked = 0
    for k in range(160):
        metric = metrics[k % len(metrics)]
        window = str(rng.choice(WINDOWS))
        mode = str(rng.choice(["sliding", "tumbling"]))
        thr_text = THRESHOLDS[int(rng.integers(0, len(THRESHOLDS)))]
        filters = FILTERS[int(rng.integers(0, len(FILTERS)))]
        group_by = "b" if rng.random() < 0.3 else None
        interval = int(rng.choice(INTERVALS_MS))
        a = T0_MS + int(rng.integers(-3600_000, SPAN_MS)) + int(rng.integers(0, 1000))
        b = min(a + int(rng.integers(10 * 60_000, 14 * 3600_000)), T0_MS + SPAN_MS + 3600_000)
        max_points = int(rng.choice([30, 80, 200]))
        payload = {"model": "m", "window": window, "mode": mode}
        params = [("model", "m"), ("metric", metric), ("window", window), ("mode", mode),
                  ("from", str(a)), ("to", str(b)), ("step", str(interval)),
                  ("max_points", str(max_points)), *_filter_params(filters)]
        if thr_text is not None:
            payload["threshold"] = thr_text
            params.append(("threshold", thr_text))
        if group_by:
            payload["group_by"] = group_by
            params.append(("group_by", group_by))
        body = {"range": {"from": a, "to": b}, "intervalMs": interval, "maxDataPoints": max_points,
                "targets": [{"refId": "A", "target": metric, "payload": payload}], "filters": filters}
        ctx = f"[{metric} {window} {mode} thr={thr_text} filters={filters} group_by={group_by}]"
        simpod = http.post("/query", json=body)
        flat = http.get("/api/v1/series", query_string=params)
        assert simpod.status_code == 200 and flat.status_code == 200, (ctx, flat.get_json())
        rows = flat.get_json()
        times = [r["time"] for r in rows]
        assert times == sorted(times), ctx
        by_series = _as_items(rows, group_by)
        expected = {item["target"]: item["datapoints"] for item in simpod.get_json()}
        assert by_series == expected, ctx  # the same points, to the bit
        for row in rows:
            assert row["model"] == "m" and row["metric"] == metric, ctx
            if group_by:
                assert isinstance(row[group_by], str), ctx
        step_ms = None
        for datapoints in by_series.values():
            ts = [t for _, t in datapoints]
            if len(ts) > 1:
                step_ms = ts[1] - ts[0]
        base = np.array([_matches(s, filters) for s in truth.segments])
        if step_ms is None and mode == "tumbling":
            continue
        for name, datapoints in by_series.items():
            mask = base
            if group_by:
                value = name.split(f"{group_by}=", 1)[1]
                mask = base & np.array([s.get(group_by, "(none)") == value for s in truth.segments])
            _check_series({"datapoints": datapoints}, truth, mask, metric, window, mode,
                          float(thr_text) if thr_text else 0.5, {}, "binary_classification",
                          step_ms, failures, ctx)
            checked += len(datapoints)
    assert not failures, f"{len(failures)} of {checked} points differ:\n" + "\n".join(failures[:20])
    assert checked > 2000


def test_csv_tables_annotations_and_instant_values(http, loaded_clf):
    a, b = T0_MS, T0_MS + SPAN_MS
    base = [("model", "m"), ("from", str(a)), ("to", str(b))]
    r = http.get("/api/v1/series", query_string=[*base, ("metric", "accuracy"), ("format", "csv")])
    assert r.status_code == 200 and r.mimetype == "text/csv"
    parsed = list(csv.DictReader(io.StringIO(r.get_data(as_text=True))))
    as_json = http.get("/api/v1/series", query_string=[*base, ("metric", "accuracy")]).get_json()
    assert len(parsed) == len(as_json) > 0
    assert [int(p["time"]) for p in parsed] == [j["time"] for j in as_json]
    # an empty answer still has its header (Infinity takes an empty CSV body for an error)
    empty = http.get("/api/v1/series", query_string=[("model", "m"), ("metric", "accuracy"),
                                                     ("from", "0"), ("to", "1000"), ("format", "csv")])
    assert empty.get_data(as_text=True).startswith("time,value,series")

    table = http.get("/api/v1/series", query_string=[*base, ("metric", "confusion_matrix")]).get_json()
    assert [row["actual"] for row in table] == ["0", "1", "total"]
    sel = (loaded_clf.ts_ms > a) & (loaded_clf.ts_ms <= b) & ~np.isnan(loaded_clf.label)
    assert table[2]["total"] == int(sel.sum())

    # max_points=1: one row per label set, the value at the end of the range (alert rules)
    instant = http.get("/api/v1/series", query_string=[*base, ("metric", "label_coverage"),
                                                       ("window", "1d"), ("max_points", "1"),
                                                       ("group_by", "b")]).get_json()
    assert len(instant) == len({row["b"] for row in instant}) >= 2
    assert len({row["time"] for row in instant}) == 1

    # a literal $__interval_ms (alert rules do not substitute it) is auto; ${model:csv} lists split
    auto = http.get("/api/v1/series", query_string=[*base, ("metric", "accuracy"),
                                                    ("step", "$__interval_ms"), ("model", "m,m")])
    assert auto.status_code == 200 and auto.get_json()


def test_variables_match_the_simpod_variables(http, loaded_clf):
    for name, target in [("models", "models"), ("metrics", "metrics m"), ("windows", "windows"),
                         ("segment_keys", "segment_keys m"), ("group_by", "group_by m"),
                         ("columns", "columns m")]:
        flat = http.get(f"/api/v1/variables/{name}", query_string={"model": "m"}).get_json()
        simpod = http.post("/variable", json={"payload": {"target": target}}).get_json()
        assert flat == [{"__text": i["__text"], "__value": i["__value"]} for i in simpod], name
    values = http.get("/api/v1/variables/segment_values", query_string={"key": "b"}).get_json()
    assert [v["__value"] for v in values] == ["x", "y", "z"]


@pytest.mark.parametrize("params,words", [
    ({"metric": "nope"}, "unknown metric"),
    ({}, "metric is required"),
    ({"metric": "accuracy", "window": "5q"}, "window"),
    ({"metric": "accuracy", "threshold": "2"}, "threshold"),
    ({"metric": "accuracy", "from": "2020-02-02T00:00:00Z", "to": "2020-02-01T00:00:00Z"}, "after"),
    ({"metric": "accuracy", "filter": "nooperator"}, "filter"),
    ({"metric": "accuracy", "model": "ghost"}, "unknown model"),
    ({"metric": "accuracy", "step": "-5"}, "step"),
])
def test_bad_parameters_get_4xx_json(http, loaded_clf, params, words):
    r = http.get("/api/v1/series", query_string={"model": "m", **params})
    assert 400 <= r.status_code < 500
    assert words in r.get_json()["message"]
    r = http.get("/api/v1/variables/whatever")
    assert r.status_code == 400 and "one of" in r.get_json()["message"]
