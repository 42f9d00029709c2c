"""Reads for the engine: partial sums per bucket, raw joined rows, a column's values.

Binary COPY parsed with numpy for the raw reads (fixed-width rows); only parameters
(``%(name)s``) carry values, identifiers come from constants.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from datetime import datetime

import numpy as np
import pandas as pd

from datasource.store.catalog import Model
from datasource.store.partials import EPS, JOIN, PARTIALS, ROLLUP_BUCKET_S

# --------------------------------------------------------------------------- reads for the engine


def table_counts(conn, model: Model) -> dict[str, int]:
    with conn.cursor() as cur:
        cur.execute(
            "SELECT (SELECT count(*) FROM predictions WHERE model_id = %(m)s),"
            " (SELECT count(*) FROM feedback WHERE model_id = %(m)s),"
            " (SELECT count(*) FROM rollup WHERE model_id = %(m)s)",
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

    ``from_rollup`` reads the per-minute rollup (g must be a multiple of 60 and the
    threshold the model's); otherwise the same partials are aggregated from raw
    rows at any threshold and any g. ``segset_ids`` None means all segments.
    ``lo_s`` None means from the beginning. Columns: bucket_end, [segset_id],
    the partials (only ``columns`` when given: fewer sums, a faster scan), and
    (rollup only) revision.
    """
    names = [c for c in PARTIALS if columns is None or c in columns]
    params = {"m": model.model_id, "g": g_s, "lo": lo_s, "hi": hi_s, "thr": threshold,
              "eps": EPS, "segs": list(segset_ids) if segset_ids is not None else None}
    if from_rollup:
        if g_s % ROLLUP_BUCKET_S:
            raise ValueError("rollup buckets are one minute: g must be a multiple of 60 s")
        seg_where = "r.segset_id = 0" if segset_ids is None and not by_segset else (
            "r.segset_id <> 0" if segset_ids is None else "r.segset_id = ANY(%(segs)s)")
        # ceil(bucket_end / g) * g in integers (bigint / truncates towards zero)
        bucket = "((r.bucket_end / %(g)s + (r.bucket_end %% %(g)s > 0)::int) * %(g)s)"
        lo = "" if lo_s is None else "AND r.bucket_end > %(lo)s"
        sums = ", ".join(f"sum(r.{c}) AS {c}" for c in names)
        group = f"{bucket}, r.segset_id" if by_segset else bucket
        seg_col = "r.segset_id," if by_segset else ""
        sql = f"""
            SELECT {bucket} AS bucket_end, {seg_col} {sums}, max(r.revision) AS revision
            FROM rollup r
            WHERE r.model_id = %(m)s AND {seg_where} {lo} AND r.bucket_end <= %(hi)s
            GROUP BY {group}
        """
    else:
        bucket = "(ceil(extract(epoch FROM p.ts) / %(g)s)::bigint * %(g)s)"
        seg_where = "" if segset_ids is None else "AND p.segset_id = ANY(%(segs)s)"
        lo = "" if lo_s is None else "AND p.ts > to_timestamp(%(lo)s)"
        group = f"{bucket}, p.segset_id" if by_segset else bucket
        seg_col = "p.segset_id," if by_segset else ""
        sql = f"""
            SELECT {bucket} AS bucket_end, {seg_col}
                   {", ".join(f"{PARTIALS[c]} AS {c}" for c in names)}
            {JOIN}
            WHERE p.model_id = %(m)s {seg_where} {lo} AND p.ts <= to_timestamp(%(hi)s)
            GROUP BY {group}
        """
    with conn.cursor() as cur:
        cur.execute(sql, params)
        cols = [d[0] for d in cur.description]
        data = cur.fetchall()
    df = pd.DataFrame.from_records(data, columns=cols)
    for c in names:
        df[c] = df[c].astype(np.float64)
    return df


def bucket_revisions(conn, model: Model, *, lo_s: int | None, hi_s: int) -> pd.DataFrame:
    """Per-minute write revisions (all segments) with bucket end in (lo, hi]: bucket_end, revision."""
    lo = "" if lo_s is None else "AND bucket_end > %(lo)s"
    with conn.cursor() as cur:
        cur.execute(f"SELECT bucket_end, revision FROM rollup WHERE model_id = %(m)s"
                    f" AND segset_id = 0 {lo} AND bucket_end <= %(hi)s",
                    {"m": model.model_id, "lo": lo_s, "hi": hi_s})
        return pd.DataFrame.from_records(cur.fetchall(), columns=["bucket_end", "revision"])


def joined_rows(conn, model: Model, *, lo_s: float | None, hi_s: float,
                segset_ids: Sequence[int] | None) -> pd.DataFrame:
    """Raw joined rows with ts in (lo, hi], sorted by ts: ts_s, score, label, delay_s, segset_id.

    ``label`` is NaN where no feedback arrived; ``delay_s`` is feedback time minus
    prediction time. Streams through COPY, which is several times faster than
    fetching tuples for the hundreds of thousands of rows a long panel reads.
    """
    params = {"m": model.model_id, "lo": lo_s, "hi": hi_s,
              "segs": list(segset_ids) if segset_ids is not None else None}
    seg_where = "" if segset_ids is None else "AND p.segset_id = ANY(%(segs)s)"
    lo = "" if lo_s is None else "AND p.ts > to_timestamp(%(lo)s)"
    sql = f"""
        SELECT date_part('epoch', p.ts) AS ts_s, p.score, coalesce(f.label, 'NaN') AS label,
               coalesce(date_part('epoch', f.ts - p.ts), 'NaN') AS delay_s,
               p.segset_id::int8
        {JOIN}
        WHERE p.model_id = %(m)s {seg_where} {lo} AND p.ts <= to_timestamp(%(hi)s)
        ORDER BY p.ts
    """
    return _copy_out(conn, sql, params, ["ts_s", "score", "label", "delay_s", "segset_id"])


def column_rows(conn, model: Model, *, feature: str | None, lo_s: float | None, hi_s: float,
                segset_ids: Sequence[int] | None) -> pd.DataFrame:
    """Prediction-time values of the score (``feature`` None) or of one feature, sorted by ts.

    Columns ts_s, value (NaN where the feature is missing), segset_id.
    """
    params = {"m": model.model_id, "lo": lo_s, "hi": hi_s, "f": feature,
              "segs": list(segset_ids) if segset_ids is not None else None}
    value = "p.score" if feature is None else "coalesce((p.features ->> %(f)s)::float8, 'NaN')"
    seg_where = "" if segset_ids is None else "AND p.segset_id = ANY(%(segs)s)"
    lo = "" if lo_s is None else "AND p.ts > to_timestamp(%(lo)s)"
    sql = f"""
        SELECT date_part('epoch', p.ts) AS ts_s, {value} AS value, p.segset_id::int8
        FROM predictions p
        WHERE p.model_id = %(m)s {seg_where} {lo} AND p.ts <= to_timestamp(%(hi)s)
        ORDER BY p.ts
    """
    return _copy_out(conn, sql, params, ["ts_s", "value", "segset_id"])


def _copy_out(conn, sql: str, params: dict, names: list[str]) -> pd.DataFrame:
    """Run a parameterised SELECT of non-null 8-byte columns (float8, the last may be int8)
    through binary COPY and read it with numpy: every row has the same layout, so no
    text is parsed (several times faster than tuples or CSV for a long panel's rows)."""
    with conn.cursor() as cur:
        query = cur.mogrify(sql, params).decode()
        buf = io.BytesIO()
        cur.copy_expert(f"COPY ({query}) TO STDOUT WITH (FORMAT binary)", buf)
    data = buf.getvalue()
    header = 11 + 4 + 4 + int.from_bytes(data[15:19], "big")  # signature, flags, extension
    fields = [("count", ">i2")]
    for k, name in enumerate(names):
        kind = ">i8" if name == "segset_id" else ">f8"
        fields += [(f"len{k}", ">i4"), (name, kind)]
    row = np.dtype(fields)
    n = (len(data) - header - 2) // row.itemsize  # the file ends with a -1 trailer
    rows = np.frombuffer(data, dtype=row, count=n, offset=header)
    return pd.DataFrame({name: rows[name].astype(np.int64 if name == "segset_id" else np.float64)
                         for name in names})


def rollup_totals(conn, model: Model, columns: Sequence[str]) -> dict[str, float]:
    """All-time sums of some partials, from the rollup's all-segments rows (one aggregate, no
    rows to the client: what the Prometheus counters read every scrape)."""
    names = [c for c in columns if c in PARTIALS]  # identifiers only from the declaration
    with conn.cursor() as cur:
        cur.execute(f"SELECT {', '.join(f'coalesce(sum({c}), 0)' for c in names)} FROM rollup"
                    " WHERE model_id = %(m)s AND segset_id = 0", {"m": model.model_id})
        row = cur.fetchone()
    return {c: float(v) for c, v in zip(names, row, strict=True)}
