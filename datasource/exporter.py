"""``GET /metrics`` for Prometheus: server health, exported SLIs and good/total counters.

Three kinds of series, in the text format 0.0.4 (Prometheus 3 refuses a scrape
without a valid Content-Type):

* **Server health**, instrumented by request hooks (``init_app``): requests
  and latency per Flask endpoint, method and status (bounded labels: the
  endpoint name, never the URL), ingest rows accepted and batches rejected,
  database errors, raw-metric cache hits. Under gunicorn these live in
  ``PROMETHEUS_MULTIPROC_DIR`` (see ``datasource/gunicorn_conf.py``) and a
  scrape sums every worker's files through a fresh registry.
* **SLIs** ``mlsli_sli{model,metric,window[,group_by,group]}``: one point per
  (model, metric, window) computed by the engine exactly as ``POST /query``
  would, for the sliding window ending at the export time rounded up to the
  minute (so the per-minute rollup answers it). The default set needs no
  configuration; ``EXPORT_CONFIG`` (YAML, see ``config/export.yaml``) adds
  entries. An undefined value (empty window, 0/0) is omitted, not NaN: the
  series goes stale as a Grafana gap would, and ``absent()`` can alert on it.
* **Counters** ``mlsli_{predictions,labeled_predictions,correct_predictions}_total{model}``
  from the rollup over all time (correct at the model's threshold), for
  ``rate()``-based burn-rate rules (``datasource/slo.py``).

SLI values and counters are read at most every ``SNAPSHOT_TTL_S`` per process,
so a scrape costs one cached dict; they are the same in every worker.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psycopg2
from flask import Blueprint, Response, current_app, g, request
from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from datasource import engine, windows
from datasource import metrics as metric_registry
from datasource import query as query_service

log = logging.getLogger(__name__)
bp = Blueprint("exporter", __name__)

SNAPSHOT_TTL_S = 10.0
STEP_S = query_service.rollup_bucket_s()  # window ends on whole minutes: the rollup answers
DEFAULT_WINDOWS = ("1h", "1d")
DEFAULT_METRICS = {
    metric_registry.CLF: ("accuracy", "label_coverage", "prediction_count"),
    "regression": ("mae", "label_coverage", "prediction_count"),
}
_METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"}
_INGEST_ENDPOINTS = {"api.write_predictions": "predictions", "api.write_feedback": "feedback"}
_END_CHOICES = ("now", "latest")
_HWM_FILE = "mlsli_counter_high_water.json"  # not *.db: MultiProcessCollector ignores it

# Instrumented metrics: in no registry of their own; each scrape builds one (see metrics()).
REQUESTS = Counter("mlsli_http_requests", "HTTP requests answered, by Flask endpoint, method and status",
                   ["endpoint", "method", "status"], registry=None)
LATENCY = Histogram("mlsli_http_request_duration_seconds", "Time to answer an HTTP request",
                    ["endpoint", "method"], registry=None,
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
INGEST_ROWS = Counter("mlsli_ingest_rows", "Records accepted by the ingest API", ["kind"],
                      registry=None)
INGEST_REJECTED = Counter("mlsli_ingest_batches_rejected", "Ingest batches refused (4xx)",
                          ["kind", "status"], registry=None)
DB_ERRORS = Counter("mlsli_database_errors", "Database errors while answering requests or scrapes",
                    ["kind"], registry=None)
CACHE_LOOKUPS = Counter("mlsli_raw_cache_lookups", "Raw-metric value cache lookups", ["result"],
                        registry=None)
EXPORT_ERRORS = Counter("mlsli_export_errors", "Exported SLIs that failed to compute", ["metric"],
                        registry=None)
INSTRUMENTS = (REQUESTS, LATENCY, INGEST_ROWS, INGEST_REJECTED, DB_ERRORS, CACHE_LOOKUPS,
               EXPORT_ERRORS)


# ----------------------------------------------------------------------- configuration


class ExportConfigError(ValueError):
    """EXPORT_CONFIG or EXPORT_WINDOW_END is not usable; the server refuses to start."""


@dataclass(frozen=True)
class Entry:
    """One exported SLI: ``model`` "*" means every model whose task the metric applies to."""

    model: str
    metric: str
    window: str
    group_by: str | None = None


def load_config(path: str | None) -> tuple[list[Entry], bool]:
    """(extra entries, include the default set) from the YAML file at ``path``.

    Format: ``{include_defaults: true, slis: [{model, metric, window, group_by?}]}``.
    Every name is checked here, so a typo fails at start, not silently at scrape time.
    """
    if not path:
        return [], True
    import yaml

    try:
        doc = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ExportConfigError(f"EXPORT_CONFIG {path}: {e}") from None
    if not isinstance(doc, dict) or set(doc) - {"include_defaults", "slis"}:
        raise ExportConfigError(f"EXPORT_CONFIG {path}: expected keys include_defaults, slis")
    items = doc.get("slis") or []
    if not isinstance(items, list):
        raise ExportConfigError(f"EXPORT_CONFIG {path}: slis must be a list")
    out = []
    for i, item in enumerate(items):
        where = f"EXPORT_CONFIG {path}: slis[{i}]"
        if not isinstance(item, dict) or set(item) - {"model", "metric", "window", "group_by"}:
            raise ExportConfigError(f"{where} takes model, metric, window, group_by")
        name = item.get("metric")
        if name not in metric_registry.REGISTRY:
            raise ExportConfigError(f"{where}: unknown metric {name!r}")
        if metric_registry.REGISTRY[name].kind in ("table", "histogram"):
            raise ExportConfigError(f"{where}: {name} is a table, not one value")
        try:
            window = windows.parse_window(str(item.get("window", "")))
        except windows.WindowError as e:
            raise ExportConfigError(f"{where}: {e}") from None
        group_by = item.get("group_by")
        if group_by is not None and (not isinstance(group_by, str) or not group_by):
            raise ExportConfigError(f"{where}: group_by must be a segment key")
        out.append(Entry(str(item.get("model") or "*"), name, window.text, group_by))
    return out, bool(doc.get("include_defaults", True))


def entries_for(model: query_service.Model, extra: list[Entry], defaults: bool) -> list[Entry]:
    """The SLIs exported for one model: the default set for its task, then the config's."""
    out = []
    if defaults:
        out = [Entry(model.name, m, w) for w in DEFAULT_WINDOWS
               for m in DEFAULT_METRICS.get(model.task, ())]
    for e in extra:
        if e.model in ("*", model.name) and model.task in metric_registry.REGISTRY[e.metric].tasks:
            entry = Entry(model.name, e.metric, e.window, e.group_by)
            if entry not in out:
                out.append(entry)
    return out


def window_end(end_s: float) -> int:
    """The export time rounded up to a whole minute: every prediction so far is inside."""
    return int(math.ceil(end_s / STEP_S)) * STEP_S


# ----------------------------------------------------------------------- the snapshot


@dataclass
class Snapshot:
    slis: list[tuple[dict, float]]  # (labels, value)
    ends: dict[str, int]  # model -> window end (epoch s)
    counts: dict[str, dict[str, float]]  # model -> {"predictions", "labeled", "correct"?}
    ok: bool


def _totals(conn, model: query_service.Model) -> dict[str, float]:
    """All-time counts from the rollup's all-segments rows (segset 0), at the model's threshold."""
    tot = query_service.totals(conn, model, ("n_pred", "n_lab", "tp", "fp", "sum_label"))
    out = {"predictions": tot["n_pred"], "labeled": tot["n_lab"],
           "late_labels": query_service.retention(conn, model)["late_labels_dropped"]}
    if model.is_classifier:
        # correct = tp + tn, tn = labeled negatives not predicted positive
        out["correct"] = tot["tp"] + (tot["n_lab"] - tot["sum_label"] - tot["fp"])
    return out


def _sli_values(conn, model: query_service.Model, entries: list[Entry], end: int,
                deadline: float | None) -> list[tuple[dict, float]]:
    """Each entry's value at ``end``, from the engine as the Grafana routes ask it."""
    resolver = query_service.Resolver(conn)
    memo = engine.RequestMemo.for_metrics([metric_registry.REGISTRY[e.metric] for e in entries])
    points = np.array([end], dtype=np.int64)
    out = []
    for e in entries:
        metric = metric_registry.REGISTRY[e.metric]
        target = query_service.Target(e.metric, model=model.name, window=e.window, mode="sliding",
                                      group_by=e.group_by)
        try:
            q = resolver.query(target, metric, model, [])
            series = engine.series(conn, q, points, STEP_S, deadline, memo)
        except psycopg2.Error:
            raise
        except Exception as exc:  # one bad entry (a user metric, a window too fine) only
            log.warning("exporting %s %s %s failed: %s", model.name, e.metric, e.window, exc)
            EXPORT_ERRORS.labels(e.metric).inc()
            continue
        for s in series:
            value = float(s.values[0]) if len(s.values) else math.nan
            if math.isnan(value):
                continue  # undefined: omitted (see the module docstring)
            labels = {"model": model.name, "metric": e.metric, "window": e.window}
            if e.group_by:
                labels.update(group_by=e.group_by, group=s.name)
            out.append((labels, value))
    return out


class HighWater:
    """Keeps DB-derived counters monotone: each exported value is max(seen, current).

    A label correction (correct -> wrong) or a re-sent prediction can lower the
    all-time totals, and Prometheus reads any drop as a counter reset, adding the
    whole total to ``rate()``. Holding the high-water mark instead stalls the
    counter until the data catches up, an error of at most the number of
    corrections, in the conservative direction (error ratios read high). With
    ``PROMETHEUS_MULTIPROC_DIR`` the marks are shared by the workers in a
    locked file there, so every worker exports the same value.
    """

    def __init__(self):
        self._marks: dict[str, float] = {}
        self._lock = threading.Lock()

    def apply(self, counts: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        flat = {f"{m}\t{k}": v for m, kv in counts.items() for k, v in kv.items()}
        with self._lock:
            shared = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
            if shared and Path(shared).is_dir():
                marks = self._merge_file(Path(shared) / _HWM_FILE, flat)
            else:
                marks = self._marks = {k: max(v, self._marks.get(k, v)) for k, v in
                                       {**self._marks, **flat}.items()}
        out: dict[str, dict[str, float]] = {}
        for key in flat:
            model, kind = key.split("\t")
            out.setdefault(model, {})[kind] = marks[key]
        return out

    @staticmethod
    def _merge_file(path: Path, flat: dict[str, float]) -> dict[str, float]:
        with open(path, "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                fh.seek(0)
                try:
                    marks = json.loads(fh.read() or "{}")
                except json.JSONDecodeError:
                    marks = {}
                for k, v in flat.items():
                    marks[k] = max(v, marks.get(k, v))
                fh.seek(0)
                fh.truncate()
                fh.write(json.dumps(marks))
                fh.flush()
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
        return marks

    def clear(self) -> None:
        with self._lock:
            self._marks.clear()


HIGH_WATER = HighWater()


class _SnapshotCache:
    """One snapshot per process, recomputed at most every SNAPSHOT_TTL_S (one scrape at a time)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._value: tuple[float, Snapshot] | None = None

    def get(self, compute) -> Snapshot:
        with self._lock:
            if self._value is not None and time.monotonic() < self._value[0]:
                return self._value[1]
            snap = compute()
            self._value = (time.monotonic() + SNAPSHOT_TTL_S, snap)
            return snap

    def clear(self) -> None:
        with self._lock:
            self._value = None


SNAPSHOTS = _SnapshotCache()


def compute_snapshot(pool, settings, extra: list[Entry], defaults: bool,
                     now_s: float | None = None) -> Snapshot:
    budget_s = settings.statement_timeout_ms / 1000.0
    deadline = time.monotonic() + budget_s if budget_s > 0 else None
    slis, ends, counts = [], {}, {}
    try:
        with pool.connection() as conn:
            for model in query_service.Catalog(conn).models():
                if settings.export_window_end == "latest":
                    latest = query_service.latest_prediction_ts(conn, model)
                    if latest is None:
                        continue
                    end = window_end(latest.timestamp())
                else:
                    end = window_end(time.time() if now_s is None else now_s)
                ends[model.name] = end
                counts[model.name] = _totals(conn, model)
                slis.extend(_sli_values(conn, model, entries_for(model, extra, defaults), end,
                                        deadline))
    except psycopg2.Error as e:
        DB_ERRORS.labels(_db_error_kind(e)).inc()
        log.warning("SLI export failed: %s", str(e).strip())
        return Snapshot([], {}, {}, ok=False)
    return Snapshot(slis, ends, HIGH_WATER.apply(counts), ok=True)


class SliCollector:
    """Yields the snapshot's families at scrape time (attached to each scrape's registry)."""

    def __init__(self, snapshot: Snapshot):
        self.snapshot = snapshot

    def collect(self):
        s = self.snapshot
        sli = Metric("mlsli_sli", "Model-quality SLI over the sliding window ending at the export "
                     "time (rounded up to the minute); absent when undefined", "gauge")
        for labels, value in s.slis:
            sli.add_sample("mlsli_sli", labels, value)
        ends = GaugeMetricFamily("mlsli_sli_window_end_seconds",
                                 "End of the exported windows (epoch seconds)", labels=["model"])
        preds = CounterMetricFamily("mlsli_predictions", "Predictions stored, all time",
                                    labels=["model"])
        labeled = CounterMetricFamily("mlsli_labeled_predictions",
                                      "Predictions with feedback, all time", labels=["model"])
        correct = CounterMetricFamily("mlsli_correct_predictions",
                                      "Labeled predictions correct at the model's threshold",
                                      labels=["model"])
        late = CounterMetricFamily("mlsli_late_labels_dropped",
                                   "Labels not stored because retention had dropped their "
                                   "prediction (or their time was before the horizon)",
                                   labels=["model"])
        for model, c in sorted(s.counts.items()):
            preds.add_metric([model], c["predictions"])
            late.add_metric([model], c.get("late_labels", 0))
            labeled.add_metric([model], c["labeled"])
            if "correct" in c:
                correct.add_metric([model], c["correct"])
        for model, end in sorted(s.ends.items()):
            ends.add_metric([model], end)
        ok = GaugeMetricFamily("mlsli_sli_export_ok", "1 when the last SLI read succeeded")
        ok.add_metric([], 1.0 if s.ok else 0.0)
        yield from (sli, ends, preds, labeled, correct, late, ok)


@bp.get("/metrics")
def metrics():
    """Prometheus scrape (simpod's ``POST /metrics`` is the other view on this path)."""
    ext = current_app.extensions["mlsli_exporter"]
    pool = current_app.extensions.get("read_pool") or current_app.extensions["pool"]
    settings = current_app.extensions["settings"]
    snap = SNAPSHOTS.get(lambda: compute_snapshot(pool, settings, ext["extra"], ext["defaults"]))
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(registry)
    else:
        for m in INSTRUMENTS:
            registry.register(m)
    registry.register(SliCollector(snap))
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_PLAIN_0_0_4)


# ----------------------------------------------------------------------- request hooks


def _db_error_kind(e: BaseException) -> str:
    if isinstance(e, psycopg2.errors.QueryCanceled):
        return "timeout"
    if isinstance(e, psycopg2.OperationalError):
        return "unavailable"
    return "other"


def _endpoint() -> str:
    return request.url_rule.endpoint if request.url_rule is not None else "unmatched"


def _before() -> None:
    g.mlsli_started = time.perf_counter()


def _after(response):
    endpoint = _endpoint()
    method = request.method if request.method in _METHODS else "other"
    REQUESTS.labels(endpoint, method, str(response.status_code)).inc()
    started = g.get("mlsli_started")
    if started is not None:
        LATENCY.labels(endpoint, method).observe(time.perf_counter() - started)
    kind = _INGEST_ENDPOINTS.get(endpoint)
    if kind is not None:
        if response.status_code == 200 and response.is_json:
            written = (response.get_json(silent=True) or {}).get("written")
            if isinstance(written, int):
                INGEST_ROWS.labels(kind).inc(written)
        elif 400 <= response.status_code < 500:
            INGEST_REJECTED.labels(kind, str(response.status_code)).inc()
    return response


def init_app(app) -> None:
    """Register GET /metrics and the request hooks; validate EXPORT_CONFIG (fails at start)."""
    settings = app.extensions["settings"]
    if settings.export_window_end not in _END_CHOICES:
        raise ExportConfigError(f"EXPORT_WINDOW_END must be one of {', '.join(_END_CHOICES)}")
    extra, defaults = load_config(settings.export_config)
    app.extensions["mlsli_exporter"] = {"extra": extra, "defaults": defaults}
    app.register_blueprint(bp)
    app.before_request(_before)
    app.after_request(_after)

    handle = app.handle_user_exception

    def counting(e):  # the app's own handlers answer; this only counts database errors
        if isinstance(e, psycopg2.Error):
            DB_ERRORS.labels(_db_error_kind(e)).inc()
        return handle(e)

    app.handle_user_exception = counting
    _count_cache_lookups()


def _count_cache_lookups() -> None:
    """Count hits and misses of the engine's raw-metric cache (wrapped once per process)."""
    cache = engine.CACHE
    if getattr(cache, "_mlsli_counted", False):
        return
    get = cache.get

    def counted(key, revision):
        hit = get(key, revision)
        CACHE_LOOKUPS.labels("miss" if hit is None else "hit").inc()
        return hit

    with contextlib.suppress(AttributeError):
        cache.get = counted
        cache._mlsli_counted = True


def clear_caches() -> None:
    """Forget the snapshot and the high-water marks (tests; a fresh process starts empty)."""
    SNAPSHOTS.clear()
    HIGH_WATER.clear()
