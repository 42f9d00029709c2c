"""The store on a real PostgreSQL: upserts, late and corrected feedback, rollup consistency."""

from __future__ import annotations

import os
import threading
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from datasource import db, ingest, store
from datasource.store.partials import BIN_TABLES, ROLLUP_TABLES
from tests.conftest import STORED_LABELS

T0 = datetime(2020, 2, 1, tzinfo=UTC)


def _counts(conn, name="m"):
    return store.table_counts(conn, store.get_model(conn, name))


def _register(conn, name="m", task="binary_classification", threshold=0.5):
    body = {"name": name, "task": task}
    if threshold is not None and task == "binary_classification":
        body["threshold"] = threshold
    model, _ = ingest.register_model(conn, body)
    conn.commit()
    return model


def _preds(n, seed=0, start=0, id_prefix="p"):
    rng = np.random.default_rng(seed)
    return [{"id": f"{id_prefix}{start + i}", "ts": (T0 + timedelta(seconds=int(rng.integers(0, 7200)))).isoformat(),
             "score": float(rng.random()), "segments": {"b": str(rng.choice(["x", "y", "z"]))},
             "features": {"f": float(rng.normal())}} for i in range(n)]


def _fb(ids, seed=0):
    rng = np.random.default_rng(seed)
    return [{"id": i, "ts": (T0 + timedelta(hours=3)).isoformat(), "label": int(rng.integers(0, 2))} for i in ids]


def _write(conn, kind, recs, name="m"):
    fn = ingest.write_predictions if kind == "p" else ingest.write_feedback
    n = fn(conn, name, recs, 100_000)
    conn.commit()
    return n


def _rollup_all(conn, model):
    with conn.cursor() as cur:
        cur.execute(f"SELECT segset_id, bucket_end, {', '.join(store.PARTIALS)} FROM rollup"
                    " WHERE model_id = %s ORDER BY 1, 2", (model.model_id,))
        return cur.fetchall()


def test_migrations_are_recorded_and_idempotent(conn):
    assert db.migrate(conn) == []
    with conn.cursor() as cur:
        cur.execute("SELECT version FROM schema_version ORDER BY version")
        assert [r[0] for r in cur.fetchall()] == ["001_init.sql", "002_rollup.sql", "003_columns_references.sql", "004_no_row_fk_checks.sql",
                                                 "005_partial_set.sql", "006_levels_bins.sql", "007_bins_packed.sql",
                                                     "008_partitions_retention.sql", "009_fillfactor.sql",
                                                     "010_bins_suffix.sql", "011_bins_parts.sql", "012_prediction_room.sql",
                                                     "013_key_collation.sql", "014_partitions_attached.sql",
                                                         "015_feedback_waiting.sql", "016_rollup_room.sql"]


def test_the_embedded_server_runs_with_the_write_path_settings(conn):
    """db.embedded_url gives its server db.WRITE_PATH_SETTINGS (mlsli.conf, read at start)."""
    if os.environ.get("DATABASE_URL"):
        pytest.skip("the tests run on DATABASE_URL's server, whose settings are its owner's")
    with conn.cursor() as cur:
        for name, value in db.WRITE_PATH_SETTINGS.items():
            cur.execute(f"SHOW {name}")
            assert cur.fetchone()[0] == value, name


def test_rollup_pages_keep_room_for_updates_and_score_bins_are_filled(conn):
    """Migration 016: the rollup levels, updated by every batch, keep half of each page free
    (HOT updates); the score-bin levels, only appended to and folded, are filled."""
    with conn.cursor() as cur:
        cur.execute("SELECT relname, reloptions FROM pg_class WHERE relname = ANY(%(t)s)",
                    {"t": [*ROLLUP_TABLES.values(), *BIN_TABLES.values()]})
        fillfactor = {t: [o for o in opts if o.startswith("fillfactor=")] for t, opts in cur.fetchall()}
    assert fillfactor == {**{t: ["fillfactor=50"] for t in ROLLUP_TABLES.values()},
                          **{t: ["fillfactor=100"] for t in BIN_TABLES.values()}}


def test_same_batch_twice_changes_nothing(conn):
    model = _register(conn)
    recs = _preds(300)
    assert _write(conn, "p", recs) == 300
    assert _write(conn, "f", _fb([r["id"] for r in recs[:200]])) == 200
    before = (_counts(conn), _rollup_all(conn, model))
    assert _write(conn, "p", recs) == 300
    assert _write(conn, "f", _fb([r["id"] for r in recs[:200]])) == 200
    after = (_counts(conn), _rollup_all(conn, model))
    assert before[0] == after[0] == {**after[0], "predictions": 300, "feedback": 200}
    np.testing.assert_allclose(np.array([r[2:] for r in before[1]], float),
                               np.array([r[2:] for r in after[1]], float), rtol=1e-12)
    assert store.check_rollup(conn, model) == []


def test_repeated_id_in_one_batch_counts_once_last_wins(conn):
    model = _register(conn)
    recs = [{"id": "a", "ts": 1580515200000, "score": 0.1}, {"id": "a", "ts": 1580515260000, "score": 0.9}]
    assert _write(conn, "p", recs) == 1
    with conn.cursor() as cur:
        cur.execute("SELECT score, ts FROM predictions")
        assert cur.fetchall() == [(0.9, datetime(2020, 2, 1, 0, 1, tzinfo=UTC))]
    assert store.check_rollup(conn, model) == []


def test_feedback_before_prediction_joins_on_arrival(conn):
    model = _register(conn)
    _write(conn, "f", [{"id": "a", "ts": "2020-02-01T05:00:00Z", "label": 1}])
    assert _counts(conn)["rollup"] == 0  # nothing to join yet
    _write(conn, "p", [{"id": "a", "ts": "2020-02-01T00:00:30Z", "score": 0.8}])
    rows = _rollup_all(conn, model)
    cols = dict(zip(store.PARTIALS, rows[0][2:], strict=True))
    assert (cols["n_pred"], cols["n_lab"], cols["tp"]) == (1, 1, 1)
    assert store.check_rollup(conn, model) == []


def test_label_correction_replaces_old_label(conn):
    model = _register(conn)
    _write(conn, "p", [{"id": "a", "ts": "2020-02-01T00:00:30Z", "score": 0.8}])
    _write(conn, "f", [{"id": "a", "ts": "2020-02-01T05:00:00Z", "label": 1}])
    _write(conn, "f", [{"id": "a", "ts": "2020-02-01T06:00:00Z", "label": 0}])
    with conn.cursor() as cur:
        cur.execute(f"SELECT label, ts FROM {STORED_LABELS}")
        assert cur.fetchall() == [(0.0, datetime(2020, 2, 1, 6, tzinfo=UTC))]
    by_segset = {r[0]: dict(zip(store.PARTIALS, r[2:], strict=True)) for r in _rollup_all(conn, model)}
    assert by_segset[0]["tp"] == 0 and by_segset[0]["fp"] == 1 and by_segset[0]["n_lab"] == 1
    assert store.check_rollup(conn, model) == []


def test_moved_prediction_leaves_its_old_bucket(conn):
    model = _register(conn)
    _write(conn, "p", [{"id": "a", "ts": "2020-02-01T00:00:30Z", "score": 0.8, "segments": {"b": "x"}}])
    _write(conn, "f", [{"id": "a", "ts": "2020-02-01T05:00:00Z", "label": 1}])
    _write(conn, "p", [{"id": "a", "ts": "2020-02-01T03:00:30Z", "score": 0.2, "segments": {"b": "y"}}])
    live = [r for r in _rollup_all(conn, model) if r[2] > 0]
    assert {(r[1]) for r in live} == {int(datetime(2020, 2, 1, 3, 1, tzinfo=UTC).timestamp())}
    assert store.check_rollup(conn, model) == []


def test_migration_015_keeps_in_feedback_only_the_labels_that_wait(conn):
    """A store written before migration 015 held every label in feedback too (the label of a
    stored prediction twice). Applied to such rows, the migration deletes those whose
    prediction is stored, leaves the waiting ones, and changes no label or count."""
    model = _register(conn)
    _write(conn, "p", [{"id": k, "ts": "2020-02-01T00:00:30Z", "score": 0.8} for k in ("a", "b", "c")])
    _write(conn, "f", [{"id": k, "ts": "2020-02-01T05:00:00Z", "label": 1} for k in ("a", "b", "w")])
    with conn.cursor() as cur:  # the rows as 008-014 wrote them: each stored prediction's label again
        cur.execute("INSERT INTO feedback (model_id, output_id, ts, label)"
                    " SELECT model_id, output_id, label_ts, label FROM predictions WHERE label IS NOT NULL")
        cur.execute("DELETE FROM schema_version WHERE version = '015_feedback_waiting.sql'")
    conn.commit()
    before = _counts(conn)
    assert before["feedback"] == 5  # a and b twice, w waiting
    assert db.migrate(conn) == ["015_feedback_waiting.sql"]
    with conn.cursor() as cur:
        cur.execute("SELECT output_id, label FROM feedback")
        assert cur.fetchall() == [("w", 1.0)]
        cur.execute("SELECT output_id, label FROM predictions ORDER BY 1")
        assert cur.fetchall() == [("a", 1.0), ("b", 1.0), ("c", None)]
    assert _counts(conn) == {**before, "feedback": 3}
    assert store.check_rollup(conn, model) == []


def test_rollup_equals_rebuild_after_random_mixed_writes(conn):
    """Random batches of new, repeated, moved predictions, early/late/corrected feedback."""
    model = _register(conn)
    rng = np.random.default_rng(42)
    ids = [f"o{i}" for i in range(400)]
    truth_pred, truth_label, truth_label_ms = {}, {}, {}
    for step in range(30):
        pick = rng.choice(ids, size=int(rng.integers(1, 60)), replace=True)
        if rng.random() < 0.55:
            recs = [{"id": str(i), "ts": int(1580515200000 + rng.integers(0, 6 * 3600) * 1000 + rng.integers(0, 1000)),
                     "score": float(rng.choice([0.0, 0.5, 1.0, rng.random()])),
                     "segments": {"b": str(rng.choice(["x", "y"])), "v": str(rng.choice(["1", "2"]))}}
                    for i in pick]
            _write(conn, "p", recs)
            truth_pred.update({r["id"]: r for r in recs})
        else:
            recs = [{"id": str(i), "ts": int(1580600000000 + rng.integers(0, 10**6)),
                     "label": int(rng.integers(0, 2))} for i in pick]
            _write(conn, "f", recs)
            truth_label.update({r["id"]: r["label"] for r in recs})
            truth_label_ms.update({r["id"]: r["ts"] for r in recs})
        assert store.check_rollup(conn, model) == [], f"after batch {step}"
    # Independent oracle for the all-segments rows: recount from the Python-side truth.
    rows = {r[1]: dict(zip(store.PARTIALS, r[2:], strict=True)) for r in _rollup_all(conn, model) if r[0] == 0}
    expect: dict[int, dict] = {}
    for oid, r in truth_pred.items():
        bucket = -(-r["ts"] // 60000) * 60
        e = expect.setdefault(bucket, {"n_pred": 0, "n_lab": 0, "tp": 0, "sum_score": 0.0})
        e["n_pred"] += 1
        e["sum_score"] += r["score"]
        if oid in truth_label:
            e["n_lab"] += 1
            e["tp"] += int(truth_label[oid] == 1 and r["score"] >= 0.5)
    for bucket, e in expect.items():
        got = rows[bucket]
        assert (got["n_pred"], got["n_lab"], got["tp"]) == (e["n_pred"], e["n_lab"], e["tp"])
        assert got["sum_score"] == pytest.approx(e["sum_score"], rel=1e-9, abs=1e-12)
    assert all(rows[b]["n_pred"] == 0 for b in rows if b not in expect)
    with conn.cursor() as cur:  # one label per key, and each prediction holds its key's label
        cur.execute(f"SELECT output_id, label FROM {STORED_LABELS} WHERE model_id = %s", (model.model_id,))
        feedback = cur.fetchall()
        cur.execute("SELECT output_id, label FROM predictions WHERE model_id = %s", (model.model_id,))
        on_predictions = dict(cur.fetchall())
        cur.execute("SELECT output_id, (extract(epoch FROM label_ts) * 1000)::int8 FROM predictions"
                    " WHERE model_id = %s AND label IS NOT NULL", (model.model_id,))
        label_ms = dict(cur.fetchall())
        cur.execute("SELECT output_id, label FROM feedback WHERE model_id = %s", (model.model_id,))
        waiting = dict(cur.fetchall())
    assert sorted(feedback) == sorted((k, float(v)) for k, v in truth_label.items())
    assert on_predictions == {k: (float(truth_label[k]) if k in truth_label else None) for k in truth_pred}
    # each label's time travels with it (a label that waited, a re-sent prediction keeping its label)
    assert label_ms == {k: truth_label_ms[k] for k in truth_pred if k in truth_label}
    # feedback holds the labels whose prediction has not come, and only those (migration 015)
    assert waiting == {k: float(v) for k, v in truth_label.items() if k not in truth_pred}
    assert 0 < len(waiting) < len(truth_label)


def test_rebuild_restores_a_damaged_rollup(conn):
    model = _register(conn)
    recs = _preds(100)
    _write(conn, "p", recs)
    _write(conn, "f", _fb([r["id"] for r in recs]))
    with conn.cursor() as cur:
        cur.execute("UPDATE rollup SET tp = tp + 1 WHERE segset_id = 0")
    conn.commit()
    assert store.check_rollup(conn, model)
    store.rebuild_rollup(conn, model)
    conn.commit()
    assert store.check_rollup(conn, model) == []


def test_threshold_change_rebuilds_rollup(conn):
    model = _register(conn, threshold=0.5)
    recs = _preds(200)
    _write(conn, "p", recs)
    _write(conn, "f", _fb([r["id"] for r in recs]))
    model = _register(conn, threshold=0.3)
    assert model.threshold == 0.3
    assert store.check_rollup(conn, model) == []
    expected = sum(1 for r in recs if r["score"] >= 0.3)
    rows = [dict(zip(store.PARTIALS, r[2:], strict=True)) for r in _rollup_all(conn, model) if r[0] == 0]
    assert sum(r["n_pred_pos"] for r in rows) == expected


def test_task_change_refused_once_data_exists(conn):
    _register(conn)
    _write(conn, "p", _preds(3))
    with pytest.raises(Exception, match="task cannot change"):
        ingest.register_model(conn, {"name": "m", "task": "regression"})


def test_two_concurrent_writers_on_overlapping_ids(clean_db):
    setup = db.connect(clean_db)
    model = _register(setup)
    errors = []

    def writer(seed):
        c = db.connect(clean_db)
        try:
            for k in range(8):
                recs = _preds(150, seed=seed * 100 + k, start=0)  # same ids p0..p149 in both
                ingest.write_predictions(c, "m", recs, 10_000)
                c.commit()
                ingest.write_feedback(c, "m", _fb([r["id"] for r in recs[::2]], seed=seed + k), 10_000)
                c.commit()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
        finally:
            c.close()

    threads = [threading.Thread(target=writer, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert _counts(setup) == {**_counts(setup), "predictions": 150, "feedback": 75}
    assert store.check_rollup(setup, model) == []
    setup.close()


def test_raw_reads_give_the_written_rows_and_times_to_the_bit(conn):
    """joined_rows and column_rows send the time as timestamptz and convert it in numpy: each
    ts_s equals the written microseconds / 10^6 correctly rounded (Python's exact integer
    division) and PostgreSQL's date_part('epoch', ts), bit for bit, before 1970, around 2000
    and after 2100; ``columns`` and ``labeled_only`` select what they say."""
    model = _register(conn)
    rng = np.random.default_rng(4)
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    written, scores = {}, {}
    for k, start in enumerate([datetime(1950, 3, 1, tzinfo=UTC), datetime(1999, 12, 31, 23, tzinfo=UTC),
                               datetime(2020, 2, 1, tzinfo=UTC), datetime(2150, 6, 1, tzinfo=UTC)]):
        recs = []
        for i in range(60):
            ts = start + timedelta(microseconds=int(rng.integers(0, 2 * 3600 * 10**6)))
            recs.append({"id": f"c{k}-{i}", "ts": ts.isoformat(), "score": float(rng.random()),
                         "segments": {"b": str(rng.choice(["x", "y"]))}})
            written[f"c{k}-{i}"] = ts
            scores[ts] = recs[-1]["score"]
        _write(conn, "p", recs)
        _write(conn, "f", [{"id": r["id"], "ts": (written[r["id"]] + timedelta(minutes=5)).isoformat(),
                            "label": int(rng.integers(0, 2))} for r in recs[::3]])
    us = sorted((ts - epoch) // timedelta(microseconds=1) for ts in written.values())
    exact = np.array([u / 10**6 for u in us])  # int / int: correctly rounded
    rows = store.joined_rows(conn, model, lo_s=None, hi_s=10**10, segset_ids=None)
    assert list(rows.columns) == ["ts_s", "score", "label", "delay_s", "segset_id"]
    np.testing.assert_array_equal(rows["ts_s"].to_numpy(), exact)
    np.testing.assert_array_equal(rows["score"].to_numpy(), [scores[t] for t in sorted(scores)])
    with conn.cursor() as cur:
        cur.execute("SELECT date_part('epoch', ts) FROM predictions WHERE model_id = %s ORDER BY ts",
                    (model.model_id,))
        np.testing.assert_array_equal(rows["ts_s"].to_numpy(), [r[0] for r in cur.fetchall()])
    np.testing.assert_array_equal(
        store.column_rows(conn, model, feature=None, lo_s=None, hi_s=10**10, segset_ids=None)["ts_s"], exact)
    np.testing.assert_allclose(rows.loc[~rows["label"].isna(), "delay_s"], 300.0)
    labeled = store.joined_rows(conn, model, lo_s=None, hi_s=10**10, segset_ids=None,
                                columns=("score", "label"), labeled_only=True)
    assert list(labeled.columns) == ["ts_s", "score", "label"] and len(labeled) == 4 * 20
    np.testing.assert_array_equal(labeled.to_numpy(),
                                  rows.loc[~rows["label"].isna(), ["ts_s", "score", "label"]].to_numpy())


def test_ids_and_features_reach_the_tables_as_sent(conn):
    """Write batches are staged by binary COPY, their texts laid out by byte offsets: ids and
    feature names with quotes, commas, backslashes, newlines, tabs and non-ASCII characters (2-,
    3- and 4-byte UTF-8) come back from the tables as they were sent, and so do the times."""
    model = _register(conn)
    rng = np.random.default_rng(8)
    alphabet = ['a', 'Z', '0', ',', '"', "'", '\\', '\n', '\t', ' ', 'é', '€', '😀', '\u2028', '{', '}']
    sent = {}
    for batch in range(3):
        recs = []
        for i in range(200):
            oid = f"{batch}-{i}-" + "".join(rng.choice(alphabet, int(rng.integers(0, 12))))
            name = "f" + "".join(rng.choice(alphabet, int(rng.integers(0, 5))))
            ts = T0 + timedelta(microseconds=int(rng.integers(0, 10 * 86400 * 10**6)))
            recs.append({"id": oid, "ts": ts.isoformat(), "score": float(rng.random()),
                         "features": {name: float(rng.normal())} if i % 3 else {}})
            sent[oid] = (ts, recs[-1]["features"])
        _write(conn, "p", recs)
        _write(conn, "f", [{"id": r["id"], "ts": sent[r["id"]][0].isoformat(), "label": 1} for r in recs[::2]])
    with conn.cursor() as cur:
        cur.execute("SELECT output_id, ts, features FROM predictions WHERE model_id = %s", (model.model_id,))
        stored = {oid: (ts, features) for oid, ts, features in cur.fetchall()}
        cur.execute(f"SELECT output_id FROM {STORED_LABELS} WHERE model_id = %s", (model.model_id,))
        labeled = {r[0] for r in cur.fetchall()}
    assert stored == sent
    assert labeled == {oid for k, oid in enumerate(sent) if k % 200 % 2 == 0}


def test_the_same_segments_in_any_key_order_are_one_segment_set(conn):
    """Segment sets are found by each record's segments as written, then by their canonical
    text: the same pairs in another order or as numpy strings, in the same batch or a later
    one, are one set; other values, or a value in another key, are another."""
    model = _register(conn)
    same = [{"borough": "Queens", "vendor": "1", "zone": "é 😀"}, {"zone": "é 😀", "vendor": "1", "borough": "Queens"},
            {np.str_("vendor"): np.str_("1"), "zone": "é 😀", "borough": np.str_("Queens")}]  # as pandas gives them
    other = [{"borough": "1", "vendor": "Queens", "zone": "é 😀"}, {"borough": "Queens", "vendor": "1"}, {}]
    for batch in range(2):
        _write(conn, "p", [{"id": f"{batch}-{i}", "ts": T0.isoformat(), "score": 0.5, "segments": s}
                           for i, s in enumerate(same + other)])
    sets = store.segment_sets(conn, model.model_id)
    assert sorted(map(len, sets.values())) == [0, 2, 3, 3]
    (queens,) = [k for k, segments in sets.items() if segments == same[0]]
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM predictions WHERE model_id = %s AND segset_id = %s",
                    (model.model_id, queens))
        assert cur.fetchone()[0] == 6
