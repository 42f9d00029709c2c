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


def missing_rate(values: np.ndarray, n_total: int, params: dict) -> float:
    return (n_total - len(values)) / n_total if n_total else np.nan


def _of_present(fn):
    """A summary of the present values; an empty window is a gap."""
    def stat(values: np.ndarray, n_total: int, params: dict) -> float:
        return float(fn(values, params)) if len(values) else np.nan
    stat.__doc__ = fn.__doc__
    return stat


mean = _of_present(lambda v, p: np.mean(v))
std = _of_present(lambda v, p: np.std(v))  # population, ddof 0
minimum = _of_present(lambda v, p: np.min(v))
maximum = _of_present(lambda v, p: np.max(v))
quantile = _of_present(lambda v, p: np.quantile(v, p.get("quantile", 0.5)))


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


def _of_samples(fn):
    """A drift statistic of a window against the reference; empty on either side is a gap."""
    def stat(values, reference) -> float:
        if len(values) == 0 or len(reference) == 0:
            return np.nan
        return float(fn(values, reference))
    return stat


def _ks(values, reference):
    from scipy import stats

    return stats.ks_2samp(values, reference)


def _wasserstein(values, reference):
    from scipy import stats

    return stats.wasserstein_distance(values, reference)


def _js(values, reference):
    from scipy.spatial.distance import jensenshannon

    return jensenshannon(*_binned_proportions(values, reference), base=2)


ks_statistic = _of_samples(lambda v, r: _ks(v, r).statistic)
ks_pvalue = _of_samples(lambda v, r: _ks(v, r).pvalue)
wasserstein = _of_samples(_wasserstein)
psi = _of_samples(lambda v, r: psi_from_proportions(*_binned_proportions(v, r)))
js_distance = _of_samples(_js)


def _category_counts(values: list, reference: list) -> tuple[np.ndarray, np.ndarray]:
    cats = sorted(set(values) | set(reference))
    index = {c: k for k, c in enumerate(cats)}
    cur = np.bincount([index[v] for v in values], minlength=len(cats)).astype(np.float64)
    ref = np.bincount([index[v] for v in reference], minlength=len(cats)).astype(np.float64)
    return cur, ref


def _chi2(values: list, reference: list, field: str) -> float:
    """scipy's chi2_contingency of window vs reference category counts (one category: no test)."""
    from scipy.stats import chi2_contingency

    cur, ref = _category_counts(values, reference)
    if len(cur) < 2:
        return 0.0 if field == "statistic" else 1.0
    return getattr(chi2_contingency(np.vstack([cur, ref]), correction=False), field)


def _category_psi(values: list, reference: list) -> float:
    cur, ref = _category_counts(values, reference)
    return psi_from_proportions(cur / cur.sum(), ref / ref.sum())


chi2_statistic = _of_samples(lambda v, r: _chi2(v, r, "statistic"))
chi2_pvalue = _of_samples(lambda v, r: _chi2(v, r, "pvalue"))
category_psi = _of_samples(_category_psi)
