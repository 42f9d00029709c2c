"""Query latency through HTTP, side by side with the essay's join-and-score approach.

    .venv/bin/python benchmarks/query.py                      # 1M predictions, 30 days
    .venv/bin/python benchmarks/query.py --predictions 100000 --reps 10
    .venv/bin/python benchmarks/query.py --predictions 100000000 --fill sql --skip-baseline

The database ``mlsli_bench_query`` (on DATABASE_URL's server, else the embedded
PostgreSQL under ``.data/bench-pg``) is filled once with the bulk client: 30
days of predictions, ~80 % labeled with delays up to 2 days, segmented by
borough x vendor. A later run with the same ``--predictions``, ``--seed`` and
``--fill`` reuses it. ``--fill sql`` generates the same distribution inside
PostgreSQL (``fill_sql.py``; here 10M predictions in ~95 s instead of ~28 min with the
bulk client, 100M in 13-21 min, and no arrays of all rows in this process).

Every case is a ``POST /query`` with the JSON Grafana (simpod-json-datasource,
builder mode) sends, to a real ``gunicorn -w 2 --threads 4`` on 127.0.0.1,
timed from the request to the last byte of the response on one keep-alive
connection. The baseline is the essay's Postgres approach, run in this process
against the same database: fetch the joined (score, label) rows with psycopg2,
then score them with scikit-learn, once for a single value and once per point
for a panel. Every baseline also checks our numbers: the max |difference|
between the served datapoints and scikit-learn's is printed per case. With
``--skip-baseline`` (10M, 100M: the join would not fit in memory) an oracle checks
them within bounded memory: each panel at ``--oracle-points`` points, scikit-learn on
that window's rows read back alone; cumulative values against counts made in SQL.

Cases: (a) cumulative accuracy, a 30-day panel and a stat panel (its last
value is the current one); (b) a 7-day panel of 1h-sliding accuracy at a
5-minute step; (c) the same for roc_auc, cold (first request after a server
start) and warm (cached); (d) an 8-metric dashboard refresh; (e) (a) and (b)
at threshold 0.3, with an ad hoc filter and with a group-by.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import shlex
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import common
import fill_sql
import numpy as np
import psycopg2
import requests
from tqdm import tqdm

from datasource import db, store

DB_NAME = "mlsli_bench_query"
DATA_VERSION = 1  # bump when synthesize() changes
NOW_MS = common.END_S * 1000 + 7_123  # Grafana's "now": just after the last prediction
HOUR_S = 3600
DS = {"type": "simpod-json-datasource", "uid": "mlsli"}
PANEL_MAX_POINTS = 1000  # a ~1000 px wide time-series panel
STAT_MAX_POINTS = 300  # a stat panel
PANEL_7D_MAX_POINTS = 2100  # the 5-minute panel: "Max data points" query option (see README)
DASHBOARD_METRICS = ("accuracy", "precision", "recall", "f1", "label_coverage",
                     "prediction_count", "positive_rate", "base_rate")


# --------------------------------------------------------------------------- the data


def _tag(n: int, seed: int, zones: int = 1, fill: str = "bulk") -> str:
    """What the model's description says of its data (a later run reuses it when equal)."""
    return f"benchmark data v{DATA_VERSION}: seed={seed} predictions={n}" + (
        f" zones={zones}" if zones > 1 else "") + (f" fill={fill}" if fill != "bulk" else "")


def _has_data(url: str, n: int, seed: int, n_feedback: int | None, zones: int = 1,
              fill: str = "bulk") -> bool:
    """Whether the database holds this data (``n_feedback`` None: any number of labels)."""
    conn = db.connect(url, statement_timeout_ms=0)  # counting 100M rows takes a while
    try:
        model = store.get_model(conn, common.MODEL)
        if model is None or model.description != _tag(n, seed, zones, fill):
            return False
        counts = store.table_counts(conn, model)
        return counts["predictions"] == n and n_feedback in (None, counts["feedback"])
    except psycopg2.Error:
        return False
    finally:
        conn.close()


def ensure_sql_data(server: str, n: int, seed: int, refill: bool, zones: int = 1,
                    db_name: str = DB_NAME) -> tuple[str, float]:
    """The URL of database ``db_name`` filled by ``fill_sql`` (unless it already holds that
    data), and the fill's seconds (NaN: reused). Prints the phases, table sizes and the peak
    RSS of this process."""
    url = common.with_dbname(server, db_name)
    tag = _tag(n, seed, zones, "sql")
    if not refill and common.database_exists(server, db_name) and _has_data(
            url, n, seed, None, zones, "sql"):
        print(f"reusing database {db_name} ({tag})", flush=True)
        return url, float("nan")
    url = common.fresh_database(server, db_name)
    phases, took, others = _measured(lambda: fill_sql.fill(url, n, seed, tag, zones))
    conn = db.connect(url)
    try:
        sizes = fill_sql.table_sizes(conn)
    finally:
        conn.close()
    print(f"filled {db_name} in PostgreSQL in {took:.0f} s ("
          + ", ".join(f"{k} {v:.0f} s" for k, v in phases.items())
          + f"); peak RSS of this process {fill_sql.peak_rss_mb():,.0f} MB; others' cores "
          f"{common.fmt_cores(others)}", flush=True)
    print("  sizes: " + ", ".join(f"{t} {b / 2**20:,.1f} MB" for t, b in sizes.items())
          + f", total {sum(sizes.values()) / 2**30:,.1f} GB", flush=True)
    return url, took


def ensure_data(server: str, data: common.Synthetic, seed: int, refill: bool, zones: int = 1) -> str:
    """The benchmark database's URL, filled with ``data`` unless it already holds it."""
    url = common.with_dbname(server, DB_NAME)
    tag = _tag(len(data), seed, zones)
    if not refill and common.database_exists(server, DB_NAME) and _has_data(
            url, len(data), seed, len(data.fb_index), zones):
        print(f"reusing database {DB_NAME} ({tag})", flush=True)
        return url
    url = common.fresh_database(server, DB_NAME)
    _, took, others = _measured(lambda: common.bulk_fill(url, data, tag))
    print(f"filled {DB_NAME} with the bulk client, then VACUUM ANALYZE and CHECKPOINT, in "
          f"{took:.0f} s (others' cores {common.fmt_cores(others)})", flush=True)
    return url


def _measured(fill: Callable[[], object]) -> tuple[object, float, float]:
    """What ``fill()`` returns, its seconds and the cores other processes used meanwhile (a
    fill's time on a shared machine says little without them)."""
    load = common.OtherLoad().start()
    t0, mark = time.perf_counter(), load.now()
    try:
        result = fill()
        return result, time.perf_counter() - t0, load.cores(mark, load.now())
    finally:
        load.stop()


# --------------------------------------------------------------------------- Grafana requests


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


# Grafana's rangeutil.roundInterval: (upper bound exclusive, interval) in ms.
_ROUND = ((15, 10), (35, 20), (75, 50), (150, 100), (350, 200), (750, 500), (1500, 1000),
          (3500, 2000), (7500, 5000), (12500, 10000), (17500, 15000), (25000, 20000),
          (45000, 30000), (90000, 60000), (150000, 120000), (450000, 300000),
          (750000, 600000), (1050000, 900000), (1500000, 1200000), (2700000, 1800000),
          (5400000, 3600000), (9000000, 7200000), (16200000, 10800000),
          (32400000, 21600000), (86400000, 43200000), (604800000, 86400000),
          (1814400000, 604800000), (3628800000, 2592000000))


def grafana_interval_ms(range_ms: int, max_points: int) -> int:
    """The intervalMs Grafana computes for a panel: range / maxDataPoints, rounded."""
    raw = range_ms / max_points
    return next((iv for bound, iv in _ROUND if raw < bound), 31536000000)


def _interval_text(ms: int) -> str:
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def grafana_body(targets: list[dict], *, days: int, max_points: int,
                 filters: list[dict] | None = None) -> dict:
    """A /query body as Grafana sends it for a panel over the last ``days`` days."""
    from_ms = NOW_MS - days * common.DAY_S * 1000
    interval = grafana_interval_ms(NOW_MS - from_ms, max_points)
    text = _interval_text(interval)
    return {
        "app": "dashboard", "requestId": "SQR100", "timezone": "browser", "panelId": 2,
        "dashboardUID": "mlsli-bench", "panelName": "bench",
        "range": {"from": _iso(from_ms), "to": _iso(NOW_MS),
                  "raw": {"from": f"now-{days}d", "to": "now"}},
        "rangeRaw": {"from": f"now-{days}d", "to": "now"},
        "interval": text, "intervalMs": interval, "maxDataPoints": max_points,
        "targets": targets,
        "scopedVars": {"__interval": {"text": text, "value": text},
                       "__interval_ms": {"text": str(interval), "value": interval}},
        "startTime": NOW_MS, "filters": filters or [],
    }


def target(metric: str, ref: str = "A", **payload: str) -> dict:
    """A builder-mode target: Grafana sends every payload value as a string."""
    return {"refId": ref, "datasource": DS, "editorMode": "builder", "target": metric,
            "payload": {"model": common.MODEL, "window": "1h", "mode": "sliding", **payload}}


# --------------------------------------------------------------------------- the baseline


@dataclass
class Baseline:
    """One baseline run: seconds, values per series name, and how the time was obtained."""

    seconds: float
    values: dict[str, np.ndarray]
    note: str = ""


class Essay:
    """The essay's approach: join predictions with feedback in SQL, score with scikit-learn."""

    SQL = "SELECT {cols} FROM predictions p {labels} {seg} WHERE p.model_id = %(m)s {where}"
    JOIN = "{kind} JOIN essay_feedback f ON f.model_id = p.model_id AND f.output_id = p.output_id"
    ROW_LABELS = "CROSS JOIN LATERAL (SELECT p.label) f"  # the label the writers store on the row
    # The essay's second table: every label by (model, output_id). The store keeps a label on
    # its prediction's row (feedback holds only labels that wait for theirs, migration 015), so
    # the baseline gets its own copy, made before timing, indexed as feedback is.
    FEEDBACK = """
        DROP TABLE IF EXISTS essay_feedback;
        CREATE TABLE essay_feedback AS
          SELECT model_id, output_id, label_ts AS ts, label FROM predictions WHERE label IS NOT NULL
          UNION ALL SELECT model_id, output_id, ts, label FROM feedback;
        CREATE INDEX ON essay_feedback (model_id, output_id);
        ANALYZE essay_feedback"""

    def __init__(self, url: str, budget_s: float):
        self.conn = db.connect(url, statement_timeout_ms=0)
        self.conn.autocommit = True
        self.model = store.get_model(self.conn, common.MODEL)
        self.budget_s = budget_s
        with self.conn.cursor() as cur:
            cur.execute(self.FEEDBACK)

    def close(self) -> None:
        self.conn.close()

    def _sql(self, cols: str, *, lo_s: float | None, left: bool, seg_key: str | None,
             group_key: str | None, row_labels: bool) -> str:
        """The rows with ts in (lo, hi]: cols (then the group), labels joined from feedback (or,
        ``row_labels``, from the prediction rows), only labeled ones unless ``left``."""
        where = "AND p.ts <= to_timestamp(%(hi)s)"
        if lo_s is not None:
            where += " AND p.ts > to_timestamp(%(lo)s)"
        if row_labels:
            labels = self.ROW_LABELS
            where += "" if left else " AND f.label IS NOT NULL"
        else:
            labels = self.JOIN.format(kind="LEFT" if left else "")
        seg = ""
        if seg_key or group_key:
            seg = "JOIN segment_sets s ON s.model_id = p.model_id AND s.segset_id = p.segset_id"
        if seg_key:
            where += " AND s.segments ->> %(sk)s = %(sv)s"
        if group_key:
            cols += ", s.segments ->> %(gk)s"
        return self.SQL.format(cols=cols, labels=labels, seg=seg, where=where)

    def fetch(self, *, lo_s: float | None, hi_s: float, left: bool = False,
              seg_key: str | None = None, seg_value: str | None = None,
              group_key: str | None = None, ordered: bool = True,
              row_labels: bool = False) -> dict[str, np.ndarray]:
        """Joined rows with ts in (lo, hi] (ordered by ts for panels): ts, score, label[, group]."""
        sql = self._sql("extract(epoch FROM p.ts)::float8, p.score, f.label", lo_s=lo_s, left=left,
                        seg_key=seg_key, group_key=group_key, row_labels=row_labels)
        if ordered:
            sql += " ORDER BY p.ts"
        with self.conn.cursor() as cur:
            cur.execute(sql, {"m": self.model.model_id, "lo": lo_s, "hi": hi_s,
                              "sk": seg_key, "sv": seg_value, "gk": group_key})
            rows = cur.fetchall()
        if group_key:
            nums = np.array([r[:3] for r in rows], dtype=np.float64).reshape(-1, 3)
        else:  # one pass in C; None (no feedback) becomes NaN
            nums = np.array(rows, dtype=np.float64).reshape(-1, 3)
        out = {"ts": nums[:, 0].copy(), "score": nums[:, 1].copy(), "label": nums[:, 2].copy()}
        if group_key:
            out["group"] = np.array([r[3] for r in rows], dtype=object)
        return out

    def accuracy_counts(self, *, hi_s: float, thr: float, seg_key: str | None = None,
                        seg_value: str | None = None,
                        group_key: str | None = None) -> dict[str | None, tuple[int, int]]:
        """(correct at ``thr``, labeled) of the predictions with ts <= hi, per group value (None:
        not grouped), counted in PostgreSQL from the labels on the prediction rows."""
        sql = self._sql("count(*) FILTER (WHERE (p.score >= %(thr)s) = (f.label = 1)), count(*)",
                        lo_s=None, left=False, seg_key=seg_key, group_key=group_key, row_labels=True)
        with self.conn.cursor() as cur:
            cur.execute(sql + (" GROUP BY 3" if group_key else ""),
                        {"m": self.model.model_id, "hi": hi_s, "thr": thr, "sk": seg_key,
                         "sv": seg_value, "gk": group_key})
            return {(r[2] if group_key else None): (r[0], r[1]) for r in cur.fetchall()}

    def per_point(self, points_s: np.ndarray, rows: dict, span_s: int | None,
                  fns: dict[str, Callable], spent_s: float) -> tuple[dict, int]:
        """Each fn(window rows) at each point, until the time budget runs out.

        Returns the values (NaN where not computed) and how many points were done.

        Windows are found by binary search on the sorted timestamps (kinder to
        the baseline than masking all rows per point).
        """
        ts = rows["ts"]
        hi = np.searchsorted(ts, points_s, side="right")
        lo = np.zeros_like(hi) if span_s is None else np.searchsorted(ts, points_s - span_s,
                                                                      side="right")
        n = len(points_s)
        order = _spread(n)
        vals = {k: np.full(n, np.nan) for k in fns}
        t0 = time.perf_counter()
        done = 0
        for i in order:
            window = {k: v[lo[i]:hi[i]] for k, v in rows.items()}
            for name, fn in fns.items():
                vals[name][i] = fn(window)
            done += 1
            if time.perf_counter() - t0 + spent_s > self.budget_s:
                break
        return vals, done


def _spread(n: int) -> list[int]:
    """0..n-1 in an order whose every prefix is spread over the whole range."""
    seen, out = set(), []
    step = 1 << max(0, math.ceil(math.log2(max(n, 1))))
    while step >= 1:
        for i in range(0, n, step):
            if i not in seen:
                seen.add(i)
                out.append(i)
        step //= 2
    return out


def _labeled(w: dict) -> tuple[np.ndarray, np.ndarray]:
    keep = ~np.isnan(w["label"])
    return w["label"][keep], w["score"][keep]


def sk_accuracy(thr: float) -> Callable:
    from sklearn.metrics import accuracy_score

    def fn(w):
        y, s = _labeled(w)
        return accuracy_score(y, (s >= thr).astype(np.float64)) if len(y) else np.nan
    return fn


def np_median_score(w: dict) -> float:
    """The median of every prediction's score in the window (labeled or not)."""
    return float(np.median(w["score"])) if len(w["score"]) else np.nan


def sk_roc_auc(w: dict) -> float:
    from sklearn.metrics import roc_auc_score

    y, s = _labeled(w)
    if len(np.unique(y)) < 2:
        return np.nan
    return roc_auc_score(y, s)


def sk_dashboard(thr: float) -> dict[str, Callable]:
    from sklearn.metrics import f1_score, precision_score, recall_score

    def clf(metric):
        def fn(w):
            y, s = _labeled(w)
            if not len(y):
                return np.nan
            return metric(y, (s >= thr).astype(np.float64), zero_division=np.nan)
        return fn

    def count(w):
        return float(len(w["score"])) if len(w["score"]) else np.nan

    def ratio(num, den):
        return num / den if den else np.nan

    return {
        "accuracy": sk_accuracy(thr),
        "precision": clf(precision_score),
        "recall": clf(recall_score),
        "f1": clf(f1_score),
        "label_coverage": lambda w: ratio(np.count_nonzero(~np.isnan(w["label"])), len(w["label"])),
        "prediction_count": count,
        "positive_rate": lambda w: ratio(np.count_nonzero(w["score"] >= thr), len(w["score"])),
        "base_rate": lambda w: ratio(np.nansum(w["label"]), np.count_nonzero(~np.isnan(w["label"]))),
    }


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    key: str
    title: str
    body: dict
    baseline: SingleValue | Panel | None = None
    baseline_key: str | None = None  # reuse another case's baseline run
    cold: bool = False
    points: int | None = None  # datapoints expected per series
    result: dict = field(default_factory=dict)


def _points(days: int, step_s: int) -> np.ndarray:
    from_s, to_s = NOW_MS / 1000 - days * common.DAY_S, NOW_MS / 1000
    return np.arange(math.ceil(from_s / step_s) * step_s, math.floor(to_s / step_s) * step_s + 1,
                     step_s, dtype=np.int64)


def _groups(rows: dict[str, np.ndarray], group_name: str) -> dict[str, dict[str, np.ndarray]]:
    """The rows per group (``group_name=value``), or all of them as group ""."""
    if "group" not in rows:
        return {"": rows}
    return {f"{group_name}={g}": {k: v[rows["group"] == g] for k, v in rows.items() if k != "group"}
            for g in sorted(set(rows["group"].tolist()))}


@dataclass
class SingleValue:
    """The essay's cumulative accuracy: one join, one accuracy_score (per group if grouped)."""

    fetch_kw: dict
    thr: float
    name: str = ""

    def __call__(self, e: Essay) -> Baseline:
        t0 = time.perf_counter()
        rows = e.fetch(lo_s=None, hi_s=NOW_MS / 1000, ordered=False, **self.fetch_kw)
        fn = sk_accuracy(self.thr)
        values = {(group or self.name): np.array([fn(part)])
                  for group, part in _groups(rows, self.name).items()}
        return Baseline(time.perf_counter() - t0, values, "one value")

    def oracle(self, e: Essay, points: int) -> dict[str, np.ndarray]:
        """The same values with no row in Python: correct and labeled predictions counted in
        PostgreSQL (``points`` unused: one value)."""
        counts = e.accuracy_counts(hi_s=NOW_MS / 1000, thr=self.thr, **self.fetch_kw)
        return {(self.name if group is None else f"{self.name}={group}"): np.array([correct / labeled])
                for group, (correct, labeled) in counts.items() if labeled}


@dataclass
class Panel:
    """The essay's approach for a panel: one join, then scikit-learn at every point."""

    fetch_kw: dict
    fns: dict[str, Callable]
    points: np.ndarray
    span_s: int | None
    group_name: str = ""

    def __call__(self, e: Essay) -> Baseline:
        points, span_s = self.points, self.span_s
        t0 = time.perf_counter()
        lo = None if span_s is None else float(points[0] - span_s)
        rows = e.fetch(lo_s=lo, hi_s=float(points[-1]), **self.fetch_kw)
        fetched = time.perf_counter() - t0
        values = {}
        parts = _groups(rows, self.group_name)
        compute, done_min = 0.0, len(points)
        for pname, part in parts.items():
            t1 = time.perf_counter()
            vals, done = e.per_point(points, part, span_s, self.fns, fetched + compute)
            compute += (time.perf_counter() - t1) * len(points) / done  # extrapolated if cut
            done_min = min(done_min, done)
            for fname, v in vals.items():
                values[(fname, pname)] = v
        note = f"{len(points)} points x {len(self.fns) * len(parts)} series"
        if done_min < len(points):
            note += f", extrapolated from {done_min}"
        return Baseline(fetched + compute, values, note)

    def oracle(self, e: Essay, points: int) -> dict[tuple[str, str], np.ndarray]:
        """The same values at ``points`` points spread over the panel (NaN at the others), each
        window's rows read back alone, with the labels on the prediction rows: memory bounded
        by one window, whatever the table holds."""
        values = {}
        for i in _spread(len(self.points))[:points]:
            hi = float(self.points[i])
            lo = None if self.span_s is None else hi - self.span_s
            rows = e.fetch(lo_s=lo, hi_s=hi, ordered=False, row_labels=True, **self.fetch_kw)
            for pname, part in _groups(rows, self.group_name).items():
                for fname, fn in self.fns.items():
                    values.setdefault((fname, pname), np.full(len(self.points), np.nan))[i] = fn(part)
        return values


def build_cases(args) -> list[Case]:
    acc5, acc3 = sk_accuracy(0.5), sk_accuracy(0.3)
    p30 = _points(30, 3600)  # the server widens Grafana's 30 m step to 1 h for 1000 points
    p7 = _points(7, 300)
    panel = {"days": 30, "max_points": PANEL_MAX_POINTS}
    stat = {"days": 30, "max_points": STAT_MAX_POINTS}
    week = {"days": 7, "max_points": PANEL_7D_MAX_POINTS}
    cum = {"window": "cumulative"}
    manhattan = [{"key": "borough", "operator": "=", "value": "Manhattan"}]
    cases = [
        Case("a", "(a) cumulative accuracy, 30-day panel",
             grafana_body([target("accuracy", **cum)], **panel),
             SingleValue({}, 0.5, "accuracy"), points=len(p30)),
        Case("a_stat", "(a) cumulative accuracy, stat panel (current value)",
             grafana_body([target("accuracy", **cum)], **stat), baseline_key="a"),
        Case("b", "(b) 1h-sliding accuracy, 7-day panel, 5 m step",
             grafana_body([target("accuracy")], **week),
             Panel({}, {"accuracy": acc5}, p7, HOUR_S), points=len(p7)),
        Case("c_cold", "(c) 1h-sliding roc_auc, 7 days, 5 m step: cold",
             grafana_body([target("roc_auc")], **week),
             Panel({}, {"roc_auc": sk_roc_auc}, p7, HOUR_S), cold=True, points=len(p7)),
        Case("c_warm", "(c) 1h-sliding roc_auc, 7 days, 5 m step: warm (cached)",
             grafana_body([target("roc_auc")], **week), baseline_key="c_cold", points=len(p7)),
        Case("c_binned", "(c) the same, method=binned (score bins; vs exact sklearn)",
             grafana_body([target("roc_auc", method="binned")], **week), baseline_key="c_cold",
             cold=True, points=len(p7)),
        Case("g_est", "(g) 1h-sliding estimated_accuracy (CBPE), 7 days, 5 m step",
             grafana_body([target("estimated_accuracy")], **week), points=len(p7)),
        Case("g_asof", "(g) (b) as_of=point (labels known at each point; raw rows)",
             grafana_body([target("accuracy", as_of="point")], **week), points=len(p7)),
        Case("g_raw", "(g) (b) at threshold 0.123 (off the bin grid: raw rows)",
             grafana_body([target("accuracy", threshold="0.123")], **week), points=len(p7)),
        Case("f_cold", "(f) 1h-sliding median score, 7 days, 5 m step: cold",
             grafana_body([target("quantile", column="score", quantile="0.5")], **week),
             Panel({"left": True}, {"quantile": np_median_score}, p7, HOUR_S), cold=True,
             points=len(p7)),
        Case("f_warm", "(f) 1h-sliding median score, 7 days, 5 m step: warm (cached)",
             grafana_body([target("quantile", column="score", quantile="0.5")], **week),
             baseline_key="f_cold", points=len(p7)),
        Case("d", "(d) 8-metric dashboard refresh, 7 days, 1h sliding",
             grafana_body([target(m, chr(ord("A") + i)) for i, m in enumerate(DASHBOARD_METRICS)],
                          **week),
             Panel({"left": True}, sk_dashboard(0.5), p7, HOUR_S), points=len(p7)),
        Case("e_a_thr", "(e) (a) at threshold 0.3 (score bins)",
             grafana_body([target("accuracy", threshold="0.3", **cum)], **panel),
             SingleValue({}, 0.3, "accuracy"), points=len(p30)),
        Case("e_b_thr", "(e) (b) at threshold 0.3 (score bins)",
             grafana_body([target("accuracy", threshold="0.3")], **week),
             Panel({}, {"accuracy": acc3}, p7, HOUR_S), points=len(p7)),
        Case("e_a_filter", "(e) (a) with ad hoc filter borough=Manhattan",
             grafana_body([target("accuracy", **cum)], filters=manhattan, **panel),
             SingleValue({"seg_key": "borough", "seg_value": "Manhattan"}, 0.5, "accuracy"),
             points=len(p30)),
        Case("e_b_filter", "(e) (b) with ad hoc filter borough=Manhattan",
             grafana_body([target("accuracy")], filters=manhattan, **week),
             Panel({"seg_key": "borough", "seg_value": "Manhattan"}, {"accuracy": acc5}, p7,
                    HOUR_S), points=len(p7)),
        Case("e_a_group", "(e) (a) grouped by borough (5 series)",
             grafana_body([target("accuracy", group_by="borough", **cum)], **panel),
             SingleValue({"group_key": "borough"}, 0.5, "accuracy borough"), points=len(p30)),
        Case("e_b_group", "(e) (b) grouped by borough (5 series)",
             grafana_body([target("accuracy", group_by="borough")], **week),
             Panel({"group_key": "borough"}, {"accuracy": acc5}, p7, HOUR_S, "borough"),
             points=len(p7)),
    ]
    if args.cases:
        wanted = set(args.cases.split(","))
        keep = {c.key for c in cases if c.key in wanted or c.key.split("_")[0] in wanted}
        keep |= {c.baseline_key for c in cases if c.key in keep and c.baseline_key}
        cases = [c for c in cases if c.key in keep]
    return cases


# --------------------------------------------------------------------------- measuring


def post(session: requests.Session, base: str, body: dict) -> tuple[float, list]:
    data = json.dumps(body)
    t0 = time.perf_counter()
    resp = session.post(base + "/query", data=data, timeout=120,
                        headers={"Content-Type": "application/json"})
    content = resp.content
    took = time.perf_counter() - t0
    if resp.status_code != 200:
        raise RuntimeError(f"/query answered {resp.status_code}: {content[:300]!r}")
    return took, json.loads(content)


def _served(answer: list) -> dict:
    """(metric, group) -> values, and the number of datapoints per series."""
    out = {}
    for item in answer:
        name = item["target"]
        metric, _, group = name.partition(" ")
        out[(metric, group)] = np.array([np.nan if v is None else v
                                         for v, _ in item["datapoints"]], dtype=np.float64)
    return out


def measure_http(case: Case, url: str, server: common.Gunicorn | None, reps: int,
                 cold_reps: int, load: common.OtherLoad, quiet_wait: float) -> None:
    """Time ``reps`` requests on one keep-alive connection (cold: one per server start)."""
    latencies, answer = [], None
    load.wait_quiet(quiet_wait)
    t0 = load.now()
    try:
        if case.cold:
            for _ in tqdm(range(cold_reps), desc=f"{case.key} (restarts)", leave=False,
                          file=sys.stderr, disable=None):
                with common.Gunicorn(url) as g, requests.Session() as s:
                    took, answer = post(s, g.url, case.body)
                    latencies.append(took)
        else:
            with requests.Session() as s:
                for _ in range(3):  # warm-up: connections, caches, the OS page cache
                    post(s, server.url, case.body)
                for _ in tqdm(range(reps), desc=case.key, leave=False, file=sys.stderr, disable=None):
                    took, answer = post(s, server.url, case.body)
                    latencies.append(took)
    except (RuntimeError, requests.RequestException) as e:  # at 100M a case may time out: say so
        case.result.update(p50=float("nan"), p95=float("nan"), others=load.cores(t0, load.now()),
                           n=len(latencies), served={}, series=0, datapoints=[],
                           failed=" ".join(str(e).split())[:160])
        print(f"{case.key}: failed after {len(latencies)} requests: {case.result['failed']}",
              flush=True)
        return
    others = load.cores(t0, load.now())
    served = _served(answer)
    lengths = {len(v) for v in served.values()}
    case.result.update(p50=common.pct(latencies, 50), p95=common.pct(latencies, 95), others=others,
                       n=len(latencies), served=served, series=len(served),
                       datapoints=sorted(lengths))
    if case.points is not None and lengths != {case.points}:
        raise SystemExit(f"{case.key}: expected {case.points} datapoints per series, got {lengths}")


def measure_baseline(case: Case, essay: Essay, reps: int, load: common.OtherLoad,
                     quiet_wait: float) -> None:
    runs = []
    load.wait_quiet(quiet_wait)
    t0 = load.now()
    for _ in tqdm(range(reps), desc=f"{case.key} baseline", leave=False, file=sys.stderr, disable=None):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runs.append(case.baseline(essay))
    secs = [r.seconds for r in runs]
    case.result.update(base_p50=common.pct(secs, 50), base_n=len(runs), base_note=runs[0].note,
                       base_others=load.cores(t0, load.now()),
                       base_values=runs[0].values)


def server_rss_mb(server: common.Gunicorn) -> float:
    """Resident memory of gunicorn's master and workers (what the issue's RSS row asks)."""
    import psutil

    master = psutil.Process(server.proc.pid)
    return sum(p.memory_info().rss for p in [master, *master.children(recursive=True)]) / 2**20


def check(case: Case, base: Case) -> str:
    """Max |served - scikit-learn| over all compared values (the baseline's, else the oracle's)."""
    served = case.result.get("served")
    ref = base.result.get("base_values", base.result.get("oracle_values"))
    if not served or ref is None:
        return ""
    diffs = []
    for key, expect in ref.items():
        if isinstance(key, tuple):  # (metric, group) panels
            metric, group = key
        else:  # single values: "metric" or "metric group=x"
            metric, _, group = key.partition(" ")
        got = served.get((metric, group))
        if got is None:
            return f"series {metric} {group} missing"
        if len(expect) == 1:  # the current value: the last datapoint
            got = got[-1:]
        m = ~np.isnan(expect)
        if not np.array_equal(np.isnan(got[m]), np.zeros(m.sum(), dtype=bool)):
            return "gaps differ"
        if m.any():
            diffs.append(float(np.max(np.abs(got[m] - expect[m]))))
    return f"{max(diffs):.0e}" if diffs else "–"


class _Timers:
    """Exclusive wall time per category of instrumented functions (nested calls subtracted)."""

    def __init__(self):
        self.total: dict[str, float] = {}
        self._stack: list[float] = []

    def wrap(self, fn, category: str):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self._stack.append(0.0)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                took = time.perf_counter() - t0
                inner = self._stack.pop()
                self.total[category] = self.total.get(category, 0.0) + took - inner
                if self._stack:
                    self._stack[-1] += took
        return timed


PROFILE_PARTS = ("SQL", "store", "engine", "datapoints", "JSON")


def profile_cases(url: str, cases: list[Case], reps: int, top: int) -> list[list[str]]:
    """Run each case in-process (Flask test client) and split its time by layer.

    SQL = cursor execute/copy/fetch; store = the rest of ``datasource.store``
    (rows to pandas); engine = ``datasource.engine`` (numpy, pandas, metric
    functions); datapoints = ``grafana._datapoints`` (Python lists for JSON);
    JSON = Flask's encoder; rest = routing, request parsing, everything else.
    """
    import contextlib
    import cProfile
    import inspect
    import pstats

    import psycopg2.extensions

    from datasource import create_app, engine, grafana

    app = create_app({"database_url": url})
    timers = _Timers()

    class TimingCursor(psycopg2.extensions.cursor):
        pass

    for name in ("execute", "copy_expert", "fetchall", "fetchone", "fetchmany"):
        setattr(TimingCursor, name, timers.wrap(getattr(psycopg2.extensions.cursor, name), "SQL"))
    pool = app.extensions["pool"]
    plain_connection = pool.connection

    @contextlib.contextmanager
    def connection():
        with plain_connection() as conn:
            conn.cursor_factory = TimingCursor
            yield conn

    pool.connection = connection
    saved = []
    from datasource.store import catalog, reads, writes

    for module, category in ((catalog, "store"), (reads, "store"), (writes, "store"),
                             (engine, "engine")):
        for name, fn in list(vars(module).items()):
            if inspect.isfunction(fn) and fn.__module__ == module.__name__:
                saved.append((module, name, fn))
                wrapped = timers.wrap(fn, category)
                setattr(module, name, wrapped)
                if category == "store" and getattr(store, name, None) is fn:  # the re-export
                    saved.append((store, name, fn))
                    setattr(store, name, wrapped)
    saved.append((grafana, "_datapoints", grafana._datapoints))
    grafana._datapoints = timers.wrap(grafana._datapoints, "datapoints")
    app.json.dumps = timers.wrap(app.json.dumps, "JSON")
    client = app.test_client()
    rows = []
    try:
        for case in cases:
            cold = case.cold and hasattr(engine, "CACHE")
            for _ in range(2):
                client.post("/query", json=case.body)
            timers.total.clear()
            walls = []
            prof = cProfile.Profile() if top else None
            for _ in range(reps):
                if cold:
                    engine.CACHE.clear()
                if prof:
                    prof.enable()
                t0 = time.perf_counter()
                resp = client.post("/query", json=case.body)
                walls.append(time.perf_counter() - t0)
                if prof:
                    prof.disable()
                if resp.status_code != 200:
                    raise RuntimeError(f"{case.key}: {resp.status_code} {resp.data[:200]!r}")
            parts = {k: timers.total.get(k, 0.0) / reps for k in PROFILE_PARTS}
            mean = float(np.mean(walls))
            http = case.result.get("p50", float("nan"))
            rows.append([case.title, common.fmt_ms(mean),
                         *(common.fmt_ms(parts[k]) for k in PROFILE_PARTS),
                         common.fmt_ms(mean - sum(parts.values())), common.fmt_ms(http),
                         f"{len(resp.data) / 1024:,.0f} KiB"])
            if prof:
                print(f"\n--- {case.key}: top {top} functions by own time ({reps} requests)")
                pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(top)
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)
    return rows


def _ratio(x: float) -> str:
    if x != x:
        return "–"
    return f"{x:.1f}x" if x < 10 else f"{x:,.0f}x"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--predictions", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--zones", type=int, default=1, metavar="K",
                    help="add a zone segment of K values: 10 x K segment sets (default 1: 10)")
    ap.add_argument("--reps", type=int, default=30, help="timed requests per case")
    ap.add_argument("--cold-reps", type=int, default=8,
                    help="server restarts for the cold roc_auc case (one request each)")
    ap.add_argument("--baseline-reps", type=int, default=5, help="timed baseline runs per case")
    ap.add_argument("--baseline-budget", type=float, default=30.0,
                    help="seconds one baseline run may spend before the rest is extrapolated")
    ap.add_argument("--cases", default="", help="comma list of case keys (a,b,c,d,e,...)")
    ap.add_argument("--refill", action="store_true", help="refill the database even if it matches")
    ap.add_argument("--skip-baseline", action="store_true", help="only our side")
    ap.add_argument("--oracle-points", type=int, default=12, metavar="K",
                    help="with --skip-baseline, check the served values at K points of each panel "
                         "against scikit-learn on that window's rows read back alone, and "
                         "cumulative values against counts made in PostgreSQL (0: no check)")
    ap.add_argument("--fill", choices=("bulk", "sql"), default="bulk",
                    help="fill with the bulk client from common.synthesize, or in PostgreSQL "
                         "(fill_sql: the same distribution, not the same values; for 10M-100M)")
    ap.add_argument("--quiet-wait", type=float, default=30.0, metavar="S",
                    help="before each case wait up to S seconds for other processes to go idle")
    ap.add_argument("--profile", action="store_true",
                    help="also run each case in-process and split its time by layer")
    ap.add_argument("--cprofile", type=int, default=0, metavar="N",
                    help="with --profile: print the N functions with most own time per case")
    args = ap.parse_args(argv)
    if min(args.predictions, args.reps, args.cold_reps, args.baseline_reps, args.zones) < 1:
        ap.error("counts must be positive")

    started = time.perf_counter()
    pg_server = common.server_url()
    info = common.machine_of(pg_server)
    if args.fill == "sql":
        print(f"query benchmark: {fill_sql.describe(args.predictions, args.seed, args.zones)}",
              flush=True)
        url, _ = ensure_sql_data(pg_server, args.predictions, args.seed, args.refill, args.zones)
    else:
        data = common.synthesize(args.predictions, args.seed, args.zones)
        print(f"query benchmark: {common.describe_data(data)}; seed {args.seed}", flush=True)
        url = ensure_data(pg_server, data, args.seed, args.refill, args.zones)
        del data
    cases = build_cases(args)
    by_key = {c.key: c for c in cases}

    load = common.OtherLoad().start()
    t_http = time.perf_counter()
    try:
        for c in [c for c in cases if c.cold]:
            measure_http(c, url, None, args.reps, args.cold_reps, load, args.quiet_wait)
        with common.Gunicorn(url) as server:
            for c in [c for c in cases if not c.cold]:
                measure_http(c, url, server, args.reps, args.cold_reps, load,
                             args.quiet_wait)
            rss_mb = server_rss_mb(server)
        t_http = time.perf_counter() - t_http

        t_base = time.perf_counter()
        if not args.skip_baseline or args.oracle_points:
            essay = Essay(url, args.baseline_budget)
            try:
                for c in cases:
                    if c.baseline is None:
                        continue
                    if not args.skip_baseline:
                        measure_baseline(c, essay, args.baseline_reps, load, args.quiet_wait)
                    else:
                        c.result["oracle_values"] = c.baseline.oracle(essay, args.oracle_points)
            finally:
                essay.close()
        t_base = time.perf_counter() - t_base
        profile = profile_cases(url, cases, args.reps, args.cprofile) if args.profile else None
    finally:
        load.stop()

    rows = []
    for c in cases:
        base = by_key[c.baseline_key] if c.baseline_key else c
        r, b = c.result, base.result
        ratio = b["base_p50"] / r["p50"] if b.get("base_p50") else float("nan")
        shape = (f"failed: {r['failed'][:80]}" if "failed" in r
                 else f"{r['series']} x {'/'.join(map(str, r['datapoints']))}")
        rows.append([c.title, shape,
                     common.fmt_ms(r["p50"]), common.fmt_ms(r["p95"]),
                     common.fmt_ms(b.get("base_p50", float("nan"))),
                     _ratio(ratio),
                     b.get("base_note", ""), check(c, base),
                     f"{common.fmt_cores(r['others'])} / "
                     f"{common.fmt_cores(b.get('base_others', float('nan')))}"])
    print(f"\nQuery latency through HTTP ({args.reps} requests per case, cold: {args.cold_reps} "
          f"server starts) vs the essay's join + scikit-learn ({args.baseline_reps} runs)\n")
    print(common.table(["case", "series x points", "ours p50", "ours p95", "baseline p50",
                        "ratio", "baseline computes", "max |Δ| vs sklearn",
                        "others' cores (ours/base)"], rows))
    if args.skip_baseline and args.oracle_points:
        print(f"\nmax |Δ| vs sklearn, baseline skipped: panels at {args.oracle_points} points each, "
              "scikit-learn (numpy for the median) on each window's rows read back alone; "
              "cumulative values against correct/labeled counts made in PostgreSQL; labels from "
              "the prediction rows")
    if profile:
        print(f"\nWhere the time goes, in-process (Flask test client, mean of {args.reps} "
              "requests; cold roc_auc: cache cleared before each)\n")
        print(common.table(["case", "in-process", *PROFILE_PARTS, "rest", "HTTP p50",
                            "response"], profile))
    print(f"\nserver RSS after the warm cases (gunicorn master + workers): {rss_mb:,.0f} MB")
    common.print_machine(info)
    print(f"\ncommand: {shlex.join([sys.executable, *sys.argv])}")
    print(f"benchmark wall time: {time.perf_counter() - started:.0f} s "
          f"(HTTP cases {t_http:.0f} s, baselines or oracle {t_base:.0f} s)")


if __name__ == "__main__":
    main()
