"""rebuild_rollup in chunks of days equals the one-shot rebuild, at every level.

Five weeks of predictions (a gap of days without any, three segments) and labels. A rebuild
in chunks of ~150 rows (each chunk whole days; days without rows skipped) writes the very
rows, level by level and score bin by score bin, that a rebuild in one chunk writes; after
damage to rows of every level in different weeks, including a stray bucket with no raw rows,
a chunked rebuild leaves ``check_rollup`` empty. With a retention horizon, the chunks start
after it and the rollup of the dropped weeks is kept as it was.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from datasource import ingest, store
from datasource.store import bins, partials
from datasource.store.writes import REBUILD_CHUNK_ROWS

W0 = datetime(2020, 2, 6, tzinfo=UTC)  # a Thursday: the first weekly partition starts here
W0_S = int(W0.timestamp())
DAY_S = 86_400
WEEK_S = 7 * DAY_S
N = 2500


@pytest.fixture
def model(conn):
    rng = np.random.default_rng(7)
    day = rng.integers(0, 35, N)
    day = np.where((day >= 10) & (day < 13), day + 5, day)  # days 10-12 hold no rows
    ts = W0_S + day * DAY_S + rng.integers(1, DAY_S + 1, N)  # (day, day + 1], ends included
    ts[:3] = W0_S + np.array([DAY_S, 2 * DAY_S, 20 * DAY_S])  # on a day's boundary
    score = rng.random(N).round(3)  # some on the bin edges
    labeled = rng.random(N) < 0.75
    label = (rng.random(N) < score).astype(int)
    ingest.register_model(conn, {"name": "m", "threshold": 0.5})
    preds = [{"id": f"p{i}", "ts": int(ts[i]) * 1000, "score": float(score[i]),
              "segments": {"b": "xyz"[i % 3]}} for i in range(N)]
    fbs = [{"id": f"p{i}", "ts": int(ts[i] + 3600) * 1000, "label": int(label[i])}
           for i in range(N) if labeled[i]]
    for k in range(0, N, 1000):
        ingest.write_predictions(conn, "m", preds[k:k + 1000], 10**6)
    ingest.write_feedback(conn, "m", fbs, 10**6)
    conn.commit()
    return store.get_model(conn, "m")


def _levels(conn, model, before_s: float = np.inf) -> dict[str, dict[str, np.ndarray]]:
    """Every level's rows (rollup: partials; score bins: records), sorted by key, revisions left
    out (each rebuild takes a new one); with ``before_s``, only the buckets ending by then."""
    out = {}
    with conn.cursor() as cur:
        for table in partials.ROLLUP_TABLES.values():
            cur.execute(f"SELECT segset_id, bucket_end, {partials.cols()} FROM {table}"
                        " WHERE model_id = %s AND bucket_end <= %s ORDER BY 1, 2",
                        (model.model_id, before_s))
            rows = np.array(cur.fetchall(), dtype=np.float64)
            out[table] = dict(zip(["segset_id", "bucket_end", *partials.PARTIALS], rows.T, strict=True))
    for table in partials.BIN_TABLES.values():
        out[table] = bins.read_records(conn, table, "t.model_id = %(m)s AND t.bucket_end <= %(b)s",
                                       {"m": model.model_id, "b": before_s})
    return out


def _assert_same(got, want) -> None:
    assert got.keys() == want.keys()
    for table in want:
        assert got[table].keys() == want[table].keys(), table
        for name, w in want[table].items():
            g = got[table][name]
            assert len(g) == len(w) and len(w) > 0, (table, name)
            if name in (*partials.COUNT_PARTIALS, "segset_id", "bucket_end", "bin", "n", "pos", "neg"):
                np.testing.assert_array_equal(g, w, err_msg=f"{table}.{name}")
            else:  # float sums: the same rows, maybe added in another order
                np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12, err_msg=f"{table}.{name}")


def _damage(conn, model, weeks: list[int], stray_s: int) -> None:
    """Wrong values in a row of each level, each level in another of ``weeks``, and a stray
    minute row (and 5-minute bins) for the bucket ending at ``stray_s``, which no raw row is in."""
    tables = [*partials.ROLLUP_TABLES.values(), *partials.BIN_TABLES.values()]
    with conn.cursor() as cur:
        for k, table in enumerate(tables):
            lo = W0_S + weeks[k % len(weeks)] * WEEK_S
            where = (f"model_id = {model.model_id} AND bucket_end > {lo} AND bucket_end <= {lo + WEEK_S}"
                     f" AND ctid = (SELECT ctid FROM {table} WHERE model_id = {model.model_id}"
                     f" AND bucket_end > {lo} AND bucket_end <= {lo + WEEK_S} ORDER BY bucket_end LIMIT 1)")
            if table.startswith("score_bins"):
                cur.execute(f"SELECT bins FROM {table} WHERE {where}")
                rec = np.frombuffer(bytes(cur.fetchone()[0]), dtype=bins.RECORD).copy()
                rec["n"][0] += 2
                rec["sum_score"][-1] += 0.5
                cur.execute(f"UPDATE {table} SET bins = %s WHERE {where}", (rec.tobytes(),))
            else:
                cur.execute(f"UPDATE {table} SET n_pred = n_pred + 3, sum_score = sum_score - 1 WHERE {where}")
            assert cur.rowcount == 1, table
        cur.execute(f"INSERT INTO rollup (model_id, segset_id, bucket_end, revision, {partials.cols()})"
                    f" SELECT model_id, segset_id, {int(stray_s)}, revision, {partials.cols()} FROM rollup"
                    " WHERE model_id = %s LIMIT 1", (model.model_id,))
        cur.execute("INSERT INTO score_bins_5m (model_id, segset_id, bucket_end, bins)"
                    f" SELECT model_id, segset_id, {int(stray_s)}, bins FROM score_bins_5m"
                    " WHERE model_id = %s LIMIT 1", (model.model_id,))


def test_chunked_rebuild_equals_the_one_shot_rebuild(conn, model):
    assert store.check_rollup(conn, model) == []
    assert N < REBUILD_CHUNK_ROWS  # the default: one chunk here
    ends = []
    assert store.rebuild_rollup(conn, model, progress=ends.append) > 0
    assert len(ends) == 1
    one_shot = _levels(conn, model)
    _damage(conn, model, weeks=[0, 1, 2, 3, 4], stray_s=W0_S + 11 * DAY_S + 600)  # no rows that day
    assert {d["table"] for d in store.check_rollup(conn, model)} == {
        *partials.ROLLUP_TABLES.values(), *partials.BIN_TABLES.values()}

    ends.clear()
    store.rebuild_rollup(conn, model, chunk_rows=150, progress=ends.append)
    assert len(ends) >= N // 150 * 3 // 4  # many chunks, each ending on a day's boundary
    assert all(e % DAY_S == 0 for e in ends) and ends == sorted(set(ends))
    assert not set(ends) & {W0_S + d * DAY_S for d in (11, 12, 13)}  # the days without rows
    assert store.check_rollup(conn, model) == []
    _assert_same(_levels(conn, model), one_shot)
    conn.commit()


def test_chunked_rebuild_after_the_retention_horizon_keeps_the_dropped_weeks(conn, model):
    store.rebuild_rollup(conn, model)
    conn.commit()
    # drop the first two weeks of raw rows: the horizon is W0 + 2 weeks
    assert store.apply_retention(conn, 7, now=W0 + timedelta(days=21)) >= 2
    horizon = store.raw_horizon(conn).timestamp()
    assert horizon == W0_S + 2 * WEEK_S
    kept = _levels(conn, model, before_s=horizon)
    _damage(conn, model, weeks=[2, 3, 4], stray_s=W0_S + 60 * DAY_S)  # after all rows
    assert store.check_rollup(conn, model)
    ends = []
    store.rebuild_rollup(conn, model, chunk_rows=100, progress=ends.append)
    assert len(ends) > 5 and min(ends) > horizon
    assert store.check_rollup(conn, model) == []
    _assert_same(_levels(conn, model, before_s=horizon), kept)  # the rollup of dropped rows stays
    conn.commit()
