"""Distribution and drift statistics of one column, computed at query time.

No buckets are fixed up front: quantiles are exact (numpy on the window's
values), histogram bins are chosen from the data of the requested range
(Freedman–Diaconis, or a bin count), and drift compares a window with a
reference sample (the training data the loader stores, or a time range)
using scipy's own tests. Missing values (a feature absent from a prediction)
count in ``missing_rate`` and are left out everywhere else.
"""

from __future__ import annotations

import numpy as np

MAX_BINS = 200
PSI_BINS = 10
PSI_EPS = 1e-4  # proportion used for an empty bin, so PSI stays finite


def summary(stat: str, values: np.ndarray, n_total: int, quantile: float = 0.5) -> float:
    """mean, std (population, ddof 0), min, max, quantile (linear) or missing_rate of one window."""
    if stat == "missing_rate":
        return (n_total - len(values)) / n_total if n_total else np.nan
    if len(values) == 0:
        return np.nan
    if stat == "mean":
        return float(np.mean(values))
    if stat == "std":
        return float(np.std(values))
    if stat == "min":
        return float(np.min(values))
    if stat == "max":
        return float(np.max(values))
    if stat == "quantile":
        return float(np.quantile(values, quantile))
    raise KeyError(stat)


def histogram_edges(values: np.ndarray, bins: int | None) -> np.ndarray:
    """Bin edges from the data: Freedman–Diaconis (at most MAX_BINS bins) or ``bins`` equal bins."""
    if len(values) == 0:
        return np.array([0.0, 1.0])
    if bins is None:
        edges = np.histogram_bin_edges(values, bins="fd")
        if len(edges) - 1 > MAX_BINS:
            edges = np.histogram_bin_edges(values, bins=MAX_BINS)
        return edges
    return np.histogram_bin_edges(values, bins=bins)


def histogram_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """numpy's rule: bins [e_k, e_k+1), the last one closed; values outside are not counted."""
    counts, _ = np.histogram(values, bins=edges)
    return counts


def psi_inner_edges(reference: np.ndarray) -> np.ndarray:
    """Deciles of the reference (duplicates dropped): the PSI / JS bins are (e_k-1, e_k]."""
    qs = np.quantile(reference, np.linspace(0, 1, PSI_BINS + 1)[1:-1])
    return np.unique(qs)


def _proportions(values: np.ndarray, inner: np.ndarray) -> np.ndarray:
    ids = np.searchsorted(inner, values, side="left")
    counts = np.bincount(ids, minlength=len(inner) + 1).astype(np.float64)
    return counts / counts.sum()


def _binned_proportions(values: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Window and reference proportions over the PSI bins.

    A reference with at most PSI_BINS distinct values (a flag, a surcharge, an
    hour) gets one bin per value seen in either sample, since its deciles would
    collapse into one or two bins and hide the shift; otherwise the bins are the
    reference's deciles.
    """
    distinct = np.unique(reference)
    if len(distinct) <= PSI_BINS:
        values_seen = np.union1d(distinct, np.unique(values))
        cur = np.searchsorted(values_seen, values)
        ref = np.searchsorted(values_seen, reference)
        n = len(values_seen)
        return (np.bincount(cur, minlength=n) / len(values),
                np.bincount(ref, minlength=n) / len(reference))
    inner = psi_inner_edges(reference)
    return _proportions(values, inner), _proportions(reference, inner)


def psi_from_proportions(cur: np.ndarray, ref: np.ndarray) -> float:
    cur = np.where(cur > 0, cur, PSI_EPS)
    ref = np.where(ref > 0, ref, PSI_EPS)
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def numeric_drift(stat: str, values: np.ndarray, reference: np.ndarray) -> float:
    """ks_statistic, ks_pvalue, psi, wasserstein or js_distance of a window against the reference."""
    if len(values) == 0 or len(reference) == 0:
        return np.nan
    from scipy import stats

    if stat in ("ks_statistic", "ks_pvalue"):
        res = stats.ks_2samp(values, reference)
        return float(res.statistic if stat == "ks_statistic" else res.pvalue)
    if stat == "wasserstein":
        return float(stats.wasserstein_distance(values, reference))
    cur, ref = _binned_proportions(values, reference)
    if stat == "psi":
        return psi_from_proportions(cur, ref)
    if stat == "js_distance":
        from scipy.spatial.distance import jensenshannon

        return float(jensenshannon(cur, ref, base=2))
    raise KeyError(stat)


def categorical_drift(stat: str, values: list, reference: list) -> float:
    """chi2_statistic, chi2_pvalue (scipy's chi2_contingency on window vs reference counts) or psi."""
    if len(values) == 0 or len(reference) == 0:
        return np.nan
    cats = sorted(set(values) | set(reference))
    index = {c: k for k, c in enumerate(cats)}
    cur = np.bincount([index[v] for v in values], minlength=len(cats)).astype(np.float64)
    ref = np.bincount([index[v] for v in reference], minlength=len(cats)).astype(np.float64)
    if stat == "psi":
        return psi_from_proportions(cur / cur.sum(), ref / ref.sum())
    if stat in ("chi2_statistic", "chi2_pvalue"):
        from scipy.stats import chi2_contingency

        if len(cats) < 2:
            return 0.0 if stat == "chi2_statistic" else 1.0
        res = chi2_contingency(np.vstack([cur, ref]), correction=False)
        return float(res.statistic if stat == "chi2_statistic" else res.pvalue)
    raise KeyError(stat)


NUMERIC_SUMMARIES = ("mean", "std", "min", "max", "quantile", "missing_rate")
NUMERIC_DRIFT = ("ks_statistic", "ks_pvalue", "psi", "wasserstein", "js_distance")
CATEGORICAL_DRIFT = ("chi2_statistic", "chi2_pvalue", "psi")
