"""Writers of one model at once (``store.locks``): the bulk client's batches in flight.

A batch takes the model's lock shared (the bulk client's batches, keys disjoint) and its
write revision when it takes the rollup lock, which it holds to its commit: revisions grow in
commit order even when batches start in another order. ``Client.local(writers=3)`` leaves
the tables ``writers=1`` leaves, with repeated keys across batches, corrections and labels
that came before their predictions, and the rollup equal to a rebuild from raw rows.
"""

from __future__ import annotations

import numpy as np

from datasource import db, ingest, records, store
from datasource.client import Client
from tests.conftest import STORED_LABELS, empty_database
from tests.threads import in_thread

DAY_MS = 86_400_000
W1_MS = 1_580_947_200_000  # 2020-02-06, a Thursday: a week of partitions starts here


def _predictions(prefix: str, start_ms: int, n: int = 20):
    return records.parse_predictions(
        [{"id": f"{prefix}{i}", "ts": start_ms + i * 1000, "score": (i % 10) / 10} for i in range(n)],
        "binary_classification", n)


def _revision(conn, model, lo_ms: int, hi_ms: int) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT max(revision) FROM rollup WHERE model_id = %s AND bucket_end > %s"
                    " AND bucket_end <= %s", (model.model_id, lo_ms // 1000, hi_ms // 1000 + 60))
        return cur.fetchone()[0]


def test_revisions_follow_commits_when_batches_start_in_another_order(clean_db):
    """B starts first and waits (for a new week, while another transaction holds the
    partition lock); A starts later, passes it (both hold the model's lock shared) and
    commits first. B's revision must be the higher: taken at its start it would be the lower,
    and a value cached at A's revision would not see B's rows."""
    conns = [db.connect(clean_db) for _ in range(3)]
    a, b, holder = conns
    model = ingest.register_model(a, {"name": "m"})[0]
    assert store.write_predictions(a, model, _predictions("old", W1_MS)) == 20  # week W1 exists
    a.commit()
    with holder.cursor() as cur:  # the partition lock, as a writer making a week holds it
        cur.execute("SELECT pg_advisory_xact_lock(715018, -1)")

    def write_b():
        n = store.write_predictions(b, model, _predictions("b", W1_MS + 7 * DAY_MS), shared=True)
        b.commit()
        return n

    t, out = in_thread(write_b)
    t.join(1.0)
    assert t.is_alive(), "B did not wait for the partition lock"
    assert store.write_predictions(a, model, _predictions("a", W1_MS + DAY_MS), shared=True) == 20
    a.commit()  # A, started after B, commits first
    holder.commit()
    t.join(30)
    assert out == {"value": 20}, out
    rev_a = _revision(a, model, W1_MS + DAY_MS, W1_MS + DAY_MS + 20_000)
    rev_b = _revision(a, model, W1_MS + 7 * DAY_MS, W1_MS + 7 * DAY_MS + 20_000)
    assert rev_b > rev_a, (rev_a, rev_b)
    assert store.check_rollup(a, model) == []
    for c in conns:
        c.close()


def test_a_writer_waits_for_the_rollup_lock_of_another_batch(clean_db):
    """A batch that holds the rollup lock (its deltas added, not committed) keeps a second
    batch of disjoint keys out of the rollup, not out of the raw rows: the second is found
    waiting for the rollup lock, its raw rows written; it commits after the first."""
    a, b, watcher = (db.connect(clean_db) for _ in range(3))
    model = ingest.register_model(a, {"name": "m"})[0]
    # the segment set and the week committed first: a batch that makes one holds it to its
    # commit, and a second batch with the same new one waits for that
    assert store.write_predictions(a, model, _predictions("old", W1_MS)) == 20
    a.commit()
    assert store.write_predictions(a, model, _predictions("a", W1_MS + 120_000), shared=True) == 20

    def write_b():
        n = store.write_predictions(b, model, _predictions("b", W1_MS + 240_000), shared=True)
        b.commit()
        return n

    t, out = in_thread(write_b)
    waiting = []
    for _ in range(100):
        with watcher.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                        " AND classid = %s AND objid = %s", (store.locks.ROLLUP_NAMESPACE, model.model_id))
            waiting.append(cur.fetchone()[0])
        watcher.rollback()
        if waiting[-1]:
            break
        t.join(0.05)
    assert waiting[-1] == 1 and t.is_alive(), "B did not reach the rollup lock while A held it"
    a.commit()
    t.join(30)
    assert out == {"value": 20}, out
    assert store.table_counts(a, model)["predictions"] == 60
    assert store.check_rollup(a, model) == []
    for c in (a, b, watcher):
        c.close()


def _snapshot(url: str):
    conn = db.connect(url)
    with conn.cursor() as cur:
        cur.execute("SELECT output_id, ts, score, label, label_ts FROM predictions ORDER BY 1")
        p = cur.fetchall()
        cur.execute(f"SELECT output_id, ts, label FROM {STORED_LABELS} ORDER BY 1")
        f = cur.fetchall()
        cur.execute(f"SELECT segset_id, bucket_end, {', '.join(store.PARTIALS)} FROM rollup ORDER BY 1, 2")
        r = cur.fetchall()
    model = store.get_model(conn, "m")
    diffs = store.check_rollup(conn, model)
    conn.rollback()
    conn.close()
    return p, f, r, diffs


def test_three_writers_leave_the_tables_one_writer_leaves(clean_db):
    """Batches of 300 with keys re-sent two batches later (that batch waits for the first,
    with the one between still in flight) and in the next batch, corrections, and labels sent
    before their predictions."""
    rng = np.random.default_rng(5)
    n = 3000
    ids = [f"k{i}" for i in range(n)]
    ts = W1_MS + np.sort(rng.integers(0, 20 * DAY_MS, n))
    preds = [{"id": ids[i], "ts": int(ts[i]), "score": float(rng.random()),
              "segments": {"s": "ab"[i % 2]}} for i in range(n)]
    resent = [dict(p, score=float(rng.random())) for p in preds[100:200] + preds[650:750]]
    early = [{"id": f"k{i}", "ts": int(ts[i]) + 1000, "label": int(rng.random() < 0.5)} for i in range(2900, 3000)]
    labels = [{"id": ids[i], "ts": int(ts[i]) + int(rng.integers(1, DAY_MS)), "label": int(rng.random() < 0.6)}
              for i in rng.permutation(2900)[:2000]]
    fixes = [dict(x, label=1 - x["label"], ts=x["ts"] + 1) for x in labels[:200]]
    snapshots = []
    for writers in (1, 3):
        empty_database(clean_db)
        with Client.local(database_url=clean_db, batch_size=300, writers=writers) as client:
            client.register_model("m")
            assert client.write_feedback("m", early) == len(early)
            # the segment sets first: a batch that makes one holds it to its commit, and the
            # next batch would wait for that instead of running beside it
            assert client.write_predictions("m", [{"id": f"w{s}", "ts": W1_MS, "score": 0.5,
                                                   "segments": {"s": s}} for s in "ab"]) == 2
            # batches of 300: k0-k299, k300-k599, then k100-k199 again with k600-k799 (the
            # first batch's keys), then k650-k749 again with k800-k999 (the previous batch's)
            stream = preds[:600] + resent[:100] + preds[600:800] + resent[100:] + preds[800:]
            assert client.write_predictions("m", stream) == n + len(resent)
            assert client.write_feedback("m", labels + fixes) == len(labels) + len(fixes)
        snapshots.append(_snapshot(clean_db))
    (p1, f1, r1, d1), (p2, f2, r2, d2) = snapshots
    assert d1 == [] and d2 == []
    assert (p1, f1) == (p2, f2)
    assert [row[:2] for row in r1] == [row[:2] for row in r2]
    for name, c1, c2 in zip(store.PARTIALS, np.array(r1, float).T[2:], np.array(r2, float).T[2:], strict=True):
        np.testing.assert_allclose(c1, c2, rtol=1e-9, atol=1e-9, err_msg=name)
    # against the records as sent: each id's last score, and its last label (early labels
    # joined when their prediction came, corrections over first labels)
    score, label = {}, {}
    for rec in preds[:600] + resent[:100] + preds[600:800] + resent[100:] + preds[800:]:
        score[rec["id"]] = rec["score"]
    for rec in early + labels + fixes:
        label[rec["id"]] = float(rec["label"])
    assert {row[0]: row[2] for row in p2 if row[0][0] == "k"} == score
    assert {row[0]: row[3] for row in p2 if row[3] is not None} == label


def test_labels_before_the_horizon_are_counted_with_several_writers_as_with_one(clean_db):
    """The bulk client makes a batch's weeks before writing it, but not weeks before the
    retention horizon: 70 labels in 70 dropped weeks are counted as late, as one writer counts
    them (making their weeks first, it refused the batch: more than 64 new weeks at once)."""
    horizon_ms = W1_MS + 100 * 7 * DAY_MS
    late = [{"id": f"gone{w}", "ts": W1_MS + w * 7 * DAY_MS, "label": 1} for w in range(70)]
    counts = []
    for writers in (1, 3):
        empty_database(clean_db)
        conn = db.connect(clean_db)
        with conn.cursor() as cur:
            cur.execute("INSERT INTO raw_horizon (id, horizon) VALUES (1, to_timestamp(%s))", (horizon_ms / 1000,))
        conn.commit()
        with Client.local(database_url=clean_db, writers=writers) as client:
            client.register_model("m")
            assert client.write_feedback("m", late) == 0
        counts.append(store.retention_status(conn, store.get_model(conn, "m").model_id)["late_labels_dropped"])
        conn.close()
    assert counts == [70, 70]
