"""A partial added to the declared set is rebuilt from raw rows on the next start, not served as
the zeros of a column DEFAULT; an unchanged set rebuilds nothing."""

from __future__ import annotations

import numpy as np

from datasource import db, store
from datasource.store import partials

NEW = "n_confident"
NEW_SQL = "count(*) FILTER (WHERE p.score >= 0.9 OR p.score <= 0.1)"


def NEW_ROW(r):  # noqa: N802 - the same partial per row, in numpy (what writes keep up to date)
    return ((r.score >= 0.9) | (r.score <= 0.1)).astype(float)


def _write(client, rng, n=600):
    client.register_model("m", threshold=0.5)
    t0 = 1580515200000
    preds = [{"id": f"o{i}", "ts": t0 + int(rng.integers(0, 6 * 3600_000)),
              "score": float(rng.random()), "segments": {"b": str(rng.choice(["x", "y"]))}}
             for i in range(n)]
    client.write_predictions("m", preds)
    client.write_feedback("m", [{"id": p["id"], "ts": p["ts"] + 60_000, "label": int(rng.random() < 0.5)}
                                for p in preds[::2]])
    return preds


def test_new_partial_is_rebuilt_with_values_on_next_start(client, clean_db, monkeypatch):
    preds = _write(client, np.random.default_rng(1))
    conn = db.connect(clean_db)
    try:
        assert db.migrate(conn) == [] and not store.sync_partials(conn)  # unchanged: no rebuild
        monkeypatch.setitem(store.PARTIALS, NEW, NEW_SQL)
        try:
            store.check_schema(conn)
            raise AssertionError("check_schema accepted a rollup built for another partial set")
        except RuntimeError as e:
            assert "migrations" in str(e)
        db.migrate(conn)  # what the next start-up runs
        store.check_schema(conn)
        model = store.get_model(conn, "m")
        with conn.cursor() as cur:
            cur.execute(f"SELECT sum({NEW}), count(*) FILTER (WHERE {NEW} <> 0) FROM rollup"
                        " WHERE model_id = %s AND segset_id = 0", (model.model_id,))
            total, nonzero_rows = cur.fetchone()
            cur.execute(f"SELECT segset_id, sum({NEW}) FROM rollup WHERE model_id = %s"
                        " AND segset_id <> 0 GROUP BY 1", (model.model_id,))
            per_segset = dict(cur.fetchall())
        conn.rollback()
        scores = np.array([p["score"] for p in preds])
        expected = int(((scores >= 0.9) | (scores <= 0.1)).sum())
        assert expected > 50 and total == expected and nonzero_rows > 0
        assert sum(per_segset.values()) == expected
        assert store.check_rollup(conn, model) == []
        # a write needs the partial's per-row form too: without it, refused, nothing written
        try:
            client.write_predictions("m", [{"id": "late", "ts": preds[0]["ts"], "score": 0.95}])
            raise AssertionError("a partial without its per-row form was not kept, yet accepted")
        except RuntimeError as e:
            assert "PARTIAL_ROWS" in str(e)
        # with it, writes after the rebuild keep the new partial up to date
        monkeypatch.setitem(partials.PARTIAL_ROWS, NEW, NEW_ROW)
        client.write_predictions("m", [{"id": "late", "ts": preds[0]["ts"], "score": 0.95}])
        assert store.check_rollup(conn, model) == []
        with conn.cursor() as cur:
            cur.execute(f"SELECT sum({NEW}) FROM rollup WHERE model_id = %s AND segset_id = 0",
                        (model.model_id,))
            assert cur.fetchone()[0] == expected + 1
        conn.rollback()
    finally:
        monkeypatch.undo()
        with conn.cursor() as cur:
            cur.execute(f"ALTER TABLE rollup DROP COLUMN IF EXISTS {NEW}")
        conn.commit()
        db.migrate(conn)  # back to the declared set for the other tests
        store.check_schema(conn)
        conn.close()
