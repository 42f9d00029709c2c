"""As-of: each SLI as it was known at a time, from the feedback times; the label-settling table.

Payload ``as_of=point`` computes the point at time t with only the feedback whose ``ts`` is
at most t (+ ``lag``): what a live dashboard or alert saw at t (lag L: what it saw L later).
``as_of=<time T>`` uses the feedback with ``ts`` <= T at every point. The store keeps one
label per prediction, the latest, with its ``ts``: a corrected label is unknown before the
correction's ``ts``, even where an earlier version had arrived (its history is not kept).

Partial metrics, exactly and from the declared SQL partials: every partial is a sum over
the window's rows of an expression of (prediction, label or NULL), so

    partial(t) = sum over rows in window(t) whose label is unknown at t of f(row, NULL)
               + sum over rows in window(t) whose label is known at t of f(row, label).

A row with prediction bucket b (bucket width g = window.bucket(step)) is in window(t) for
the points b <= t < b + W (W: the window's width, the step when tumbling, no bound when
cumulative); its label, arriving in bucket a (the first point whose t + lag reaches the
feedback ts), is known for t >= a. So a row adds f(row, NULL) on [b, min(max(a, b), b + W))
and f(row, label) on [max(a, b), b + W): one SQL read aggregates the partials per
(b, a, kind) entry (``store.asof_reads.asof_partials``), and each entry is two marks in a
difference array over the points, summed once: O(entries + points). Arrivals before b are
read as b, and labels that arrive only after b + W as none, so a bounded window has at most
W / step + 2 entries per prediction bucket, whatever the rows. A cumulative window (no
b + W) keys the labeled rows by arrival alone: f(row, NULL) from b on, f(row, label) from a
on, and f(row, NULL) subtracted from a on: at most three entries per bucket.

Raw metrics run on each window's joined rows (as ``engine.raw_series``) with the labels
not known at the point masked: no cache (a point's value depends on the point itself).

Cost: MAX_ASOF_ROWS predictions per query (counted from the rollup, in whole minutes of the
span), and the request's deadline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import numpy as np
import pandas as pd

from datasource import engine, metrics, store, windows
from datasource.errors import ClientError
from datasource.store.asof_reads import asof_joined_rows, asof_partials

MAX_ASOF_ROWS = 5_000_000  # predictions an as-of query reads (the span of its windows)
DAY_S = 86_400
MAX_SETTLING_DAYS = 400  # rows of a settling table
SETTLING_LAGS = (("1h", 3600), ("6h", 6 * 3600), ("1d", DAY_S), ("2d", 2 * DAY_S), ("7d", 7 * DAY_S))
_SETTLING_RES = 3600  # arrival buckets of the settling read: every lag and day end is whole hours


@dataclass(frozen=True)
class Known:
    """When labels are known. The read puts each label in the arrival bucket
    h = ceil((f.ts - shift) / res) * res; with ``res`` dividing every t + lag - shift, the
    label is known at point t iff h <= t + lag - shift, i.e. from the point
    ceil((h + shift - lag) / step) * step. ``fixed``: labels with ts <= cutoff, at every point."""

    cutoff: datetime  # no feedback after this counts anywhere in the query
    res: int
    shift: int
    lags: tuple[int, ...]
    fixed: bool = False

    @classmethod
    def of(cls, params: dict, points: np.ndarray, step: int) -> Known:
        as_of = params["as_of"]
        if as_of == "point":
            lag = int(params.get("lag", 0))
            return cls(_utc(int(points[-1]) + lag), step, lag, (lag,))
        return cls(_utc(float(as_of)), step, 0, (0,), fixed=True)


def _utc(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, UTC)


def _ceil_div(a, b):
    return -(-a // b)


# ----------------------------------------------------------------------- series


def series(conn, q: engine.Query, points: np.ndarray, step: int,
           deadline: float | None = None) -> list[engine.Series]:
    """The metric at each point with the labels known then (``q.param_dict['as_of']``)."""
    if q.metric.kind not in ("partial", "raw"):
        raise engine.QueryError(f"as_of applies to metrics of labels, not {q.metric.name}")
    if len(points) == 0:
        return [] if q.group_by else [engine.Series("", points, np.empty(0))]
    known = Known.of(q.param_dict, points, step)
    check_rows(conn, q, q.window.earliest(int(points[0]), step), int(points[-1]))
    if q.metric.kind == "partial":
        lagged = partial_lagged(conn, q, points, step, known, deadline)
    else:
        lagged = raw_lagged(conn, q, points, step, known, deadline)
    return [engine.Series(name, points, values[0], {q.group_by: name} if q.group_by else {})
            for name, values in lagged.items()]


def check_rows(conn, q: engine.Query, lo: float | None, hi: float) -> None:
    """Refuse (QueryError) a query over more than MAX_ASOF_ROWS predictions, counted from the
    rollup over the whole minutes that cover (lo, hi] before any row is read."""
    m = store.ROLLUP_BUCKET_S
    df = store.partials_by_bucket(
        conn, q.model, g_s=store.ALL_TIME_S, lo_s=None if lo is None else int(lo // m * m),
        hi_s=int(_ceil_div(hi, m) * m), segset_ids=q.segset_ids, by_segset=False,
        threshold=q.model.threshold if q.model.is_classifier else None, from_rollup=True,
        columns=("n_pred",))
    n = int(df["n_pred"].sum()) if not df.empty else 0
    if n > MAX_ASOF_ROWS:
        raise engine.QueryError(
            f"as_of reads the {n} predictions of the span, more than {MAX_ASOF_ROWS}: "
            "narrow the time range, shorten the window or filter segments")


def _groups(frame: pd.DataFrame, q: engine.Query, volume: pd.Series) -> dict[str, pd.DataFrame]:
    """Split the entries by group value, the TOP_GROUPS with most predictions (``volume``
    per entry) kept and the rest folded into 'other', as the engine does."""
    groups = engine._group_of(q)
    if groups is None:
        return {"": frame}
    if frame.empty:
        return {}
    frame = frame.assign(group=frame["segset_id"].map(groups).fillna(engine.NONE_VALUE))
    frame["group"] = frame["group"].map(engine._top_groups(volume.groupby(frame["group"]).sum()))
    return dict(iter(frame.groupby("group", sort=True)))


def partial_lagged(conn, q: engine.Query, points: np.ndarray, step: int, known: Known,
                   deadline: float | None = None) -> dict[str, np.ndarray]:
    """group -> (len(known.lags), len(points)) values of a partial metric, one row per lag."""
    g = q.window.bucket(step)
    first, n = int(points[0]), len(points)
    width = None if q.window.cumulative else q.window.width(step)
    cols = tuple(sorted(set(q.metric.needs) | {"n_pred"}))
    entries = asof_partials(
        conn, q.model, g_s=g, lo_s=q.window.earliest(first, step), hi_s=int(points[-1]),
        clip_s=first if q.window.cumulative else None, width_s=width,
        segset_ids=q.segset_ids, by_segset=q.group_by is not None,
        threshold=q.threshold if q.model.is_classifier else None, columns=cols,
        cutoff=known.cutoff, res_s=known.res, shift_s=known.shift, lags_s=known.lags,
        fixed=known.fixed)
    engine._check_deadline(deadline, f"{q.metric.name} as of")
    kind = entries["kind"].to_numpy()
    # each prediction counts once: its known entry, or its unknown one with no label to come
    # (open windows: unknown + known - retracted)
    volume = (entries["n_pred"].where((kind >= 1) | entries["known_h"].isna(), 0.0)
              * np.where(kind == 2, -1.0, 1.0))
    out = {}
    for name, part in _groups(entries, q, volume).items():
        b = part["bucket_end"].to_numpy(np.int64)
        kind = part["kind"].to_numpy()
        is_known = kind >= 1  # kind 2: an unknown row, subtracted from its arrival on
        h = part["known_h"].to_numpy()
        arrives = ~np.isnan(h)
        h_int = np.where(arrives, h, 0).astype(np.int64)
        start = np.clip(_ceil_div(b - first, step), 0, n)  # first point whose window has the row
        stop = (np.full(len(b), n) if width is None
                else np.clip(_ceil_div(b + width - first, step), 0, n))  # first point without
        values = part[list(cols)].to_numpy(np.float64) * np.where(kind == 2, -1.0, 1.0)[:, None]
        rows = []
        for lag in known.lags:
            engine._check_deadline(deadline, f"{q.metric.name} as of")
            ia = np.where(arrives, np.clip(_ceil_div(h_int + known.shift - lag - first, step), 0, n), n)
            since = np.maximum(ia, start)
            lo = np.where(is_known, since, start)
            hi = np.where(is_known, stop, np.minimum(since, stop))
            sums = _interval_sums(lo, hi, values, n)
            rows.append(np.asarray(q.metric.finalize({c: sums[:, j] for j, c in enumerate(cols)}),
                                   dtype=np.float64))
        out[name] = np.vstack(rows)
    if not q.group_by and not out:
        out[""] = np.full((len(known.lags), n), np.nan)
    return out


def _interval_sums(lo: np.ndarray, hi: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """(n, columns): at each point index k, the sum of the values of the entries with
    lo <= k < hi (a difference array: +v at lo, -v at hi, then a running sum)."""
    live = lo < hi
    lo, hi, values = lo[live], hi[live], values[live]
    out = np.empty((n, values.shape[1]))
    for j in range(values.shape[1]):
        diff = (np.bincount(lo, weights=values[:, j], minlength=n + 1)
                - np.bincount(hi, weights=values[:, j], minlength=n + 1))
        out[:, j] = np.cumsum(diff[:n])
    return out


def raw_lagged(conn, q: engine.Query, points: np.ndarray, step: int, known: Known,
               deadline: float | None = None) -> dict[str, np.ndarray]:
    """group -> (len(known.lags), len(points)) values of a raw metric on each window's joined
    rows, the labels not yet known at the point masked (then dropped when labeled_only)."""
    params = q.param_dict
    rows = asof_joined_rows(conn, q.model, lo_s=q.window.earliest(int(points[0]), step),
                            hi_s=int(points[-1]), segset_ids=q.segset_ids, cutoff=known.cutoff,
                            res_s=known.res, shift_s=known.shift, fixed=known.fixed)
    out = {}
    count = 0
    for name, part in engine._split_groups(rows, q).items():
        ts, score = part["ts_s"].to_numpy(), part["score"].to_numpy()
        label, delay, h = part["label"].to_numpy(), part["delay_s"].to_numpy(), part["known_h"].to_numpy()
        lo_idx, hi_idx = q.window.slices(ts, points, step)
        finite = np.isfinite(h)
        h_int = np.where(finite, h, 0).astype(np.int64)
        pred_all = (score >= q.threshold).astype(np.float64) if q.model.is_classifier else score
        values = np.full((len(known.lags), len(points)), np.nan)
        for r, lag in enumerate(known.lags):
            # the first point that knows each label; -inf (fixed) always, NaN (none) never
            since = np.where(finite, _ceil_div(h_int + known.shift - lag, step) * step, h)
            for i, (a, b) in enumerate(zip(lo_idx, hi_idx, strict=True)):
                count += 1
                if deadline is not None and count % 16 == 0 and time.monotonic() > deadline:
                    raise engine.ComputeTimeout(f"{q.metric.name} as of over {len(points)} windows "
                                                "ran past the time budget")
                seen = since[a:b] <= points[i]
                y, s, d, p = label[a:b], score[a:b], delay[a:b], pred_all[a:b]
                if q.metric.labeled_only:
                    y, s, d, p = y[seen], s[seen], d[seen], p[seen]
                else:
                    y, d = np.where(seen, y, np.nan), np.where(seen, d, np.nan)
                value = q.metric.raw(engine.WindowRows(y, s, p, d, params))
                values[r, i] = np.nan if value is None else float(value)
        out[name] = values
    if not q.group_by and not out:
        out[""] = np.full((len(known.lags), len(points)), np.nan)
    return out


# ----------------------------------------------------------------------- settling table


def settling_table(conn, q: engine.Query, from_s: float, to_s: float) -> tuple[list, list]:
    """Per UTC day overlapping (from, to]: its predictions, and the metric named by payload
    ``of`` (default accuracy; same threshold and filter; group_by ignored) over the day's
    predictions as known 1 h, 6 h, 1 d, 2 d and 7 d after the day closed, and as known now.

    A day D holds the predictions with ts in (D 00:00, D+1 00:00] UTC: the point at D+1 00:00
    of a 1-day tumbling window. The column "+L" of day D is exactly that point of the
    series ``window=1d, mode=tumbling, as_of=point, lag=L`` (feedback with ts <= D+1 00:00 + L;
    computed for every lag from one read), "latest" that point without as_of. A lag whose
    time has not come yet (later than now) is null, as is a metric undefined on the day.
    """
    of = metrics.get(q.param_dict.get("of", "accuracy"))
    first = (int(from_s // DAY_S) + 1) * DAY_S  # the end of the first day overlapping (from, to]
    last = int(_ceil_div(to_s, DAY_S)) * DAY_S
    n_days = max(0, (last - first) // DAY_S + 1)
    if n_days > MAX_SETTLING_DAYS:
        raise ClientError(f"label_settling covers {n_days} days, more than {MAX_SETTLING_DAYS}: "
                          "narrow the time range",
                          [{"index": None, "field": "range", "message": "too many days"}])
    columns = ([{"text": "day", "type": "string"}, {"text": "predictions", "type": "number"}]
               + [{"text": f"after {text}", "type": "number"} for text, _ in SETTLING_LAGS]
               + [{"text": "now", "type": "number"}])  # names fixed, whatever "of" is
    if n_days == 0:
        return columns, []
    points = np.arange(first, last + DAY_S, DAY_S, dtype=np.int64)
    day = windows.Window("1d", DAY_S, windows.TUMBLING)
    base = replace(q, metric=of, window=day, group_by=None, params=())
    try:
        check_rows(conn, base, first - DAY_S, last)
    except engine.QueryError as e:
        raise ClientError(str(e), [{"index": None, "field": "range", "message": str(e)}]) from None
    lags = tuple(s for _, s in SETTLING_LAGS)
    known = Known(_utc(last + max(lags)), _SETTLING_RES, 0, lags)
    lagged = (partial_lagged if of.kind == "partial" else raw_lagged)(conn, base, points, DAY_S, known)[""]
    latest = engine.series(conn, base, points, DAY_S)[0].values
    count_q = replace(base, metric=metrics.get("prediction_count"),
                      threshold=q.model.threshold if q.model.is_classifier else None)
    counts = np.nan_to_num(engine.series(conn, count_q, points, DAY_S)[0].values)
    now = time.time()
    rows = []
    for i, t in enumerate(points.tolist()):
        cells = [None if t + lag > now or np.isnan(v) else float(v)
                 for lag, v in zip(lags, lagged[:, i], strict=True)]
        rows.append([_utc(t - DAY_S).strftime("%Y-%m-%d"), int(counts[i]), *cells,
                     None if np.isnan(latest[i]) else float(latest[i])])
    return columns, rows
