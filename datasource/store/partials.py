"""The declared partial aggregates and the SQL fragments every rollup query shares.

A partial is a name and an SQL aggregate over raw rows: a prediction ``p`` and its label
``f`` (``f.label``, ``f.ts``; NULL before feedback arrives); ``%(thr)s`` is the decision threshold (NULL for
regression). The rollup's columns are derived from this declaration
(``schema.sync_partials``), and its fingerprint decides when the rollup is rebuilt.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np

ROLLUP_BUCKET_S = 60
ALL_TIME_S = ROLLUP_BUCKET_S * 10**9  # one bucket holding all time (to year ~3870): range sums
EPS = float(np.finfo(np.float64).eps)  # the clipping scikit-learn's log_loss applies
LOCK_NAMESPACE = 715018

# name -> SQL aggregate over raw rows ``p`` (a prediction) and ``f`` (its label, or NULLs).
# %(thr)s is the decision threshold (NULL for regression models).
PARTIALS: dict[str, str] = {
    "n_pred": "count(*)",
    "n_pred_pos": "count(*) FILTER (WHERE p.score >= %(thr)s)",
    "n_lab": "count(f.label)",
    "tp": "count(*) FILTER (WHERE f.label = 1 AND p.score >= %(thr)s)",
    "fp": "count(*) FILTER (WHERE f.label = 0 AND p.score >= %(thr)s)",
    "sum_score": "coalesce(sum(p.score), 0)",
    "sum_score_pos": "coalesce(sum(p.score) FILTER (WHERE p.score >= %(thr)s), 0)",
    "sum_score_sq": "coalesce(sum(p.score * p.score), 0)",
    "sum_label": "coalesce(sum(f.label), 0)",
    "sum_label_sq": "coalesce(sum(f.label * f.label), 0)",
    "sum_err": "coalesce(sum(p.score - f.label), 0)",
    "sum_abs_err": "coalesce(sum(abs(p.score - f.label)), 0)",
    "sum_sq_err": "coalesce(sum((p.score - f.label) * (p.score - f.label)), 0)",
    "sum_logloss": (
        "coalesce(sum(CASE WHEN f.label = 1 THEN -ln(least(greatest(p.score, %(eps)s), 1 - %(eps)s))"
        " WHEN f.label = 0 THEN -ln(least(greatest(1 - p.score, %(eps)s), 1 - %(eps)s)) END), 0)"
    ),
}
COUNT_PARTIALS = ("n_pred", "n_pred_pos", "n_lab", "tp", "fp")


class Rows:
    """A write batch's raw rows as numpy arrays, for the per-row values below: ``score``,
    ``label`` (NaN: no label yet), the model's ``thr`` (None: regression) and ``eps``."""

    def __init__(self, score: np.ndarray, label: np.ndarray, thr: float | None, eps: float = 0.0):
        self.score, self.label, self.thr, self.eps = score, label, thr, eps
        self.labeled = ~np.isnan(label)
        self.above = np.zeros(len(score), bool) if thr is None else score >= thr  # SQL: NULL -> no
        self.pos, self.neg = label == 1, label == 0

    def where_labeled(self, values: np.ndarray) -> np.ndarray:
        """``values`` where the row has a label, else 0 (SQL's sum skips the NULLs)."""
        return np.where(self.labeled, values, 0.0)


def _logloss(r: Rows) -> np.ndarray:
    clip = lambda x: np.clip(x, r.eps, 1 - r.eps)  # noqa: E731 - least(greatest(x, eps), 1 - eps)
    return np.where(r.pos, -np.log(clip(r.score)), np.where(r.neg, -np.log(clip(1 - r.score)), 0.0))


# The same partials as per-row values in numpy: each partial above is the sum over rows of
# its value here. The write path sums these over a batch's rows (the rows it replaced with
# sign -1, the rows it wrote with +1) instead of running the SQL aggregates on the server:
# the batch's rows are in the writer's hands, and the sums cost milliseconds in numpy where
# the SQL aggregate cost a third of a second per 50,000 rows (measured). Rebuilds and checks
# keep the SQL, so ``check_rollup`` tests these forms against it after every kind of write.
PARTIAL_ROWS: dict[str, Callable[[Rows], np.ndarray]] = {
    "n_pred": lambda r: np.ones(len(r.score)),
    "n_pred_pos": lambda r: r.above.astype(np.float64),
    "n_lab": lambda r: r.labeled.astype(np.float64),
    "tp": lambda r: (r.pos & r.above).astype(np.float64),
    "fp": lambda r: (r.neg & r.above).astype(np.float64),
    "sum_score": lambda r: r.score,
    "sum_score_pos": lambda r: np.where(r.above, r.score, 0.0),
    "sum_score_sq": lambda r: r.score * r.score,
    "sum_label": lambda r: r.where_labeled(r.label),
    "sum_label_sq": lambda r: r.where_labeled(r.label * r.label),
    "sum_err": lambda r: r.where_labeled(r.score - r.label),
    "sum_abs_err": lambda r: r.where_labeled(np.abs(r.score - r.label)),
    "sum_sq_err": lambda r: r.where_labeled((r.score - r.label) * (r.score - r.label)),
    "sum_logloss": _logloss,
}
# The partials that depend on the decision threshold (their SQL reads %(thr)s).
THRESHOLD_PARTIALS = tuple(n for n, sql in PARTIALS.items() if "%(thr)s" in sql)

# ----------------------------------------------------------------------------- rollup levels
# The rollup at four bucket widths, maintained at every write: a panel reads the coarsest
# level whose width divides its bucket (gcd of window and step), a range sum the coarsest
# levels that tile it, so a 30-day panel at a 1 h step reads 720 rows, not 43,200. Four
# levels because each is a small multiple of the next finer one (5, 12, 24): a range is
# tiled by at most ~2 x (4 + 11 + 23) + its middle, whatever its length.
LEVELS = (60, 300, 3600, 86400)
ROLLUP_TABLES = {60: "rollup", 300: "rollup_5m", 3600: "rollup_1h", 86400: "rollup_1d"}

# ----------------------------------------------------------------------------- score bins
# Per bucket, segment set and score bin k (scores in [k/100, (k+1)/100), bin 100: score 1):
# 100 bins because a threshold is chosen in hundredths, ten calibration bins are unions of
# ten of them, and the binned ROC AUC's error bound (ties within a bin) shrinks with the
# width; more bins would multiply the bytes of every bucket. Stored packed, one row per bucket
# and segment set (store/bins.py). Classifiers only.
SCORE_BINS = 100
N_BINS = SCORE_BINS + 1
BIN_EDGES = [k / SCORE_BINS for k in range(SCORE_BINS + 1)]  # k/100: the double of "0.29"
# Levels of the score bins: from 5 minutes (a minute level would hold ~2 rows per prediction
# and double the cost of ingest); a panel whose bucket is not a multiple of 5 minutes reads
# raw rows at other thresholds than the model's.
BIN_LEVELS = (300, 3600, 86400)
BIN_TABLES = {300: "score_bins_5m", 3600: "score_bins_1h", 86400: "score_bins_1d"}
BIN_BASE_S = BIN_LEVELS[0]
# bin k holds score s when BIN_EDGES[k] <= s < BIN_EDGES[k + 1]: s >= t for t = k/100 exactly
# when the bin is >= k, as the threshold comparisons of PARTIALS decide it.
BIN = "(width_bucket(p.score, %(edges)s::float8[]) - 1)"
BIN_PARTIALS: dict[str, str] = {
    "n": "count(*)",
    "pos": "count(*) FILTER (WHERE f.label = 1)",
    "neg": "count(*) FILTER (WHERE f.label = 0)",
    "sum_score": "coalesce(sum(p.score), 0)",
    "sum_score_lab": "coalesce(sum(p.score) FILTER (WHERE f.label IS NOT NULL), 0)",
}
BIN_COUNTS = ("n", "pos", "neg")
# The bin partials as per-row values in numpy (the write path's, as PARTIAL_ROWS).
BIN_ROWS: dict[str, Callable[[Rows], np.ndarray]] = {
    "n": lambda r: np.ones(len(r.score)),
    "pos": lambda r: r.pos.astype(np.float64),
    "neg": lambda r: r.neg.astype(np.float64),
    "sum_score": lambda r: r.score,
    "sum_score_lab": lambda r: r.where_labeled(r.score),
}
# Each threshold partial at threshold k/100 is a sum of one bin column over the bins >= k.
THRESHOLD_FROM_BINS = {"n_pred_pos": "n", "tp": "pos", "fp": "neg", "sum_score_pos": "sum_score"}
if set(THRESHOLD_FROM_BINS) != set(THRESHOLD_PARTIALS):
    raise ValueError("every threshold partial needs its sum over score bins (THRESHOLD_FROM_BINS)")


def bin_index(scores: np.ndarray) -> np.ndarray:
    """The score bin of each score, as the SQL's ``BIN`` computes it (for references)."""
    return np.searchsorted(np.asarray(BIN_EDGES), np.asarray(scores, dtype=np.float64),
                           side="right") - 1


def grid_bin(threshold: float | None) -> int | None:
    """The bin index k when ``threshold`` is k/100 on the grid, else None."""
    if threshold is None:
        return None
    k = round(threshold * SCORE_BINS)
    return k if 0 <= k <= SCORE_BINS and BIN_EDGES[k] == threshold else None


def level_for(g: int, levels: tuple[int, ...] = LEVELS) -> int | None:
    """The coarsest level whose width divides g (None: g is not a multiple of the finest)."""
    fits = [w for w in levels if g % w == 0]
    return max(fits) if fits else None


def level_pieces(lo: int | None, hi: int,
                 levels: tuple[int, ...] = LEVELS) -> list[tuple[int, int | None, int]]:
    """Tile (lo, hi] (lo None: from the beginning; both multiples of the finest level) by the
    coarsest levels: [(width, a, b)], each (a, b] aligned to its width."""
    pieces: list[tuple[int, int | None, int]] = []

    def cover(a: int | None, b: int, levels: tuple[int, ...]) -> None:
        if a is not None and a >= b:
            return
        w, finer = levels[-1], levels[:-1]
        if not finer:
            pieces.append((w, a, b))
            return
        start = None if a is None else -(-a // w) * w
        end = b // w * w
        if start is not None and start >= end:
            cover(a, b, finer)
            return
        pieces.append((w, start, end))
        if a is not None:
            cover(a, start, finer)
        cover(end, b, finer)

    cover(lo, hi, tuple(levels))
    return pieces


def level_bucket(column: str, width: int, base: int = ROLLUP_BUCKET_S) -> str:
    """SQL: the end of the width-bucket holding a bucket ending at ``column`` (epoch s), whose
    own width is ``base``."""
    if width == base:
        return column
    return f"(({column} / {width} + ({column} %% {width} > 0)::int) * {width})"



def partial_type(name: str) -> str:
    """The rollup column type of a partial: counts are exact integers, sums are floats."""
    return "bigint" if name in COUNT_PARTIALS else "double precision"


def partials_fingerprint() -> str:
    """A digest of the declared partial set (names, SQL, types): when it changes, the rollup
    is rebuilt, so a new or redefined partial never serves zeros or stale sums."""
    text = "\n".join(f"{n}\t{partial_type(n)}\t{PARTIALS[n]}" for n in sorted(PARTIALS))
    text += f"\nlevels {LEVELS}\nbins {BIN_LEVELS} {BIN_EDGES} {BIN}\n"
    text += "\n".join(f"bin {n}\t{BIN_PARTIALS[n]}" for n in BIN_PARTIALS)  # in record order
    text += "\nbins packed per bucket and segment set, with suffix sums (store/bins.py)"
    return hashlib.sha256(text.encode()).hexdigest()


def select_partials() -> str:
    return ",\n       ".join(f"{expr} AS {name}" for name, expr in PARTIALS.items())


def cols() -> str:
    return ", ".join(PARTIALS)

# The raw rows: each prediction with its label, which the writers copy onto the prediction
# row (migration 008), so that no read joins feedback and a window reads only the weekly
# partitions it overlaps. ``f`` names the row's label as the partials read it (planned as
# plain columns of ``p``: the lateral subquery is flattened).
LABEL_OF = "CROSS JOIN LATERAL (SELECT {0}.label, {0}.label_ts AS ts) f"
RAW_ROWS = f"FROM predictions p {LABEL_OF.format('p')}"


def raw_bucket(width: int) -> str:
    """SQL: the end of the width-second bucket holding prediction ``p``."""
    return f"(ceil(extract(epoch FROM p.ts) / {width})::bigint * {width})"


# Rebuilds and checks cover the rows after the retention horizon (%(after)s, epoch s, NULL:
# all): the rollup keeps the dropped rows' partials, which no raw row can confirm any more.
# The horizon is a week boundary, so every bucket after it holds only rows after it.
RETAINED = "AND (%(after)s::float8 IS NULL OR p.ts > to_timestamp(%(after)s::float8))"
# A rebuild's chunk: the rows with ts in (%(lo)s, %(hi)s] (epoch s, whole days: each row's
# buckets at every level end in the same range, so a chunk's rows rebuild its buckets alone).
IN_CHUNK = "AND p.ts > to_timestamp(%(lo)s::float8) AND p.ts <= to_timestamp(%(hi)s::float8)"


def all_contributions(width: int = ROLLUP_BUCKET_S, chunk: bool = False) -> str:
    """The rollup rows of one level rebuilt from raw rows (segset 0: all segments), of the
    rows in a chunk (``IN_CHUNK``) when ``chunk``."""
    bucket = raw_bucket(width)
    return f"""
    SELECT CASE WHEN grouping(p.segset_id) = 1 THEN 0 ELSE p.segset_id END AS segset_id,
           {bucket} AS bucket_end,
           {select_partials()}
    {RAW_ROWS}
    WHERE p.model_id = %(m)s {RETAINED} {IN_CHUNK if chunk else ""}
    GROUP BY GROUPING SETS (({bucket}, p.segset_id), ({bucket}))
"""


def bin_contributions(width: int = BIN_BASE_S, chunk: bool = False) -> str:
    """The score-bin rows of one level rebuilt from raw rows (of a chunk's rows when ``chunk``)."""
    bucket = raw_bucket(width)
    sums = ", ".join(f"{expr} AS {name}" for name, expr in BIN_PARTIALS.items())
    return f"""
    SELECT CASE WHEN grouping(p.segset_id) = 1 THEN 0 ELSE p.segset_id END AS segset_id,
           {bucket} AS bucket_end, {BIN} AS bin, {sums}
    {RAW_ROWS}
    WHERE p.model_id = %(m)s {RETAINED} {IN_CHUNK if chunk else ""}
    GROUP BY GROUPING SETS (({bucket}, p.segset_id, {BIN}), ({bucket}, {BIN}))
"""
