"""Every datapoint of random Grafana queries equals scikit-learn on rows chosen in plain Python.

Data: random predictions with segments, duplicates and moved predictions,
feedback that is late, missing, out of order, early (before its prediction)
or corrected; scores with ties, exact 0/1 and exact thresholds; timestamps on
minute boundaries. Queries: random metric, window, mode, threshold, range,
step, ad hoc filter and group_by, through the real Flask app on PostgreSQL.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from datasource import metrics as registry
from datasource import store
from datasource.records import FeedbackRows, PredictionRows
from tests import oracle

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

T0_MS = 1580515200000  # 2020-02-01T00:00:00Z
SPAN_MS = 36 * 3600 * 1000
WINDOWS = ["5m", "15m", "1h", "6h", "7m", "90s", "1d", "cumulative"]
INTERVALS_MS = [30_000, 60_000, 300_000, 600_000, 900_000, 3_600_000, 45_000]
THRESHOLDS = [None, None, "0.3", "0.5", "0.77", "0.123"]
FILTERS = [[], [], [{"key": "b", "operator": "=", "value": "x"}],
           [{"key": "b", "operator": "!=", "value": "y"}],
           [{"key": "v", "operator": "=~", "value": "1|3"}],
           [{"key": "b", "operator": "=", "value": "x"}, {"key": "v", "operator": "=", "value": "2"}]]


def _random_data(rng, task: str, n: int = 2500):
    """(predictions written in order, feedback written in order) with every awkward case."""
    preds, fbs = [], []
    for i in range(n):
        ts = T0_MS + int(rng.integers(0, SPAN_MS))
        if rng.random() < 0.05:
            ts -= ts % 60_000  # exactly on a minute boundary
        if task == "binary_classification":
            r = rng.random()
            score = (float(rng.choice([0.0, 1.0, 0.5, 0.3, 0.77])) if r < 0.08
                     else round(float(rng.random()), 2) if r < 0.4 else float(rng.random()))
        else:
            score = float(rng.normal(50, 10))
        seg = {"b": str(rng.choice(["x", "y", "z"], p=[0.5, 0.3, 0.2])), "v": str(rng.choice(["1", "2", "3"]))}
        if rng.random() < 0.03:
            seg = {"b": "x"}  # a segment set without v
        preds.append({"id": f"o{i}", "ts": ts, "score": score, "segments": seg})
    # duplicates: the same id re-sent, sometimes with a new score, time or segment
    for _ in range(n // 20):
        j = int(rng.integers(0, n))
        p = dict(preds[j])
        p["score"] = float(rng.random()) if task == "binary_classification" else float(rng.normal(50, 10))
        if rng.random() < 0.5:
            p["ts"] = T0_MS + int(rng.integers(0, SPAN_MS))
        preds.append(p)
    for p in preds[:n]:
        if rng.random() < 0.2:
            continue  # feedback never arrives
        delay = int(rng.exponential(3 * 3600 * 1000))
        label = (int(rng.random() < 0.3 + 0.5 * p["score"]) if task == "binary_classification"
                 else float(p["score"] + rng.normal(0, 5)) if rng.random() > 0.02 else 0.0)
        fbs.append({"id": p["id"], "ts": p["ts"] + delay, "label": label})
    for _ in range(n // 25):  # corrections
        f = dict(fbs[int(rng.integers(0, len(fbs)))])
        f["label"] = 1 - f["label"] if task == "binary_classification" else f["label"] + 1.0
        f["ts"] += 3600_000
        fbs.append(f)
    order = rng.permutation(len(fbs))  # out of order
    fbs = [fbs[k] for k in order]
    return preds, fbs


def _load(http, rng, task, model="m", threshold=None):
    body = {"name": model, "task": task}
    if threshold is not None:
        body["threshold"] = threshold
    assert http.post("/api/v1/models", json=body).status_code == 201
    preds, fbs = _random_data(rng, task)
    # Some feedback arrives before the predictions are written.
    early = fbs[: len(fbs) // 10]
    assert http.post("/api/v1/feedback", json={"model": model, "records": early}).status_code == 200
    for k in range(0, len(preds), 700):
        r = http.post("/api/v1/predictions", json={"model": model, "records": preds[k:k + 700]})
        assert r.status_code == 200, r.get_json()
    r = http.post("/api/v1/feedback", json={"model": model, "records": fbs[len(fbs) // 10:]})
    assert r.status_code == 200
    final_p = {p["id"]: p for p in preds}
    final_f = {}
    for f in early + fbs[len(fbs) // 10:]:
        final_f[f["id"]] = f
    return oracle.build_truth(final_p, final_f)


def _matches(seg: dict, filters: list) -> bool:
    for f in filters:
        have = seg.get(f["key"])
        if f["operator"] == "=" and have != f["value"]:
            return False
        if f["operator"] == "!=" and have == f["value"]:
            return False
        if f["operator"] == "=~" and (have is None or not re.fullmatch(f["value"], have)):
            return False
    return True


def _iso(ms: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _check_series(item, truth, rows_mask, metric, window, mode, thr, params, task, step_ms, failures, ctx):
    ts, score, label = truth.ts_ms[rows_mask], truth.score[rows_mask], truth.label[rows_mask]
    delay = (truth.label_ts_ms[rows_mask] - truth.ts_ms[rows_mask]) / 1000.0
    for value, t in item["datapoints"]:
        if window == "cumulative" and step_ms and t - step_ms >= truth.ts_ms.max():
            # a cumulative line ends one step after the model's latest prediction
            if value is not None:
                failures.append(f"{ctx} t={t}: got {value} past the latest data, expected a gap")
            continue
        if window == "cumulative":
            lo = -np.inf
        else:
            width = step_ms if mode == "tumbling" else {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}[
                window[-1]] * int(window[:-1])
            lo = t - width
        sel = (ts > lo) & (ts <= t)
        if task == "binary_classification":
            expected = oracle.classification(metric, label[sel], score[sel], delay[sel], thr, params)
        else:
            expected = oracle.regression(metric, label[sel], score[sel], delay[sel], params)
        if not oracle.close(value, expected):
            failures.append(f"{ctx} t={t}: got {value}, expected {expected}")


CLF_METRICS = [m.name for m in registry.REGISTRY.values()
               if registry.CLF in m.tasks and m.kind in ("partial", "raw") and m.source == "builtin"]
REG_METRICS = [m.name for m in registry.REGISTRY.values()
               if registry.REG in m.tasks and m.kind in ("partial", "raw") and m.source == "builtin"]


@pytest.mark.parametrize("task,metrics,n_queries", [
    ("binary_classification", CLF_METRICS + ["sklearn.f1_score", "sklearn.cohen_kappa_score"], 260),
    ("regression", REG_METRICS, 120),
])
def test_random_queries_match_sklearn(http, task, metrics, n_queries):
    rng = np.random.default_rng(7 if task == "regression" else 11)
    truth = _load(http, rng, task, threshold=0.5 if task == "binary_classification" else None)
    failures: list[str] = []
    points_checked = 0
    for k in range(n_queries):
        metric = metrics[k % len(metrics)]
        window = str(rng.choice(WINDOWS))
        mode = str(rng.choice(["sliding", "tumbling"]))
        thr_text = THRESHOLDS[int(rng.integers(0, len(THRESHOLDS)))] if task == "binary_classification" else None
        filters = FILTERS[int(rng.integers(0, len(FILTERS)))]
        group_by = "b" if rng.random() < 0.25 else None
        interval = int(rng.choice(INTERVALS_MS))
        a = T0_MS + int(rng.integers(-3600_000, SPAN_MS))
        b = min(a + int(rng.integers(10 * 60_000, 14 * 3600_000)), T0_MS + SPAN_MS + 3600_000)
        a += int(rng.integers(0, 1000))  # unaligned range bounds
        max_points = int(rng.choice([30, 80, 200]))
        payload = {"model": "m", "window": window, "mode": mode}
        params = {}
        if metric == "label_delay":
            params["quantile"] = float(rng.choice([0.5, 0.9, 0.25]))
            payload["quantile"] = str(params["quantile"])
        if metric == "estimation_error":
            params["of"] = str(rng.choice(["accuracy", "precision", "recall", "f1"]))
            payload["of"] = params["of"]
        if thr_text is not None:
            payload["threshold"] = thr_text
        if group_by:
            payload["group_by"] = group_by
        # A second target in the same request: targets share partials read once per request.
        other = metrics[int(rng.integers(0, len(metrics)))]
        body = {"range": {"from": _iso(a), "to": _iso(b)}, "intervalMs": interval, "maxDataPoints": max_points,
                "targets": [{"refId": "A", "target": metric, "payload": payload},
                            {"refId": "B", "target": other, "payload": payload}], "filters": filters}
        r = http.post("/query", json=body)
        ctx = f"[{metric} {window} {mode} thr={thr_text} filters={filters} group_by={group_by} int={interval}]"
        assert r.status_code == 200, (ctx, r.get_json())
        result = r.get_json()
        thr = float(thr_text) if thr_text else 0.5
        base = np.array([_matches(s, filters) for s in truth.segments])
        if not result:
            assert group_by, ctx
            continue
        times = [t for _, t in result[0]["datapoints"]]
        step_ms = times[1] - times[0] if len(times) > 1 else None
        assert len(times) <= max_points, ctx
        assert all(a <= t <= b for t in times), ctx
        if step_ms:
            assert all(t % step_ms == 0 for t in times) and np.all(np.diff(times) == step_ms), ctx
        elif mode == "tumbling" and times:
            continue  # a single tumbling point: its width is not observable from the answer
        for item in result:
            mask = base
            if group_by:
                value = item["target"].split(f"{group_by}=", 1)[1]
                mask = base & np.array([s.get(group_by, "(none)") == value for s in truth.segments])
            name = metric if item["refId"] == "A" else other
            _check_series(item, truth, mask, name, window, mode, thr, params, task, step_ms, failures,
                          f"{ctx} {item['refId']}={name}")
            points_checked += len(item["datapoints"])
    assert not failures, f"{len(failures)} of {points_checked} points differ:\n" + "\n".join(failures[:20])
    assert points_checked > 5000


def test_tables_match_sklearn(http):
    rng = np.random.default_rng(3)
    truth = _load(http, rng, "binary_classification", threshold=0.5)
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import confusion_matrix

    for k in range(25):
        a = T0_MS + int(rng.integers(0, SPAN_MS // 2)) + int(rng.integers(0, 2)) * 17
        b = a + int(rng.integers(3600_000, SPAN_MS))
        thr = float(rng.choice([0.5, 0.3, 0.65]))
        body = {"range": {"from": _iso(a), "to": _iso(b)}, "intervalMs": 60_000, "maxDataPoints": 100,
                "targets": [{"refId": "A", "target": "confusion_matrix", "payload": {"model": "m", "threshold": str(thr)}},
                            {"refId": "B", "target": "calibration", "payload": {"model": "m"}}]}
        r = http.post("/query", json=body)
        assert r.status_code == 200
        cm_table, cal_table = r.get_json()
        sel = (truth.ts_ms > a) & (truth.ts_ms <= b) & ~np.isnan(truth.label)
        y, s = truth.label[sel].astype(int), truth.score[sel]
        tn, fp, fn, tp = confusion_matrix(y, (s >= thr).astype(int), labels=[0, 1]).ravel()
        assert cm_table["rows"][0][1:3] == [tn, fp] and cm_table["rows"][1][1:3] == [fn, tp], k
        prob_true, prob_pred = calibration_curve(y, s, n_bins=10)
        rows = [row for row in cal_table["rows"] if row[5] > 0]
        np.testing.assert_allclose([row[4] for row in rows], prob_true, rtol=1e-9)
        np.testing.assert_allclose([row[3] for row in rows], prob_pred, rtol=1e-9)
        assert sum(row[5] for row in cal_table["rows"]) == len(y)


def test_merged_partials_equal_metric_of_union(conn):
    """finalize(partials(A) + partials(B)) == metric(A ∪ B) for every partial metric."""
    from datasource import ingest

    ingest.register_model(conn, {"name": "m", "threshold": 0.5})
    rng = np.random.default_rng(5)
    preds, fbs = _random_data(rng, "binary_classification", n=800)
    model = store.get_model(conn, "m")
    from datasource.records import parse_feedback, parse_predictions

    p_rows: PredictionRows = parse_predictions(preds, model.task, 10**6)
    f_rows: FeedbackRows = parse_feedback(fbs, model.task, 10**6)
    store.write_predictions(conn, model, p_rows)
    store.write_feedback(conn, model, f_rows)
    truth = oracle.build_truth({p["id"]: p for p in preds}, {f["id"]: f for f in fbs})
    cut = (T0_MS + SPAN_MS // 3) // 1000
    everything = 10**10
    for thr in (0.5, 0.42):
        parts = [store.partials_by_bucket(conn, model, g_s=everything, lo_s=lo, hi_s=hi, segset_ids=None,
                                          by_segset=False, threshold=thr, from_rollup=False)
                 for lo, hi in ((None, cut), (cut, everything))]
        merged = {c: np.array([sum(float(p[c].sum()) for p in parts)]) for c in store.PARTIALS}
        for m in registry.REGISTRY.values():
            if m.kind != "partial" or registry.CLF not in m.tasks:
                continue
            got = float(m.finalize(merged)[0])
            exp = oracle.classification(m.name, truth.label, truth.score, None, thr, {})
            assert oracle.close(None if np.isnan(got) else got, exp), (m.name, thr, got, exp)


# ----------------------------------------------------------------------- ROC AUC, all windows at once


def _random_scores(rng, n: int):
    """Scores with every kind of tie: continuous, rounded, a few values with exact 0 and 1, all
    equal, -0.0 beside 0.0 (equal scores), and scores outside [0, 1] (logits: ranked otherwise)."""
    kind = int(rng.integers(0, 7))
    if kind == 5:
        return rng.choice([-0.0, 0.0, 0.25, 1.0], n)
    if kind == 6:
        return np.round(rng.normal(0.0, 3.0, n), int(rng.integers(0, 3)))
    if kind == 0:
        return rng.random(n)
    if kind == 1:
        return np.round(rng.random(n), int(rng.integers(1, 3)))
    if kind == 2:
        return rng.choice([0.0, 1.0, 0.5, 0.3, 0.77], n)
    if kind == 3:
        return np.full(n, 0.42)
    return np.where(rng.random(n) < 0.5, rng.random(n), np.round(rng.random(n), 2))


def _random_windows(rng, n: int):
    """[lo, hi) row bounds as the engine cuts them (sliding at any width and step, tumbling) or
    arbitrary (overlapping, out of order, empty)."""
    kind = int(rng.integers(0, 3))
    if kind == 2:
        a, b = rng.integers(0, n + 1, (2, int(rng.integers(1, 80))))
        return np.minimum(a, b), np.maximum(a, b)
    ts = np.sort(rng.uniform(0, 1000, n))
    step = float(rng.choice([7.0, 10.0, 25.0, 60.0]))
    width = step if kind == 1 else float(rng.choice([step, 3 * step, 12 * step, 2.5 * step, 33.0, 150.0]))
    points = np.arange(float(rng.integers(-50, 100)), 1100.0, step)
    return np.searchsorted(ts, points - width, side="right"), np.searchsorted(ts, points, side="right")


def test_batch_ranking_metrics_equal_sklearn_on_every_window():
    """The batch ROC AUC and average precision of each window equal scikit-learn's roc_auc_score
    and average_precision_score on that window's rows (NaN where undefined: one class, or no
    positive), over random data with ties and random windows."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(23)
    checked = undefined = 0
    for trial in range(150):
        n = int(rng.integers(0, 400))
        score = _random_scores(rng, n)
        label = (rng.random(n) < rng.choice([0.0, 0.05, 0.5, 0.9, 1.0])).astype(np.float64)
        lo, hi = _random_windows(rng, n)
        auc = registry.windowed_roc_auc(label, score, lo, hi)
        ap = registry.windowed_average_precision(label, score, lo, hi)
        assert auc.shape == ap.shape == lo.shape
        for k, (a, b) in enumerate(zip(lo, hi, strict=True)):
            y, s = label[a:b], score[a:b]
            if y.sum() == 0:
                assert np.isnan(ap[k]), (trial, k, ap[k])
            else:
                assert abs(ap[k] - average_precision_score(y, s)) <= 1e-12, (trial, k, ap[k])
            if len(set(y)) < 2:
                assert np.isnan(auc[k]), (trial, k, auc[k])
                undefined += 1
                continue
            expected = roc_auc_score(y, s)
            assert abs(auc[k] - expected) <= 1e-12, (trial, k, auc[k], expected)
            checked += 1
    assert checked > 2000 and undefined > 150


def _count_batched_windows(monkeypatch, name: str = "roc_auc") -> list[int]:
    """Wrap a metric's batch function (the real one runs) to record how many windows each call
    evaluates."""
    from dataclasses import replace

    calls: list[int] = []
    real = registry.REGISTRY[name]

    def windows(y_true, y_score, lo_idx, hi_idx):
        calls.append(len(lo_idx))
        return real.windows(y_true, y_score, lo_idx, hi_idx)

    monkeypatch.setitem(registry.REGISTRY, name, replace(real, windows=windows))
    return calls


ROC_WINDOWS = ["5m", "15m", "1h", "6h", "7m", "90s", "13m", "2h", "1d"]


@pytest.mark.parametrize("metric", ["roc_auc", "average_precision"])
def test_ranking_panels_match_sklearn(http, monkeypatch, metric):
    """Sliding and tumbling ROC AUC and average precision panels (the batch path) at random
    windows, steps, filters and group-bys: every point equals scikit-learn on the window's
    labeled rows (data with ties, late, missing and corrected labels)."""
    calls = _count_batched_windows(monkeypatch, metric)
    rng = np.random.default_rng(29)
    truth = _load(http, rng, "binary_classification", threshold=0.5)
    failures: list[str] = []
    checked = 0
    for _ in range(40):
        window, mode = str(rng.choice(ROC_WINDOWS)), str(rng.choice(["sliding", "sliding", "tumbling"]))
        filters = FILTERS[int(rng.integers(0, len(FILTERS)))]
        group_by = "v" if rng.random() < 0.3 else None
        interval = int(rng.choice(INTERVALS_MS + [20_000, 420_000]))
        a = T0_MS + int(rng.integers(-3600_000, SPAN_MS)) + int(rng.integers(0, 1000))
        b = min(a + int(rng.integers(3600_000, 30 * 3600_000)), T0_MS + SPAN_MS + 3600_000)
        payload = {"model": "m", "window": window, "mode": mode, **({"group_by": group_by} if group_by else {})}
        body = {"range": {"from": _iso(a), "to": _iso(b)}, "intervalMs": interval,
                "maxDataPoints": int(rng.choice([100, 300, 600])), "filters": filters,
                "targets": [{"refId": "A", "target": metric, "payload": payload}]}
        r = http.post("/query", json=body)
        ctx = f"[{window} {mode} filters={filters} group_by={group_by} int={interval}]"
        assert r.status_code == 200, (ctx, r.get_json())
        base = np.array([_matches(s, filters) for s in truth.segments])
        for item in r.get_json():
            times = [t for _, t in item["datapoints"]]
            step_ms = times[1] - times[0] if len(times) > 1 else None
            if mode == "tumbling" and step_ms is None:
                continue
            mask = base
            if group_by:
                value = item["target"].split(f"{group_by}=", 1)[1]
                mask = base & np.array([s.get(group_by, "(none)") == value for s in truth.segments])
            _check_series(item, truth, mask, metric, window, mode, 0.5, {}, "binary_classification",
                          step_ms, failures, ctx)
            checked += len(item["datapoints"])
    assert not failures, f"{len(failures)} of {checked} points differ:\n" + "\n".join(failures[:20])
    assert checked > 7000 and sum(calls) > 0.9 * checked, (checked, sum(calls))  # the batch path ran


def test_roc_auc_batch_recomputes_only_the_windows_a_write_touched(http, monkeypatch):
    """The per-point cache still holds for the batch path: a repeated panel evaluates no window,
    and after a new labeled prediction only the windows holding its minute are evaluated
    again; every point still equals scikit-learn on the rows as they are now."""
    calls = _count_batched_windows(monkeypatch)
    rng = np.random.default_rng(31)
    truth = _load(http, rng, "binary_classification", threshold=0.5)
    a, b = T0_MS + 2 * 3600_000, T0_MS + 14 * 3600_000
    body = {"range": {"from": _iso(a), "to": _iso(b)}, "intervalMs": 300_000, "maxDataPoints": 1000,
            "targets": [{"refId": "A", "target": "roc_auc", "payload": {"model": "m", "window": "1h"}}]}
    first = http.post("/query", json=body).get_json()
    assert sum(calls) == len(first[0]["datapoints"]) == 145
    calls.clear()
    assert http.post("/query", json=body).get_json() == first and calls == []
    late = {"id": "late", "ts": a + 5 * 3600_000 + 17_000, "score": 0.61, "segments": {"b": "x", "v": "1"}}
    assert http.post("/api/v1/predictions", json={"model": "m", "records": [late]}).status_code == 200
    assert http.post("/api/v1/feedback", json={"model": "m", "records": [
        {"id": "late", "ts": late["ts"] + 60_000, "label": 1}]}).status_code == 200
    truth.ts_ms, truth.score = np.append(truth.ts_ms, late["ts"]), np.append(truth.score, late["score"])
    truth.label, truth.label_ts_ms = np.append(truth.label, 1.0), np.append(truth.label_ts_ms, late["ts"] + 60_000)
    truth.segments.append(late["segments"])
    second = http.post("/query", json=body).get_json()
    minute_end = -(-late["ts"] // 60_000) * 60_000
    touched = [t for _, t in first[0]["datapoints"] if t - 3600_000 < minute_end <= t]
    assert sum(calls) == len(touched) == 12
    failures: list[str] = []
    _check_series(second[0], truth, np.ones(len(truth.ts_ms), bool), "roc_auc", "1h", "sliding", 0.5, {},
                  "binary_classification", 300_000, failures, "after the write")
    assert not failures, "\n".join(failures[:20])
    changed = [t for (v1, t), (v2, _) in zip(first[0]["datapoints"], second[0]["datapoints"], strict=True)
               if v1 != v2]
    assert changed and set(changed) <= set(touched)
