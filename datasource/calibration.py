"""CBPE's calibrator: an isotonic regression of labels on the score bin, fitted on a labeled
reference, giving one calibrated probability per score bin.

Why per bin: the label-free estimates must stay mergeable partials served from the rollup.
A calibrator that is constant on each score bin turns E[TP] = sum of calibrated probabilities
of the predicted positives into sum_b n_b p_b over the bins at or above the threshold, where
n_b are the score-bin counts the rollup levels already keep; any window, filter, group-by and
grid threshold is O(buckets x bins), and changing the calibrator (a new reference) rebuilds
nothing. Fitting on bins equals fitting on the reference's rows with each score replaced by
its bin (isotonic regression pools tied inputs by their weighted mean).
"""

from __future__ import annotations

import numpy as np

from datasource.store import N_BINS, bin_index


def isotonic_from_rows(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Calibrated probability per score bin from a reference's scores and 0/1 labels."""
    bins = bin_index(scores)
    return _fit(bins.astype(np.float64), labels.astype(np.float64), np.ones(len(bins)))


def isotonic_from_bins(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """The same from per-bin labeled positives and negatives (a labeled time range's bins)."""
    count = pos + neg
    keep = count > 0
    return _fit(np.flatnonzero(keep).astype(np.float64), pos[keep] / count[keep], count[keep])


def _fit(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    from sklearn.isotonic import IsotonicRegression

    iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
    iso.fit(x, y, sample_weight=w)
    return iso.predict(np.arange(N_BINS, dtype=np.float64))


def expected_partials(b: dict, calibrated: np.ndarray, k: int) -> dict:
    """CBPE's partials over score-bin arrays (points, bins) with the calibrated probability of
    each bin, at the grid threshold k/100: the inputs of the estimated_* finalizers; and the
    realized confusion counts of the labeled predictions, which estimation_error compares."""
    n, pos, neg = b["n"], b["pos"], b["neg"]
    expected = n * calibrated
    return {"n_pred": n.sum(axis=1), "n_pred_pos": n[:, k:].sum(axis=1),
            "sum_score": expected.sum(axis=1), "sum_score_pos": expected[:, k:].sum(axis=1),
            "tp": pos[:, k:].sum(axis=1), "fp": neg[:, k:].sum(axis=1),
            "n_lab": (pos + neg).sum(axis=1), "sum_label": pos.sum(axis=1)}
