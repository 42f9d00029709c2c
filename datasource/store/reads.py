"""Reads for the engine: partial sums per bucket, raw joined rows, a column's values.

Binary COPY parsed with numpy for the raw reads (fixed-width rows); only parameters
(``%(name)s``) carry values, identifiers come from constants.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import numpy as np
import pandas as pd

from datasource.store import bins
from datasource.store.binary_copy import copy_out
from datasource.store.catalog import Model
from datasource.store.deltas import group_sum
from datasource.store.partials import (
    ALL_TIME_S,
    BIN_TABLES,
    EPS,
    PARTIALS,
    RAW_ROWS,
    ROLLUP_BUCKET_S,
    ROLLUP_TABLES,
    THRESHOLD_FROM_BINS,
    THRESHOLD_PARTIALS,
    grid_bin,
    level_for,
    level_pieces,
)
from datasource.store.retention import require_retained

# --------------------------------------------------------------------------- reads for the engine


def table_counts(conn, model: Model) -> dict[str, int]:
    """Rows stored: predictions, labels ("feedback": on their predictions' rows, or waiting
    for them in ``feedback``) and minute rollup rows."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT p.n, p.labeled + (SELECT count(*) FROM feedback WHERE model_id = %(m)s),"
            " (SELECT count(*) FROM rollup WHERE model_id = %(m)s)"
            " FROM (SELECT count(*) AS n, count(label) AS labeled FROM predictions WHERE model_id = %(m)s) p",
            {"m": model.model_id},
        )
        p, f, r = cur.fetchone()
    return {"predictions": p, "feedback": f, "rollup": r}


def latest_prediction_ts(conn, model: Model) -> datetime | None:
    with conn.cursor() as cur:
        cur.execute("SELECT max(ts) FROM predictions WHERE model_id = %(m)s", {"m": model.model_id})
        return cur.fetchone()[0]


def partials_by_bucket(conn, model: Model, *, g_s: int, lo_s: int | None, hi_s: int,
                       segset_ids: Sequence[int] | None, by_segset: bool,
                       threshold: float | None, from_rollup: bool,
                       columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Partials summed per g-second bucket (ending at multiples of g) with end in (lo, hi].

    ``from_rollup`` reads the rollup levels (g, lo and hi whole minutes; g = ALL_TIME_S
    sums the whole range into one bucket from the levels that tile it); at another
    threshold than the model's, which must then be on the score-bin grid
    (``grid_bin``), the threshold partials come from the score bins. Otherwise the same
    partials are aggregated from raw rows at any threshold and any g. ``segset_ids`` None
    means all segments; ``lo_s`` None means from the beginning. Columns: bucket_end,
    [segset_id], the partials (only ``columns`` when given: fewer sums, a faster scan),
    and (rollup only) revision.
    """
    names = [c for c in PARTIALS if columns is None or c in columns]
    params = {"m": model.model_id, "g": g_s, "lo": lo_s, "hi": hi_s, "thr": threshold,
              "eps": EPS, "segs": list(segset_ids) if segset_ids is not None else None}
    if from_rollup:
        other = model.is_classifier and threshold != model.threshold
        from_bins = [c for c in names if other and c in THRESHOLD_PARTIALS]
        df = _rollup_sums(conn, ROLLUP_TABLES, params, [c for c in names if c not in from_bins],
                          segset_ids, by_segset, revision=True)
        if from_bins:
            k = grid_bin(threshold)
            if k is None:
                raise ValueError(f"threshold {threshold} is not on the score-bin grid")
            keys = ["segset_id", "bucket_end"] if by_segset else ["bucket_end"]
            rows = _threshold_union(conn, params, segset_ids, by_segset, k)
            sums = group_sum({**{c: rows[c] for c in keys},
                              **{c: rows[THRESHOLD_FROM_BINS[c]] for c in from_bins}}, keys, from_bins)
            df = _outer_join(df, sums, keys, from_bins)
    else:
        require_retained(conn, lo_s)
        bucket = "(ceil(extract(epoch FROM p.ts) / %(g)s)::bigint * %(g)s)"
        seg_where = "" if segset_ids is None else "AND p.segset_id = ANY(%(segs)s)"
        lo = "" if lo_s is None else "AND p.ts > to_timestamp(%(lo)s)"
        group = f"{bucket}, p.segset_id" if by_segset else bucket
        seg_col = "p.segset_id," if by_segset else ""
        sql = f"""
            SELECT {bucket} AS bucket_end, {seg_col}
                   {", ".join(f"{PARTIALS[c]} AS {c}" for c in names)}
            {RAW_ROWS}
            WHERE p.model_id = %(m)s {seg_where} {lo} AND p.ts <= to_timestamp(%(hi)s)
            GROUP BY {group}
        """
        df = _frame(conn, sql, params)
    for c in names:
        if df[c].dtype != np.float64:
            df[c] = df[c].astype(np.float64)
    return df


def _outer_join(frame: pd.DataFrame, sums: dict[str, np.ndarray], keys: list[str],
                names: list[str]) -> pd.DataFrame:
    """``frame`` with the columns ``names`` of ``sums``, joined on ``keys`` (unique on each
    side); a key missing on one side counts 0 there. Both sides stacked and summed per key
    (``group_sum``: x + 0 is x). pandas' outer merge and fillna took ~3 ms of a 30-day panel
    at a grid threshold (720 rows; benchmarks/README.md, "Reads at a grid threshold")."""
    n_left, n_right = len(frame), len(sums[keys[0]])
    own = [c for c in frame.columns if c not in keys]
    stacked = {k: np.concatenate([frame[k].to_numpy(np.int64), np.asarray(sums[k], np.int64)]) for k in keys}
    for c in own:
        column = frame[c].to_numpy()
        if column.dtype == object:  # an empty frame's columns
            column = column.astype(np.float64)
        stacked[c] = np.concatenate([column, np.zeros(n_right, column.dtype)])
    for c in names:
        stacked[c] = np.concatenate([np.zeros(n_left), np.asarray(sums[c], np.float64)])
    return pd.DataFrame(group_sum(stacked, keys, own + names), columns=keys + own + names)


def _frame(conn, sql: str, params: dict) -> pd.DataFrame:
    with conn.cursor() as cur:
        cur.execute(sql, params)
        cols = [d[0] for d in cur.description]
        data = cur.fetchall()
    return pd.DataFrame.from_records(data, columns=cols)


def _rollup_sums(conn, tables: dict[int, str], params: dict, names: list[str],
                 segset_ids, by_segset: bool, revision: bool) -> pd.DataFrame:
    sums = [(f"sum(r.{c})", c) for c in names]
    if revision:
        sums.append(("max(r.revision)", "revision"))
    return _level_union(conn, tables, params, sums, segset_ids, by_segset,
                        names + (["revision"] if revision else []))


def _pieces(params: dict, levels: tuple[int, ...]) -> list[tuple[int, int | None, int]]:
    """The levels that serve (lo, hi] for g-buckets: one level whose width divides g, or
    (g = ALL_TIME_S) the levels that tile the range."""
    g, lo, hi = params["g"], params["lo"], params["hi"]
    finest = levels[0]
    if any(x is not None and x % finest for x in (lo, hi)) or (g != ALL_TIME_S and g % finest):
        raise ValueError(f"these buckets are multiples of {finest} s: g, lo and hi must be too")
    if g == ALL_TIME_S:
        return level_pieces(lo, hi, levels)
    return [(level_for(int(np.gcd.reduce([g, hi] + ([] if lo is None else [lo]))), levels), lo, hi)]


def _seg_where(segset_ids, by_segset: bool) -> str:
    return "segset_id = 0" if segset_ids is None and not by_segset else (
        "segset_id <> 0" if segset_ids is None else "segset_id = ANY(%(segs)s)")


def _bin_union(conn, params: dict, segset_ids, by_segset: bool) -> dict[str, np.ndarray]:
    """The score-bin records over (lo, hi] from the levels ``_pieces`` picks, each bucket end
    rounded up to its g-bucket: segset_id, bucket_end, bin, BIN_PARTIALS. A (g-bucket, [segset,]
    bin) may repeat (several level buckets or segment sets in one): the callers sum."""
    g = params["g"]
    parts = []
    for width, a, b in _pieces(params, tuple(sorted(BIN_TABLES))):
        lower = "" if a is None else "AND bucket_end > %(a)s"
        where = f"model_id = %(m)s AND {_seg_where(segset_ids, by_segset)} {lower} AND bucket_end <= %(b)s"
        part = bins.read_records(conn, BIN_TABLES[width], where, {**params, "a": a, "b": b})
        if width != g:
            part["bucket_end"] = -(-part["bucket_end"] // g) * g
        parts.append(part)
    return bins.concat(parts)


def _threshold_union(conn, params: dict, segset_ids, by_segset: bool, k: int) -> dict[str, np.ndarray]:
    """``bins.threshold_sums`` of the score-bin rows over (lo, hi] from the levels ``_pieces``
    picks, in one statement, each bucket end rounded up to its g-bucket (as ``_bin_union``;
    a multiple of g stays itself). One statement instead of one per level: the 30-day panel
    at a grid threshold read two levels in two round trips."""
    g = params["g"]
    pieces, params = _piece_wheres(params, BIN_TABLES, segset_ids, by_segset)
    rows = bins.threshold_sums(conn, [(BIN_TABLES[width], where) for width, where in pieces], k, params)
    rows["bucket_end"] = -(-rows["bucket_end"] // g) * g
    return rows


def _piece_wheres(params: dict, tables: dict[int, str], segset_ids,
                  by_segset: bool) -> tuple[list[tuple[int, str]], dict]:
    """The levels ``_pieces`` picks among ``tables`` for (lo, hi], each with the WHERE that
    selects its rows (bounds named a0, b0, a1, …: one statement can hold them all), and the
    params with those bounds added."""
    params = dict(params)
    seg_where = _seg_where(segset_ids, by_segset)
    pieces = []
    for i, (width, a, b) in enumerate(_pieces(params, tuple(sorted(tables)))):
        params[f"a{i}"], params[f"b{i}"] = a, b
        lower = "" if a is None else f"AND bucket_end > %(a{i})s"
        pieces.append((width, f"model_id = %(m)s AND {seg_where} {lower} AND bucket_end <= %(b{i})s"))
    return pieces, params


def _level_union(conn, tables: dict[int, str], params: dict, sums: list[tuple[str, str]],
                 segset_ids, by_segset: bool, read: list[str]) -> pd.DataFrame:
    """``sums`` ((aggregate, name) pairs) per g-bucket over the rows of the coarsest levels that
    serve (lo, hi] (``_pieces``). Read through binary COPY (every column 8 bytes: numeric
    sums would otherwise arrive as Decimals)."""
    g = params["g"]
    pieces, params = _piece_wheres(params, tables, segset_ids, by_segset)
    selects = [f"SELECT segset_id, bucket_end, {', '.join(dict.fromkeys(read))} FROM {tables[width]} WHERE {where}"
               for width, where in pieces]
    # ceil(bucket_end / g) * g in integers (bigint / truncates towards zero)
    bucket = "((r.bucket_end / %(g)s + (r.bucket_end %% %(g)s > 0)::int) * %(g)s)"
    keys = [(bucket, "bucket_end")] + ([("r.segset_id", "segset_id")] if by_segset else [])
    # One level of width g, and each stored row its own output row (all segments' row 0, or
    # per segment set): no aggregate needed.
    direct = len(pieces) == 1 and pieces[0][0] == g and (segset_ids is None or by_segset)
    if direct:
        keys = [("r.bucket_end", "bucket_end")] + keys[1:]
        sums = [(_row_value(expr), name) for expr, name in sums]
    columns = [f"({expr})::int8 AS {name}" for expr, name in keys]
    columns += [f"({expr})::{'int8' if name == 'revision' else 'float8'} AS {name}" for expr, name in sums]
    group = "" if direct else f"GROUP BY {', '.join(expr for expr, _ in keys)}"
    sql = f"""
        SELECT {", ".join(columns)}
        FROM ({" UNION ALL ".join(selects)}) r
        {group}
    """
    return _copy_out(conn, sql, params, [name for _, name in keys + sums])


def _row_value(aggregate: str) -> str:
    """The one row's value an aggregate of this module takes over a group of one row."""
    for fn in ("sum", "max"):
        if aggregate.startswith(f"{fn}(") and aggregate.endswith(")"):
            return aggregate[len(fn) + 1:-1]
    raise ValueError(f"no per-row form for {aggregate}")


def score_bins_by_bucket(conn, model: Model, *, g_s: int, lo_s: int | None, hi_s: int,
                         segset_ids: Sequence[int] | None, by_segset: bool) -> pd.DataFrame:
    """The score-bin partials per g-bucket and bin (g, lo and hi whole minutes; g = ALL_TIME_S:
    one bucket): bucket_end, [segset_id], bin, n, pos, neg, sum_score, sum_score_lab. A
    (bucket_end, [segset_id,] bin) may come in several rows: the partials are their sum."""
    params = {"m": model.model_id, "g": g_s, "lo": lo_s, "hi": hi_s,
              "segs": list(segset_ids) if segset_ids is not None else None}
    records = _bin_union(conn, params, segset_ids, by_segset)
    if not by_segset:
        del records["segset_id"]
    return bins.frame(records)


def bucket_revisions(conn, model: Model, *, lo_s: int | None, hi_s: int) -> pd.DataFrame:
    """Per-minute write revisions (all segments) with bucket end in (lo, hi]: bucket_end, revision."""
    lo = "" if lo_s is None else "AND bucket_end > %(lo)s"
    with conn.cursor() as cur:
        cur.execute(f"SELECT bucket_end, revision FROM rollup WHERE model_id = %(m)s"
                    f" AND segset_id = 0 {lo} AND bucket_end <= %(hi)s",
                    {"m": model.model_id, "lo": lo_s, "hi": hi_s})
        return pd.DataFrame.from_records(cur.fetchall(), columns=["bucket_end", "revision"])


def range_revision(conn, model: Model, *, lo_s: float, hi_s: float) -> int:
    """The highest write revision of the minute buckets holding predictions with ts in
    (lo, hi]; 0 when nothing was written there. Every write that touches a prediction of the
    range (its score, label, features or segments) raises it."""
    m = ROLLUP_BUCKET_S
    with conn.cursor() as cur:
        cur.execute("SELECT coalesce(max(revision), 0) FROM rollup WHERE model_id = %(m)s"
                    " AND segset_id = 0 AND bucket_end > %(lo)s AND bucket_end <= %(hi)s",
                    {"m": model.model_id, "lo": int(lo_s // m * m), "hi": int(-(-hi_s // m) * m)})
        return int(cur.fetchone()[0])


# What a raw read can send besides the time (ts_s, always first): each column's SQL over the
# prediction row ``p`` and its label ``f`` (RAW_ROWS).
RAW_COLUMNS = {
    "score": "p.score",
    "label": "coalesce(f.label, 'NaN')",
    "delay_s": "coalesce(date_part('epoch', f.ts - p.ts), 'NaN')",
    "segset_id": "p.segset_id::int8",
}


def joined_rows(conn, model: Model, *, lo_s: float | None, hi_s: float,
                segset_ids: Sequence[int] | None, columns: Sequence[str] = tuple(RAW_COLUMNS),
                labeled_only: bool = False) -> pd.DataFrame:
    """Raw joined rows with ts in (lo, hi], sorted by ts: ts_s and ``columns`` (of RAW_COLUMNS).

    ``label`` is NaN where no feedback arrived; ``delay_s`` is feedback time minus
    prediction time (both from the prediction row, which carries its label). Streams through COPY, which is several times faster than
    fetching tuples for the hundreds of thousands of rows a long panel reads. Only the
    columns asked for, and with ``labeled_only`` only the labeled rows, cross the wire: a
    7-day ROC AUC panel at 1M predictions reads 7.1 MB (ts, score, label of its labeled rows)
    instead of 14.6 MB.
    """
    require_retained(conn, lo_s)
    params = {"m": model.model_id, "lo": lo_s, "hi": hi_s,
              "segs": list(segset_ids) if segset_ids is not None else None}
    seg_where = "" if segset_ids is None else "AND p.segset_id = ANY(%(segs)s)"
    lo = "" if lo_s is None else "AND p.ts > to_timestamp(%(lo)s)"
    labeled = "AND f.label IS NOT NULL" if labeled_only else ""
    selected = "".join(f", {RAW_COLUMNS[c]} AS {c}" for c in columns)
    sql = f"""
        SELECT p.ts AS ts_s{selected}
        {RAW_ROWS}
        WHERE p.model_id = %(m)s {seg_where} {lo} AND p.ts <= to_timestamp(%(hi)s) {labeled}
        ORDER BY p.ts
    """
    return _copy_out(conn, sql, params, ["ts_s", *columns])


def column_rows(conn, model: Model, *, feature: str | None, lo_s: float | None, hi_s: float,
                segset_ids: Sequence[int] | None) -> pd.DataFrame:
    """Prediction-time values of the score (``feature`` None) or of one feature, sorted by ts.

    Columns ts_s, value (NaN where the feature is missing), segset_id.
    """
    require_retained(conn, lo_s)
    params = {"m": model.model_id, "lo": lo_s, "hi": hi_s, "f": feature,
              "segs": list(segset_ids) if segset_ids is not None else None}
    value = "p.score" if feature is None else "coalesce((p.features ->> %(f)s)::float8, 'NaN')"
    seg_where = "" if segset_ids is None else "AND p.segset_id = ANY(%(segs)s)"
    lo = "" if lo_s is None else "AND p.ts > to_timestamp(%(lo)s)"
    sql = f"""
        SELECT p.ts AS ts_s, {value} AS value, p.segset_id::int8
        FROM predictions p
        WHERE p.model_id = %(m)s {seg_where} {lo} AND p.ts <= to_timestamp(%(hi)s)
        ORDER BY p.ts
    """
    return _copy_out(conn, sql, params, ["ts_s", "value", "segset_id"])


def _copy_out(conn, sql: str, params: dict, names: list[str]) -> pd.DataFrame:
    """A parameterised SELECT of non-null 8-byte columns (int8 for INT8_COLUMNS, timestamptz
    for TIMESTAMP_COLUMNS, else float8) as a DataFrame, through binary COPY
    (``binary_copy.copy_out``)."""
    kinds = {n: "int8" if n in INT8_COLUMNS else "timestamptz" if n in TIMESTAMP_COLUMNS else "float8"
             for n in names}
    columns = copy_out(conn, sql, params, kinds)
    # copy=False: the arrays are this call's own; consolidating them into one block copied
    # every value (54 ms of the 2.3M rows of a 7-day panel at 10M predictions)
    return pd.DataFrame({n: _epoch_s(v) if n in TIMESTAMP_COLUMNS else v for n, v in columns.items()},
                        copy=False)


INT8_COLUMNS = frozenset({"segset_id", "bucket_end", "bin", "revision"})  # the rest are float8
# Sent as timestamptz, PostgreSQL's binary form (microseconds since 2000-01-01 UTC), and turned
# into epoch seconds here: no per-row date_part in the query (64 vs 85 ms of COPY for the 187K
# rows of a 7-day ROC AUC panel at 1M predictions).
TIMESTAMP_COLUMNS = frozenset({"ts_s"})


def _epoch_s(unix_us: np.ndarray) -> np.ndarray:
    """Epoch seconds as date_part('epoch', ts) gives them: the exact microseconds since 1970,
    divided by 10^6 in double precision (the same rounding, bit for bit)."""
    return unix_us / 1e6


def rollup_totals(conn, model: Model, columns: Sequence[str]) -> dict[str, float]:
    """All-time sums of some partials, from the rollup's all-segments rows (one aggregate, no
    rows to the client: what the Prometheus counters read every scrape)."""
    names = [c for c in columns if c in PARTIALS]  # identifiers only from the declaration
    with conn.cursor() as cur:
        cur.execute(f"SELECT {', '.join(f'coalesce(sum({c}), 0)' for c in names)} FROM rollup"
                    " WHERE model_id = %(m)s AND segset_id = 0", {"m": model.model_id})
        row = cur.fetchone()
    return {c: float(v) for c, v in zip(names, row, strict=True)}
