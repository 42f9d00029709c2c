"""Independent oracles: each metric recomputed with scikit-learn / numpy on rows chosen in Python.

Nothing here imports the engine: rows are selected from the Python-side truth
(last write wins, as the store promises), windows are cut with plain
comparisons, and values come from scikit-learn where it has the metric.
Undefined values (0/0, a single class) are NaN, which the server sends as null.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import sklearn.metrics as skm
from sklearn.calibration import calibration_curve

NAN = float("nan")


@dataclass
class Truth:
    """Final state of a model's data: one row per prediction, label NaN when none arrived."""

    ts_ms: np.ndarray
    score: np.ndarray
    label: np.ndarray
    label_ts_ms: np.ndarray
    segments: list[dict]


def build_truth(preds: dict[str, dict], labels: dict[str, dict]) -> Truth:
    ids = sorted(preds, key=lambda i: (preds[i]["ts"], i))
    ts = np.array([preds[i]["ts"] for i in ids], dtype=np.int64)
    return Truth(
        ts_ms=ts,
        score=np.array([preds[i]["score"] for i in ids], dtype=float),
        label=np.array([labels[i]["label"] if i in labels else NAN for i in ids], dtype=float),
        label_ts_ms=np.array([labels[i]["ts"] if i in labels else 0 for i in ids], dtype=np.int64),
        segments=[preds[i].get("segments", {}) for i in ids],
    )


def _safe(fn, *args, **kw) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(fn(*args, **kw))


def _cm(y, pred):
    tp = float(np.sum((y == 1) & (pred == 1)))
    fp = float(np.sum((y == 0) & (pred == 1)))
    fn = float(np.sum((y == 1) & (pred == 0)))
    tn = float(np.sum((y == 0) & (pred == 0)))
    return tp, fp, fn, tn


def ece(y, s, n_bins=10) -> float:
    """Expected calibration error with bins (k/n, (k+1)/n], the first closed at 0.

    Per-bin means are cross-checked against scikit-learn's calibration_curve.
    """
    if len(y) == 0:
        return NAN
    edges = [k / n_bins for k in range(n_bins + 1)]
    total, rates, means = 0.0, [], []
    for k in range(n_bins):
        lo, hi = edges[k], edges[k + 1]
        inside = (s > lo) & (s <= hi) if k else (s >= lo) & (s <= hi)
        if inside.any():
            rates.append(y[inside].mean())
            means.append(s[inside].mean())
            total += inside.sum() / len(y) * abs(s[inside].mean() - y[inside].mean())
    prob_true, prob_pred = calibration_curve(y, s, n_bins=n_bins)
    np.testing.assert_allclose(prob_true, rates, rtol=1e-12)
    np.testing.assert_allclose(prob_pred, means, rtol=1e-12)
    return total


def classification(name: str, y_all, s_all, delay, thr: float, params: dict) -> float:
    """The metric over one window: ``y_all`` has NaN for unlabeled predictions."""
    n_all = len(s_all)
    if name == "prediction_count":
        return float(n_all) if n_all else NAN
    if name == "mean_score":
        return float(np.mean(s_all)) if n_all else NAN
    if name == "positive_rate":
        return float(np.mean(s_all >= thr)) if n_all else NAN
    lab = ~np.isnan(y_all)
    if name == "label_count":
        return float(lab.sum()) if n_all else NAN
    if name == "label_coverage":
        return float(lab.sum() / n_all) if n_all else NAN
    y, s = y_all[lab].astype(int), s_all[lab]
    if name == "label_delay":
        d = delay[lab]
        return float(np.quantile(d, params.get("quantile", 0.5))) if len(d) else NAN
    if len(y) == 0:
        return NAN
    pred = (s >= thr).astype(int)
    tp, fp, fn, tn = _cm(y, pred)
    z = np.nan
    if name == "accuracy":
        return _safe(skm.accuracy_score, y, pred)
    if name == "precision":
        return _safe(skm.precision_score, y, pred, zero_division=z)
    if name == "recall":
        return _safe(skm.recall_score, y, pred, zero_division=z)
    if name == "f1":
        return _safe(skm.f1_score, y, pred, zero_division=z)
    if name == "specificity":
        return _safe(skm.recall_score, y, pred, pos_label=0, zero_division=z)
    if name == "balanced_accuracy":
        return _safe(skm.balanced_accuracy_score, y, pred)
    if name == "false_positive_rate":
        return fp / (fp + tn) if fp + tn else NAN
    if name == "false_negative_rate":
        return fn / (fn + tp) if fn + tp else NAN
    if name == "mcc":
        defined = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn) > 0
        return _safe(skm.matthews_corrcoef, y, pred) if defined else NAN
    if name == "log_loss":
        return _safe(skm.log_loss, y, s, labels=[0, 1])
    if name == "brier_score":
        return float(np.mean((s - y) ** 2)) if len(set(y)) < 2 else _safe(skm.brier_score_loss, y, s)
    if name == "base_rate":
        return float(np.mean(y))
    if name == "roc_auc":
        return _safe(skm.roc_auc_score, y, s) if len(set(y)) == 2 else NAN
    if name == "average_precision":
        return _safe(skm.average_precision_score, y, s) if y.sum() > 0 else NAN
    if name == "expected_calibration_error":
        return ece(y, s)
    if name.startswith("sklearn."):
        fn = getattr(skm, name.split(".", 1)[1])
        return _safe(fn, y, pred)
    raise KeyError(name)


def regression(name: str, y_all, s_all, delay, params: dict) -> float:
    n_all = len(s_all)
    if name == "prediction_count":
        return float(n_all) if n_all else NAN
    if name == "mean_score":
        return float(np.mean(s_all)) if n_all else NAN
    lab = ~np.isnan(y_all)
    if name == "label_count":
        return float(lab.sum()) if n_all else NAN
    if name == "label_coverage":
        return float(lab.sum() / n_all) if n_all else NAN
    y, s = y_all[lab], s_all[lab]
    if name == "label_delay":
        d = delay[lab]
        return float(np.quantile(d, params.get("quantile", 0.5))) if len(d) else NAN
    if len(y) == 0:
        return NAN
    if name == "mae":
        return _safe(skm.mean_absolute_error, y, s)
    if name == "mse":
        return _safe(skm.mean_squared_error, y, s)
    if name == "rmse":
        return _safe(skm.root_mean_squared_error, y, s)
    if name == "r2":
        return _safe(skm.r2_score, y, s) if len(y) >= 2 else NAN
    if name == "mean_error":
        return float(np.mean(s - y))
    if name == "mape":
        return _safe(skm.mean_absolute_percentage_error, y, s)
    raise KeyError(name)


def close(got, expected, rel=1e-9) -> bool:
    if got is None:
        return bool(np.isnan(expected))
    if np.isnan(expected):
        return False
    return abs(got - expected) <= rel * max(1.0, abs(expected))
