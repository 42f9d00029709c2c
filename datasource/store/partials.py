"""The declared partial aggregates and the SQL fragments every rollup query shares.

A partial is a name and an SQL aggregate over joined rows ``p`` (predictions)
LEFT JOIN ``f`` (feedback); ``%(thr)s`` is the decision threshold (NULL for
regression). The rollup's columns are derived from this declaration
(``schema.sync_partials``), and its fingerprint decides when the rollup is rebuilt.
"""

from __future__ import annotations

import hashlib

import numpy as np

ROLLUP_BUCKET_S = 60
EPS = float(np.finfo(np.float64).eps)  # the clipping scikit-learn's log_loss applies
LOCK_NAMESPACE = 715018

# name -> SQL aggregate over joined rows ``p`` (predictions) LEFT JOIN ``f`` (feedback).
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



def partial_type(name: str) -> str:
    """The rollup column type of a partial: counts are exact integers, sums are floats."""
    return "bigint" if name in COUNT_PARTIALS else "double precision"


def partials_fingerprint() -> str:
    """A digest of the declared partial set (names, SQL, types): when it changes, the rollup
    is rebuilt, so a new or redefined partial never serves zeros or stale sums."""
    text = "\n".join(f"{n}\t{partial_type(n)}\t{PARTIALS[n]}" for n in sorted(PARTIALS))
    return hashlib.sha256(text.encode()).hexdigest()


def select_partials() -> str:
    return ",\n       ".join(f"{expr} AS {name}" for name, expr in PARTIALS.items())


def cols() -> str:
    return ", ".join(PARTIALS)

JOIN = (
    "FROM predictions p LEFT JOIN feedback f"
    " ON f.model_id = p.model_id AND f.output_id = p.output_id"
)
MINUTE_BUCKET = "(ceil(extract(epoch FROM p.ts) / 60)::bigint * 60)"




def all_contributions() -> str:
    return f"""
    SELECT CASE WHEN grouping(p.segset_id) = 1 THEN 0 ELSE p.segset_id END AS segset_id,
           {MINUTE_BUCKET} AS bucket_end,
           {select_partials()}
    {JOIN}
    WHERE p.model_id = %(m)s
    GROUP BY GROUPING SETS (({MINUTE_BUCKET}, p.segset_id), ({MINUTE_BUCKET}))
"""
