"""As-of: every served point equals scikit-learn on the window's rows with only the labels
whose feedback ts had come by then (t + lag, or a fixed time T), chosen in plain Python.

Data and truth come from tests/test_metrics_oracle.py (late, missing, early, out-of-order
and corrected feedback); the store keeps the last written label and its ts, and so does
the truth, so a corrected label is unknown before the correction's ts.
"""

from __future__ import annotations

import numpy as np
import pytest

from datasource import asof
from tests import oracle
from tests.test_metrics_oracle import FILTERS, SPAN_MS, T0_MS, _iso, _load, _matches

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

WINDOWS = ["5m", "1h", "6h", "7m", "90s", "1d", "cumulative"]
INTERVALS_MS = [60_000, 300_000, 900_000, 3_600_000, 45_000]
THRESHOLDS = [None, "0.3", "0.77", "0.123", "0.5"]
LAGS = [None, None, "90s", "30m", "6h", "1d"]
UNIT_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
CLF = ["accuracy", "precision", "recall", "f1", "log_loss", "brier_score", "label_coverage",
       "label_count", "roc_auc", "average_precision", "label_delay", "sklearn.roc_auc_score"]
REG = ["mae", "rmse", "r2", "label_count", "label_coverage", "sklearn.median_absolute_error"]
DAY_MS = 86_400_000


def _ms(text: str | None) -> int:
    return 0 if text is None else UNIT_MS[text[-1]] * int(text[:-1])


def _expected(task, metric, truth, mask, known, thr, params):
    """The oracle on the rows of ``mask`` with the labels outside ``known`` removed."""
    y = np.where(known, truth.label, np.nan)[mask]
    s = truth.score[mask]
    d = ((truth.label_ts_ms - truth.ts_ms) / 1000.0)[mask]
    if task == "binary_classification":
        return oracle.classification(metric, y, s, d, thr, params)
    return oracle.regression(metric, y, s, d, params)


def _query(http, payload, a, b, interval, max_points, filters, target):
    body = {"range": {"from": _iso(a), "to": _iso(b)}, "intervalMs": interval,
            "maxDataPoints": max_points, "filters": filters,
            "targets": [{"refId": "A", "target": target, "payload": payload}]}
    return http.post("/query", json=body)


@pytest.fixture
def loaded(http):
    rng = np.random.default_rng(23)
    clf = _load(http, rng, "binary_classification", model="c", threshold=0.5)
    reg = _load(http, rng, "regression", model="r")
    return {"binary_classification": ("c", clf), "regression": ("r", reg)}


def test_as_of_points_match_sklearn(http, loaded):
    rng = np.random.default_rng(5)
    failures, checked = [], 0
    jobs = [("binary_classification", m) for m in CLF] * 7 + [("regression", m) for m in REG] * 6
    for k, (task, metric) in enumerate(jobs):
        model, truth = loaded[task]
        window = WINDOWS[int(rng.integers(0, len(WINDOWS)))]
        mode = "tumbling" if rng.random() < 0.3 else "sliding"
        thr_text = THRESHOLDS[k % len(THRESHOLDS)] if task == "binary_classification" else None
        filters = FILTERS[int(rng.integers(0, len(FILTERS)))]
        group_by = "b" if rng.random() < 0.25 else None
        interval = int(rng.choice(INTERVALS_MS))
        a = T0_MS + int(rng.integers(-3600_000, SPAN_MS)) + int(rng.integers(0, 1000))
        b = min(a + int(rng.integers(20 * 60_000, 14 * 3600_000)), T0_MS + SPAN_MS + 3600_000)
        max_points = int(rng.choice([30, 80, 150]))
        payload = {"model": model, "window": window, "mode": mode}
        fixed = None
        lag = None
        if rng.random() < 0.7:
            payload["as_of"] = "point"
            lag = LAGS[int(rng.integers(0, len(LAGS)))]
            if lag:
                payload["lag"] = lag
        else:
            fixed = T0_MS + int(rng.integers(0, SPAN_MS + 12 * 3600_000))
            payload["as_of"] = fixed if rng.random() < 0.5 else _iso(fixed)
        params = {}
        if metric == "label_delay":
            params["quantile"] = float(rng.choice([0.5, 0.9]))
            payload["quantile"] = str(params["quantile"])
        if thr_text:
            payload["threshold"] = thr_text
        if group_by:
            payload["group_by"] = group_by
        ctx = (f"[{metric} {window} {mode} thr={thr_text} as_of={payload['as_of']} lag={lag} "
               f"filters={filters} group_by={group_by} int={interval}]")
        r = _query(http, payload, a, b, interval, max_points, filters, metric)
        assert r.status_code == 200, (ctx, r.get_json())
        result = r.get_json()
        thr = float(thr_text) if thr_text else 0.5
        base = np.array([_matches(s, filters) for s in truth.segments])
        labeled = ~np.isnan(truth.label)
        if not result:
            assert group_by, ctx
            continue
        times = [t for _, t in result[0]["datapoints"]]
        assert len(times) <= max_points, ctx
        step_ms = times[1] - times[0] if len(times) > 1 else None
        if mode == "tumbling" and step_ms is None:
            continue
        for item in result:
            mask = base
            if group_by:
                value = item["target"].split(f"{group_by}=", 1)[1]
                mask = base & np.array([s.get(group_by, "(none)") == value for s in truth.segments])
            for value, t in item["datapoints"]:
                checked += 1
                if window == "cumulative" and step_ms and t - step_ms >= truth.ts_ms.max():
                    if value is not None:
                        failures.append(f"{ctx} t={t}: {value} past the latest data")
                    continue
                width = (np.inf if window == "cumulative" else
                         step_ms if mode == "tumbling" else _ms(window))
                sel = mask & (truth.ts_ms > t - width) & (truth.ts_ms <= t)
                known = labeled & (truth.label_ts_ms <= (fixed if fixed is not None else t + _ms(lag)))
                expected = _expected(task, metric, truth, sel, known, thr, params)
                if not oracle.close(value, expected):
                    failures.append(f"{ctx} t={t}: got {value}, expected {expected}")
    assert not failures, f"{len(failures)} of {checked} points differ:\n" + "\n".join(failures[:20])
    assert checked > 3000


def test_far_future_equals_latest(http, loaded):
    """as_of long after the last feedback (a time, or point with a lag past every delay) = latest."""
    rng = np.random.default_rng(9)
    a, b = T0_MS - 3600_000, T0_MS + SPAN_MS + 3600_000
    for k, metric in enumerate(["accuracy", "roc_auc", "f1", "log_loss", "mae", "r2"]):
        task = "regression" if metric in ("mae", "r2") else "binary_classification"
        model, _ = loaded[task]
        payload = {"model": model, "window": ["1h", "cumulative", "6h"][k % 3],
                   "mode": "tumbling" if k % 2 else "sliding"}
        if task == "binary_classification":
            payload["threshold"] = ["0.5", "0.123", "0.3"][k % 3]
        if k % 3 == 1:
            payload["group_by"] = "b"
        filters = FILTERS[int(rng.integers(0, len(FILTERS)))]
        latest = _query(http, payload, a, b, 900_000, 200, filters, metric).get_json()
        for as_of in ({"as_of": "2150-01-01T00:00:00Z"}, {"as_of": "point", "lag": "300d"}):
            got = _query(http, {**payload, **as_of}, a, b, 900_000, 200, filters, metric).get_json()
            assert [s["target"] for s in got] == [s["target"] for s in latest] and got, (metric, as_of)
            for mine, theirs in zip(got, latest, strict=True):
                for (v, t), (w, u) in zip(mine["datapoints"], theirs["datapoints"], strict=True):
                    assert t == u and (v is None) == (w is None), (metric, as_of, t)
                    assert v is None or oracle.close(v, w), (metric, as_of, t, v, w)


def test_settling_table_matches_sklearn(http, loaded):
    a, b = T0_MS - 7200_000, T0_MS + SPAN_MS + 7200_000  # three days overlap (a, b]
    for k, of in enumerate(["accuracy", "roc_auc", "log_loss", "label_coverage", "recall", "mae", "r2"]):
        task = "regression" if of in ("mae", "r2") else "binary_classification"
        model, truth = loaded[task]
        thr_text = ["0.123", "0.5", "0.3"][k % 3] if task == "binary_classification" else None
        filters = FILTERS[k % len(FILTERS)]
        payload = {"model": model, "of": of, "group_by": "b"}
        if thr_text:
            payload["threshold"] = thr_text
        r = _query(http, payload, a, b, 3_600_000, 100, filters, "label_settling")
        assert r.status_code == 200, r.get_json()
        table = r.get_json()[0]
        texts = [c["text"] for c in table["columns"]]
        assert texts == ["day", "predictions"] + [f"after {x}" for x in ("1h", "6h", "1d", "2d", "7d")] \
            + ["now"]
        first_day = (a // DAY_MS) * DAY_MS
        days = [first_day + i * DAY_MS for i in range(len(table["rows"]))]
        assert len(days) == 3 and days[-1] + DAY_MS >= b
        base = np.array([_matches(s, filters) for s in truth.segments])
        labeled = ~np.isnan(truth.label)
        thr = float(thr_text) if thr_text else 0.5
        for row, start in zip(table["rows"], days, strict=True):
            end = start + DAY_MS
            assert row[0] == _iso(start)[:10]
            sel = base & (truth.ts_ms > start) & (truth.ts_ms <= end)
            assert row[1] == int(sel.sum())
            for cell, lag in zip(row[2:], [3600_000, 6 * 3600_000, DAY_MS, 2 * DAY_MS, 7 * DAY_MS, None],
                                 strict=True):
                known = labeled if lag is None else labeled & (truth.label_ts_ms <= end + lag)
                expected = _expected(task, of, truth, sel, known, thr, {})
                assert oracle.close(cell, expected), (of, row[0], lag, cell, expected)
        # the column "after 6h" is the point at the day's end of the tumbling 1-day series with lag 6h
        series = _query(http, {**{k: v for k, v in payload.items() if k not in ("of", "group_by")},
                               "window": "1d", "mode": "tumbling", "as_of": "point", "lag": "6h"},
                        days[0] + DAY_MS, days[-1] + DAY_MS, DAY_MS, 100, filters, of).get_json()
        for (v, _), row in zip(series[0]["datapoints"], table["rows"], strict=True):
            assert (v is None and row[3] is None) or oracle.close(v, row[3]), (of, row[0], v, row[3])


def test_corrected_label_unknown_before_the_correction(http):
    """The store keeps the last label and its ts: a label corrected at 2 h, first sent at 10 min,
    is unknown at every point before 2 h (not its first value), known with the new value after.
    Feedback exactly at a point's time (or time + lag) counts at that point; early feedback
    (before its prediction) counts from the prediction's window on."""
    e = 1583020800000  # 2020-03-01T00:00:00Z
    assert http.post("/api/v1/models", json={"name": "e", "threshold": 0.5}).status_code == 201
    preds = [{"id": "a", "ts": e + 30_000, "score": 0.9}, {"id": "b", "ts": e + 60_000, "score": 0.2},
             {"id": "c", "ts": e + 90_000, "score": 0.8}, {"id": "d", "ts": e - 10_000, "score": 0.7}]
    assert http.post("/api/v1/predictions", json={"model": "e", "records": preds}).status_code == 200
    for fb in ([{"id": "a", "ts": e + 300_000, "label": 1}, {"id": "b", "ts": e + 600_000, "label": 1},
                {"id": "d", "ts": e - 3600_000, "label": 1}],
               [{"id": "b", "ts": e + 7200_000, "label": 0}]):  # the correction, later
        assert http.post("/api/v1/feedback", json={"model": "e", "records": fb}).status_code == 200

    def points(metric, **extra):
        payload = {"model": "e", "window": "1d", **extra}
        r = _query(http, payload, e, e + 3 * 3600_000, 300_000, 100, [], metric)
        assert r.status_code == 200, r.get_json()
        return {t - e: v for v, t in r.get_json()[0]["datapoints"]}

    count, acc = points("label_count", as_of="point"), points("accuracy", as_of="point")
    delay = points("label_delay", as_of="point")
    for dt, n in count.items():
        expected = 1 if dt < 300_000 else 2 if dt < 7200_000 else 3
        assert n == expected, (dt, n)
        assert acc[dt] == 1.0, (dt, acc[dt])  # b's first label (1, predicted 0) never counts
        assert delay[dt] == (-3590.0 if dt < 300_000 else (-3590 + 270) / 2 if dt < 7200_000 else 270.0)
    lagged = points("label_count", as_of="point", lag="1h")
    assert lagged[3600_000 - 300_000] == 2 and lagged[3600_000] == 3  # 7200 s <= t + 1 h
    fixed = points("label_count", as_of=_iso(e + 600_000))  # b's first version arrived then
    assert fixed[0] == 1 and {v for dt, v in fixed.items() if dt} == {2}
    latest = points("label_count")
    assert latest[0] == 1 and {v for dt, v in latest.items() if dt} == {3}
    # the flat endpoint (Infinity) takes the same parameters
    r = http.get(f"/api/v1/series?model=e&metric=label_count&window=1d&as_of=point&lag=1h"
                 f"&from={_iso(e)}&to={_iso(e + 3 * 3600_000)}&step=5m")
    assert r.status_code == 200, r.get_json()
    assert {row["time"] - e: row["value"] for row in r.get_json()} == lagged


def test_settling_null_until_the_lag_has_passed(http):
    import time

    now_ms = int(time.time() * 1000)
    assert http.post("/api/v1/models", json={"name": "n", "threshold": 0.5}).status_code == 201
    start = now_ms // DAY_MS * DAY_MS
    ts = max(start + 1000, now_ms - 60_000)
    assert http.post("/api/v1/predictions", json={"model": "n", "records": [
        {"id": "x", "ts": ts, "score": 0.9}]}).status_code == 200
    assert http.post("/api/v1/feedback", json={"model": "n", "records": [
        {"id": "x", "ts": ts, "label": 1}]}).status_code == 200
    r = _query(http, {"model": "n"}, start, ts + 1, 3_600_000, 100, [], "label_settling")
    [row] = r.get_json()[0]["rows"]
    assert row[:2] == [_iso(start)[:10], 1] and row[2:7] == [None] * 5 and row[7] == 1.0


@pytest.mark.parametrize("payload,field", [
    ({"as_of": "yesterday"}, "as_of"),
    ({"as_of": "point", "lag": "soon"}, "lag"),
    ({"lag": "6h"}, "lag"),
    ({"as_of": _iso(T0_MS), "lag": "1h"}, "lag"),
    ({"as_of": "1700-01-01T00:00:00Z"}, "as_of"),
])
def test_invalid_as_of_is_a_400_naming_the_field(http, payload, field):
    assert http.post("/api/v1/models", json={"name": "m", "threshold": 0.5}).status_code == 201
    for metric in ("accuracy", "roc_auc"):
        r = _query(http, {"model": "m", **payload}, T0_MS, T0_MS + 3600_000, 60_000, 100, [], metric)
        assert r.status_code == 400, r.get_json()
        body = r.get_json()
        assert field in body["message"] and body["errors"][0]["field"] == f"payload.{field}", body


def test_too_many_rows_is_a_400(http, monkeypatch):
    assert http.post("/api/v1/models", json={"name": "c", "threshold": 0.5}).status_code == 201
    preds = [{"id": f"p{i}", "ts": T0_MS + i * 60_000, "score": (i % 10) / 10} for i in range(120)]
    assert http.post("/api/v1/predictions", json={"model": "c", "records": preds}).status_code == 200
    monkeypatch.setattr(asof, "MAX_ASOF_ROWS", 100)
    for metric in ("accuracy", "roc_auc", "label_settling"):
        r = _query(http, {"model": "c", "window": "1d", "as_of": "point"}, T0_MS, T0_MS + SPAN_MS,
                   3_600_000, 100, [], metric)
        assert r.status_code == 400 and "more than 100" in r.get_json()["message"], r.get_json()
    r = _query(http, {"model": "c", "window": "1h", "as_of": "point"}, T0_MS, T0_MS + 3600_000,
               3_600_000, 100, [], "accuracy")
    assert r.status_code == 200  # 60 predictions in the windows of this range
