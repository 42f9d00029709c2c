"""CBPE with an isotonic calibrator (payload calibration=isotonic) against an independent
implementation written here from NannyML's formulas: scikit-learn's IsotonicRegression fitted
on the reference's rows (each score replaced by its 0.01 bin, the server's documented choice),
applied row by row to the window's predictions, labeled or not:
E[TP] = Σ_{ŷ=1} p̃, E[FP] = Σ_{ŷ=1} (1 - p̃), E[FN] = Σ_{ŷ=0} p̃, E[TN] = Σ_{ŷ=0} (1 - p̃).
Random windows, grid thresholds, filters and group-bys; a stored labeled reference and a
labeled time range of the model's own predictions; and, on miscalibrated scores, the
calibrated estimate converges to the realized accuracy where the uncalibrated one does not.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.isotonic import IsotonicRegression
from sklearn.metrics import roc_auc_score

from tests import oracle
from tests.test_metrics_oracle import FILTERS, SPAN_MS, T0_MS, _iso, _load, _matches

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

EDGES = np.arange(101) / 100.0


def bin_of(s):
    return np.searchsorted(EDGES, s, side="right") - 1


def calibrated(ref_s, ref_y, s):
    if len(s) == 0:
        return np.empty(0)
    iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(bin_of(ref_s), ref_y)
    return iso.predict(bin_of(s))


def expected(metric, p, s, thr):
    if len(s) == 0:
        return oracle.NAN
    if metric == "estimated_roc_auc":
        y = np.r_[np.ones(len(s)), np.zeros(len(s))]
        w = np.r_[p, 1 - p]
        if w[: len(s)].sum() <= 0 or w[len(s):].sum() <= 0:
            return oracle.NAN
        return float(roc_auc_score(y, np.r_[bin_of(s), bin_of(s)], sample_weight=w))
    pos = s >= thr
    tp, fp = p[pos].sum(), (1 - p[pos]).sum()
    fn, tn = p[~pos].sum(), (1 - p[~pos]).sum()
    if metric == "estimated_accuracy":
        return (tp + tn) / (tp + fp + fn + tn)
    if metric == "estimated_precision":
        return tp / (tp + fp) if tp + fp else oracle.NAN
    if metric == "estimated_recall":
        return tp / (tp + fn) if tp + fn else oracle.NAN
    return 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else oracle.NAN


def test_isotonic_estimates_match_the_formulas(http):
    rng = np.random.default_rng(17)
    truth = _load(http, rng, "binary_classification", threshold=0.5)
    ref_s = rng.random(3000) ** 2
    ref_y = (rng.random(3000) < np.sqrt(ref_s)).astype(int)  # scores miscalibrated: p = sqrt(s)
    r = http.post("/api/v1/references", json={"model": "m", "name": "jan", "columns": {
        "score": ref_s.tolist(), "label": ref_y.astype(float).tolist()}})
    assert r.status_code == 201, r.get_json()
    lab = ~np.isnan(truth.label)
    cut_lo, cut_hi = T0_MS // 60_000 * 60, (T0_MS + SPAN_MS // 2) // 60_000 * 60  # whole minutes, s
    in_range = lab & (truth.ts_ms / 1000 > cut_lo) & (truth.ts_ms / 1000 <= cut_hi)
    sources = {"jan": (ref_s, ref_y),
               f"{cut_lo * 1000}/{cut_hi * 1000}": (truth.score[in_range], truth.label[in_range])}
    metrics = ["estimated_accuracy", "estimated_precision", "estimated_recall", "estimated_f1",
               "estimated_roc_auc", "estimation_error"]
    windows = [("1h", 300_000), ("6h", 3_600_000), ("cumulative", 3_600_000), ("1d", 3_600_000)]
    failures, checked = [], 0
    for k in range(36):
        metric = metrics[k % len(metrics)]
        of = str(rng.choice(["accuracy", "precision", "recall", "f1"]))
        reference = list(sources)[k % 2]
        window, interval = windows[int(rng.integers(0, len(windows)))]
        thr_text = str(rng.choice(["0.5", "0.3", "0.62", "0.05"]))
        filters = FILTERS[int(rng.integers(0, len(FILTERS)))]
        group_by = "b" if rng.random() < 0.3 else None
        a = T0_MS + int(rng.integers(-3600_000, SPAN_MS // 2))
        b = a + int(rng.integers(6 * 3600_000, 30 * 3600_000))
        payload = {"model": "m", "window": window, "threshold": thr_text,
                   "calibration": "isotonic", "reference": reference}
        if metric == "estimated_roc_auc":
            payload["method"] = "binned"
        if metric == "estimation_error":
            payload["of"] = of
        if group_by:
            payload["group_by"] = group_by
        body = {"range": {"from": _iso(a), "to": _iso(b)}, "intervalMs": interval,
                "maxDataPoints": 100, "filters": filters,
                "targets": [{"refId": "A", "target": metric, "payload": payload}]}
        r = http.post("/query", json=body)
        assert r.status_code == 200, r.get_json()
        ref_scores, ref_labels = sources[reference]
        for item in r.get_json():
            mask = np.array([_matches(s, filters) for s in truth.segments])
            if group_by:
                value = item["target"].split(f"{group_by}=", 1)[1]
                mask &= np.array([s.get(group_by, "(none)") == value for s in truth.segments])
            ts, s, y = truth.ts_ms[mask], truth.score[mask], truth.label[mask]
            times = [t for _, t in item["datapoints"]]
            step = times[1] - times[0] if len(times) > 1 else interval
            width = np.inf if window == "cumulative" else {"h": 3_600_000, "d": 86_400_000}[window[-1]] * int(window[:-1])
            for value, t in item["datapoints"]:
                if window == "cumulative" and t - step >= truth.ts_ms.max():
                    continue
                sel = (ts > t - width) & (ts <= t)
                p = calibrated(ref_scores, ref_labels, s[sel])
                if metric == "estimation_error":  # the estimate minus scikit-learn on the labeled rows
                    exp = (expected(f"estimated_{of}", p, s[sel], float(thr_text))
                           - oracle.classification(of, y[sel], s[sel], None, float(thr_text), {}))
                else:
                    exp = expected(metric, p, s[sel], float(thr_text))
                checked += 1
                if not oracle.close(value, exp):
                    failures.append(f"{metric} {reference} {window} thr={thr_text} t={t}: {value} != {exp}")
    assert not failures, f"{len(failures)} of {checked}:\n" + "\n".join(failures[:20])
    assert checked > 800


def test_isotonic_calibration_corrects_miscalibrated_scores(http):
    """Scores s with true probability sqrt(s): taken as calibrated, the estimate is off by
    ~0.09; calibrated on a labeled reference of 20,000 it is within 4 binomial standard errors
    (0.014 at N = 20,000) of the realized accuracy."""
    rng = np.random.default_rng(3)
    n = 20_000
    assert http.post("/api/v1/models", json={"name": "m", "threshold": 0.5}).status_code == 201
    s = rng.random(n) ** 2
    y = (rng.random(n) < np.sqrt(s)).astype(int)
    ts = T0_MS + np.sort(rng.integers(0, 86_400_000, n))
    preds = [{"id": f"o{i}", "ts": int(ts[i]), "score": float(s[i])} for i in range(n)]
    fbs = [{"id": f"o{i}", "ts": int(ts[i]) + 1, "label": int(y[i])} for i in range(n)]
    for k in range(0, n, 5000):
        assert http.post("/api/v1/predictions", json={"model": "m", "records": preds[k:k + 5000]}).status_code == 200
        assert http.post("/api/v1/feedback", json={"model": "m", "records": fbs[k:k + 5000]}).status_code == 200
    ref_s = rng.random(n) ** 2
    ref_y = (rng.random(n) < np.sqrt(ref_s)).astype(float)
    assert http.post("/api/v1/references", json={"model": "m", "name": "training", "columns": {
        "score": ref_s.tolist(), "label": ref_y.tolist()}}).status_code == 201

    def last(target, **payload):
        body = {"range": {"from": _iso(T0_MS), "to": _iso(T0_MS + 86_400_000)}, "intervalMs": 3_600_000,
                "maxDataPoints": 30, "targets": [{"refId": "A", "target": target, "payload": {
                    "model": "m", "window": "cumulative", **payload}}]}
        r = http.post("/query", json=body)
        assert r.status_code == 200, r.get_json()
        return [v for v, _ in r.get_json()[0]["datapoints"] if v is not None][-1]

    realized = last("accuracy")
    naive = last("estimated_accuracy")
    fixed = last("estimated_accuracy", calibration="isotonic")
    assert abs(naive - realized) > 0.05, (naive, realized)
    assert abs(fixed - realized) < 4 * 0.5 / np.sqrt(n), (fixed, realized)


def test_calibration_errors_are_400_naming_the_field(http):
    assert http.post("/api/v1/models", json={"name": "m", "threshold": 0.5}).status_code == 201
    http.post("/api/v1/predictions", json={"model": "m", "records": [
        {"id": "a", "ts": T0_MS, "score": 0.4}]})
    for payload, field in [({"calibration": "platt"}, "calibration"),
                           ({"calibration": "isotonic"}, "reference"),  # no stored 'training'
                           ({"calibration": "isotonic", "threshold": "0.123"}, "threshold"),
                           ({"calibration": "isotonic", "reference": "x/y"}, "reference")]:
        body = {"range": {"from": _iso(T0_MS - 3600_000), "to": _iso(T0_MS + 3600_000)},
                "intervalMs": 60_000, "maxDataPoints": 100, "targets": [
                    {"refId": "A", "target": "estimated_accuracy", "payload": {"model": "m", **payload}}]}
        r = http.post("/query", json=body)
        assert r.status_code == 400, (payload, r.get_json())
        assert any(field in e["field"] for e in r.get_json()["errors"]), (payload, r.get_json())
