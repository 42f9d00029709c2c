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
    if name.startswith("estimated_"):
        return estimated(name, s_all, thr)
    if name == "estimation_error":  # the estimate over all predictions minus the labeled realized
        of = params.get("of", "accuracy")
        return estimated(f"estimated_{of}", s_all, thr) - classification(of, y_all, s_all, delay, thr, {})
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
        fname = name.split(".", 1)[1]
        return sklearn_formula(fname, y, s if fname in SCORE_FUNCTIONS else pred)
    raise KeyError(name)


def estimated(name: str, s, thr: float) -> float:
    """CBPE (NannyML) with scores as calibrated probabilities, over all predictions of a window:
    E[TP] = Σ_{ŷ=1} s, E[FP] = Σ_{ŷ=1} (1-s), E[FN] = Σ_{ŷ=0} s, E[TN] = Σ_{ŷ=0} (1-s)."""
    if len(s) == 0:
        return NAN
    pos = s >= thr
    tp, fp = float(np.sum(s[pos])), float(np.sum(1 - s[pos]))
    fn, tn = float(np.sum(s[~pos])), float(np.sum(1 - s[~pos]))
    if name == "estimated_accuracy":
        return (tp + tn) / (tp + fp + fn + tn)
    if name == "estimated_precision":
        return tp / (tp + fp) if tp + fp else NAN
    if name == "estimated_recall":
        return tp / (tp + fn) if tp + fn else NAN
    if name == "estimated_f1":
        return 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else NAN
    if name == "estimated_roc_auc":
        # each prediction is s of a positive and 1 - s of a negative with its score: scikit-learn's
        # weighted ROC AUC of that doubled sample
        weights = np.r_[s, 1 - s]
        if weights[: len(s)].sum() <= 0 or weights[len(s):].sum() <= 0:
            return NAN
        return _safe(skm.roc_auc_score, np.r_[np.ones(len(s)), np.zeros(len(s))], np.r_[s, s],
                     sample_weight=weights)
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
    if name.startswith("sklearn."):
        return sklearn_formula(name.split(".", 1)[1], y, s)
    raise KeyError(name)


# ----------------------------------------------------------------------- scikit-learn, written out

SCORE_FUNCTIONS = ("average_precision_score", "brier_score_loss", "log_loss", "roc_auc_score")


def _ratio(num: float, den: float, if_zero: float = 0.0) -> float:
    """scikit-learn's zero_division='warn': 0/0 counts as 0."""
    return num / den if den else if_zero


def _finite(num: float, den: float) -> float:
    """1 - num/den with scikit-learn's force_finite: a constant target scores 1 if perfect, else 0."""
    if den == 0:
        return 1.0 if num == 0 else 0.0
    return 1.0 - num / den


def _pairwise_auc(y, s) -> float:
    """P(score of a positive > score of a negative), ties counting one half: the definition."""
    pos, neg = s[y == 1], s[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        return NAN
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def _step_average_precision(y, s) -> float:
    """Σ (R_k - R_k-1) P_k over the distinct score thresholds, highest first."""
    n_pos = float(np.sum(y == 1))
    if n_pos == 0:
        return 0.0
    total, prev_recall = 0.0, 0.0
    for t in np.unique(s)[::-1]:
        chosen = s >= t
        tp = float(np.sum(y[chosen] == 1))
        recall, precision = tp / n_pos, tp / chosen.sum()
        total += (recall - prev_recall) * precision
        prev_recall = recall
    return total


def sklearn_formula(fname: str, y, second) -> float:
    """The published formula of each function in ``metrics.SKLEARN_METRICS``, on one window.

    ``second`` is the score for SCORE_FUNCTIONS, else the thresholded prediction (classifiers)
    or the prediction (regression). Where scikit-learn documents a convention for an undefined
    case (zero_division, force_finite, no positives) the formula follows it; NaN where it has none.
    """
    y = np.asarray(y, dtype=float)
    p = np.asarray(second, dtype=float)
    n = len(y)
    if n == 0:
        return NAN
    tp = float(np.sum((y == 1) & (p == 1)))
    fp = float(np.sum((y == 0) & (p == 1)))
    fn = float(np.sum((y == 1) & (p == 0)))
    tn = float(np.sum((y == 0) & (p == 0)))
    err = p - y
    if fname == "accuracy_score":
        return (tp + tn) / n
    if fname in ("hamming_loss", "zero_one_loss"):
        return (fp + fn) / n
    if fname == "balanced_accuracy_score":  # mean recall over the classes present in y
        recalls = [float(np.mean(p[y == c] == c)) for c in np.unique(y)]
        return float(np.mean(recalls))
    if fname == "cohen_kappa_score":
        po = (tp + tn) / n
        pe = ((tp + fn) * (tp + fp) + (tn + fp) * (tn + fn)) / n**2
        return (po - pe) / (1 - pe) if pe != 1 else NAN
    if fname == "precision_score":
        return _ratio(tp, tp + fp)
    if fname == "recall_score":
        return _ratio(tp, tp + fn)
    if fname == "f1_score":
        return _ratio(2 * tp, 2 * tp + fp + fn)
    if fname == "jaccard_score":
        return _ratio(tp, tp + fp + fn)
    if fname == "matthews_corrcoef":
        den = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        return _ratio(tp * tn - fp * fn, den)
    if fname == "brier_score_loss":
        return float(np.mean((p - y) ** 2))
    if fname == "log_loss":
        eps = np.finfo(np.float64).eps
        q = np.clip(p, eps, 1 - eps)
        return float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))
    if fname == "roc_auc_score":
        return _pairwise_auc(y, p)
    if fname == "average_precision_score":
        return _step_average_precision(y, p)
    if fname == "mean_absolute_error":
        return float(np.mean(np.abs(err)))
    if fname == "mean_squared_error":
        return float(np.mean(err**2))
    if fname == "root_mean_squared_error":
        return float(np.sqrt(np.mean(err**2)))
    if fname == "max_error":
        return float(np.max(np.abs(err)))
    if fname == "median_absolute_error":
        return float(np.median(np.abs(err)))
    if fname == "mean_absolute_percentage_error":
        return float(np.mean(np.abs(err) / np.maximum(np.abs(y), np.finfo(np.float64).eps)))
    if fname == "mean_squared_log_error":
        if np.any(y <= -1) or np.any(p <= -1):
            return NAN  # undefined: scikit-learn raises, the server shows a gap
        return float(np.mean((np.log1p(p) - np.log1p(y)) ** 2))
    if fname == "r2_score":
        if n < 2:
            return NAN
        return _finite(float(np.sum(err**2)), float(np.sum((y - y.mean()) ** 2)))
    if fname == "explained_variance_score":
        return _finite(float(np.var(y - p)), float(np.var(y)))
    if fname == "d2_absolute_error_score":
        if n < 2:
            return NAN
        return _finite(float(np.sum(np.abs(err))), float(np.sum(np.abs(y - np.median(y)))))
    raise KeyError(fname)


def close(got, expected, rel=1e-9) -> bool:
    if got is None:
        return bool(np.isnan(expected))
    if np.isnan(expected):
        return False
    return abs(got - expected) <= rel * max(1.0, abs(expected))
