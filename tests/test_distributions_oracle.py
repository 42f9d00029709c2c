"""Distribution and drift metrics against numpy/scipy on rows chosen in plain Python.

Random and adversarial data (ties, a constant column, missing features, NaN,
single-row and empty windows), random windows/ranges/filters, through the real
app on PostgreSQL; and every bad payload gets a 400.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from scipy.spatial.distance import jensenshannon

from tests.test_metrics_oracle import _iso

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

T0_MS = 1580515200000
SPAN_MS = 24 * 3600 * 1000
FEATURES = ("f_norm", "f_ties", "f_const", "f_sparse")


def _row_features(rng, shifted: bool) -> dict:
    f = {"f_norm": float(rng.normal(1.0 if shifted else 0.0, 1.0)),
         "f_ties": float(rng.integers(0, 6 if shifted else 4)),
         "f_const": 3.0}
    if rng.random() < 0.6:
        f["f_sparse"] = float(rng.exponential(2.0))
    elif rng.random() < 0.5:
        f["f_sparse"] = None  # sent as null
    return f


@pytest.fixture
def data(http):
    rng = np.random.default_rng(21)
    assert http.post("/api/v1/models", json={"name": "m"}).status_code == 201
    preds = []
    for i in range(1500):
        ts = T0_MS + int(rng.integers(0, SPAN_MS))
        shifted = ts > T0_MS + SPAN_MS // 2
        preds.append({"id": f"o{i}", "ts": ts, "score": round(float(rng.beta(2, 5 if shifted else 2)), 3),
                      "segments": {"b": str(rng.choice(["x", "y", "z"], p=[0.2, 0.3, 0.5] if shifted else [0.5, 0.3, 0.2]))},
                      "features": _row_features(rng, shifted)})
    for k in range(0, len(preds), 500):
        assert http.post("/api/v1/predictions", json={"model": "m", "records": preds[k:k + 500]}).status_code == 200
    ref_rows = [_row_features(rng, False) for _ in range(800)]
    reference = {f: [r.get(f) for r in ref_rows] for f in FEATURES}
    reference["score"] = [round(float(rng.beta(2, 2)), 3) for _ in range(800)]
    reference["b"] = [str(rng.choice(["x", "y", "z"], p=[0.5, 0.3, 0.2])) for _ in range(800)]
    r = http.post("/api/v1/references", json={"model": "m", "name": "training", "columns": reference})
    assert r.status_code == 201, r.get_json()
    return preds, reference


def _column(preds, name):
    if name == "score":
        return np.array([p["score"] for p in preds], float)
    if name == "b":
        return np.array([p["segments"]["b"] for p in preds], object)
    return np.array([np.nan if p["features"].get(name) is None else p["features"][name] for p in preds], float)


def _psi(cur, ref, eps=1e-4):
    """Window and reference proportions: per value when the reference has at most 10 distinct
    values, else per reference decile bin (q_k-1, q_k]."""
    if len(set(ref.tolist())) <= 10:
        values = sorted(set(ref.tolist()) | set(cur.tolist()))
        return (np.array([np.sum(cur == v) for v in values], float) / len(cur),
                np.array([np.sum(ref == v) for v in values], float) / len(ref))
    inner = np.unique(np.percentile(ref, [10, 20, 30, 40, 50, 60, 70, 80, 90]))
    bounds = [-np.inf, *inner, np.inf]

    def props(x):
        return np.array([np.sum((x > lo) & (x <= hi)) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)],
                        float) / len(x)

    return props(cur), props(ref)


def expected(metric, values, ref, q):
    """numpy/scipy on one window. ``values`` may hold NaN (missing) for numeric columns."""
    if values.dtype == object:
        cur = [v for v in values if isinstance(v, str)]
        if not cur:
            return np.nan
        cats = sorted(set(cur) | set(ref))
        c = np.array([cur.count(k) for k in cats], float)
        r = np.array([list(ref).count(k) for k in cats], float)
        if metric == "psi":
            pc, pr = np.maximum(c / c.sum(), 0) , r / r.sum()
            pc, pr = np.where(pc > 0, pc, 1e-4), np.where(pr > 0, pr, 1e-4)
            return float(np.sum((pc - pr) * np.log(pc / pr)))
        if len(cats) < 2:
            return 0.0 if metric == "chi2_statistic" else 1.0
        res = stats.chi2_contingency(np.vstack([c, r]), correction=False)
        return float(res[0] if metric == "chi2_statistic" else res[1])
    n = len(values)
    present = values[~np.isnan(values)]
    if metric == "missing_rate":
        return (n - len(present)) / n if n else np.nan
    if len(present) == 0:
        return np.nan
    ref = np.asarray(ref, float)
    ref = ref[~np.isnan(ref)]
    match metric:
        case "mean":
            return float(np.mean(present))
        case "std":
            return float(np.std(present))
        case "min":
            return float(present.min())
        case "max":
            return float(present.max())
        case "quantile":
            return float(np.quantile(present, q))
        case "ks_statistic":
            return float(stats.ks_2samp(present, ref).statistic)
        case "ks_pvalue":
            return float(stats.ks_2samp(present, ref).pvalue)
        case "wasserstein":
            return float(stats.wasserstein_distance(present, ref))
        case "js_distance":
            pc, pr = _psi(present, ref)
            return float(jensenshannon(pc, pr, base=2))
        case "psi":
            pc, pr = _psi(present, ref)
            pc, pr = np.where(pc > 0, pc, 1e-4), np.where(pr > 0, pr, 1e-4)
            return float(np.sum((pc - pr) * np.log(pc / pr)))
    raise KeyError(metric)


def _close(got, exp):
    if got is None:
        return bool(np.isnan(exp))
    return not np.isnan(exp) and abs(got - exp) <= 1e-9 * max(1.0, abs(exp))


NUMERIC = ["mean", "std", "min", "max", "quantile", "missing_rate", "ks_statistic", "ks_pvalue", "psi",
           "wasserstein", "js_distance"]


def test_random_distribution_queries_match_numpy_and_scipy(http, data):
    preds, reference = data
    rng = np.random.default_rng(8)
    ts = np.array([p["ts"] for p in preds])
    seg_b = np.array([p["segments"]["b"] for p in preds])
    failures, checked = [], 0
    for k in range(140):
        categorical = k % 7 == 6
        metric = str(rng.choice(["chi2_statistic", "chi2_pvalue", "psi"])) if categorical else NUMERIC[k % len(NUMERIC)]
        column = "b" if categorical else str(rng.choice(["score", *FEATURES]))
        window = str(rng.choice(["5m", "1h", "6h", "cumulative", "2m"]))
        mode = str(rng.choice(["sliding", "tumbling"]))
        a = T0_MS + int(rng.integers(-1800_000, SPAN_MS)) + 333
        b = a + int(rng.integers(30 * 60_000, 12 * 3600_000))
        interval = int(rng.choice([60_000, 300_000, 900_000, 20_000]))
        q = float(rng.choice([0.5, 0.9, 0.01]))
        use_range_ref = rng.random() < 0.2 and not categorical
        ref_spec = f"{T0_MS}/{T0_MS + 6 * 3600_000}" if use_range_ref else "training"
        filt = [{"key": "b", "operator": "!=", "value": "z"}] if rng.random() < 0.3 and not categorical else []
        payload = {"model": "m", "column": column, "window": window, "mode": mode, "quantile": str(q),
                   "reference": ref_spec}
        body = {"range": {"from": _iso(a), "to": _iso(b)}, "intervalMs": interval, "maxDataPoints": 60,
                "targets": [{"refId": "A", "target": metric, "payload": payload}], "filters": filt}
        r = http.post("/query", json=body)
        ctx = f"[{metric} {column} {window} {mode} ref={ref_spec} filter={filt}]"
        assert r.status_code == 200, (ctx, r.get_json())
        sel_rows = np.ones(len(preds), bool) if not filt else seg_b != "z"
        values = _column(preds, column)[sel_rows]
        t_sel = ts[sel_rows]
        if use_range_ref:  # a time-range reference is filtered like the window
            ref_mask = (ts > T0_MS) & (ts <= T0_MS + 6 * 3600_000) & sel_rows
            ref = _column(preds, column)[ref_mask]
            ref = ref[~np.isnan(ref)]
        else:
            ref = reference[column]
            ref = [np.nan if v is None else v for v in ref] if column != "b" else ref
        points = r.get_json()[0]["datapoints"]
        step = points[1][1] - points[0][1] if len(points) > 1 else None
        for value, t in points:
            if window == "cumulative" and step and t - step >= ts.max():
                # a cumulative line ends one step after the model's latest prediction
                if value is not None:
                    failures.append(f"{ctx} t={t}: got {value} past the latest data")
                continue
            if window == "cumulative":
                lo = -np.inf
            elif mode == "tumbling":
                if step is None:
                    continue
                lo = t - step
            else:
                lo = t - int(window[:-1]) * (60_000 if window[-1] == "m" else 3_600_000)
            exp = expected(metric, values[(t_sel > lo) & (t_sel <= t)], ref, q)
            checked += 1
            if not _close(value, exp):
                failures.append(f"{ctx} t={t}: got {value}, expected {exp}")
    assert not failures, f"{len(failures)} of {checked} differ:\n" + "\n".join(failures[:15])
    assert checked > 2000


def test_histogram_heatmap_and_table(http, data):
    preds, _ = data
    ts = np.array([p["ts"] for p in preds])
    for column, bins in (("score", None), ("f_norm", 7), ("f_const", None), ("f_sparse", None)):
        a, b = T0_MS + 3600_000, T0_MS + 9 * 3600_000
        payload = {"model": "m", "column": column, "window": "1h"}
        if bins:
            payload["bins"] = str(bins)
        body = {"range": {"from": _iso(a), "to": _iso(b)}, "intervalMs": 1800_000, "maxDataPoints": 100,
                "targets": [{"refId": "A", "target": "histogram", "payload": payload},
                            {"refId": "B", "target": "histogram", "payload": {**payload, "format": "table"}}]}
        out = http.post("/query", json=body).get_json()
        vals = _column(preds, column)
        in_range = vals[(ts > a) & (ts <= b)]
        in_range = in_range[~np.isnan(in_range)]
        edges = np.histogram_bin_edges(in_range, bins=bins or "fd")
        if len(edges) > 201:
            edges = np.histogram_bin_edges(in_range, bins=200)
        series = [s for s in out if s["refId"] == "A"]
        table = next(s for s in out if s["refId"] == "B")
        assert [s["target"] for s in series] == [f"{e:.6g}" for e in edges[1:]], column
        assert [row[3] for row in table["rows"]] == np.histogram(in_range, edges)[0].tolist()
        for p_idx, (_, t) in enumerate(series[0]["datapoints"]):
            window = vals[(ts > t - 3600_000) & (ts <= t)]
            counts = np.histogram(window[~np.isnan(window)], edges)[0]
            assert [s["datapoints"][p_idx][0] for s in series] == counts.tolist(), (column, t)


def test_drift_ranking_table(http, data):
    preds, reference = data
    a, b = T0_MS + SPAN_MS // 2, T0_MS + SPAN_MS
    body = {"range": {"from": _iso(a), "to": _iso(b)}, "intervalMs": 60_000, "maxDataPoints": 100,
            "targets": [{"refId": "A", "target": "drift_ranking", "payload": {"model": "m"}}]}
    table = http.post("/query", json=body).get_json()[0]
    names = [c["text"] for c in table["columns"]]
    rows = {row[0]: dict(zip(names, row, strict=True)) for row in table["rows"]}
    assert set(rows) == {"score", *FEATURES, "b"}
    ts = np.array([p["ts"] for p in preds])
    for col, row in rows.items():
        vals = _column(preds, col)[(ts > a) & (ts <= b)]
        ref = reference[col] if col == "b" else [np.nan if v is None else v for v in reference[col]]
        exp = expected("psi", vals, ref, 0.5)
        assert _close(row["psi"], exp), (col, row["psi"], exp)
        if col != "b":
            assert _close(row["ks_statistic"], expected("ks_statistic", vals, ref, 0.5))
    psis = [row[names.index("psi")] for row in table["rows"]]
    assert psis == sorted(psis, reverse=True)
    assert table["rows"][0][0] in ("f_norm", "score", "b", "f_ties")  # the shifted columns lead


def test_drift_ranking_is_cached_until_a_write_touches_its_range(http, data, monkeypatch):
    """A table over a closed range is computed once per write revision of the range: a write
    into the range or a new reference recomputes it, a write outside does not."""
    from datasource import engine

    preds, reference = data
    a, b = T0_MS + SPAN_MS // 2, T0_MS + SPAN_MS
    calls = []
    real = engine._drift_table
    monkeypatch.setattr(engine, "_drift_table", lambda *args: calls.append(1) or real(*args))
    body = {"range": {"from": _iso(a), "to": _iso(b)}, "intervalMs": 60_000, "maxDataPoints": 100,
            "targets": [{"refId": "A", "target": "drift_ranking", "payload": {"model": "m"}}]}

    def ranking():
        return {row[0]: row[3] for row in http.post("/query", json=body).get_json()[0]["rows"]}

    first = ranking()
    assert ranking() == first and len(calls) == 1
    outside = {"id": "later", "ts": b + 3600_000, "score": 0.5, "segments": {"b": "x"}, "features": {}}
    assert http.post("/api/v1/predictions", json={"model": "m", "records": [outside]}).status_code == 200
    assert ranking() == first and len(calls) == 1
    ts = np.array([p["ts"] for p in preds])
    inside = dict(preds[int(np.flatnonzero((ts > a) & (ts <= b))[0])])
    inside["score"] = 0.999  # a correction of one prediction in the range
    assert http.post("/api/v1/predictions", json={"model": "m", "records": [inside]}).status_code == 200
    second = ranking()
    assert len(calls) == 2 and second != first
    vals = np.array([p["score"] if p["id"] != inside["id"] else 0.999 for p in preds])[(ts > a) & (ts <= b)]
    assert _close(second["score"], expected("psi", vals, reference["score"], 0.5))
    changed = {**reference, "score": [min(1.0, v + 0.1) for v in reference["score"]]}
    assert http.post("/api/v1/references", json={"model": "m", "name": "training",
                                                 "columns": changed}).status_code == 201
    third = ranking()
    assert len(calls) == 3
    assert _close(third["score"], expected("psi", vals, changed["score"], 0.5))


def test_viewers_asking_at_once_share_one_computation(app, data, monkeypatch):
    """Requests of one process for the same table while it is being computed wait for that
    computation instead of each computing it (cached_table's in-flight entries); all get the
    same ranking."""
    import threading
    import time

    from datasource import engine

    a, b = T0_MS + SPAN_MS // 2, T0_MS + SPAN_MS
    calls = []
    real = engine._drift_table

    def slow(*args):
        calls.append(1)
        time.sleep(0.3)  # long enough for the other viewers to arrive meanwhile
        return real(*args)

    monkeypatch.setattr(engine, "_drift_table", slow)
    body = {"range": {"from": _iso(a), "to": _iso(b)}, "intervalMs": 60_000, "maxDataPoints": 100,
            "targets": [{"refId": "A", "target": "drift_ranking", "payload": {"model": "m"}}]}
    answers, start = [], threading.Barrier(4)

    def viewer():
        client = app.test_client()
        start.wait()
        answers.append(client.post("/query", json=body).get_json()[0]["rows"])

    threads = [threading.Thread(target=viewer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(answers) == 4 and all(rows == answers[0] for rows in answers)
    assert len(calls) == 1


def test_single_row_and_empty_windows(http, data):
    preds, _ = data
    first = min(p["ts"] for p in preds)
    t = -(-first // 60_000) * 60_000  # the minute that holds only the first prediction (or few)
    body = {"range": {"from": _iso(t - 3 * 60_000), "to": _iso(t)}, "intervalMs": 60_000, "maxDataPoints": 10,
            "targets": [{"refId": "A", "target": "std", "payload": {"model": "m", "column": "f_norm", "window": "1m"}},
                        {"refId": "B", "target": "ks_pvalue", "payload": {"model": "m", "column": "score", "window": "1m"}}]}
    out = http.post("/query", json=body).get_json()
    assert [v for v, _ in out[0]["datapoints"][:3]] == [None, None, None]  # empty windows are gaps
    in_last = [p for p in preds if t - 60_000 < p["ts"] <= t]
    exp = float(np.std([p["features"]["f_norm"] for p in in_last]))
    assert _close(out[0]["datapoints"][-1][0], exp)


@pytest.mark.parametrize("change,words", [
    ({"column": "nope"}, "unknown column"),
    ({"target": "quantile", "quantile": "1.5"}, "quantile"),
    ({"target": "quantile", "quantile": "0"}, "quantile"),
    ({"target": "histogram", "bins": "0"}, "bins"),
    ({"target": "histogram", "bins": "-3"}, "bins"),
    ({"target": "histogram", "bins": "100000000"}, "bins"),
    ({"target": "histogram", "bins": "many"}, "bins"),
    ({"target": "histogram", "format": "svg"}, "format"),
    ({"target": "ks_statistic", "reference": "2010-01-01T00:00:00Z/2010-02-01T00:00:00Z"}, "no data"),
    ({"target": "ks_statistic", "reference": "last-week"}, "no column"),
    ({"target": "chi2_statistic", "column": "f_norm"}, "segment column"),
    ({"target": "ks_statistic", "column": "b"}, "numeric column"),
])
def test_bad_distribution_payloads(http, data, change, words):
    target = change.pop("target", "mean")
    payload = {"model": "m", "column": "f_norm", "window": "1h", **change}
    body = {"range": {"from": _iso(T0_MS), "to": _iso(T0_MS + 3600_000)}, "intervalMs": 60_000, "maxDataPoints": 100,
            "targets": [{"refId": "A", "target": target, "payload": payload}]}
    r = http.post("/query", json=body)
    assert r.status_code == 400, r.get_json()
    assert words in r.get_json()["message"]
