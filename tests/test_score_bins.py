"""Rollup levels and score bins against scikit-learn on the same raw rows.

* Thresholds on the grid k/100 other than the model's are served from the score bins:
  every datapoint equals scikit-learn at that threshold, over random windows, steps that
  pick each rollup level, filters and group-bys.
* method=binned: ROC AUC and average precision equal scikit-learn on the scores replaced
  by their bin (computed here with numpy, not with the server's SQL), the binned ROC AUC is
  within its stated bound of the exact one, and is exact when scores lie on the grid; a
  bucket finer than the bins' 5 minutes falls back to the exact method.
* The range tiling covers (lo, hi] exactly once; check_rollup sees damage at every level.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from datasource import metrics as registry
from datasource import store
from datasource.store import partials
from tests import oracle
from tests.test_metrics_oracle import FILTERS, SPAN_MS, T0_MS, _iso, _load, _matches

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

EDGES = np.arange(101) / 100.0  # [k/100, (k+1)/100), the last bin holds 1.0


def bin_of(s: np.ndarray) -> np.ndarray:
    return np.searchsorted(EDGES, s, side="right") - 1


def _width_ms(window: str, step_ms: int, mode: str) -> float:
    if window == "cumulative":
        return np.inf
    if mode == "tumbling":
        return step_ms
    return {"m": 60_000, "h": 3_600_000, "d": 86_400_000}[window[-1]] * int(window[:-1])


def _query(http, targets, a, b, interval, max_points, filters):
    body = {"range": {"from": _iso(a), "to": _iso(b)}, "intervalMs": interval,
            "maxDataPoints": max_points, "targets": targets, "filters": filters}
    r = http.post("/query", json=body)
    assert r.status_code == 200, r.get_json()
    return r.get_json()


def _masks(truth, item, filters, group_by):
    mask = np.array([_matches(s, filters) for s in truth.segments])
    if group_by:
        value = item["target"].split(f"{group_by}=", 1)[1]
        mask &= np.array([s.get(group_by, "(none)") == value for s in truth.segments])
    return mask


# (window, interval ms): each picks a level: 1 min (raw rows off the model's threshold, exact
# method for binned metrics), 5 min, 1 h, and day-tiled prefixes
SHAPES = [("1h", 300_000), ("6h", 3_600_000), ("1d", 3_600_000), ("cumulative", 3_600_000),
          ("15m", 60_000), ("cumulative", 300_000), ("1d", 86_400_000)]
GRID_THRESHOLDS = ["0.0", "0.01", "0.3", "0.25", "0.77", "0.99", "1.0", "1"]


def test_grid_thresholds_from_score_bins_match_sklearn(http):
    rng = np.random.default_rng(21)
    truth = _load(http, rng, "binary_classification", threshold=0.5)
    metrics = ["accuracy", "precision", "recall", "f1", "mcc", "positive_rate",
               "estimated_accuracy", "estimated_precision", "balanced_accuracy"]
    failures, checked = [], 0
    for k in range(36):
        metric = metrics[k % len(metrics)]
        window, interval = SHAPES[int(rng.integers(0, len(SHAPES)))]
        mode = "tumbling" if window != "cumulative" and rng.random() < 0.2 else "sliding"
        thr_text = GRID_THRESHOLDS[int(rng.integers(0, len(GRID_THRESHOLDS)))]
        filters = FILTERS[int(rng.integers(0, len(FILTERS)))]
        group_by = "b" if rng.random() < 0.3 else None
        a = T0_MS + int(rng.integers(-3600_000, SPAN_MS // 2))
        b = a + int(rng.integers(6 * 3600_000, 48 * 3600_000))
        payload = {"model": "m", "window": window, "mode": mode, "threshold": thr_text}
        if group_by:
            payload["group_by"] = group_by
        result = _query(http, [{"refId": "A", "target": metric, "payload": payload}], a, b,
                        interval, 120, filters)
        thr = float(thr_text)
        for item in result:
            mask = _masks(truth, item, filters, group_by)
            ts, s, y = truth.ts_ms[mask], truth.score[mask], truth.label[mask]
            times = [t for _, t in item["datapoints"]]
            step = times[1] - times[0] if len(times) > 1 else interval
            for value, t in item["datapoints"]:
                if window == "cumulative" and t - step >= truth.ts_ms.max():
                    assert value is None, "a cumulative line ends after the latest data"
                    continue
                sel = (ts > t - _width_ms(window, step, mode)) & (ts <= t)
                if metric.startswith("estimated_"):
                    expected = oracle.estimated(metric, s[sel], thr)
                else:
                    expected = oracle.classification(metric, y[sel], s[sel], None, thr, {})
                checked += 1
                if not oracle.close(value, expected):
                    failures.append(f"{metric} {window} {mode} thr={thr_text} {filters} t={t}: "
                                    f"{value} != {expected}")
    assert not failures, f"{len(failures)} of {checked}:\n" + "\n".join(failures[:20])
    assert checked > 1000


def _binned_expected(metric: str, y_all, s_all):
    labeled = ~np.isnan(y_all)
    y, s = y_all[labeled].astype(int), s_all[labeled]
    q = bin_of(s)
    if metric == "estimated_roc_auc":
        if len(s_all) == 0:
            return oracle.NAN
        qa = bin_of(s_all)
        yy = np.r_[np.ones(len(s_all)), np.zeros(len(s_all))]
        w = np.r_[s_all, 1.0 - s_all]
        if w[: len(s_all)].sum() <= 0 or w[len(s_all):].sum() <= 0:
            return oracle.NAN
        return float(roc_auc_score(yy, np.r_[qa, qa], sample_weight=w))
    if metric == "expected_calibration_error":
        if len(y) == 0:
            return oracle.NAN
        tenth = np.minimum(np.floor(q / 10).astype(int), 9)  # [k/10, (k+1)/10), 1.0 in the last
        total = 0.0
        for c in range(10):
            inside = tenth == c
            if inside.any():
                total += inside.sum() / len(y) * abs(s[inside].mean() - y[inside].mean())
        return total
    if len(np.unique(y)) < 2:
        return oracle.NAN if metric == "roc_auc" or y.sum() == 0 else float(
            average_precision_score(y, q))
    if metric == "roc_auc":
        return float(roc_auc_score(y, q))
    return float(average_precision_score(y, q))


def test_binned_metrics_equal_sklearn_on_binned_scores(http):
    rng = np.random.default_rng(5)
    truth = _load(http, rng, "binary_classification", threshold=0.5)
    metrics = ["roc_auc", "average_precision", "expected_calibration_error", "estimated_roc_auc"]
    failures, checked, bound_checked = [], 0, 0
    for k in range(24):
        metric = metrics[k % len(metrics)]
        window, interval = SHAPES[int(rng.integers(0, len(SHAPES)))]
        filters = FILTERS[int(rng.integers(0, len(FILTERS)))]
        group_by = "b" if rng.random() < 0.3 else None
        a = T0_MS + int(rng.integers(-3600_000, SPAN_MS // 2))
        b = a + int(rng.integers(6 * 3600_000, 40 * 3600_000))
        payload = {"model": "m", "window": window, "method": "binned"}
        if group_by:
            payload["group_by"] = group_by
        targets = [{"refId": "A", "target": metric, "payload": payload}]
        if metric == "roc_auc":
            targets.append({"refId": "B", "target": metric, "payload": {**payload, "method": "exact"}})
        result = _query(http, targets, a, b, interval, 120, filters)
        exact = {(i["target"]): i["datapoints"] for i in result if i["refId"] == "B"}
        for item in (i for i in result if i["refId"] == "A"):
            mask = _masks(truth, item, filters, group_by)
            ts, s, y = truth.ts_ms[mask], truth.score[mask], truth.label[mask]
            times = [t for _, t in item["datapoints"]]
            step = times[1] - times[0] if len(times) > 1 else interval
            for j, (value, t) in enumerate(item["datapoints"]):
                if window == "cumulative" and t - step >= truth.ts_ms.max():
                    assert value is None, "a cumulative line ends after the latest data"
                    continue
                sel = (ts > t - _width_ms(window, step, "sliding")) & (ts <= t)
                width = _width_ms(window, step, "sliding")
                g = step if window == "cumulative" else int(np.gcd(int(width), step))
                if g % 300_000 == 0:
                    expected = _binned_expected(metric, y[sel], s[sel])
                elif metric == "estimated_roc_auc":  # finer than the bins: the exact method
                    expected = oracle.estimated(metric, s[sel], 0.5)
                else:
                    delay = np.zeros(int(sel.sum()))
                    expected = oracle.classification(metric, y[sel], s[sel], delay, 0.5, {})
                checked += 1
                if not oracle.close(value, expected):
                    failures.append(f"{metric} {window} {filters} {group_by} t={t}: {value} != {expected}")
                if metric == "roc_auc" and value is not None and g % 300_000 == 0:
                    lab = ~np.isnan(y[sel])
                    yy, ss = y[sel][lab], s[sel][lab]
                    q = bin_of(ss)
                    pos = np.bincount(q[yy == 1], minlength=101)
                    neg = np.bincount(q[yy == 0], minlength=101)
                    bound = float(np.sum(pos * neg) / 2 / (pos.sum() * neg.sum()))
                    exact_value = exact[item["target"]][j][0]
                    assert abs(value - exact_value) <= bound + 1e-12, (t, value, exact_value, bound)
                    bound_checked += 1
    assert not failures, f"{len(failures)} of {checked}:\n" + "\n".join(failures[:20])
    assert checked > 500 and bound_checked > 50
    # a 1-minute step is finer than the bins: method=binned answers as method=exact
    a = T0_MS + 6 * 3600_000
    fine = [{"refId": r, "target": "roc_auc", "payload": {"model": "m", "window": "15m", "method": m}}
            for r, m in (("A", "binned"), ("B", "exact"))]
    binned, exact_ = _query(http, fine, a, a + 3 * 3600_000, 60_000, 1000, [])
    assert len(binned["datapoints"]) == 181 and binned["datapoints"] == exact_["datapoints"]


@pytest.mark.parametrize("seed", range(40))
def test_binned_auc_bound_holds_and_is_exact_on_the_grid(seed):
    """The formula of the bound on random data, ties and skewed classes, against scikit-learn."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 3000))
    s = rng.beta(rng.uniform(0.2, 3), rng.uniform(0.2, 3), size=n)
    if seed % 4 == 0:
        s = np.round(s, 3)  # ties inside bins
    y = (rng.random(n) < rng.uniform(0.05, 0.95)).astype(int)
    y[0], y[-1] = 0, 1
    q = bin_of(s)
    pos = np.bincount(q[y == 1], minlength=101)[None, :].astype(float)
    neg = np.bincount(q[y == 0], minlength=101)[None, :].astype(float)
    binned = float(registry.binned_auc(pos, neg)[0])
    bound = float(registry.binned_auc_bound(pos, neg)[0])
    exact = float(roc_auc_score(y, s))
    assert abs(binned - exact) <= bound + 1e-12
    assert binned == pytest.approx(roc_auc_score(y, q), abs=1e-12)
    on_grid = np.floor(s * 100) / 100  # every bin now holds one distinct score
    q = bin_of(on_grid)
    pos = np.bincount(q[y == 1], minlength=101)[None, :].astype(float)
    neg = np.bincount(q[y == 0], minlength=101)[None, :].astype(float)
    assert float(registry.binned_auc(pos, neg)[0]) == pytest.approx(roc_auc_score(y, on_grid), abs=1e-12)
    ap = float(registry.binned_average_precision(pos, neg)[0])
    assert ap == pytest.approx(average_precision_score(y, on_grid), abs=1e-12)


def test_bins_agree_with_the_threshold_comparison_at_every_grid_point():
    """s >= k/100 exactly when bin(s) >= k, for scores next to each edge (the SQL does the
    same comparison against the same doubles: the grid oracle test above checks the SQL)."""
    for k in range(101):
        t = k / 100
        for s in (np.nextafter(t, 0), t, np.nextafter(t, 2)):
            if 0 <= s <= 1:
                assert (s >= t) == (bin_of(np.array([s]))[0] >= k), (k, s)
        assert partials.grid_bin(float(f"{t:.2f}")) == k
    assert partials.grid_bin(0.123) is None and partials.grid_bin(None) is None


@pytest.mark.parametrize("seed", range(30))
def test_level_pieces_tile_the_range_once(seed):
    rng = np.random.default_rng(seed)
    lo = None if seed % 5 == 0 else int(rng.integers(0, 10**6)) * 60
    hi = (lo or 0) + int(rng.integers(0, 200_000)) * 60
    pieces = partials.level_pieces(lo, hi)
    covered = []
    for width, a, b in pieces:
        assert width in partials.LEVELS and b % width == 0 and (a is None or a % width == 0)
        covered.append((-np.inf if a is None else a, b))
    covered.sort()
    start = -np.inf if lo is None else lo
    for a, b in covered:
        if a == b:
            continue
        assert a == start, (lo, hi, pieces)
        start = b
    assert start == hi or (lo is not None and lo == hi)
    assert len(pieces) <= 2 * (4 + 11 + 23) + 1


def _edit_bins(conn, table, edit, limit=None):
    """Change stored score-bin records in place (``edit`` gets each row's record array), and
    their suffix sums with them."""
    from datasource.store import bins

    with conn.cursor() as cur:
        cur.execute(f"SELECT model_id, segset_id, bucket_end, bins FROM {table}"
                    + (f" LIMIT {int(limit)}" if limit else ""))
        rows = cur.fetchall()
        for m, s, b, blob in rows:
            rec = np.frombuffer(bytes(blob), dtype=bins.RECORD).copy()
            edit(rec)
            value = rec.tobytes()  # and the row's threshold sums, as its writer would
            cur.execute(f"UPDATE {table} SET bins = %s, suffix = %s WHERE model_id = %s"
                        " AND segset_id = %s AND bucket_end = %s", (value, bins.suffix_of(value), m, s, b))
    assert rows


def test_check_rollup_sees_every_level(conn):
    from datasource import ingest

    ingest.register_model(conn, {"name": "m", "threshold": 0.5})
    model = store.get_model(conn, "m")
    from datasource.records import parse_feedback, parse_predictions

    preds = [{"id": f"p{i}", "ts": T0_MS + i * 37_000, "score": (i % 100) / 99, "segments": {"b": "x"}}
             for i in range(600)]
    store.write_predictions(conn, model, parse_predictions(preds, model.task, 10**6))
    fbs = [{"id": f"p{i}", "ts": T0_MS + i * 40_000, "label": i % 2} for i in range(0, 600, 2)]
    store.write_feedback(conn, model, parse_feedback(fbs, model.task, 10**6))
    conn.commit()
    assert store.check_rollup(conn, model) == []
    for table in (*partials.ROLLUP_TABLES.values(), *partials.BIN_TABLES.values()):
        if table.startswith("score_bins"):
            _edit_bins(conn, table, lambda rec: rec.__setitem__("n", rec["n"] + (np.arange(len(rec)) == 0)),
                       limit=1)
        else:
            with conn.cursor() as cur:
                cur.execute(f"UPDATE {table} SET n_pred = n_pred + 1 WHERE ctid ="
                            f" (SELECT ctid FROM {table} LIMIT 1)")
        diffs = store.check_rollup(conn, model)
        assert {d["table"] for d in diffs} == {table}, table
        conn.rollback()
    for table in partials.BIN_TABLES.values():  # the suffix sums alone, the bins intact
        with conn.cursor() as cur:
            cur.execute(f"UPDATE {table} SET suffix = overlay(suffix PLACING '\\xff'::bytea FROM 110)"
                        f" WHERE ctid = (SELECT ctid FROM {table} WHERE length(suffix) > 110 LIMIT 1)")
            assert cur.rowcount == 1
        diffs = store.check_rollup(conn, model)
        assert [(d["table"], d["partial"]) for d in diffs] == [(table, "suffix")], table
        conn.rollback()
    with conn.cursor() as cur:
        cur.execute("UPDATE rollup_1d SET tp = tp + 5")
    store.rebuild_rollup(conn, model)
    assert store.check_rollup(conn, model) == []


def test_grid_thresholds_and_binned_metrics_read_the_score_bins(http, database_url):
    """Not a raw-path answer that happens to agree: emptying the score bins' label counts
    changes these answers (tp = fp = 0 at 0.3; no pairs for ROC AUC), while the model's own
    threshold (the rollup) is unchanged."""
    import psycopg2

    truth = _load(http, np.random.default_rng(2), "binary_classification", threshold=0.5)
    a, b = int(truth.ts_ms.min()) - 60_000, int(truth.ts_ms.max()) + 60_000
    targets = [{"refId": r, "target": m, "payload": {"model": "m", "window": "cumulative", **p}}
               for r, m, p in (("A", "accuracy", {"threshold": "0.3"}),
                               ("B", "roc_auc", {"method": "binned"}),
                               ("C", "accuracy", {}))]

    def values():
        return {i["refId"]: [v for v, _ in i["datapoints"]]
                for i in _query(http, targets, a, b, 3_600_000, 60, [])}

    before = values()
    assert all(v is not None for v in before["A"][-3:] + before["B"][-3:])
    conn = psycopg2.connect(database_url)

    def no_labels(rec):
        rec["pos"] = 0
        rec["neg"] = 0

    for table in partials.BIN_TABLES.values():
        _edit_bins(conn, table, no_labels)
    conn.commit()
    conn.close()
    after = values()
    assert all(v is None for v in after["B"])
    assert all(x != y for x, y in zip(after["A"][-3:], before["A"][-3:], strict=True))
    assert after["C"] == before["C"]


def test_coarse_panels_read_the_coarse_levels(http, database_url):
    """A 1-hour step reads the hour level (a 6 h panel, a cumulative panel's grid), the sum
    before a cumulative panel's first point the day level, a 1-minute step the minute level:
    damaging one level changes exactly the panels that read it; a rebuild restores them."""
    import psycopg2

    _load(http, np.random.default_rng(4), "binary_classification", threshold=0.5)
    a, b = T0_MS + 26 * 3600_000, T0_MS + SPAN_MS
    targets = [{"refId": "A", "target": "accuracy", "payload": {"model": "m", "window": "6h"}},
               {"refId": "B", "target": "accuracy", "payload": {"model": "m", "window": "cumulative"}},
               {"refId": "C", "target": "accuracy", "payload": {"model": "m", "window": "15m"}}]

    def values(interval):
        return {i["refId"]: [v for v, _ in i["datapoints"]]
                for i in _query(http, targets, a, b, interval, 1000, [])}

    hourly, minutes = values(3_600_000), values(60_000)
    conn = psycopg2.connect(database_url)
    for table, changed in (("rollup_1h", {"A", "B"}), ("rollup_1d", {"B"})):
        with conn.cursor() as cur:
            cur.execute(f"UPDATE {table} SET tp = 0")
        conn.commit()
        after = values(3_600_000)
        assert {r for r in after if after[r] != hourly[r]} == changed, table
        assert values(60_000)["C"] == minutes["C"]  # a 1-minute step reads the minute level
        from datasource import store

        with psycopg2.connect(database_url) as c2:
            for model in store.list_models(c2):
                store.rebuild_rollup(c2, model)
        assert values(3_600_000) == hourly
    conn.close()


def test_packed_bins_follow_corrections_and_empty_buckets(conn):
    """The packed rows (store/bins.py) after corrections that move predictions between bins,
    buckets and segment sets, and empty a bucket entirely: equal to a rebuild with each batch's
    delta a row of its own, at most MAX_PARTS rows a key; folded, one row a key, no residue of an
    emptied bin, and the threshold sums equal numpy's on the final rows, before and after."""
    from datasource import ingest
    from datasource.records import parse_feedback, parse_predictions
    from datasource.store import bins

    ingest.register_model(conn, {"name": "m", "threshold": 0.5})
    model = store.get_model(conn, "m")
    rng = np.random.default_rng(9)
    n = 400
    ts = T0_MS + rng.integers(0, 6 * 3600_000, n)
    scores = rng.random(n)
    segs = rng.choice(["x", "y"], n)

    def write(idx):
        preds = [{"id": f"p{i}", "ts": int(ts[i]), "score": float(scores[i]),
                  "segments": {"b": str(segs[i])}} for i in idx]
        store.write_predictions(conn, model, parse_predictions(preds, model.task, 10**6))

    write(range(n))
    fbs = [{"id": f"p{i}", "ts": int(ts[i]) + 60_000, "label": int(rng.random() < scores[i])}
           for i in range(n)]
    store.write_feedback(conn, model, parse_feedback(fbs, model.task, 10**6))
    first_bucket = ts < T0_MS + 3600_000
    for _ in range(3):  # corrections: new scores, segment sets and times; empty the first hour
        moved = rng.choice(n, 120, replace=False)
        scores[moved] = rng.random(120)
        segs[moved] = rng.choice(["x", "y", "z"], 120)
        ts[moved] = T0_MS + rng.integers(3600_000, 6 * 3600_000, 120)
        write(moved)
    ts[first_bucket] = T0_MS + 5 * 3600_000
    write(np.flatnonzero(first_bucket))
    labels = np.array([f["label"] for f in fbs], float)

    def threshold_sums_equal_numpy():
        for k in (0, 30, 50, 77, 100):
            got = store.partials_by_bucket(conn, model, g_s=store.ALL_TIME_S, lo_s=None, hi_s=3_000_000_000,
                                           segset_ids=None, by_segset=False, threshold=k / 100,
                                           from_rollup=True)
            above = scores >= k / 100
            assert got["n_pred_pos"].sum() == above.sum()
            assert got["tp"].sum() == (above & (labels == 1)).sum()
            assert got["fp"].sum() == (above & (labels == 0)).sum()
            np.testing.assert_allclose(got["sum_score_pos"].sum(), scores[above].sum(), rtol=1e-12)

    assert store.check_rollup(conn, model) == []
    threshold_sums_equal_numpy()
    with conn.cursor() as cur:
        for table in partials.BIN_TABLES.values():
            cur.execute(f"SELECT max(c), count(*) FILTER (WHERE c > 1) FROM (SELECT count(*) c FROM {table}"
                        " GROUP BY segset_id, bucket_end) x")
            most, with_deltas = cur.fetchone()
            assert most <= bins.MAX_PARTS and with_deltas > 0, table
    assert store.fold_score_bins(conn, model, chunk_keys=7) > 0  # several chunks, each committed
    assert store.check_rollup(conn, model) == []
    threshold_sums_equal_numpy()
    stored = bins.read(conn, partials.BIN_TABLES[300], "model_id = %(m)s", {"m": model.model_id})
    assert not stored.duplicated(["segset_id", "bucket_end", "bin"]).any()  # one row a key
    assert (stored["n"] > 0).all()  # emptied bins leave no record
    assert stored[stored["bucket_end"] < (T0_MS + 3600_000) // 1000].empty  # the emptied hour


def test_group_sum_sorts_only_when_needed():
    from datasource.store.deltas import group_sum

    rec = {"a": np.array([1, 1, 2, 2, 2]), "b": np.array([5, 5, 1, 3, 3]), "v": np.arange(5.0)}
    out = group_sum(rec, ["a", "b"], ["v"])
    assert out["a"].tolist() == [1, 2, 2] and out["b"].tolist() == [5, 1, 3]
    assert out["v"].tolist() == [1.0, 2.0, 7.0]
    shuffled = {k: v[[4, 0, 2, 1, 3]] for k, v in rec.items()}
    again = group_sum(shuffled, ["a", "b"], ["v"])
    assert {k: v.tolist() for k, v in again.items()} == {k: v.tolist() for k, v in out.items()}


@pytest.mark.parametrize("by_segset", [False, True])
def test_a_grid_thresholds_sums_join_the_rollups_as_an_outer_merge_would(by_segset):
    """reads._outer_join against pandas' outer merge + fillna(0) (what it replaced): keys on
    one side only, on both, none at all; the rollup's own columns keep their values."""
    import pandas as pd

    from datasource.store.reads import _outer_join

    rng = np.random.default_rng(7)
    keys = ["segset_id", "bucket_end"] if by_segset else ["bucket_end"]
    for n_left, n_right in ((0, 0), (0, 5), (6, 0), (40, 30), (300, 310)):
        def unique_keys(n):
            pairs = rng.choice(600, size=n, replace=False)
            return {"segset_id": pairs % 3, "bucket_end": 60 * (pairs // 3 + 1)} if by_segset \
                else {"bucket_end": 60 * (pairs + 1)}
        left = pd.DataFrame({**unique_keys(n_left), "n_lab": rng.integers(0, 9, n_left).astype(float),
                             "revision": rng.integers(1, 99, n_left)})[keys + ["n_lab", "revision"]]
        right = {**unique_keys(n_right), "tp": rng.random(n_right), "fp": rng.random(n_right)}
        got = _outer_join(left, right, keys, ["tp", "fp"])
        want = left.merge(pd.DataFrame(right)[keys + ["tp", "fp"]], on=keys, how="outer").fillna(0.0)
        want = want.sort_values(keys).reset_index(drop=True)
        assert list(got.columns) == keys + ["n_lab", "revision", "tp", "fp"]
        assert len(got) == len(want)
        for c in got.columns:
            assert np.array_equal(got[c].to_numpy(np.float64), want[c].to_numpy(np.float64)), c


def test_packed_rows_are_stored_inline_uncompressed(conn):
    """The design's premise (store/bins.py): a read copies each row's bytes as they are. Rows of
    every bin (over PostgreSQL's 2 KB compression threshold), written through the staging table
    twice (an insert, then a merge): no value of any level is stored compressed."""
    from datasource import ingest
    from datasource.records import parse_predictions

    ingest.register_model(conn, {"name": "m", "threshold": 0.5})
    model = store.get_model(conn, "m")
    for part in range(2):
        preds = [{"id": f"p{part}-{i}", "ts": T0_MS + 1000, "score": (i % 101) / 100,
                  "segments": {"b": "x"}} for i in range(1010)]
        store.write_predictions(conn, model, parse_predictions(preds, model.task, 10**6))
    conn.commit()
    with conn.cursor() as cur:
        for table in partials.BIN_TABLES.values():
            cur.execute(f"SELECT min(octet_length(bins)), count(*) FILTER (WHERE"
                        f" pg_column_size(bins) < octet_length(bins)"
                        f" OR pg_column_size(suffix) < octet_length(suffix)) FROM {table}")
            longest_min, compressed = cur.fetchone()
            assert longest_min > 2048 and compressed == 0, table
    assert store.check_rollup(conn, model) == []


def test_a_key_folds_its_delta_rows_at_max_parts(conn):
    """Forty label batches on one 5-minute bucket: each adds a delta row, and the writer folds
    the key's rows into one whenever they reach MAX_PARTS, so a read never sums more; the rows
    always add up to the raw rows (check_rollup) and to numpy's counts."""
    from datasource import ingest
    from datasource.records import parse_feedback, parse_predictions
    from datasource.store import bins

    ingest.register_model(conn, {"name": "m", "threshold": 0.5})
    model = store.get_model(conn, "m")
    scores = np.linspace(0, 1, 40)
    preds = [{"id": f"p{i}", "ts": T0_MS + 1000 * (i + 1), "score": float(s)} for i, s in enumerate(scores)]
    store.write_predictions(conn, model, parse_predictions(preds, model.task, 10**6))
    counts = []
    for i in range(40):
        store.write_feedback(conn, model, parse_feedback([{"id": f"p{i}", "ts": T0_MS + 600_000, "label": i % 2}],
                                                         model.task, 10**6))
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM score_bins_5m WHERE model_id = %s AND segset_id = 0",
                        (model.model_id,))
            counts.append(cur.fetchone()[0])
    # a batch that brings a key to MAX_PARTS rows folds them: after it, one; then growing again
    folded = counts.index(1)
    assert max(counts) == counts[folded - 1] == bins.MAX_PARTS - 1 and counts[-1] > 1
    assert store.check_rollup(conn, model) == []
    got = store.partials_by_bucket(conn, model, g_s=store.ALL_TIME_S, lo_s=None, hi_s=3_000_000_000,
                                   segset_ids=None, by_segset=False, threshold=0.3, from_rollup=True)
    labels = np.arange(40) % 2
    assert got["tp"].sum() == ((scores >= 0.3) & (labels == 1)).sum()
    assert got["fp"].sum() == ((scores >= 0.3) & (labels == 0)).sum()


def _parts(conn, model_id: int) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM score_bins_5m WHERE model_id = %s AND segset_id = 0", (model_id,))
        n = cur.fetchone()[0]
    conn.commit()
    return n


@pytest.mark.parametrize("others", [1, 9])
def test_a_key_filled_by_batches_committed_while_one_waits_is_folded(clean_db, monkeypatch, others):
    """A batch counts its keys' rows before the rollup lock and folds those that may have
    reached MAX_PARTS by the time it holds it (``bins.fold_full``). Here the bulk client's
    concurrent batches (model lock shared) are played by two connections: batch X counts,
    then waits before the lock while ``others`` batches on one 5-minute key commit; X must
    fold the key. With one batch between, X's count (MAX_PARTS - 1, its own row included)
    plus the revisions taken since reaches MAX_PARTS; with nine, more than FOLD_SLACK
    revisions were taken, and X counts every key again (its count before, 7, was below
    MAX_PARTS - FOLD_SLACK)."""
    import threading

    from datasource import db
    from datasource.records import parse_feedback, parse_model, parse_predictions
    from datasource.store import bins, locks
    from tests.threads import in_thread

    conns = [db.connect(clean_db) for _ in range(2)]
    try:
        main, other = conns
        model, _ = store.upsert_model(main, parse_model({"name": "m", "threshold": 0.5}))
        main.commit()
        n = 40
        preds = [{"id": f"p{i}", "ts": T0_MS + 1000 * (i + 1), "score": i / n} for i in range(n)]
        store.write_predictions(main, model, parse_predictions(preds, model.task, 10**6))
        main.commit()
        start = bins.MAX_PARTS - 2 if others == 1 else bins.MAX_PARTS - bins.FOLD_SLACK - 2
        label = iter(range(n))

        def write(conn, shared=True):
            i = next(label)
            store.write_feedback(conn, model, parse_feedback(
                [{"id": f"p{i}", "ts": T0_MS + 600_000, "label": i % 2}], model.task, 10), shared)
            conn.commit()

        while _parts(main, model.model_id) < start:  # one row per prediction batch and label batch
            write(main, shared=False)
        assert _parts(main, model.model_id) == start
        counted, go = threading.Event(), threading.Event()
        real_lock = locks.lock_rollup
        x_thread: list[threading.Thread] = []

        def lock_after_others(cur, model_id):
            if threading.current_thread() in x_thread:
                counted.set()
                assert go.wait(30)
            return real_lock(cur, model_id)

        monkeypatch.setattr(locks, "lock_rollup", lock_after_others)
        t, out = in_thread(lambda: write(main))
        x_thread.append(t)
        assert counted.wait(30)  # X counted MAX_PARTS - 1 rows (7 with nine others), its own included
        for _ in range(others):
            write(other)
        assert _parts(other, model.model_id) == start + others  # X's row not committed yet
        go.set()
        t.join(30)
        assert "error" not in out, out.get("error")
        assert _parts(main, model.model_id) == 1  # X brought the key to MAX_PARTS rows, and folded them
        assert store.check_rollup(main, model) == []
    finally:
        for c in conns:
            c.close()


def test_the_servers_hourly_upkeep_folds_every_key(clean_db):
    """maintenance.run_once (what each server process runs once an hour) folds every score-bin
    key held in several rows into one; the bins still equal a rebuild."""
    from datasource import db, ingest, maintenance
    from datasource.records import parse_feedback, parse_predictions

    conn = db.connect(clean_db)
    try:
        ingest.register_model(conn, {"name": "m", "threshold": 0.5})
        model = store.get_model(conn, "m")
        preds = [{"id": f"p{i}", "ts": T0_MS + 7_000 * i, "score": (i % 97) / 96} for i in range(300)]
        store.write_predictions(conn, model, parse_predictions(preds, model.task, 10**6))
        conn.commit()
        for k in range(3):  # three label batches: up to four rows a key
            fbs = [{"id": f"p{i}", "ts": T0_MS + 3600_000, "label": i % 2} for i in range(k, 300, 3)]
            store.write_feedback(conn, model, parse_feedback(fbs, model.task, 10**6))
            conn.commit()

        def most_rows():
            with conn.cursor() as cur:
                cur.execute("SELECT max(c) FROM (SELECT count(*) c FROM score_bins_5m"
                            " GROUP BY segset_id, bucket_end) x")
                return cur.fetchone()[0]

        assert most_rows() > 1
        pool = db.Pool(clean_db, 2)
        maintenance.run_once(pool, days=0)
        pool.close()
        assert most_rows() == 1
        assert store.check_rollup(conn, model) == []
    finally:
        conn.close()


def test_the_hourly_upkeep_holds_no_lock_on_models_while_it_folds(clean_db, monkeypatch):
    """run_once lists the models, then folds each: a statement that locks the tables in
    another order meanwhile (the tests' TRUNCATE of every table) is not deadlocked with it.
    Holding the read lock on ``models`` through the folds did deadlock (measured in the suite)."""
    import threading
    import time

    import psycopg2

    from datasource import db, ingest, maintenance
    from tests.conftest import empty_database

    conn = db.connect(clean_db)
    ingest.register_model(conn, {"name": "m", "threshold": 0.5})
    conn.commit()
    conn.close()
    real, listed = store.fold_score_bins, threading.Event()

    def fold_later(c, model, **kw):
        listed.set()
        time.sleep(0.5)  # the TRUNCATE below starts meanwhile
        return real(c, model, **kw)

    monkeypatch.setattr(store, "fold_score_bins", fold_later)
    errors = []

    def upkeep():
        pool = db.Pool(clean_db, 2)
        try:
            maintenance.run_once(pool, days=0)
        except psycopg2.Error as e:
            errors.append(e)
        finally:
            pool.close()

    thread = threading.Thread(target=upkeep)
    thread.start()
    assert listed.wait(10)
    try:
        empty_database(clean_db)
    except psycopg2.Error as e:
        errors.append(e)
    thread.join(10)
    assert errors == []


def test_the_upkeep_thread_of_a_closed_app_stops_without_a_word(clean_db, monkeypatch, caplog):
    """A server process's upkeep thread whose pool was closed (an app closed by a test, or
    replaced) ends at its next round instead of logging that the upkeep failed; while the pool
    is open, a failing round is logged and the thread goes on."""
    import logging
    import threading

    from datasource import db, maintenance

    monkeypatch.setattr(maintenance, "FIRST_DELAY_S", 0.05)
    monkeypatch.setattr(maintenance, "INTERVAL_S", 0.05)
    rounds = []
    monkeypatch.setattr(maintenance, "run_once", lambda pool, days: rounds.append(1) or 1 / 0)
    pool = db.Pool(clean_db, 1)
    with caplog.at_level(logging.WARNING, logger=maintenance.log.name):
        thread = maintenance.start(pool, days=0, stop=threading.Event())
        for _ in range(200):  # two rounds, or 10 s
            if len(rounds) >= 2:
                break
            thread.join(0.05)
        pool.close()
        thread.join(5)
    assert not thread.is_alive()
    failed = [r for r in caplog.records if "store upkeep failed" in r.getMessage()]
    assert len(failed) == len(rounds) >= 2  # the rounds before the close, and none after
