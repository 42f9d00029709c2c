"""The benchmarks' SQL fill (benchmarks/fill_sql.py) against ``common.synthesize``.

20,000 predictions generated in PostgreSQL: the rollup rebuilt from them equals the raw rows
(``check_rollup``); each prediction row carries its label and label time; a row is the
same whatever the chunk size; and the data has synthesize's distribution at the same n:
counts per borough and vendor, time per week, labeled share, mean score and score quantiles,
delay quantiles and the label-rate drift from the first week to the last, each within a
tolerance of about four standard errors of the difference between two samples of this size.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from datasource import db, store
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import common  # noqa: E402
import fill_sql  # noqa: E402

N = 20_000
SEED = 3
WEEK_MS = 7 * 86_400_000
START_MS = common.START_S * 1000


def _stats(ts_ms, score, borough, vendor, label, delay_ms) -> dict[str, np.ndarray | float]:
    """The compared statistics of predictions (label NaN: unlabeled; delay NaN likewise)."""
    labeled = ~np.isnan(label)
    first = labeled & (ts_ms < START_MS + WEEK_MS)
    last = labeled & (ts_ms >= common.END_S * 1000 - WEEK_MS)
    cell = np.bincount(borough * len(common.VENDORS) + vendor,
                       minlength=len(common.BOROUGHS) * len(common.VENDORS))
    weeks = np.bincount(((ts_ms - START_MS) // WEEK_MS).astype(int), minlength=5)
    return {
        "segment shares": cell / len(ts_ms),
        "week shares": weeks / len(ts_ms),
        "labeled share": labeled.mean(),
        "mean score": score.mean(),
        "score quantiles 0.1 0.5 0.9": np.quantile(score, [0.1, 0.5, 0.9]),
        "label rate": label[labeled].mean(),
        "delay quantiles h 0.25 0.5 0.9": np.quantile(delay_ms[labeled], [0.25, 0.5, 0.9]) / 3.6e6,
        "label rate drift, first week - last": label[first].mean() - label[last].mean(),
    }


TOLERANCE = {  # absolute; n = 20,000 predictions, ~16,000 labeled, ~3,700 labeled a week
    "segment shares": 0.02, "week shares": 0.02, "labeled share": 0.02, "mean score": 0.012,
    "score quantiles 0.1 0.5 0.9": 0.02, "label rate": 0.02,
    "delay quantiles h 0.25 0.5 0.9": 1.0, "label rate drift, first week - last": 0.06,
}


def _numpy_stats(n: int, seed: int) -> dict:
    d = common.synthesize(n, seed)
    label = np.full(n, np.nan)
    label[d.fb_index] = d.fb_label
    delay = np.full(n, np.nan)
    delay[d.fb_index] = d.fb_ts_ms - d.ts_ms[d.fb_index]
    return _stats(d.ts_ms.astype(float), d.score, d.borough, d.vendor, label, delay)


def _sql_stats(conn) -> dict:
    with conn.cursor() as cur:
        cur.execute(
            "SELECT extract(epoch FROM p.ts) * 1000, p.score, s.segments ->> 'borough',"
            " s.segments ->> 'vendor', coalesce(p.label, 'NaN'),"
            " coalesce(extract(epoch FROM p.label_ts - p.ts) * 1000, 'NaN')"
            " FROM predictions p JOIN segment_sets s USING (model_id, segset_id)")
        rows = cur.fetchall()
    ts_ms, score, label, delay = (np.array([r[k] for r in rows], dtype=float) for k in (0, 1, 4, 5))
    borough = np.array([common.BOROUGHS.index(r[2]) for r in rows])
    vendor = np.array([common.VENDORS.index(r[3]) for r in rows])
    return _stats(ts_ms, score, borough, vendor, label, delay)


@pytest.fixture
def filled(clean_db):
    seconds = fill_sql.fill(clean_db, N, SEED, "sql fill test", chunk_rows=6_000)
    assert set(seconds) == {"raw rows", "indexes, vacuum", "rollup", "vacuum analyze, checkpoint"}
    conn = db.connect(clean_db)
    yield conn
    conn.close()


def test_sql_fill_has_synthesize_distribution_and_a_consistent_rollup(filled):
    conn = filled
    model = store.get_model(conn, common.MODEL)
    assert model.description == "sql fill test" and model.threshold == 0.5
    counts = store.table_counts(conn, model)
    assert counts["predictions"] == N and counts["rollup"] > 0
    assert store.check_rollup(conn, model) == []
    ids = {json.dumps(s, sort_keys=True): k for k, s in store.segment_sets(conn, model.model_id).items()}
    assert sorted(ids) == sorted(json.dumps(s, sort_keys=True) for s in fill_sql.segments())
    with conn.cursor() as cur:
        # each label on its prediction's row, with its time; none waits in feedback
        cur.execute("SELECT count(*) FROM feedback")
        assert cur.fetchone()[0] == 0
        cur.execute("SELECT count(*) FROM predictions WHERE (label IS NULL) <> (label_ts IS NULL)")
        assert cur.fetchone()[0] == 0
        # the raw tables' indexes are back, on every partition
        cur.execute("SELECT count(*) FROM pg_indexes WHERE tablename LIKE 'predictions_p%'"
                    " OR tablename LIKE 'feedback_p%'")
        assert cur.fetchone()[0] == (2 * len(store.partitions(conn, "predictions"))
                                     + len(store.partitions(conn, "feedback")))
        cur.execute("SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
                    " WHERE NOT i.indisvalid")
        assert cur.fetchone()[0] == 0
        # a row does not depend on the chunk it was made in: all rows in one go are the same
        cur.execute(f"SELECT count(*) FROM ({fill_sql.rows_sql()}) r JOIN predictions p USING (output_id)"
                    " WHERE p.ts = r.ts AND p.score = r.score AND p.segset_id = r.segset_id"
                    " AND p.label IS NOT DISTINCT FROM r.label",
                    {"lo": 0, "hi": N, "n": N, "seed": SEED, "prefix": f"s{SEED}-",
                     "segsets": [ids[json.dumps(s, sort_keys=True)] for s in fill_sql.segments()]})
        assert cur.fetchone()[0] == N

    got, want = _sql_stats(conn), _numpy_stats(N, SEED)
    for name, tol in TOLERANCE.items():
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=tol, err_msg=name)
    assert want["label rate drift, first week - last"] > 0.08  # the drift is there to compare
    assert np.all((got["delay quantiles h 0.25 0.5 0.9"] > 0) & (got["delay quantiles h 0.25 0.5 0.9"] < 48))
