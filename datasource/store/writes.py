"""Writes: staged upserts of predictions and feedback with rollup upkeep, rebuild and check.

Each write batch, under a per-model advisory lock, subtracts the old contribution of the
keys it touches, upserts the raw rows and adds their new contribution, in one transaction:
the rollup always equals a rebuild from raw rows (``rebuild_rollup`` / ``check_rollup``).
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterable, Sequence

import numpy as np

from datasource.errors import ClientError
from datasource.records import FeedbackRows, PredictionRows, iso_utc
from datasource.store import bins, retention
from datasource.store.catalog import Model, _segset_ids, list_models
from datasource.store.partials import (
    BIN,
    BIN_BASE_S,
    BIN_COUNTS,
    BIN_EDGES,
    BIN_LEVELS,
    BIN_PARTIALS,
    BIN_TABLES,
    COUNT_PARTIALS,
    EPS,
    LABEL_OF,
    LEVELS,
    LOCK_NAMESPACE,
    MINUTE_BUCKET,
    PARTIALS,
    ROLLUP_TABLES,
    all_contributions,
    bin_contributions,
    cols,
    level_bucket,
    partial_type,
    partials_fingerprint,
    raw_bucket,
    select_partials,
)
from datasource.store.reads import _copy_out

log = logging.getLogger(__name__)
BIN_BUCKET = raw_bucket(BIN_BASE_S)  # the score bins' delta is kept at their finest level



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
        missing |= {f"{t}.bins" for t in BIN_TABLES.values() if "bins" not in _rollup_columns(cur, t)}
        cur.execute("SELECT fingerprint FROM partial_set WHERE id = 1")
        row = cur.fetchone()
    conn.rollback()
    if missing:
        raise RuntimeError(f"rollup table lacks partial columns {sorted(missing)}; run the migrations")
    if not row or row[0] != partials_fingerprint():
        raise RuntimeError("the rollup was built for another partial set; run the migrations")


# --------------------------------------------------------------------------- writes


def _copy_rows(cur, table: str, columns: str, rows: Iterable[Sequence]) -> None:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    buf.seek(0)
    cur.copy_expert(f"COPY {table} ({columns}) FROM STDIN WITH (FORMAT csv)", buf)


def _deltas_from_rows(cur, model: Model) -> None:
    """The rollup and score-bin deltas of ``delta_rows``: the rows a batch removed (sign -1)
    and wrote (+1), with their labels. Two aggregates over a temp table of the batch's rows,
    no join: the raw tables were read once, by the DELETE/UPDATE that produced them."""
    rows = f"FROM delta_rows p {LABEL_OF.format('p')}"
    cur.execute(
        f"""
        INSERT INTO rollup_delta (segset_id, bucket_end, {cols()})
        SELECT segset_id, bucket_end, {", ".join(f"sum(sign * {c})" for c in PARTIALS)}
        FROM (
          SELECT p.sign, CASE WHEN grouping(p.segset_id) = 1 THEN 0 ELSE p.segset_id END
                           AS segset_id,
                 {MINUTE_BUCKET} AS bucket_end, {select_partials()}
          {rows}
          GROUP BY GROUPING SETS ((p.sign, {MINUTE_BUCKET}, p.segset_id), (p.sign, {MINUTE_BUCKET}))
        ) c
        GROUP BY segset_id, bucket_end
        """,
        {"thr": model.threshold, "eps": EPS})
    if model.is_classifier:
        cur.execute(
            f"""
            INSERT INTO bins_delta (segset_id, bucket_end, bin, {", ".join(BIN_PARTIALS)})
            SELECT CASE WHEN grouping(p.segset_id) = 1 THEN 0 ELSE p.segset_id END,
                   {BIN_BUCKET}, {BIN},
                   {", ".join(f"sum(p.sign * ({expr}))" for expr in _per_row(BIN_PARTIALS))}
            {rows}
            GROUP BY GROUPING SETS (({BIN_BUCKET}, p.segset_id, {BIN}), ({BIN_BUCKET}, {BIN}))
            """,
            {"edges": BIN_EDGES})


def _begin_write(cur, model: Model) -> int:
    """Serialize writers of one model (old/new contributions must not interleave, and the
    delete-then-insert of a key must not race another writer's: the key's uniqueness)."""
    cur.execute("SELECT pg_advisory_xact_lock(%(ns)s, %(m)s)", {"ns": LOCK_NAMESPACE, "m": model.model_id})
    cur.execute("SELECT nextval('write_revision')")
    revision = cur.fetchone()[0]
    cur.execute(
        f"CREATE TEMP TABLE rollup_delta (segset_id int, bucket_end bigint,"
        f" {', '.join(f'{c} double precision' for c in PARTIALS)}) ON COMMIT DROP"
    )
    cur.execute(
        f"CREATE TEMP TABLE bins_delta (segset_id int, bucket_end bigint, bin int,"
        f" {', '.join(f'{c} double precision' for c in BIN_PARTIALS)}) ON COMMIT DROP"
    )
    cur.execute("CREATE TEMP TABLE delta_rows (sign int, ts timestamptz, score double precision,"
                " segset_id int, label double precision, label_ts timestamptz) ON COMMIT DROP")
    return revision


def _merge_delta(cur, model: Model, revision: int) -> None:
    """Add the batch's minute deltas to every level of the rollup and of the score bins."""
    _deltas_from_rows(cur, model)
    sums = ", ".join(
        f"sum({c})::bigint" if c in COUNT_PARTIALS else f"sum({c})" for c in PARTIALS
    )
    bin_sums = ", ".join(f"sum({c})::float8" for c in BIN_PARTIALS)
    as_is = ", ".join(f"{c}::bigint" if c in COUNT_PARTIALS else c for c in PARTIALS)
    for width in LEVELS:
        table, bucket = ROLLUP_TABLES[width], level_bucket("bucket_end", width)
        # rollup_delta holds one row per minute and segment set: the finest level takes it as
        # it is (no second aggregate), the coarser ones sum it into their buckets
        source = (f"{as_is} FROM rollup_delta" if width == LEVELS[0] else
                  f"{sums} FROM rollup_delta GROUP BY segset_id, {bucket}")
        cur.execute(
            f"""
            INSERT INTO {table} (model_id, segset_id, bucket_end, revision, {cols()})
            SELECT %(m)s, segset_id, {bucket}, %(rev)s, {source}
            ON CONFLICT (model_id, segset_id, bucket_end) DO UPDATE SET
              revision = excluded.revision,
              {", ".join(f"{c} = {table}.{c} + excluded.{c}" for c in PARTIALS)}
            """,
            {"m": model.model_id, "rev": revision},
        )
    if model.is_classifier:
        delta = _records_of(_copy_out(
            cur.connection, f"SELECT segset_id::int8, bucket_end, bin::int8, {bin_sums} FROM bins_delta"
                            " GROUP BY segset_id, bucket_end, bin", {}, bins.COLUMNS))
        for width in BIN_LEVELS:
            bins.merge(cur, BIN_TABLES[width], model.model_id, _to_level(delta, width))
    # Made per batch from the declared partials: a partial added since the connection opened
    # gets its column (the tables are dropped here, and at commit if a statement failed).
    cur.execute("DROP TABLE rollup_delta, bins_delta, delta_rows")


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


def write_predictions(conn, model: Model, rows: PredictionRows) -> int:
    """Upsert validated predictions and keep the rollup equal to the raw rows.

    Runs in the caller's transaction; the caller commits (one batch, one transaction).
    A key is replaced by delete-then-insert (the partitioned table has no unique index; the
    model's lock makes the pair atomic): the deleted rows give the old contributions, the
    inserted rows, with their label from feedback, the new ones.
    Returns the number of distinct output ids written (a repeated id: the last wins).
    """
    if not rows.ids:
        return 0
    _refuse_before_horizon(retention.hold_horizon(conn), rows.ts, "predictions")
    segset_ids = _segset_ids(conn, model.model_id, rows.segments)
    last = {oid: i for i, oid in enumerate(rows.ids)}  # later record wins
    with conn.cursor() as cur:
        revision = _begin_write(cur, model)
        retention.ensure_partitions(cur, "predictions", rows.ts)
        cur.execute("CREATE TEMP TABLE stage (output_id text, ts timestamptz, score double precision,"
                    " segset_id int, features jsonb) ON COMMIT DROP")
        keep = list(last.values())
        _copy_rows(cur, "stage", "output_id, ts, score, segset_id, features",
                   zip(last, iso_utc([rows.ts[i] for i in keep]), [rows.scores[i] for i in keep],
                       [segset_ids[i] for i in keep], [rows.features_json[i] for i in keep],
                       strict=True))
        # Without statistics on the temp table the planner hash-joins all of predictions
        # (measured: 1.91 s -> 1.05 s for a 50K batch on a 1M-row table).
        cur.execute("ANALYZE stage")
        cur.execute(
            """
            WITH gone AS (
              DELETE FROM predictions p USING stage s
              WHERE p.model_id = %(m)s AND p.output_id = s.output_id
              RETURNING p.ts, p.score, p.segset_id, p.label, p.label_ts)
            INSERT INTO delta_rows SELECT -1, ts, score, segset_id, label, label_ts FROM gone;
            WITH put AS (
              INSERT INTO predictions (model_id, output_id, ts, score, segset_id, features,
                                       label, label_ts)
              SELECT %(m)s, s.output_id, s.ts, s.score, s.segset_id, s.features, f.label, f.ts
              FROM stage s
              LEFT JOIN feedback f ON f.model_id = %(m)s AND f.output_id = s.output_id
              RETURNING ts, score, segset_id, label, label_ts)
            INSERT INTO delta_rows SELECT 1, ts, score, segset_id, label, label_ts FROM put;
            """, {"m": model.model_id})
        _merge_delta(cur, model, revision)
        cur.execute("DROP TABLE stage")
        names = sorted(rows.feature_names)
        if names:
            cur.execute(
                "INSERT INTO model_features (model_id, name) SELECT %(m)s, unnest(%(n)s::text[])"
                " ON CONFLICT DO NOTHING", {"m": model.model_id, "n": names})
    return len(last)


def write_feedback(conn, model: Model, rows: FeedbackRows) -> int:
    """Upsert validated feedback (a corrected label replaces the old one), rollup kept exact.

    The label is copied onto its prediction's row: the row before the update gives the old
    contribution (sign -1), the updated row the new one (+1). A label for a prediction that
    retention dropped, or with a time before the horizon, is counted (``retention_counts``)
    and not stored. Returns the number of labels stored.
    """
    if not rows.ids:
        return 0
    last = {oid: i for i, oid in enumerate(rows.ids)}
    horizon = retention.hold_horizon(conn)
    with conn.cursor() as cur:
        revision = _begin_write(cur, model)
        cur.execute("CREATE TEMP TABLE stage (output_id text, ts timestamptz, label double precision)"
                    " ON COMMIT DROP")
        keep = list(last.values())
        _copy_rows(cur, "stage", "output_id, ts, label",
                   zip(last, iso_utc([rows.ts[i] for i in keep]), [rows.labels[i] for i in keep],
                       strict=True))
        cur.execute("ANALYZE stage")
        stored = len(last)
        if horizon is not None:
            stored -= _drop_late_labels(cur, model, horizon)
        retention.ensure_partitions(cur, "feedback", [rows.ts[i] for i in last.values()
                                                      if horizon is None or rows.ts[i] >= horizon])
        cur.execute(
            """
            INSERT INTO delta_rows
            SELECT -1, p.ts, p.score, p.segset_id, p.label, p.label_ts
            FROM stage s JOIN predictions p ON p.model_id = %(m)s AND p.output_id = s.output_id;
            WITH put AS (
              UPDATE predictions p SET label = s.label, label_ts = s.ts FROM stage s
              WHERE p.model_id = %(m)s AND p.output_id = s.output_id
              RETURNING p.ts, p.score, p.segset_id, p.label, p.label_ts)
            INSERT INTO delta_rows SELECT 1, ts, score, segset_id, label, label_ts FROM put;
            DELETE FROM feedback f USING stage s WHERE f.model_id = %(m)s AND f.output_id = s.output_id;
            INSERT INTO feedback (model_id, output_id, ts, label)
            SELECT %(m)s, output_id, ts, label FROM stage;
            """, {"m": model.model_id})
        _merge_delta(cur, model, revision)
        cur.execute("DROP TABLE stage")
    return stored


def _drop_late_labels(cur, model: Model, horizon) -> int:
    """Remove from ``stage`` (and count) the labels retention left no place for: those with a
    time before the horizon (their partition is gone) and those whose prediction was dropped
    (its key is in ``dropped_keys``, and no retained prediction has it)."""
    cur.execute(
        """
        WITH late AS (
          DELETE FROM stage s
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


def _per_row(aggregates: dict[str, str]) -> list[str]:
    """The per-row value whose sum each bin aggregate is (so a signed sum can be taken)."""
    forms = {
        "n": "1",
        "pos": "(f.label = 1)::int",
        "neg": "(f.label = 0)::int",
        "sum_score": "p.score",
        "sum_score_lab": "CASE WHEN f.label IS NOT NULL THEN p.score ELSE 0 END",
    }
    if set(forms) != set(aggregates):
        raise ValueError("every bin partial needs its per-row form")
    return [f"coalesce({forms[n]}, 0)" for n in aggregates]


def rebuild_rollup(conn, model: Model) -> int:
    """Recompute every level of the model's rollup (and its score bins) from raw rows;
    returns the number of minute rollup rows."""
    after = _after(conn)  # the horizon lock before the model's, in the writers' order
    with conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(%(ns)s, %(m)s)", {"ns": LOCK_NAMESPACE, "m": model.model_id})
        cur.execute("SELECT nextval('write_revision')")
        revision = cur.fetchone()[0]
        params = {"m": model.model_id, "thr": model.threshold, "eps": EPS, "rev": revision,
                  "edges": BIN_EDGES, "after": after}
        for table in (*ROLLUP_TABLES.values(), *BIN_TABLES.values()):
            cur.execute(f"DELETE FROM {table} WHERE model_id = %(m)s AND {_AFTER}", params)
        cur.execute(
            f"INSERT INTO rollup (model_id, segset_id, bucket_end, revision, {cols()})"
            f" SELECT %(m)s, segset_id, bucket_end, %(rev)s, {cols()} FROM ({all_contributions()}) c",
            params,
        )
        minute_rows = cur.rowcount
        for width in LEVELS[1:]:  # the coarser levels from the minute level
            bucket = level_bucket("bucket_end", width)
            cur.execute(
                f"INSERT INTO {ROLLUP_TABLES[width]} (model_id, segset_id, bucket_end, revision, {cols()})"
                f" SELECT model_id, segset_id, {bucket}, max(revision),"
                f" {', '.join(f'sum({c})' for c in PARTIALS)} FROM rollup WHERE model_id = %(m)s AND {_AFTER}"
                f" GROUP BY model_id, segset_id, {bucket}", params)
        if model.is_classifier:
            base = _records_of(_bin_rows(conn, bin_contributions(), params))
            for width in BIN_LEVELS:  # the coarser bins from the 5-minute bins
                bins.replace_all(cur, BIN_TABLES[width], model.model_id, _to_level(base, width),
                                 after=params["after"])
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
    stored = bins.read(conn, table, f"model_id = %(m)s AND {_AFTER}", params)
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
