"""Writes: staged upserts of predictions and feedback with rollup upkeep, rebuild and check.

Each write batch, in one transaction, upserts the raw rows of its keys under the model's
lock, then adds to the rollup the old contribution of the rows it replaced, negated, and the
new one of the rows it wrote, under the model's rollup lock (``locks``): the rollup always
equals a rebuild from raw rows (``rebuild_rollup`` / ``check_rollup``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from datasource.errors import ClientError
from datasource.records import FeedbackRows, PredictionRows
from datasource.store import binary_copy, bins, deltas, locks, retention
from datasource.store.catalog import Model, _segset_ids, list_models
from datasource.store.partials import (
    BIN_BASE_S,
    BIN_COUNTS,
    BIN_EDGES,
    BIN_LEVELS,
    BIN_PARTIALS,
    BIN_TABLES,
    COUNT_PARTIALS,
    EPS,
    LEVELS,
    LOCK_NAMESPACE,
    PARTIALS,
    ROLLUP_TABLES,
    all_contributions,
    bin_contributions,
    cols,
    level_bucket,
    partial_type,
    partials_fingerprint,
)
from datasource.store.reads import _copy_out

log = logging.getLogger(__name__)



def _rollup_columns(cur, table: str = "rollup") -> set[str]:
    cur.execute(
        "SELECT column_name FROM information_schema.columns"
        " WHERE table_name = %(t)s AND table_schema = current_schema()", {"t": table}
    )
    return {r[0] for r in cur.fetchall()}


def sync_partials(conn) -> bool:
    """Derive the rollup's partial columns from ``PARTIALS`` and rebuild every model's rollup
    when the declared set changed since the last start (its fingerprint is stored in
    ``partial_set``). Needs the owner role (it may ALTER the table); runs with the migrations.
    Returns whether the rollup was rebuilt."""
    fingerprint = partials_fingerprint()
    with conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(%(ns)s, 0)", {"ns": LOCK_NAMESPACE})
        cur.execute("SELECT fingerprint FROM partial_set WHERE id = 1")
        row = cur.fetchone()
        if row and row[0] == fingerprint:
            conn.commit()
            return False
        for table in ROLLUP_TABLES.values():  # every level has the declared columns
            for name in sorted(set(PARTIALS) - _rollup_columns(cur, table)):
                cur.execute(f"ALTER TABLE {table} ADD COLUMN {name} {partial_type(name)}"
                            " NOT NULL DEFAULT 0")
        models = list_models(conn)
        log.warning("the declared partial set changed (fingerprint %s): rebuilding the rollup of "
                    "%d model(s)", fingerprint[:12], len(models))
        rows = sum(rebuild_rollup(conn, m) for m in models)
        cur.execute(
            "INSERT INTO partial_set (id, fingerprint) VALUES (1, %(f)s)"
            " ON CONFLICT (id) DO UPDATE SET fingerprint = excluded.fingerprint, updated_at = now()",
            {"f": fingerprint})
    conn.commit()
    log.warning("rollup rebuilt: %d rows", rows)
    return True


def check_schema(conn) -> None:
    """Fail fast when the rollup does not hold the declared partials (``sync_partials`` not run)."""
    with conn.cursor() as cur:
        missing = {f"{t}.{c}" for t in ROLLUP_TABLES.values() for c in set(PARTIALS) - _rollup_columns(cur, t)}
        missing |= {f"{t}.{c}" for t in BIN_TABLES.values() for c in ("bins", "suffix")
                    if c not in _rollup_columns(cur, t)}
        cur.execute("SELECT fingerprint FROM partial_set WHERE id = 1")
        row = cur.fetchone()
    conn.rollback()
    if missing:
        raise RuntimeError(f"rollup table lacks partial columns {sorted(missing)}; run the migrations")
    if not row or row[0] != partials_fingerprint():
        raise RuntimeError("the rollup was built for another partial set; run the migrations")


# --------------------------------------------------------------------------- writes


# The rows a batch replaced, as binary_copy.copy_out reads them (timestamptz: exact µs).
_REPLACED = {"ts_us": "timestamptz", "score": "float8", "segset_id": "int8", "label": "float8"}
# The raw rows of a batch's keys are found by an index probe per key in each weekly partition:
# the keys as an array (an InitPlan) leave the planner no join to choose. Joined with the
# staged rows instead, it hash-joined them with a scan of every partition whenever the raw
# tables' statistics lagged behind their growth (measured: 15.7 ms to delete nothing for
# 1,000 new keys in a 70K-row week whose statistics said 229 rows; O(table) per batch).
# The array comes sorted in the key index's order: each partition's scan sorts its array
# first (one pass when it is sorted already), and a 50,000-label batch probes five weekly
# partitions (the labels' UPDATE measured 420 -> 265 ms).
_STAGED = "p.output_id = ANY(ARRAY(SELECT output_id FROM {0} ORDER BY output_id))"


def _analyze_staged(cur, table: str) -> None:
    """Statistics for a staging table: the planner needs its row count (without it, it
    hash-joined all of predictions: 1.91 s -> 1.05 s for a 50K batch on a 1M-row table). A
    sample of 300 rows gives that; the default 30,000 took 43 of a 50K batch's ~1,000 ms.
    SET LOCAL ends with the transaction, which runs no other ANALYZE."""
    cur.execute(f"SET LOCAL default_statistics_target = 1; ANALYZE {table}")


def _merge_delta(cur, model: Model, rows: deltas.BatchRows) -> None:
    """Add the deltas of a batch's rows to every level of the rollup and of the score bins:
    summed in numpy (``deltas``) and sent to staging tables by binary COPY, and the score
    bins' delta rows inserted (``bins.insert_levels``), before the model's rollup lock is
    taken (the batches waiting for it wait less); then under it, with the batch's write
    revision, one upsert per rollup level, and the score-bin keys that reached MAX_PARTS rows
    folded (``bins.fold_full``)."""
    names = deltas.partial_names()
    levels = deltas.rollup_levels(rows, model.threshold)
    bin_rows = bins.encode_levels(deltas.bin_levels(rows)) if model.is_classifier else {}
    table = f"level_delta_{partials_fingerprint()[:12]}"  # its columns follow the declaration
    binary_copy.staging_table(cur, table, "width int, segset_id int, bucket_end bigint, "
                              + ", ".join(f"{c} double precision" for c in names))
    parts = [levels[w] for w in LEVELS]
    binary_copy.copy_in(cur, table, {
        "width": ("int4", np.concatenate([np.full(len(p["bucket_end"]), w) for w, p in zip(LEVELS, parts, strict=True)])),
        "segset_id": ("int4", np.concatenate([p["segset_id"] for p in parts])),
        "bucket_end": ("int8", np.concatenate([p["bucket_end"] for p in parts])),
        **{c: ("float8", np.concatenate([p[c] for p in parts])) for c in names}})
    bins.stage_levels(cur, model.model_id, bin_rows)
    bins.insert_levels(cur, BIN_TABLES, bin_rows)
    counted = bins.count_near_full(cur, BIN_TABLES, model.model_id, bin_rows)
    revision = locks.lock_rollup(cur, model.model_id)
    values = ", ".join(f"{c}::bigint" if c in COUNT_PARTIALS else c for c in names)
    cur.execute("".join(
        f"""
        INSERT INTO {ROLLUP_TABLES[width]} (model_id, segset_id, bucket_end, revision, {", ".join(names)})
        SELECT %(m)s, segset_id, bucket_end, %(rev)s, {values} FROM {table} WHERE width = {int(width)}
        ON CONFLICT (model_id, segset_id, bucket_end) DO UPDATE SET
          revision = excluded.revision,
          {", ".join(f"{c} = {ROLLUP_TABLES[width]}.{c} + excluded.{c}" for c in names)};
        """ for width in LEVELS), {"m": model.model_id, "rev": revision})
    bins.fold_full(cur, BIN_TABLES, model.model_id, bin_rows, revision, counted)


FOLD_CHUNK_KEYS = 2_000  # keys folded per transaction: the model's writers wait for one chunk


def fold_score_bins(conn, model: Model, chunk_keys: int = FOLD_CHUNK_KEYS) -> int:
    """Fold every key of the model's score bins held in more than one row (``bins.fold``), a
    chunk of keys per transaction under the model's locks, committing each: the
    server's hourly upkeep (``maintenance``). Returns the number of rows removed."""
    if not model.is_classifier:
        return 0
    removed = 0
    for table in BIN_TABLES.values():
        with conn.cursor() as cur:
            seg, bucket = bins.multi_row_keys(cur, table, model.model_id)
        conn.commit()
        for lo in range(0, len(seg), chunk_keys):
            with conn.cursor() as cur:
                locks.lock_writer(cur, model.model_id)
                revision = locks.lock_rollup(cur, model.model_id)
                removed += bins.fold(cur, table, model.model_id, seg[lo:lo + chunk_keys],
                                     bucket[lo:lo + chunk_keys], revision)
            conn.commit()
    return removed


def make_weeks(conn, kind: str, rows: PredictionRows | FeedbackRows) -> int:
    """Create the weekly partitions a batch of ``kind`` rows needs, in the caller's transaction;
    returns how many were made. The bulk client commits this before it writes the batch: made
    inside the batch's transaction, a week holds the partition lock until that commits, and
    the client's other batch in flight, needing the same week, waited for it (~1 s a week).
    Times before the retention horizon are left to the write, as the write leaves them: a
    prediction there is refused by name, a label there counted as late; neither needs a week.
    A label batch makes none: only labels that wait for their prediction go to ``feedback``
    (none, when predictions come first), and its write makes their weeks."""
    if kind == "feedback":
        return 0
    us = rows.ts_us
    horizon = retention.raw_horizon(conn)
    if horizon is not None:
        us = us[us >= int(horizon.timestamp() * 1_000_000)]
    with conn.cursor() as cur:
        return retention.ensure_partitions(cur, kind, us)


def _refuse_before_horizon(horizon, times, what: str) -> None:
    """A 422 naming the first records whose time is before the retention horizon."""
    if horizon is None:
        return
    bad = [i for i, t in enumerate(times) if t < horizon]
    if bad:
        raise ClientError(
            f"{len(bad)} {what} have a time before {horizon.isoformat()}, when retention dropped "
            "the raw rows (RETENTION); they cannot be stored",
            [{"index": i, "field": "ts", "message": f"before the retention horizon {horizon.isoformat()}"}
             for i in bad], status=422)


def write_predictions(conn, model: Model, rows: PredictionRows, shared: bool = False) -> int:
    """Upsert validated predictions and keep the rollup equal to the raw rows.

    Runs in the caller's transaction; the caller commits (one batch, one transaction).
    A key is replaced by delete-then-insert (the partitioned table has no unique index; the
    model's lock makes the pair atomic): the deleted rows give the old contributions, the
    written rows the new ones, each with the label its old row held or, for a label that came
    first, the label waiting in ``feedback`` (whose row is then deleted). ``shared``: the
    model's lock taken shared, for the bulk client's concurrent batches (``locks``).
    Returns the number of distinct output ids written (a repeated id: the last wins).
    """
    if not rows.ids:
        return 0
    _refuse_before_horizon(retention.hold_horizon(conn), rows.ts, "predictions")
    segset_ids = _segset_ids(conn, model.model_id, rows.segments)
    last = {oid: i for i, oid in enumerate(rows.ids)}  # later record wins
    keep = np.fromiter(last.values(), np.int64, len(last))
    us = rows.ts_us[keep]
    scores = np.asarray(rows.scores, np.float64)[keep]
    segsets = np.asarray(segset_ids, np.int64)[keep]
    with conn.cursor() as cur:
        locks.lock_writer(cur, model.model_id, shared)
        retention.ensure_partitions(cur, "predictions", us)
        binary_copy.staging_table(cur, "stage_predictions", "ord int, output_id text COLLATE \"C\", ts timestamptz,"
                                  " score double precision, segset_id int, features jsonb,"
                                  " label double precision, label_ts timestamptz")
        binary_copy.copy_in(cur, "stage_predictions", {
            "ord": ("int4", np.arange(len(keep))), "output_id": ("text", list(last)),
            "ts": ("timestamptz", us), "score": ("float8", scores), "segset_id": ("int4", segsets),
            "features": ("jsonb", [rows.features_json[i] for i in keep])})
        _analyze_staged(cur, "stage_predictions")
        params = {"m": model.model_id}
        staged = _STAGED.format("stage_predictions")
        replaced = binary_copy.copy_out(  # the rows replaced; a re-sent prediction keeps its label
            conn, f"WITH gone AS (DELETE FROM predictions p WHERE p.model_id = %(m)s AND {staged}"
                  f" RETURNING p.output_id, p.ts, p.score, p.segset_id, p.label, p.label_ts),"
                  f" kept AS (UPDATE stage_predictions s SET label = gone.label, label_ts = gone.label_ts"
                  f" FROM gone WHERE s.output_id = gone.output_id AND gone.label IS NOT NULL RETURNING 1)"
                  f" SELECT ts, score, segset_id::int8, coalesce(label, 'NaN'), (SELECT count(*) FROM kept)"
                  f" FROM gone", params, {**_REPLACED, "kept": "int8"})
        moved = binary_copy.copy_out(  # labels that waited for their prediction move onto its row
            conn, f"WITH waited AS (DELETE FROM feedback f WHERE f.model_id = %(m)s AND {staged.replace('p.', 'f.')}"
                  f" RETURNING f.output_id, f.ts, f.label)"
                  f" UPDATE stage_predictions s SET label = waited.label, label_ts = waited.ts FROM waited"
                  f" WHERE s.output_id = waited.output_id RETURNING s.ord::int8", params, {"ord": "int8"})
        cur.execute(
            """
            INSERT INTO predictions (model_id, output_id, ts, score, segset_id, features, label, label_ts)
            SELECT %(m)s, output_id, ts, score, segset_id, features, label, label_ts
            FROM stage_predictions
            """, params)
        labels = np.full(len(keep), np.nan)
        if len(moved["ord"]) or replaced["kept"].any():
            known = binary_copy.copy_out(conn, "SELECT ord::int8, label FROM stage_predictions"
                                               " WHERE label IS NOT NULL", {}, {"ord": "int8", "label": "float8"})
            labels[known["ord"]] = known["label"]
        _merge_delta(cur, model, deltas.BatchRows.concat([
            deltas.BatchRows.of(-1, replaced["ts_us"], replaced["score"], replaced["segset_id"],
                                replaced["label"]),
            deltas.BatchRows.of(1, us, scores, segsets, labels)]))
        names = sorted(rows.feature_names)
        if names:
            cur.execute(
                "INSERT INTO model_features (model_id, name) SELECT %(m)s, unnest(%(n)s::text[])"
                " ON CONFLICT DO NOTHING", {"m": model.model_id, "n": names})
    return len(last)


def write_feedback(conn, model: Model, rows: FeedbackRows, shared: bool = False) -> int:
    """Upsert validated feedback (a corrected label replaces the old one), rollup kept exact.

    The label is stored on its prediction's row: the row as it was gives the old
    contribution (sign -1), the same row with the new label the new one (+1). A label whose
    prediction has not come waits in ``feedback`` (a later one for its key replaces it) until
    ``write_predictions`` moves it onto the row. A label for a prediction that retention
    dropped, or with a time before the horizon, is counted (``retention_counts``) and not
    stored. ``shared`` as in ``write_predictions``. Returns the number of labels stored.
    """
    if not rows.ids:
        return 0
    last = {oid: i for i, oid in enumerate(rows.ids)}
    keep = np.fromiter(last.values(), np.int64, len(last))
    us = rows.ts_us[keep]
    labels = np.asarray(rows.labels, np.float64)[keep]
    horizon = retention.hold_horizon(conn)
    with conn.cursor() as cur:
        locks.lock_writer(cur, model.model_id, shared)
        binary_copy.staging_table(cur, "stage_feedback", "ord int, output_id text COLLATE \"C\", ts timestamptz,"
                                  " label double precision")
        binary_copy.copy_in(cur, "stage_feedback", {
            "ord": ("int4", np.arange(len(keep))), "output_id": ("text", list(last)),
            "ts": ("timestamptz", us), "label": ("float8", labels)})
        _analyze_staged(cur, "stage_feedback")
        stored = len(last)
        if horizon is not None:
            stored -= _drop_late_labels(cur, model, horizon)
        params = {"m": model.model_id}
        staged = _STAGED.format("stage_feedback")
        first = binary_copy.copy_out(  # first labels: the rows as they were, but for the label
            conn, f"UPDATE predictions p SET label = s.label, label_ts = s.ts FROM stage_feedback s"
                  f" WHERE p.model_id = %(m)s AND p.output_id = s.output_id AND {staged}"
                  f" AND p.label IS NULL RETURNING s.ord::int8, p.ts, p.score, p.segset_id::int8, 'NaN'::float8",
            params, {"ord": "int8", **_REPLACED})
        parts = [first]
        rest = _unlabeled_before(conn, first["ord"], stored)
        if len(rest):
            params["rest"] = bins.array_literal(rest)
            rest_staged = _ords_staged("rest")
            parts.append(binary_copy.copy_out(  # corrections: the labeled predictions as they were
                conn, f"SELECT s.ord::int8, p.ts, p.score, p.segset_id::int8, coalesce(p.label, 'NaN')"
                      f" FROM stage_feedback s JOIN predictions p ON p.model_id = %(m)s AND p.output_id = s.output_id"
                      f" WHERE s.ord = ANY(%(rest)s::int[]) AND p.{rest_staged}",
                params, {"ord": "int8", **_REPLACED}))
            cur.execute(
                f"""
                UPDATE predictions p SET label = s.label, label_ts = s.ts FROM stage_feedback s
                WHERE p.model_id = %(m)s AND p.output_id = s.output_id AND s.ord = ANY(%(rest)s::int[])
                  AND p.{rest_staged}
                """, params)
            _wait_for_predictions(cur, params, np.setdiff1d(rest, parts[-1]["ord"]), us)
        matched = {k: np.concatenate([part[k] for part in parts]) for k in first}
        old = deltas.BatchRows.of(-1, matched["ts_us"], matched["score"], matched["segset_id"],
                                  matched["label"])
        _merge_delta(cur, model, deltas.BatchRows.concat(
            [old, deltas.BatchRows.of(1, old.ts_us, old.score, old.segset_id, labels[matched["ord"]])]))
    return stored


def _ords_staged(name: str) -> str:
    """The condition on ``output_id`` for the staged labels whose ``ord`` is in %(name)s."""
    return (f"output_id = ANY(ARRAY(SELECT output_id FROM stage_feedback WHERE ord = ANY(%({name})s::int[])"
            " ORDER BY output_id))")


def _wait_for_predictions(cur, params: dict, ords: np.ndarray, us: np.ndarray) -> None:
    """Store in ``feedback`` the staged labels ``ords``, whose predictions have not come,
    each replacing the label that waited for its key before."""
    if not len(ords):
        return
    retention.ensure_partitions(cur, "feedback", us[ords])
    params["waiting"] = bins.array_literal(ords)
    cur.execute(f"DELETE FROM feedback f WHERE f.model_id = %(m)s AND f.{_ords_staged('waiting')};"
                " INSERT INTO feedback (model_id, output_id, ts, label)"
                " SELECT %(m)s, output_id, ts, label FROM stage_feedback WHERE ord = ANY(%(waiting)s::int[])",
                params)


def _unlabeled_before(conn, first_ords: np.ndarray, staged: int) -> np.ndarray:
    """The staged labels (their ``ord``) that were not a first label of a stored prediction:
    corrections, and labels that came before their prediction (none, in the common case).

    Why the split: a prediction still without a label has no ``feedback`` row (a label that
    waited there moved onto the row when the prediction came). Its first label is one UPDATE
    that returns the row as it was, with no read of the old row before and nothing written
    to ``feedback``: the lookup of each key in every weekly partition is done once."""
    if len(first_ords) == staged:
        return np.empty(0, np.int64)
    found = binary_copy.copy_out(conn, "SELECT ord::int8 FROM stage_feedback", {}, {"ord": "int8"})
    return np.setdiff1d(found["ord"], first_ords)


def _drop_late_labels(cur, model: Model, horizon) -> int:
    """Remove from ``stage_feedback`` (and count) the labels retention left no place for: those with a
    time before the horizon (their partition is gone) and those whose prediction was dropped
    (its key is in ``dropped_keys``, and no retained prediction has it)."""
    cur.execute(
        """
        WITH late AS (
          DELETE FROM stage_feedback s
          WHERE s.ts < %(h)s
             OR (EXISTS (SELECT 1 FROM dropped_keys d WHERE d.model_id = %(m)s
                         AND d.key_hash = hashtextextended(s.output_id, 0))
                 AND NOT EXISTS (SELECT 1 FROM predictions p WHERE p.model_id = %(m)s
                                 AND p.output_id = s.output_id))
          RETURNING s.ts)
        SELECT count(*), max(ts) FROM late
        """, {"m": model.model_id, "h": horizon})
    n, last_ts = cur.fetchone()
    retention.count_late_labels(cur, model.model_id, n, last_ts)
    return n


# A rebuild reads the raw rows in chunks of whole days, each at least a day and about
# REBUILD_CHUNK_ROWS rows (plus the rest of its last day): a day is a multiple of every level's
# width, so a chunk's rows make its own buckets alone, and the process holds one chunk's
# score-bin records at a time (at most 2 per row, and per day at most 288 buckets x (segment
# sets + 1) x 101 bins) instead of the model's (~10M records at 100M predictions). Measured
# at 2M predictions: peak RSS 182 MB, of which 112 MB after imports (1M rows a chunk: 514 MB;
# the one-shot rebuild before: 813 MB), in no more time (17-24 s, the one-shot 29 s).
REBUILD_CHUNK_ROWS = 100_000
_DAY_S = 86_400


def rebuild_rollup(conn, model: Model, chunk_rows: int = REBUILD_CHUNK_ROWS,
                   progress: Callable[[int], None] | None = None) -> int:
    """Recompute every level of the model's rollup (and its score bins) from raw rows, in the
    caller's transaction, one chunk of days at a time (``_rebuild_chunks``); ``progress`` is
    called with the end of each chunk (epoch s). Returns the number of minute rollup rows."""
    after = _after(conn)  # the horizon lock before the model's, in the writers' order
    with conn.cursor() as cur:
        locks.lock_writer(cur, model.model_id)
        revision = locks.lock_rollup(cur, model.model_id)
        params = {"m": model.model_id, "thr": model.threshold, "eps": EPS, "rev": revision,
                  "edges": BIN_EDGES, "after": after}
        for table in (*ROLLUP_TABLES.values(), *BIN_TABLES.values()):
            cur.execute(f"DELETE FROM {table} WHERE model_id = %(m)s AND {_AFTER}", params)
        minute_rows = 0
        for lo, hi in _rebuild_chunks(cur, model.model_id, after, chunk_rows):
            minute_rows += _rebuild_chunk(conn, cur, model, {**params, "lo": lo, "hi": hi})
            if progress is not None:
                progress(hi)
        return minute_rows


def _rebuild_chunks(cur, model_id: int, after: float | None, chunk_rows: int):
    """The chunks (lo, hi] (epoch s, whole days) of the model's raw rows after ``after``,
    ascending: from the day of the next row to the end of the day of the ``chunk_rows``-th
    next row, found by one probe of the (model_id, ts) index each; days without rows are
    skipped. Exact (numeric) epochs: a chunk ends where the next begins."""
    lo = after
    while True:
        cur.execute(
            "SELECT (ceil(extract(epoch FROM min(ts)) / %(d)s) - 1)::int8 * %(d)s,"
            " ceil(extract(epoch FROM max(ts)) / %(d)s)::int8 * %(d)s"
            " FROM (SELECT ts FROM predictions WHERE model_id = %(m)s"
            " AND (%(lo)s::float8 IS NULL OR ts > to_timestamp(%(lo)s::float8))"
            " ORDER BY ts LIMIT %(n)s) r", {"d": _DAY_S, "m": model_id, "lo": lo, "n": chunk_rows})
        first, last = cur.fetchone()
        if first is None:
            return
        yield first, last
        lo = last


def _rebuild_chunk(conn, cur, model: Model, params: dict) -> int:
    """Rebuild every level's buckets in the chunk (%(lo)s, %(hi)s] from its raw rows: the
    minute level, the coarser levels from its minute rows, the score bins from the 5-minute
    bins; returns the number of minute rows."""
    cur.execute(
        f"INSERT INTO rollup (model_id, segset_id, bucket_end, revision, {cols()})"
        f" SELECT %(m)s, segset_id, bucket_end, %(rev)s, {cols()}"
        f" FROM ({all_contributions(chunk=True)}) c", params)
    minute_rows = cur.rowcount
    for width in LEVELS[1:]:  # the coarser levels from the minute level
        bucket = level_bucket("bucket_end", width)
        cur.execute(
            f"INSERT INTO {ROLLUP_TABLES[width]} (model_id, segset_id, bucket_end, revision, {cols()})"
            f" SELECT model_id, segset_id, {bucket}, max(revision),"
            f" {', '.join(f'sum({c})' for c in PARTIALS)} FROM rollup WHERE model_id = %(m)s AND {_AFTER}"
            f" AND bucket_end > %(lo)s AND bucket_end <= %(hi)s"
            f" GROUP BY model_id, segset_id, {bucket}", params)
    if model.is_classifier:
        base = _records_of(_bin_rows(conn, bin_contributions(chunk=True), params))
        for width in BIN_LEVELS:  # the coarser bins from the 5-minute bins
            bins.insert_new(cur, BIN_TABLES[width], model.model_id, _to_level(base, width))
    return minute_rows


# Rebuilds and checks cover the buckets after the retention horizon (the rollup keeps the
# partials of dropped rows, which no raw row can confirm any more).
_AFTER = "(%(after)s::float8 IS NULL OR bucket_end > %(after)s::float8)"


def _after(conn) -> float | None:
    """The retention horizon as epoch seconds (None: no raw row was dropped), held for the
    transaction: a drop meanwhile would take raw rows from under a rebuild's DELETE."""
    horizon = retention.hold_horizon(conn)
    return None if horizon is None else horizon.timestamp()


def _bin_rows(conn, contributions_sql: str, params: dict):
    """The score-bin records a ``bin_contributions`` query computes from raw rows."""
    sums = ", ".join(f"{c}::float8" for c in BIN_PARTIALS)
    return _copy_out(conn, f"SELECT segset_id::int8, bucket_end, bin::int8, {sums}"
                           f" FROM ({contributions_sql}) c", params, bins.COLUMNS)


def _records_of(frame) -> dict[str, np.ndarray]:
    """A score-bin DataFrame's columns as arrays (the form bins' writes take)."""
    return {c: frame[c].to_numpy() for c in bins.COLUMNS}


def _to_level(records: dict[str, np.ndarray], width: int) -> dict[str, np.ndarray]:
    """5-minute bin records summed into the buckets of ``width`` (ceil(end / width) * width)."""
    if width == BIN_BASE_S:
        return records
    return bins.aggregate({**records, "bucket_end": -(-records["bucket_end"] // width) * width})


def check_rollup(conn, model: Model, rel_tol: float = 1e-9) -> list[dict]:
    """Differences between every stored level (rollup and score bins) and a rebuild from raw
    rows (empty: consistent), over the buckets after the retention horizon.

    Counts must match exactly; float sums within ``rel_tol`` (they are added and
    subtracted in a different order). A missing row equals a row of zeros.
    """
    params = {"m": model.model_id, "thr": model.threshold, "eps": EPS, "edges": BIN_EDGES,
              "after": _after(conn)}
    diffs = []
    for width in LEVELS:
        diffs += _diff(conn, ROLLUP_TABLES[width], ("segset_id", "bucket_end"), PARTIALS,
                       COUNT_PARTIALS, all_contributions(width), params, rel_tol, width)
    for width in BIN_LEVELS if model.is_classifier else ():
        diffs += _diff_bins(conn, model, width, params, rel_tol)
    return diffs


def _diff_bins(conn, model: Model, width: int, params: dict, rel_tol: float) -> list[dict]:
    """Stored score-bin records of one level against a rebuild (a missing record is zeros)."""
    table = BIN_TABLES[width]
    # a key's rows summed (bins.insert_levels appends each batch's delta as a row of its own)
    stored = bins.frame(bins.aggregate(bins.read_records(conn, table, f"model_id = %(m)s AND {_AFTER}", params)))
    rebuilt = _bin_rows(conn, bin_contributions(width), params)
    keys = ["segset_id", "bucket_end", "bin"]
    both = stored.merge(rebuilt, on=keys, how="outer", suffixes=("_s", "_r")).fillna(0.0)
    diffs = []
    for name in BIN_PARTIALS:
        s, r = both[f"{name}_s"].to_numpy(), both[f"{name}_r"].to_numpy()
        bad = s != r if name in BIN_COUNTS else np.abs(s - r) > rel_tol * np.maximum(1.0, np.abs(r))
        for i in np.flatnonzero(bad):
            diffs.append({**{k: int(both[k].iat[i]) for k in keys}, "level_s": width, "table": table,
                          "partial": name, "stored": float(s[i]), "rebuilt": float(r[i])})
    for seg, bucket in bins.suffix_mismatches(conn, table, f"model_id = %(m)s AND {_AFTER}", params):
        diffs.append({"segset_id": seg, "bucket_end": bucket, "level_s": width, "table": table,
                      "partial": "suffix", "stored": None, "rebuilt": None})
    return diffs


def _diff(conn, table: str, keys: tuple[str, ...], names, counts, rebuilt_sql: str, params: dict,
          rel_tol: float, width: int) -> list[dict]:
    diffs = []
    with conn.cursor() as cur:
        cur.execute(
            f"""
            SELECT {", ".join(f"coalesce(r.{k}, c.{k})" for k in keys)},
                   {", ".join(f"coalesce(r.{n}, 0), coalesce(c.{n}, 0)" for n in names)}
            FROM (SELECT * FROM {table} WHERE model_id = %(m)s AND {_AFTER}) r
            FULL JOIN ({rebuilt_sql}) c USING ({", ".join(keys)})
            """,
            params,
        )
        for row in cur:
            key = dict(zip(keys, row[:len(keys)], strict=True))
            for j, name in enumerate(names):
                stored, rebuilt = float(row[len(keys) + 2 * j]), float(row[len(keys) + 1 + 2 * j])
                if name in counts:
                    bad = stored != rebuilt
                else:
                    bad = abs(stored - rebuilt) > rel_tol * max(1.0, abs(rebuilt))
                if bad:
                    diffs.append({**key, "level_s": width, "table": table, "partial": name,
                                  "stored": stored, "rebuilt": rebuilt})
    return diffs
