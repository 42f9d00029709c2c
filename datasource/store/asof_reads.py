"""Reads for as-of queries: the SLI as it was known at a time, from feedback times.

A label counts at point t when its feedback ``ts`` is at most t + lag (``as_of=point``) or
at most a fixed time T. The time a label became known enters the SQL only as an *arrival
bucket* ``h = ceil((f.ts - shift) / res) * res`` (exact: date_bin's integer microseconds),
from which the engine finds, for any lag L with ``res`` dividing every t + L - shift, the first point
that knows the label: f.ts <= t + L  <=>  h <= t + L - shift.

Both reads use the declared partial expressions (``PARTIALS``, reading ``p.*`` and
``f.label``) or the raw rows, whose label and its time are on the prediction row; nothing
is re-defined here.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pandas as pd

from datasource.store.catalog import Model
from datasource.store.partials import EPS, PARTIALS
from datasource.store.reads import _copy_out
from datasource.store.retention import require_retained


def _ceil_bucket(ts: str, width: str) -> str:
    """SQL: the end of the ``width`` bucket (since the epoch) holding ``ts``, as a timestamptz:
    ceil(ts / width) * width, exactly, in the integer microseconds of date_bin (PostgreSQL
    14+; several times cheaper per row than numeric epoch arithmetic)."""
    return f"(date_bin({width}, {ts} - interval '1 microsecond', 'epoch') + {width})"


# A column of the prediction row's label (migration 008) as known at the cutoff: NULL when
# the label arrived after it (or never).
_KNOWN = "CASE WHEN p.label_ts <= %(cutoff)s THEN {} END"


def _secs(s: int) -> timedelta:
    return timedelta(seconds=int(s))


def _utc(epoch_s: int) -> datetime:
    return datetime.fromtimestamp(epoch_s, UTC)


def asof_partials(conn, model: Model, *, g_s: int, lo_s: int | None, hi_s: int,
                  clip_s: int | None, width_s: int | None, segset_ids: Sequence[int] | None,
                  by_segset: bool, threshold: float | None, columns: Sequence[str],
                  cutoff: datetime, res_s: int, shift_s: int, lags_s: Sequence[int],
                  fixed: bool) -> pd.DataFrame:
    """The declared partials of the predictions with ts in (lo, hi], per entry
    (bucket, arrival bucket, kind[, segset_id]).

    Every partial is a sum over rows of an expression of (p, f.label); each prediction
    enters up to three times through a lateral ``VALUES``: with its label forced NULL
    (``kind`` 0: what it adds while its label is unknown), with its label (``kind`` 1: what
    it adds once known) and, for open windows (``width_s`` None, cumulative), once more with
    the label NULL to be subtracted from its arrival on (``kind`` 2). Columns:

    * ``bucket_end``: b = ceil(ts / g) * g (raised to ``clip_s`` when given: cumulative
      windows, where every earlier bucket counts alike); for kinds 1 and 2 of open windows,
      the arrival bucket h instead (from there on the entry counts: entries are then per
      bucket, not per pair of buckets);
    * ``known_h``: the arrival bucket h = ceil((f.ts - shift) / res) * res, raised to
      b + min(lags) - shift (at every lag, a label arriving by then is known as soon as its
      row is in a window: the same entry); NaN when no feedback with ts <= ``cutoff``
      exists, or (bounded windows) when even the largest lag sees it only after the window
      has left the row (h + shift - max(lags) >= b + width). ``fixed``: h = b for every label
      with ts <= cutoff (known from the start; shift and lags 0);
    * ``kind``: 0, 1 or 2 as above; rows that add nothing are not produced (the known row
      of a label never known in the window, the unknown row of a label known from its
      bucket);
    * ``segset_id`` when ``by_segset``, and the partials named in ``columns``.

    Open windows need one lag equal to ``shift`` (or ``fixed``): the first point that knows
    a label is then its arrival bucket's, whatever its prediction bucket.
    """
    require_retained(conn, lo_s)
    open_ended = width_s is None
    if open_ended and not fixed and list(lags_s) != [shift_s]:
        raise ValueError("an open window reads one lag, equal to the shift")
    names = [c for c in PARTIALS if c in columns]
    params = {"m": model.model_id, "g": _secs(g_s), "lo": lo_s, "hi": hi_s,
              "clip": None if clip_s is None else _utc(clip_s), "w": _secs(width_s or 0),
              "thr": threshold, "eps": EPS, "cutoff": cutoff, "res": _secs(res_s),
              "shift": _secs(shift_s), "back": _secs(max(lags_s) - shift_s),
              "fwd": _secs(min(lags_s) - shift_s),
              "segs": list(segset_ids) if segset_ids is not None else None}
    bucket = _ceil_bucket("p.ts", "%(g)s")
    if clip_s is not None:
        bucket = f"greatest({bucket}, %(clip)s)"
    arrival = "xb.b" if fixed else _ceil_bucket("fb.ts - %(shift)s", "%(res)s")
    too_late = "" if open_ended else "WHEN xa.h0 - %(back)s >= xb.b + %(w)s THEN NULL"
    later = "xh.h > xb.b + %(fwd)s"  # known only after the row entered its first window
    if open_ended:
        kinds = "(NULL::double precision, 0), (fb.label, 1), (NULL, 2)"
        key, arrives = "CASE WHEN f.kind = 0 THEN xb.b ELSE xh.h END", "CASE WHEN f.kind <> 0 THEN xk.k END"
        group = "f.kind, xk.k"
    else:
        kinds = "(NULL::double precision, 0), (fb.label, 1)"
        key, arrives, group = "xb.b", "xh.h", "xk.k, xh.h, f.kind"
    seg_where = "" if segset_ids is None else "AND p.segset_id = ANY(%(segs)s)"
    lo = "" if lo_s is None else "AND p.ts > to_timestamp(%(lo)s)"
    seg_col = ", p.segset_id::int8 AS segset_id" if by_segset else ""
    seg_group = ", p.segset_id" if by_segset else ""
    sums = ", ".join(f"({PARTIALS[c]})::float8 AS {c}" for c in names)
    sql = f"""
        SELECT extract(epoch FROM xk.k)::int8 AS bucket_end,
               coalesce(extract(epoch FROM {arrives})::float8, 'NaN') AS known_h,
               f.kind::float8 AS kind, {sums}{seg_col}
        FROM predictions p
        CROSS JOIN LATERAL (SELECT {_KNOWN.format("p.output_id")} AS output_id,
                                   {_KNOWN.format("p.label")} AS label,
                                   {_KNOWN.format("p.label_ts")} AS ts) fb
        CROSS JOIN LATERAL (SELECT {bucket} AS b) xb
        CROSS JOIN LATERAL (SELECT CASE WHEN fb.output_id IS NOT NULL THEN {arrival} END AS h0) xa
        CROSS JOIN LATERAL (SELECT CASE WHEN xa.h0 IS NULL THEN NULL {too_late}
                                        ELSE greatest(xa.h0, xb.b + %(fwd)s) END AS h) xh
        CROSS JOIN LATERAL (VALUES {kinds}) f(label, kind)
        CROSS JOIN LATERAL (SELECT {key} AS k) xk
        WHERE p.model_id = %(m)s {seg_where} {lo} AND p.ts <= to_timestamp(%(hi)s)
          AND CASE f.kind WHEN 0 THEN xh.h IS NULL OR {later}
                          WHEN 1 THEN xh.h IS NOT NULL
                          ELSE {later} END
        GROUP BY {group}{seg_group}
    """
    out = names + ["segset_id"] if by_segset else names
    return _copy_out(conn, sql, params, ["bucket_end", "known_h", "kind", *out])


def asof_joined_rows(conn, model: Model, *, lo_s: float | None, hi_s: float,
                     segset_ids: Sequence[int] | None, cutoff: datetime, res_s: int,
                     shift_s: int, fixed: bool) -> pd.DataFrame:
    """Raw joined rows with ts in (lo, hi], sorted by ts, as ``store.joined_rows`` gives them
    (ts_s, score, label, delay_s, segset_id), with feedback of ts > ``cutoff`` left out (label
    and delay NaN), plus ``known_h``: the arrival bucket ceil((f.ts - shift) / res) * res, -inf
    when ``fixed`` (known at every point), NaN without feedback."""
    require_retained(conn, lo_s)
    params = {"m": model.model_id, "lo": lo_s, "hi": hi_s, "cutoff": cutoff, "res": _secs(res_s),
              "shift": _secs(shift_s), "segs": list(segset_ids) if segset_ids is not None else None}
    seg_where = "" if segset_ids is None else "AND p.segset_id = ANY(%(segs)s)"
    lo = "" if lo_s is None else "AND p.ts > to_timestamp(%(lo)s)"
    arrival = ("'-Infinity'::float8" if fixed else
               f"extract(epoch FROM {_ceil_bucket('f.ts - %(shift)s', '%(res)s')})::float8")
    sql = f"""
        SELECT p.ts AS ts_s, p.score, coalesce(f.label, 'NaN') AS label,
               coalesce(date_part('epoch', f.ts - p.ts), 'NaN') AS delay_s,
               CASE WHEN f.output_id IS NULL THEN 'NaN'::float8 ELSE {arrival} END AS known_h,
               p.segset_id::int8
        FROM predictions p
        CROSS JOIN LATERAL (SELECT {_KNOWN.format("p.output_id")} AS output_id,
                                   {_KNOWN.format("p.label")} AS label,
                                   {_KNOWN.format("p.label_ts")} AS ts) f
        WHERE p.model_id = %(m)s {seg_where} {lo} AND p.ts <= to_timestamp(%(hi)s)
        ORDER BY p.ts
    """
    return _copy_out(conn, sql, params, ["ts_s", "score", "label", "delay_s", "known_h", "segset_id"])
