"""Which writers of one model may run at once, and the write revision in commit order.

A write batch does two things, each under a lock held to its commit:
* **raw rows**: it replaces its keys (delete-then-insert: the partitioned tables have no
  unique index, so two writers of one key must not interleave) and labels their rows, under
  the model's lock (``lock_writer``). A writer takes it exclusively; the bulk client
  (``client._Local``) takes it shared for the transactions it has in flight at once (one
  per connection), whose keys it has checked to be disjoint, while it holds the model's bulk
  lock (``hold_bulk``: one bulk client per model);
* **rollup**: it adds its deltas under the model's rollup lock, and takes the write revision
  there (``lock_rollup``); the score bins' delta rows go in before it, and only folding a
  score-bin key happens under it (``bins.fold_full``). One writer at a time holds it, until
  it commits, so revisions grow in commit order: a cached value that carries the highest
  revision of its window is stale exactly when a later commit touched that window
  (``engine``). Had each of two concurrent writers taken its revision at its start, they
  could commit in the other order.

Why: one PostgreSQL backend runs on one core. The bulk client writes batch n+1's raw rows on
one connection while batch n adds its deltas and commits on another, and the Python of one
runs while PostgreSQL works for the other (benchmarks/ingest.py: 1M predictions + 800K
labels, 57K rows/s with one connection, 78-80K with three). Split by key instead, two
transactions each touched nearly every rollup row of the batch's time range, twice the
upserts: slower than one connection (benchmarks/README.md). Every writer takes its locks in
one order (the retention horizon, the model, the partition lock, the rollup), so none waits
for another in a cycle.
"""

from __future__ import annotations

from datasource.store.partials import LOCK_NAMESPACE

ROLLUP_NAMESPACE = 715020  # key: model_id
BULK_NAMESPACE = 715021  # key: model_id (a session lock of the bulk client)


def lock_writer(cur, model_id: int, shared: bool = False) -> None:
    """A writer's lock on the model's raw rows: exclusive, or shared for the bulk client's
    concurrent transactions (disjoint keys, under ``hold_bulk``)."""
    fn = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
    cur.execute(f"SELECT {fn}(%(ns)s, %(m)s)", {"ns": LOCK_NAMESPACE, "m": model_id})


def lock_rollup(cur, model_id: int) -> int:
    """Take the model's rollup lock (to the commit) and return the batch's write revision."""
    cur.execute("SELECT pg_advisory_xact_lock(%(ns)s, %(m)s); SELECT nextval('write_revision')",
                {"ns": ROLLUP_NAMESPACE, "m": model_id})
    return cur.fetchone()[0]


def hold_bulk(conn, model_id: int) -> None:
    """Become the model's one bulk writer (a session lock: waits for another to finish)."""
    with conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_lock(%(ns)s, %(m)s)", {"ns": BULK_NAMESPACE, "m": model_id})
    conn.commit()


def release_bulk(conn, model_id: int) -> None:
    with conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_unlock(%(ns)s, %(m)s)", {"ns": BULK_NAMESPACE, "m": model_id})
    conn.commit()
