"""The metric engine: evaluates a metric over windows on the time grid.

Partial metrics: partials are summed per bucket of width g = gcd(window,
step) (from the per-minute rollup when g is whole minutes and the threshold
is the model's, else from raw rows with the same SQL), laid on a dense grid,
prefix-summed, and each point's window is a difference of two prefix sums:
O(buckets) whatever the number of predictions.

Raw metrics: the joined rows of the whole span are read once, each point's
window is a slice found by binary search, and the function runs on it (or, where
the metric declares ``windows``, on all the slices at once). A
point's value is cached with the highest write revision of the rollup rows
its window covers, so it is recomputed only when a write touched the window.
"""

from __future__ import annotations

import copy
import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from datasource import distributions, store, windows
from datasource.metrics import REGISTRY, Metric
from datasource.store import ALL_TIME_S, BIN_BASE_S, N_BINS, ROLLUP_BUCKET_S, Model

TOP_GROUPS = 10
OTHER = "other"
NONE_VALUE = "(none)"
_TOTAL_G = ALL_TIME_S  # one bucket that holds all time: for prefix sums
# The drift ranking's statistics, PSI (what it ranks by) first.
DRIFT_METRICS = sorted((m for m in REGISTRY.values() if m.kind == "drift"), key=lambda m: m.name != "psi")


class QueryError(ValueError):
    """A query the engine cannot answer as asked (the message says why)."""


class ComputeTimeout(RuntimeError):
    """Raw-metric evaluation ran past the request's time budget."""


@dataclass(frozen=True)
class Query:
    model: Model
    metric: Metric
    window: windows.Window  # its kind says sliding, tumbling or cumulative
    threshold: float | None
    segset_ids: tuple[int, ...] | None  # None: every segment
    group_by: str | None
    segsets: dict = field(default_factory=dict, compare=False, hash=False)  # id -> segments
    params: tuple = ()  # sorted (name, value) pairs of metric payloads
    column: Column | None = None  # distribution and drift metrics
    reference: object = field(default=None, compare=False, hash=False)  # resolved reference values

    @property
    def param_dict(self) -> dict:
        return dict(self.params)


@dataclass(frozen=True)
class Column:
    """What a distribution metric looks at: the score, a numeric feature or a segment key."""

    name: str
    kind: str  # "score" | "feature" | "segment"

    @property
    def numeric(self) -> bool:
        return self.kind != "segment"


@dataclass
class Series:
    name: str
    times_s: np.ndarray
    values: np.ndarray  # nan = gap
    tags: dict = field(default_factory=dict)


@dataclass
class WindowRows:
    """What a raw metric sees: the labeled rows of one window (all rows if not labeled_only)."""

    y_true: np.ndarray
    y_score: np.ndarray
    y_pred: np.ndarray
    delay: np.ndarray
    params: dict


# ----------------------------------------------------------------------- groups


def _group_of(q: Query) -> dict[int, str] | None:
    """segset_id -> group value for group_by (None when not grouping)."""
    if not q.group_by:
        return None
    return {sid: str(seg.get(q.group_by, NONE_VALUE)) for sid, seg in q.segsets.items()}


def _top_groups(volume: pd.Series) -> dict[str, str]:
    """Keep the TOP_GROUPS values with most predictions; fold the rest into 'other'."""
    ordered = volume.sort_values(ascending=False, kind="mergesort")
    keep = list(ordered.index[:TOP_GROUPS])
    return {g: (g if g in keep else OTHER) for g in ordered.index}


# ----------------------------------------------------------------------- partial metrics


def _rollup_base(q: Query) -> int | None:
    """The finest bucket the rollup levels serve this query at: a minute at the model's
    threshold, 5 minutes (the score bins) at another threshold on the 0.01 grid, None off it."""
    if not q.model.is_classifier or q.threshold == q.model.threshold:
        return ROLLUP_BUCKET_S
    return BIN_BASE_S if store.grid_bin(q.threshold) is not None else None


def _use_rollup(q: Query, g: int) -> bool:
    """Whether the rollup levels answer buckets of g seconds (bounds on the same grid)."""
    base = _rollup_base(q)
    return base is not None and g % base == 0


@dataclass
class RequestMemo:
    """What the targets of one request share: partials read once, with the union of the
    columns their metrics need (a dashboard's accuracy, precision, recall… panels)."""

    columns: tuple[str, ...] = ()
    reads: dict = field(default_factory=dict)

    @classmethod
    def for_metrics(cls, metrics) -> RequestMemo:
        cols = {c for m in metrics if m.kind == "partial" for c in m.needs}
        return cls(tuple(sorted(cols)))


def _columns(q: Query, memo: RequestMemo | None) -> tuple[str, ...]:
    cols = set(memo.columns if memo and memo.columns else q.metric.needs)
    return tuple(sorted(cols | {"n_pred"}))  # n_pred ranks groups by volume


def _partials(conn, q: Query, *, g: int, lo: int | None, hi: int, from_rollup: bool,
              memo: RequestMemo | None = None) -> pd.DataFrame:
    """Partials per g-bucket, only the columns needed, read once per request."""
    threshold = q.threshold if q.model.is_classifier else None
    by_segset = q.group_by is not None
    columns = _columns(q, memo)
    key = (q.model.model_id, g, lo, hi, q.segset_ids, by_segset, threshold, from_rollup, columns)
    if memo is not None and key in memo.reads:
        return memo.reads[key]
    df = store.partials_by_bucket(
        conn, q.model, g_s=g, lo_s=lo, hi_s=hi, segset_ids=q.segset_ids, by_segset=by_segset,
        threshold=threshold, from_rollup=from_rollup, columns=columns)
    if memo is not None:
        memo.reads[key] = df
    return df


def _group_rows(segset_ids: np.ndarray, volume: np.ndarray, q: Query) -> dict[str, np.ndarray]:
    """The row indices of each group under ``q.group_by``, by name (sorted): each segment set's
    value of the key, the TOP_GROUPS values of most ``volume`` kept and the rest folded into
    OTHER. In numpy over the distinct segment sets: pandas' groupby on the group names (pyarrow
    strings) was most of a grouped panel's time (~100 ms for a 30-day panel, measured)."""
    groups = _group_of(q)
    ids, row_id = np.unique(np.asarray(segset_ids, np.int64), return_inverse=True)
    values, id_value = np.unique(np.array([groups.get(int(s), NONE_VALUE) for s in ids], dtype=object),
                                 return_inverse=True)
    weight = np.bincount(id_value[row_id], weights=np.asarray(volume, np.float64), minlength=len(values))
    mapping = _top_groups(pd.Series(weight, index=values))
    names, value_name = np.unique(np.array([mapping[v] for v in values], dtype=object), return_inverse=True)
    row_name = value_name[id_value[row_id]]
    order = np.argsort(row_name, kind="stable")
    bounds = np.searchsorted(row_name[order], np.arange(len(names) + 1))
    return {str(n): order[bounds[k]:bounds[k + 1]] for k, n in enumerate(names)}


def _grouped(df: pd.DataFrame, q: Query) -> dict[str, pd.DataFrame]:
    """Partial rows split by group (a bucket may come in several rows of a group: the callers
    add them up)."""
    if not q.group_by:
        return {"": df}
    if df.empty:
        return {}
    return {g: df.iloc[rows] for g, rows in _group_rows(df["segset_id"].to_numpy(), df["n_pred"].to_numpy(), q).items()}


def _check_deadline(deadline: float | None, what: str) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise ComputeTimeout(f"{what} ran past the time budget")


def partial_series(conn, q: Query, points: np.ndarray, step: int,
                   memo: RequestMemo | None = None, deadline: float | None = None) -> list[Series]:
    g = q.window.bucket(step)
    start = q.window.grid_start(int(points[0]), step)
    # Counted before any array of buckets exists (np.zeros below, the SQL read).
    n_buckets = windows.grid_buckets(int(points[0]), int(points[-1]), step, q.window)
    if n_buckets > windows.MAX_GRID_BUCKETS:
        raise QueryError(f"window {q.window.text} at a {step}s step needs {n_buckets} buckets of "
                         f"{g}s; choose a window that is a multiple of the step")
    from_rollup = _use_rollup(q, g)
    df = _partials(conn, q, g=g, lo=start, hi=int(points[-1]), from_rollup=from_rollup, memo=memo)
    cols = _columns(q, memo)
    prefix_groups = {}
    if q.window.cumulative:  # the sum before the grid's start, once
        prefix = _partials(conn, q, g=_TOTAL_G, lo=None, hi=start,
                           from_rollup=from_rollup and _use_rollup(q, start), memo=memo)
        prefix_groups = {k: v[list(cols)].sum().to_numpy() for k, v in _grouped(prefix, q).items()}
    out = []
    by_group = _grouped(df, q)
    names = sorted(set(by_group) | set(prefix_groups)) if q.group_by else [""]
    pidx = (points - start) // g
    for name in names:
        _check_deadline(deadline, f"{q.metric.name} over {len(points)} points")
        part = by_group.get(name)
        dense = np.zeros((n_buckets + 1, len(cols)))
        if part is not None and not part.empty:
            idx = ((part["bucket_end"].to_numpy(np.int64) - start) // g)
            np.add.at(dense, idx, part[list(cols)].to_numpy(np.float64))
        csum = np.cumsum(dense, axis=0)  # csum[k]: buckets 1..k (bucket 0 is empty by construction)
        if q.window.cumulative:
            win = csum[pidx] + prefix_groups.get(name, np.zeros(len(cols)))
        else:
            win = csum[pidx] - csum[pidx - q.window.width(step) // g]
        sums = {c: win[:, j] for j, c in enumerate(cols)}
        values = np.asarray(q.metric.finalize(sums), dtype=np.float64)
        out.append(Series(name, points, values, {q.group_by: name} if q.group_by else {}))
    return out


# ----------------------------------------------------------------------- binned metrics

MAX_BIN_CELLS = 1_500_000  # buckets x score bins of one series (5 float arrays: 60 MB)


def calibrated_finalizer(q: Query):
    """CBPE with the isotonic calibrator of ``q.reference`` (one probability per score bin):
    the estimated_* partial metrics over expected confusion counts, estimated_roc_auc over
    expected positives and negatives per bin."""
    from datasource import calibration, metrics

    probs = np.asarray(q.reference, dtype=np.float64)
    if q.metric.kind == "partial":
        k = store.grid_bin(q.threshold)
        return lambda b: q.metric.finalize(calibration.expected_partials(b, probs, k))
    return lambda b: metrics.binned_auc(b["n"] * probs, b["n"] * (1.0 - probs))


def binned_series(conn, q: Query, points: np.ndarray, step: int,
                  deadline: float | None = None, finalize=None) -> list[Series]:
    """A raw metric's binned form (payload method=binned) from the score bins of the rollup
    levels: per-bin partials on a dense bucket grid, prefix-summed, each point's window a
    difference of two prefix sums, then the metric's ``binned`` finalizer (or ``finalize``)."""
    finalize = finalize or q.metric.binned
    g = q.window.bucket(step)
    start = q.window.grid_start(int(points[0]), step)
    n_buckets = windows.grid_buckets(int(points[0]), int(points[-1]), step, q.window)
    if n_buckets * N_BINS > MAX_BIN_CELLS:
        raise QueryError(f"window {q.window.text} at a {step}s step needs {n_buckets} buckets of "
                         f"{N_BINS} score bins; choose a longer step")
    by_segset = q.group_by is not None
    df = store.score_bins_by_bucket(conn, q.model, g_s=g, lo_s=start, hi_s=int(points[-1]),
                                    segset_ids=q.segset_ids, by_segset=by_segset)
    prefix_groups = {}
    if q.window.cumulative:
        prefix = store.score_bins_by_bucket(conn, q.model, g_s=_TOTAL_G, lo_s=None, hi_s=start,
                                            segset_ids=q.segset_ids, by_segset=by_segset)
        # one bucket ending at _TOTAL_G: row 1 of a two-row grid from 0
        prefix_groups = _grouped_bins(prefix, q)
    by_group = _grouped_bins(df, q)
    names = sorted(set(by_group) | set(prefix_groups)) if q.group_by else [""]
    pidx = (points - start) // g
    out = []
    for name in names:
        _check_deadline(deadline, f"{q.metric.name} over {len(points)} points")
        part, before = by_group.get(name), prefix_groups.get(name)

        def window(c, part=part, before=before):
            """One partial per point and bin: prefix sums of the dense grid, differenced."""
            csum = np.cumsum(_bin_grid(part, c, start, g, n_buckets + 1), axis=0)
            if q.window.cumulative:
                return csum[pidx] + _bin_grid(before, c, 0, _TOTAL_G, 2)[1]
            return csum[pidx] - csum[pidx - q.window.width(step) // g]

        values = finalize(_OnDemand(window))  # only the partials the finalizer reads
        out.append(Series(name, points, np.asarray(values, dtype=np.float64),
                          {q.group_by: name} if q.group_by else {}))
    return out


class _OnDemand(dict):
    """A mapping that computes a key's value on first access."""

    def __init__(self, compute):
        super().__init__()
        self._compute = compute

    def __missing__(self, key):
        value = self[key] = self._compute(key)
        return value


def _bin_grid(part: pd.DataFrame | None, col: str, start: int, g: int, rows: int) -> np.ndarray:
    """(rows, N_BINS) dense array of one partial per bucket index and bin; bincount sums the
    rows that share a cell (segment sets of one group, level buckets of one g-bucket)."""
    if part is None or part.empty:
        return np.zeros((rows, N_BINS))
    flat = (part["bucket_end"].to_numpy(np.int64) - start) // g * N_BINS + part["bin"].to_numpy(np.int64)
    return np.bincount(flat, weights=part[col].to_numpy(np.float64),
                       minlength=rows * N_BINS).reshape(rows, N_BINS)


def _grouped_bins(df: pd.DataFrame, q: Query) -> dict[str, pd.DataFrame]:
    if not q.group_by:
        return {"": df}
    if df.empty:
        return {}
    return {g: df.iloc[rows] for g, rows in _group_rows(df["segset_id"].to_numpy(), df["n"].to_numpy(), q).items()}


# ----------------------------------------------------------------------- raw metrics


# RAW_CACHE_STALE_S (set by create_app): how long a raw-path value may still be served after
# a write touched its window. Why: a window that receives writes changes revision at every
# batch, and every viewer's refresh then recomputed it from raw rows: with 50 viewers of one
# dashboard and a writer inside its range, the drift ranking (~460 ms of CPU) and the exact
# ROC AUC's recent windows were recomputed five times a second and the two cores saturated
# (benchmarks/load.py --live: p50 11 s). A value is recomputed at most once per this many
# seconds while writes go on, and is exact again as soon as they stop touching its window.
RAW_CACHE_STALE_S = 0.0


class _Cache:
    """LRU of raw-metric values keyed by (query, point), valid for a write revision (or, for
    RAW_CACHE_STALE_S seconds after it was computed, for a later one)."""

    def __init__(self, size: int = 200_000):
        self.size = size
        self._data: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, revision):
        with self._lock:
            hit = self._data.get(key)
            if hit is None or (hit[0] != revision and time.monotonic() - hit[2] >= RAW_CACHE_STALE_S):
                return None
            self._data.move_to_end(key)
            return hit

    def put(self, key, revision, value) -> None:
        with self._lock:
            self._data[key] = (revision, value, time.monotonic())
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


CACHE = _Cache()
_IN_FLIGHT: dict = {}  # a computation's key -> Event set when it ends (_computed_once)
_IN_FLIGHT_LOCK = threading.Lock()
_IN_FLIGHT_WAIT_S = 30.0  # a computation is bounded by its request's budget; this is a backstop


def _computed_once(key, lookup, compute, deadline: float | None = None):
    """``lookup()`` (an answer from the caches, or None), else ``compute()``, which fills them;
    while one request of this process computes ``key``, the others asking for it wait and
    look up again: the answer it put is theirs too when its revision is theirs or within
    RAW_CACHE_STALE_S (else they compute in turn). A waiter with a ``deadline`` waits no
    longer than it: ComputeTimeout then, as if it had computed.

    Why: after a write, the viewers of a dashboard who asked in the same second each computed
    the same raw-path panel (benchmarks/load.py --live: the drift table ~460 ms of CPU each)."""
    while True:
        found = lookup()
        if found is not None:
            return found
        with _IN_FLIGHT_LOCK:
            running = _IN_FLIGHT.get(key)
            if running is None:
                _IN_FLIGHT[key] = threading.Event()
        if running is None:
            break
        left = _IN_FLIGHT_WAIT_S if deadline is None else min(_IN_FLIGHT_WAIT_S, deadline - time.monotonic())
        if not running.wait(max(left, 0.0)) and deadline is not None and time.monotonic() > deadline:
            raise ComputeTimeout("the same panel, computed for another request, ran past this one's time budget")
    try:
        return compute()
    finally:
        with _IN_FLIGHT_LOCK:
            _IN_FLIGHT.pop(key).set()


def _window_revisions(conn, q: Query, points: np.ndarray, step: int) -> np.ndarray:
    """Highest write revision of any minute bucket overlapping each point's window."""
    m = ROLLUP_BUCKET_S
    earliest = q.window.earliest(int(points[0]), step)
    lo = None if earliest is None else earliest // m * m
    hi = -(-int(points[-1]) // m) * m
    df = store.bucket_revisions(conn, q.model, lo_s=lo, hi_s=hi)
    if df.empty:
        return np.zeros(len(points), dtype=np.int64)
    ends = df["bucket_end"].to_numpy(np.int64)
    order = np.argsort(ends)
    ends, revs = ends[order], df["revision"].to_numpy(np.int64)[order]
    hi_idx = np.searchsorted(ends, -(-points // m) * m, side="right")
    if q.window.cumulative:
        running = np.maximum.accumulate(revs)
        return np.where(hi_idx > 0, running[np.maximum(hi_idx - 1, 0)], 0)
    lo_idx = np.searchsorted(ends, (points - q.window.width(step)) // m * m, side="right")
    return np.array([revs[a:b].max() if b > a else 0 for a, b in zip(lo_idx, hi_idx, strict=True)])


def _split_groups(rows: pd.DataFrame, q: Query) -> dict[str, pd.DataFrame]:
    """Raw rows split by group (volume: row count), each group's rows in their order (the split
    is a stable sort)."""
    if not q.group_by:
        return {"": rows}
    if rows.empty:
        return {}
    seg = rows["segset_id"].to_numpy()
    return {g: rows.iloc[i] for g, i in _group_rows(seg, np.ones(len(seg)), q).items()}


# Rows summed over the windows of one batch call (Metric.windows): the deadline is checked
# between calls, each some 100 ms at most on 2 cores.
BATCH_ROWS = 4_000_000


def _batched(q: Query) -> bool:
    """Whether the metric's ``windows`` function evaluates this series, many windows at a time.
    Not cumulative windows: each holds every earlier row, O(points x rows) either way, and the
    one-at-a-time loop checks the deadline every 16 windows."""
    return q.metric.windows is not None and not q.window.cumulative


def _batches(todo: np.ndarray, lo_idx: np.ndarray, hi_idx: np.ndarray):
    """Consecutive runs of the points ``todo`` whose windows hold BATCH_ROWS rows in all (at
    least one window each)."""
    rows_through = np.cumsum(hi_idx[todo] - lo_idx[todo])
    start = 0
    while start < len(todo):
        before = int(rows_through[start - 1]) if start else 0
        stop = max(int(np.searchsorted(rows_through, before + BATCH_ROWS, side="right")), start + 1)
        yield todo[start:stop]
        start = stop


def _windowed(conn, q: Query, points: np.ndarray, step: int, deadline: float | None,
              fetch, evaluate, evaluate_windows=None) -> list[Series]:
    """Evaluate ``evaluate(columns, a, b)`` on each point's slice [a, b) of time-sorted rows, or
    ``evaluate_windows(columns, lo_idx, hi_idx)`` on the slices of ``_batches`` of points.

    ``fetch(lo, hi)`` reads the rows with ts in (lo, hi] (lo None: from the
    start) as a DataFrame with ``ts_s`` (and ``segset_id`` when grouping). Without group_by,
    each point's value is cached with its window's write revision, and only
    the points whose window changed are recomputed (no rows read if none).
    """
    revisions = _window_revisions(conn, q, points, step)
    key_base = (q.model.model_id, q.metric.name, q.window, q.threshold,
                q.segset_ids, q.group_by, q.params, step if q.window.kind == windows.TUMBLING else None)
    if q.group_by is not None:  # not cached: every point computed
        return _windowed_rows(q, points, step, deadline, fetch, evaluate, evaluate_windows,
                              np.arange(len(points)), np.full(len(points), np.nan), key_base, revisions)
    state = {}

    def lookup():
        vals = np.full(len(points), np.nan)
        still = []
        for i in range(len(points)):
            hit = CACHE.get((*key_base, int(points[i])), int(revisions[i]))
            if hit is None:
                still.append(i)
            else:
                vals[i] = hit[1]
        if not still:
            return [Series("", points, vals)]
        state.update(todo=np.asarray(still, dtype=np.int64), vals=vals)
        return None

    return _computed_once(("windows", key_base, step, points[0], points[-1], len(points)), lookup,
                          lambda: _windowed_rows(q, points, step, deadline, fetch, evaluate, evaluate_windows,
                                                 state["todo"], state["vals"], key_base, revisions),
                          deadline)


def _windowed_rows(q: Query, points: np.ndarray, step: int, deadline: float | None, fetch, evaluate,
                   evaluate_windows, todo: np.ndarray, vals: np.ndarray, key_base: tuple,
                   revisions: np.ndarray) -> list[Series]:
    """``_windowed``'s computation of the points ``todo`` from raw rows (``vals``: the others'
    values, from the cache); without group_by each value is cached."""
    need = points[todo]
    rows = fetch(q.window.earliest(int(need[0]), step), int(need[-1]))
    out = []
    for name, part in _split_groups(rows, q).items():
        values = vals.copy()
        cols = {c: part[c].to_numpy() for c in part.columns if c != "group"}
        lo_idx, hi_idx = q.window.slices(cols["ts_s"], points, step)
        if evaluate_windows is not None:
            for chunk in _batches(todo, lo_idx, hi_idx):
                _check_deadline(deadline, f"{q.metric.name} over {len(todo)} windows")
                # the chunk's rows only: a batch function's whole-array passes (running counts,
                # sort keys) cost each chunk the panel's rows, not its own, otherwise
                a, b = int(lo_idx[chunk].min()), int(hi_idx[chunk].max())
                values[chunk] = evaluate_windows({c: v[a:b] for c, v in cols.items()},
                                                 lo_idx[chunk] - a, hi_idx[chunk] - a)
                if q.group_by is None:
                    for i in chunk:
                        CACHE.put((*key_base, int(points[i])), int(revisions[i]), values[i])
        else:
            for n, i in enumerate(todo):
                if deadline is not None and n % 16 == 0 and time.monotonic() > deadline:
                    raise ComputeTimeout(f"{q.metric.name} over {len(todo)} windows ran past the time budget")
                value = evaluate(cols, lo_idx[i], hi_idx[i])
                values[i] = np.nan if value is None else float(value)
                if q.group_by is None:
                    CACHE.put((*key_base, int(points[i])), int(revisions[i]), values[i])
        out.append(Series(name, points, values, {q.group_by: name} if q.group_by else {}))
    return out


def raw_series(conn, q: Query, points: np.ndarray, step: int,
               deadline: float | None = None) -> list[Series]:
    """Label metrics on each window's joined rows (labeled rows only, unless the metric says),
    by the metric's ``windows`` function where ``_batched``, else one window at a time."""
    params = q.param_dict
    batched = _batched(q)
    columns = ("score", "label") if batched else ("score", "label", "delay_s")
    if q.group_by:
        columns += ("segset_id",)

    def fetch(lo, hi):
        return store.joined_rows(conn, q.model, lo_s=lo, hi_s=hi, segset_ids=q.segset_ids,
                                 columns=columns, labeled_only=q.metric.labeled_only)

    def evaluate(cols, a, b):
        y, s, d = cols["label"][a:b], cols["score"][a:b], cols["delay_s"][a:b]
        if q.metric.labeled_only:
            keep = ~np.isnan(y)
            y, s, d = y[keep], s[keep], d[keep]
        pred = (s >= q.threshold).astype(np.float64) if q.model.is_classifier else s
        return q.metric.raw(WindowRows(y, s, pred, d, params))

    def evaluate_windows(cols, lo_idx, hi_idx):
        return q.metric.windows(cols["label"], cols["score"], lo_idx, hi_idx)

    return _windowed(conn, q, points, step, deadline, fetch, evaluate,
                     evaluate_windows if batched else None)


def _fetch_column(conn, q: Query, col: Column, lo, hi) -> pd.DataFrame:
    """Rows of a column with ts in (lo, hi]: ``value`` (numeric) or ``cat`` (segment value)."""
    rows = store.column_rows(conn, q.model, feature=col.name if col.kind == "feature" else None,
                             lo_s=lo, hi_s=hi, segset_ids=q.segset_ids)
    if col.kind == "segment":
        values = {sid: seg.get(col.name) for sid, seg in q.segsets.items()}
        rows = rows.drop(columns="value").assign(cat=rows["segset_id"].map(values))
    return rows


def column_values(conn, q: Query, col: Column, lo, hi):
    """All present values of a column in (lo, hi]: floats, or a list of segment values."""
    rows = _fetch_column(conn, q, col, lo, hi)
    if col.numeric:
        v = rows["value"].to_numpy()
        return v[~np.isnan(v)]
    return [c for c in rows["cat"].tolist() if isinstance(c, str)]


def column_series(conn, q: Query, points: np.ndarray, step: int,
                  deadline: float | None = None) -> list[Series]:
    """A distribution summary or a drift statistic of ``q.column`` on each window."""
    col, metric, params = q.column, q.metric, q.param_dict

    def fetch(lo, hi):
        return _fetch_column(conn, q, col, lo, hi)

    def evaluate(cols, a, b):
        if not col.numeric:
            cats = [c for c in cols["cat"][a:b] if isinstance(c, str)]
            return metric.categorical(cats, q.reference)
        v = cols["value"][a:b]
        present = v[~np.isnan(v)]
        if metric.kind == "column":
            return metric.numeric(present, b - a, params)
        return metric.numeric(present, q.reference)

    return _windowed(conn, q, points, step, deadline, fetch, evaluate)


def histogram_edges(conn, q: Query, from_s: float, to_s: float) -> np.ndarray:
    values = column_values(conn, q, q.column, from_s, to_s)
    return distributions.histogram_edges(values, q.param_dict.get("bins"))


def histogram_series(conn, q: Query, points: np.ndarray, step: int, from_s: float,
                     to_s: float, deadline: float | None = None) -> list[Series]:
    """Counts per bin on each window, one series per bin named by its upper edge (Grafana heatmap).

    The bins come from the values of the requested range, so they follow the data.
    """
    edges = histogram_edges(conn, q, from_s, to_s)
    if len(points) == 0:
        return []
    rows = _fetch_column(conn, q, q.column, q.window.earliest(int(points[0]), step),
                         int(points[-1]))
    v = rows["value"].to_numpy()
    lo_idx, hi_idx = q.window.slices(rows["ts_s"].to_numpy(), points, step)
    counts = np.empty((len(points), len(edges) - 1), dtype=np.float64)
    for i, (a, b) in enumerate(zip(lo_idx, hi_idx, strict=True)):
        if i % 64 == 0:
            _check_deadline(deadline, f"histogram over {len(points)} windows")
        counts[i] = distributions.histogram_counts(v[a:b][~np.isnan(v[a:b])], edges)
    return [Series(_edge_label(edges[k + 1]), points, counts[:, k]) for k in range(len(edges) - 1)]


def _edge_label(x: float) -> str:
    return f"{x:.6g}"


def histogram_table(conn, q: Query, from_s: float, to_s: float) -> tuple[list, list]:
    return cached_table(conn, q, from_s, to_s, None, lambda: _histogram_table(conn, q, from_s, to_s))


def _histogram_table(conn, q: Query, from_s: float, to_s: float) -> tuple[list, list]:
    values = column_values(conn, q, q.column, from_s, to_s)
    edges = distributions.histogram_edges(values, q.param_dict.get("bins"))
    counts = distributions.histogram_counts(values, edges)
    columns = [{"text": "bin", "type": "string"}, {"text": "lower", "type": "number"},
               {"text": "upper", "type": "number"}, {"text": "count", "type": "number"}]
    rows = [[f"{edges[k]:.6g}–{edges[k + 1]:.6g}", float(edges[k]), float(edges[k + 1]), int(c)]
            for k, c in enumerate(counts)]
    return columns, rows


TABLE_CACHE = _Cache(size=512)


def _digest(values) -> bytes:
    """A reference sample's content, for a cache key (numbers or strings)."""
    return hashlib.blake2b(pd.util.hash_array(np.asarray(values, dtype=object if isinstance(
        values, list) else None)).tobytes(), digest_size=16).digest()


def cached_table(conn, q: Query, from_s: float, to_s: float, extra, compute) -> tuple[list, list]:
    """``compute()``'s table over the range (from, to], cached with the range's write revision.

    Why: a drift ranking reads every raw row of its range (460 ms over 7 days at 1M
    predictions) and every viewer of a dashboard asks for the same range; computed once until
    a write touches the range. A now-relative range moves at every refresh and is recomputed.
    """
    revision = store.range_revision(conn, q.model, lo_s=from_s, hi_s=to_s)
    key = (q.model.model_id, q.metric.name, q.column, q.threshold, q.segset_ids, q.params,
           float(from_s), float(to_s), extra)
    def lookup():
        hit = TABLE_CACHE.get(key, revision)
        return None if hit is None else copy.deepcopy(hit[1])

    def fill():
        value = compute()
        TABLE_CACHE.put(key, revision, copy.deepcopy(value))
        return value

    return _computed_once(("table", key), lookup, fill)


def drift_table(conn, q: Query, from_s: float, to_s: float, columns_refs: list) -> tuple[list, list]:
    """Every column with a reference, ranked by PSI of the range (from, to] against it
    (cached per range and reference content, see ``cached_table``)."""
    extra = tuple((col, _digest(ref)) for col, ref in columns_refs)
    return cached_table(conn, q, from_s, to_s, extra,
                        lambda: _drift_table(conn, q, from_s, to_s, columns_refs))


def _drift_table(conn, q: Query, from_s: float, to_s: float, columns_refs: list) -> tuple[list, list]:
    out = []
    for col, ref in columns_refs:
        cur = column_values(conn, q, col, from_s, to_s)
        stats = {m.name: (m.numeric if col.numeric else m.categorical)(cur, ref)
                 for m in DRIFT_METRICS if (m.numeric if col.numeric else m.categorical)}
        out.append((col, len(cur), stats))
    out.sort(key=lambda r: (-np.nan_to_num(r[2]["psi"], nan=-1.0), r[0].name))
    names = [m.name for m in DRIFT_METRICS]
    columns = [{"text": "column", "type": "string"}, {"text": "kind", "type": "string"},
               {"text": "values", "type": "number"}] + [{"text": n, "type": "number"} for n in names]
    rows = []
    for col, n, stats in out:
        cells = [stats.get(k) for k in names]
        rows.append([col.name, col.kind, n] + [None if c is None or np.isnan(c) else float(c) for c in cells])
    return columns, rows


def series(conn, q: Query, points: np.ndarray, step: int,
           deadline: float | None = None, memo: RequestMemo | None = None,
           end_at_data: bool = False) -> list[Series]:
    """One series (or one per group) of the metric at each point.

    ``deadline`` (a ``time.monotonic()`` value) bounds the Python side of raw
    metrics, as the statement timeout bounds the SQL side. ``end_at_data``: a cumulative
    line stops one step after the model's latest prediction instead of running flat into
    the future (what a panel draws; an exporter's "now" keeps its value).
    """
    out = _series(conn, q, points, step, deadline, memo)
    if end_at_data and q.window.cumulative and len(points):
        latest = store.latest_prediction_ts(conn, q.model)
        if latest is not None:
            past = points - step >= latest.timestamp()
            if past.any():
                for s in out:
                    s.values = np.where(past, np.nan, s.values)
    return out


def _series(conn, q: Query, points: np.ndarray, step: int,
            deadline: float | None, memo: RequestMemo | None) -> list[Series]:
    if len(points) == 0:
        return [] if q.group_by else [Series("", points, np.empty(0))]
    binned_ok = q.window.bucket(step) % BIN_BASE_S == 0
    if q.param_dict.get("calibration") == "isotonic":
        if not binned_ok:
            raise QueryError(f"calibration=isotonic reads the score bins: window {q.window.text} "
                             f"and the {step}s step must be multiples of 5 minutes")
        return binned_series(conn, q, points, step, deadline, calibrated_finalizer(q))
    if "as_of" in q.param_dict:  # labels as known at a time: from raw rows and feedback times
        from datasource import asof

        return asof.series(conn, q, points, step, deadline)
    if q.metric.kind == "partial":
        return partial_series(conn, q, points, step, memo, deadline)
    if q.metric.kind in ("column", "drift"):
        return column_series(conn, q, points, step, deadline)
    if q.param_dict.get("method") == "binned" and binned_ok:
        # (a bucket finer than the score bins' 5 minutes falls back to the exact method)
        return binned_series(conn, q, points, step, deadline)
    return raw_series(conn, q, points, step, deadline)


# ----------------------------------------------------------------------- tables


def _range_rows(conn, q: Query, from_s: float, to_s: float) -> pd.DataFrame:
    return store.joined_rows(conn, q.model, lo_s=from_s, hi_s=to_s, segset_ids=q.segset_ids,
                             columns=("score", "label"), labeled_only=True)


def confusion_table(conn, q: Query, from_s: float, to_s: float) -> tuple[list, list]:
    """Actual x predicted counts for labeled predictions with ts in (from, to]."""
    aligned = from_s % ROLLUP_BUCKET_S == 0 and to_s % ROLLUP_BUCKET_S == 0 and \
        _use_rollup(q, int(from_s)) and _use_rollup(q, int(to_s))
    ungrouped = Query(q.model, q.metric, q.window, q.threshold, q.segset_ids, None,
                      q.segsets, q.params)
    needed = RequestMemo(("fp", "n_lab", "sum_label", "tp"))
    df = _partials(conn, ungrouped, g=_TOTAL_G, lo=int(from_s) if aligned else from_s,
                   hi=int(to_s) if aligned else to_s,
                   from_rollup=aligned, memo=needed)
    cols = list(_columns(q, needed))
    tot = df[cols].sum() if not df.empty else pd.Series(0.0, index=cols)
    tp, fp = int(tot["tp"]), int(tot["fp"])
    pos, n = int(tot["sum_label"]), int(tot["n_lab"])
    fn, tn = pos - tp, n - pos - fp
    columns = [{"text": "actual", "type": "string"}, {"text": "predicted 0", "type": "number"},
               {"text": "predicted 1", "type": "number"}, {"text": "total", "type": "number"}]
    rows = [["0", tn, fp, tn + fp], ["1", fn, tp, fn + tp], ["total", tn + fn, fp + tp, n]]
    return columns, rows


def calibration_table(conn, q: Query, from_s: float, to_s: float) -> tuple[list, list]:
    from datasource.metrics import calibration_bins

    rows = _range_rows(conn, q, from_s, to_s)
    lower, upper, count, mean_score, rate = calibration_bins(
        rows["label"].to_numpy(), rows["score"].to_numpy())
    columns = [{"text": "bin", "type": "string"}, {"text": "lower", "type": "number"},
               {"text": "upper", "type": "number"}, {"text": "mean score", "type": "number"},
               {"text": "observed rate", "type": "number"}, {"text": "count", "type": "number"}]
    out = []
    for lo, up, c, ms, r in zip(lower, upper, count, mean_score, rate, strict=True):
        out.append([f"{lo:.1f}–{up:.1f}", float(lo), float(up), None if np.isnan(ms) else float(ms),
                    None if np.isnan(r) else float(r), int(c)])
    return columns, out


def table(conn, q: Query, from_s: float, to_s: float) -> tuple[list, list]:
    if q.metric.name == "confusion_matrix":
        return confusion_table(conn, q, from_s, to_s)
    if q.metric.name == "calibration":
        return calibration_table(conn, q, from_s, to_s)
    if q.metric.name == "label_settling":
        from datasource import asof

        return asof.settling_table(conn, q, from_s, to_s)
    raise QueryError(f"{q.metric.name} is not a table metric")
