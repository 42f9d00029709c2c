"""The protocol-neutral query service between the HTTP routes and the engine.

Every door in (the simpod JSON protocol, the flat ``/api/v1/series`` endpoint
for Infinity, the Prometheus exporter, the SLI browser) turns its request into
``Target`` values and a ``TimeRange`` and gets neutral results back: series,
tables, events or a failed target. Here the names a client sends are resolved
(models, metric, window, threshold, column, reference, segments), the time
budget and the per-request memo live, and the engine is called; the routes
only translate, and never import the store.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import numpy as np
import psycopg2

from datasource import calibration, disconnect, distributions, engine, patterns, store, windows
from datasource import metrics as metric_registry
from datasource.errors import ClientError

ANNOTATIONS = "annotations"
FILTER_OPS = ("=", "!=", "=~", "!~")
MAX_HISTOGRAM_BINS = 1000


def bad(message: str, field: str | None = None, status: int = 400) -> ClientError:
    """A client mistake, optionally naming the offending field."""
    errors = [{"index": None, "field": field, "message": message}] if field else None
    return ClientError(message, errors, status)


# ----------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Filter:
    """One ad hoc filter on a segment key; ``value`` is compiled for =~ and !~."""

    key: str
    op: str
    value: object

    def matches(self, segments: dict) -> bool:
        have = segments.get(self.key)
        if self.op == "=":
            return have == self.value
        if self.op == "!=":
            return have != self.value
        hit = have is not None and bool(self.value.fullmatch(have))
        return hit if self.op == "=~" else not hit


@dataclass(frozen=True)
class Target:
    """One thing to compute, with values as the client sent them (lists for multi-values)."""

    metric: str
    ref_id: str = "A"
    model: object = None  # a name, a list of names, or None for the only model
    window: object = None
    mode: object = None
    threshold: object = None
    group_by: object = None
    params: dict = field(default_factory=dict)  # quantile, column, reference, bins, format


@dataclass(frozen=True)
class TimeRange:
    """Range bounds in epoch seconds and the epoch-aligned step and points."""

    from_s: float
    to_s: float
    step: int
    points: np.ndarray = field(compare=False)


@dataclass
class SeriesResult:
    ref_id: str
    metric: metric_registry.Metric
    model: str
    series: engine.Series
    name: str  # the legend
    group_by: str | None = None
    many_models: bool = False


@dataclass
class TableResult:
    ref_id: str
    metric: str
    model: str | None
    columns: list  # [{"text": name, "type": "string"|"number"|"time"}]
    rows: list


@dataclass
class FailedTarget:
    """A user metric raised: this target has no data and says why; the others still answer."""

    ref_id: str
    metric: str
    message: str


EVENT_COLUMNS = [{"text": "time", "type": "time"}, {"text": "timeEnd", "type": "time"},
                 {"text": "title", "type": "string"}, {"text": "text", "type": "string"},
                 {"text": "tags", "type": "string"}, {"text": "model", "type": "string"}]


def time_range(from_value, to_value, interval_ms, max_points, where: str = "range") -> TimeRange:
    """Parse range bounds (ISO-8601 or epoch ms) and choose the step and points."""
    try:
        from_s = windows.parse_time(from_value, "from")
        to_s = windows.parse_time(to_value, "to")
        step = windows.choose_step(from_s, to_s, interval_ms, max_points)
    except windows.WindowError as e:
        raise bad(str(e), where) from None
    return TimeRange(from_s, to_s, step, windows.grid_points(from_s, to_s, step))


def parse_filters(raw, where: str = "filters") -> list[Filter]:
    """Ad hoc filters given as ``{key, operator, value}`` objects."""
    if raw in (None, ""):
        return []
    if not isinstance(raw, list):
        raise bad("filters must be a list of {key, operator, value}", where)
    out = []
    for i, f in enumerate(raw):
        if not isinstance(f, dict) or not isinstance(f.get("key"), str):
            raise bad(f"{where}[{i}] must be an object with a string key", where)
        out.append(make_filter(f["key"], f.get("operator", "="), f.get("value"), f"{where}[{i}]"))
    return out


def make_filter(key: str, op: str, value, where: str) -> Filter:
    if op not in FILTER_OPS:
        raise bad(f"{where}.operator must be one of {', '.join(FILTER_OPS)}", where)
    value = "" if value is None else str(value)
    if op in ("=~", "!~"):
        value = patterns.compile_filter(value, where)  # RE2: linear time, whatever the pattern
    return Filter(key, op, value)


# ----------------------------------------------------------------------- resolution


def _single(value, field: str):
    if isinstance(value, list):
        if len(value) != 1:
            raise bad(f"{field} takes one value, got {len(value)}", field)
        return value[0]
    return value


class Resolver:
    """Resolves a target's names against the store; ``prefix`` names fields as the protocol does."""

    def __init__(self, conn, prefix: str = ""):
        self.conn = conn
        self.prefix = prefix

    def field(self, name: str) -> str:
        return self.prefix + name

    def models(self, value) -> list[store.Model]:
        names = value if isinstance(value, list) else [value]
        names = [n for n in names if n not in (None, "")]
        if not names:
            all_models = store.list_models(self.conn)
            if len(all_models) == 1:
                return all_models
            raise bad(f"{self.field('model')} is required (the 'models' variable lists them)",
                      self.field("model"))
        out = []
        for name in names:
            model = store.get_model(self.conn, str(name))
            if model is None:
                raise bad(f"unknown model {str(name)[:80]!r}", self.field("model"))
            out.append(model)
        return out

    def threshold(self, value, model: store.Model) -> float | None:
        if not model.is_classifier:
            return None
        value = _single(value, self.field("threshold"))
        if value in (None, "", "default"):
            return model.threshold
        try:
            thr = float(value)
        except (TypeError, ValueError):
            raise bad(f"threshold {str(value)[:40]!r} is not a number", self.field("threshold")) from None
        if not 0.0 <= thr <= 1.0:
            raise bad("threshold must be in [0, 1]", self.field("threshold"))
        return thr

    def metric_params(self, metric: metric_registry.Metric, payload: dict) -> tuple:
        params = {}
        if "bins" in metric.payloads and payload.get("bins") not in (None, "", "auto"):
            bins = _single(payload.get("bins"), self.field("bins"))
            try:
                bins = int(str(bins))
            except ValueError:
                raise bad("bins must be a whole number (or empty for Freedman–Diaconis)",
                          self.field("bins")) from None
            if not 1 <= bins <= MAX_HISTOGRAM_BINS:
                raise bad(f"bins must be between 1 and {MAX_HISTOGRAM_BINS}", self.field("bins"))
            params["bins"] = bins
        if "format" in metric.payloads:
            fmt = _single(payload.get("format"), self.field("format")) or "heatmap"
            if fmt not in ("heatmap", "table"):
                raise bad("format must be heatmap or table", self.field("format"))
            params["format"] = fmt
        if "reference" in metric.payloads:
            params["reference"] = str(_single(payload.get("reference"), self.field("reference"))
                                      or "training")
        if metric.kind in ("partial", "raw"):
            params.update(self.as_of(payload))
        if "of" in metric.payloads:
            of = metric_of(_single(payload.get("of"), self.field("of")) or "accuracy")
            if of.kind not in ("partial", "raw"):
                raise bad(f"of must name a series metric of labels, not {of.name}", self.field("of"))
            if metric.name == "estimation_error" and of.name not in metric_registry.ESTIMATED:
                raise bad(f"of must be one of {', '.join(metric_registry.ESTIMATED)} for "
                          "estimation_error", self.field("of"))
            params["of"] = of.name
        if "calibration" in metric.payloads:
            cal = _single(payload.get("calibration"), self.field("calibration")) or "none"
            if cal not in metric_registry.CALIBRATIONS:
                raise bad(f"calibration must be one of {', '.join(metric_registry.CALIBRATIONS)}",
                          self.field("calibration"))
            if cal != "none":
                params["calibration"] = cal
        if "method" in metric.payloads:
            method = _single(payload.get("method"), self.field("method")) or "exact"
            if method not in metric_registry.METHODS:
                raise bad(f"method must be one of {', '.join(metric_registry.METHODS)}",
                          self.field("method"))
            if method != "exact":
                params["method"] = method
        if "quantile" in metric.payloads:
            q = _single(payload.get("quantile"), self.field("quantile"))
            try:
                q = 0.5 if q in (None, "") else float(q)
            except (TypeError, ValueError):
                raise bad("quantile must be a number in (0, 1)", self.field("quantile")) from None
            if not 0.0 < q < 1.0:
                raise bad("quantile must be in (0, 1)", self.field("quantile"))
            params["quantile"] = q
        return tuple(sorted(params.items()))

    def as_of(self, payload: dict) -> dict:
        """``as_of``: latest (default: every label known now), ``point`` (each point with the
        feedback whose ts is at most the point's time, plus ``lag`` such as 6h) or a fixed
        time (ISO-8601 or epoch ms): params ``as_of`` = "point" or epoch seconds, ``lag`` s."""
        raw = _single(payload.get("as_of"), self.field("as_of"))
        lag_text = _single(payload.get("lag"), self.field("lag"))
        if raw in (None, "", "latest"):
            if lag_text not in (None, ""):
                raise bad("lag needs as_of=point", self.field("lag"))
            return {}
        if raw == "point":
            out: dict = {"as_of": "point"}
            if lag_text not in (None, "", "0"):
                try:
                    out["lag"] = windows.parse_window(str(lag_text)).seconds
                except windows.WindowError:
                    raise bad(f"lag {str(lag_text)[:40]!r} is not a duration such as 6h or 2d",
                              self.field("lag")) from None
            return out
        if lag_text not in (None, ""):
            raise bad("lag needs as_of=point", self.field("lag"))
        try:
            return {"as_of": windows.parse_time(raw, self.field("as_of"))}
        except windows.WindowError:
            raise bad("as_of must be latest, point, or a time (ISO-8601 or epoch milliseconds) "
                      "between 1900 and 2200", self.field("as_of")) from None

    def column(self, model: store.Model, segsets: dict, metric: metric_registry.Metric,
               value) -> engine.Column:
        """``score``, a feature name or a segment key (``feature:``/``segment:`` to disambiguate)."""
        name = str(_single(value, self.field("column")) or "score")
        features = set(store.feature_names(self.conn, model))
        segment_keys = {k for seg in segsets.values() for k in seg}
        if name == "score":
            col = engine.Column("score", "score")
        elif name.startswith("feature:") and name[8:] in features:
            col = engine.Column(name[8:], "feature")
        elif name.startswith("segment:") and name[8:] in segment_keys:
            col = engine.Column(name[8:], "segment")
        elif name in features:
            col = engine.Column(name, "feature")
        elif name in segment_keys:
            col = engine.Column(name, "segment")
        else:
            raise bad(f"unknown column {name[:80]!r} for {model.name}: use score, a feature or a "
                      "segment key", self.field("column"))
        if not col.numeric and metric.name in metric_registry.NUMERIC_ONLY:
            raise bad(f"{metric.name} needs a numeric column; {col.name} is a segment",
                      self.field("column"))
        if col.numeric and metric.name in metric_registry.CATEGORICAL_ONLY:
            raise bad(f"{metric.name} needs a segment column; {col.name} is numeric",
                      self.field("column"))
        return col

    def reference(self, q: engine.Query, col: engine.Column, spec: str):
        """A column's reference sample: a stored reference by name, or a time range 'from/to'."""
        where = self.field("reference")
        if "/" in spec:
            a, _, b = spec.partition("/")
            try:
                lo = windows.parse_time(_number_or_text(a), "from")
                hi = windows.parse_time(_number_or_text(b), "to")
            except windows.WindowError:
                raise bad("reference must be a stored reference name or a time range 'from/to'",
                          where) from None
            if hi <= lo:
                raise bad("reference range must end after it starts", where)
            values = engine.column_values(self.conn, q, col, lo, hi)
            if len(values) == 0:
                raise bad(f"reference range {spec[:80]} has no data for {col.name}", where)
            return values
        values = store.reference_column(self.conn, q.model, spec, col.name)
        if values is None:
            raise bad(f"reference {spec[:40]!r} of {q.model.name} has no column {col.name!r}"
                      " (the loader stores 'training')", where)
        if col.numeric:
            if isinstance(values, list):
                raise bad(f"reference column {col.name!r} is categorical", where)
            values = values[~np.isnan(values)]
        return values

    def group_by(self, value) -> str | None:
        value = _single(value, self.field("group_by"))
        if value in (None, "", "none", "None", "$__all", "model"):
            return None  # "model": every model is its own series already
        if not isinstance(value, str) or len(value) > 64:
            raise bad("group_by must be a segment key", self.field("group_by"))
        return value

    def query(self, t: Target, metric: metric_registry.Metric, model: store.Model,
              filters: list[Filter]) -> engine.Query:
        """The engine query for one model of a target."""
        try:
            window = windows.parse_window(_single(t.window, self.field("window")),
                                          _single(t.mode, self.field("mode")))
        except windows.WindowError as e:
            raise bad(str(e), self.field("window")) from None
        if model.task not in metric.tasks:
            raise bad(f"metric {metric.name} does not apply to {model.name} ({model.task})",
                      self.field("metric") if self.prefix == "" else "target")
        segsets = store.segment_sets(self.conn, model.model_id)
        segset_ids = (tuple(sorted(sid for sid, seg in segsets.items()
                                   if all(f.matches(seg) for f in filters)))
                      if filters else None)
        q = engine.Query(model, metric, window, self.threshold(t.threshold, model),
                         segset_ids, self.group_by(t.group_by), segsets,
                         self.metric_params(metric, t.params))
        if "column" in metric.payloads:
            col = self.column(model, segsets, metric, t.params.get("column"))
            q = replace(q, column=col,
                        params=tuple(sorted({**q.param_dict, "column": f"{col.kind}:{col.name}"}.items())))
            if metric.kind == "drift":
                q = replace(q, reference=self.reference(q, col, q.param_dict["reference"]))
        if metric.name == "estimation_error":
            q = replace(q, metric=metric_registry.estimation_error(q.param_dict["of"]))
        if q.param_dict.get("calibration") == "isotonic":
            q = replace(q, reference=self.calibrator(q, q.param_dict["reference"]))
        return q

    def calibrator(self, q: engine.Query, spec: str) -> np.ndarray:
        """The calibrated probability of each score bin, fitted on a stored reference's
        ``score`` and ``label`` columns, or on a labeled time range 'from/to' of the model's own
        predictions (read from the score bins at 5-minute bounds, rounded down)."""
        if store.grid_bin(q.threshold) is None:
            raise bad("calibration=isotonic needs a threshold on the 0.01 grid (e.g. 0.5, 0.37)",
                      self.field("threshold"))
        where = self.field("reference")
        if "/" in spec:
            a, _, b = spec.partition("/")
            try:
                lo = windows.parse_time(_number_or_text(a), "from")
                hi = windows.parse_time(_number_or_text(b), "to")
            except windows.WindowError:
                raise bad("reference must be a stored reference name or a time range 'from/to'",
                          where) from None
            base = store.BIN_BASE_S
            lo, hi = int(lo) // base * base, int(hi) // base * base
            if hi <= lo:
                raise bad("reference range must end after it starts", where)
            bins = store.score_bins_by_bucket(self.conn, q.model, g_s=store.ALL_TIME_S, lo_s=lo,
                                              hi_s=hi, segset_ids=None, by_segset=False)
            pos = np.zeros(store.N_BINS)
            neg = np.zeros(store.N_BINS)
            np.add.at(pos, bins["bin"].to_numpy(np.int64), bins["pos"].to_numpy())
            np.add.at(neg, bins["bin"].to_numpy(np.int64), bins["neg"].to_numpy())
            if pos.sum() + neg.sum() == 0:
                raise bad(f"reference range {spec[:80]} has no labeled predictions", where)
            return calibration.isotonic_from_bins(pos, neg)
        scores = store.reference_column(self.conn, q.model, spec, "score")
        labels = store.reference_column(self.conn, q.model, spec, "label")
        if not isinstance(scores, np.ndarray) or not isinstance(labels, np.ndarray):
            raise bad(f"reference {spec[:40]!r} of {q.model.name} needs numeric 'score' and 'label'"
                      " columns to calibrate (or give a labeled time range 'from/to')", where)
        if len(scores) != len(labels) or len(scores) == 0:
            raise bad(f"reference {spec[:40]!r}: 'score' and 'label' must have the same, non-zero"
                      " length", where)
        if not np.all(np.isin(labels, (0.0, 1.0))) or not np.all((scores >= 0) & (scores <= 1)):
            raise bad(f"reference {spec[:40]!r}: labels must be 0/1 and scores in [0, 1]", where)
        return calibration.isotonic_from_rows(scores, labels)


def _number_or_text(v: str):
    v = v.strip()
    return int(v) if v.isdigit() else v


def metric_of(name) -> metric_registry.Metric:
    try:
        return metric_registry.get(name)
    except metric_registry.MetricError as e:
        raise bad(str(e), "target") from None


# ----------------------------------------------------------------------- running


class Service:
    """Answers targets over one time range; one per request (it holds the budget and the memo)."""

    def __init__(self, pool, settings, prefix: str = ""):
        self.pool = pool
        self.budget_s = settings.statement_timeout_ms / 1000.0
        self.deadline = self._new_deadline()  # renewed once run() has its connection
        self.prefix = prefix

    def _new_deadline(self) -> disconnect.Deadline:
        """A float the engine compares with time.monotonic(); it also passes when the client
        goes away (disconnect.Deadline), with no budget only then."""
        return disconnect.Deadline(time.monotonic() + self.budget_s if self.budget_s > 0 else math.inf)

    def run(self, targets: list[Target], rng: TimeRange, filters: list[Filter]) -> list:
        if len(targets) > windows.MAX_TARGETS:  # before anything is resolved or read
            raise bad(f"{len(targets)} targets exceed {windows.MAX_TARGETS} per request",
                      "targets", status=413)
        known = [metric_registry.REGISTRY[t.metric] for t in targets
                 if isinstance(t.metric, str) and t.metric in metric_registry.REGISTRY]
        memo = engine.RequestMemo.for_metrics(known)
        out: list = []
        with self.pool.connection() as conn:
            # The budget is for the work: time spent waiting for a read connection (bounded by
            # db.POOL_WAIT_S) is not. The watch ends before the pool takes the connection
            # back: no cancel can reach it there.
            self.deadline = self._new_deadline()
            with disconnect.watch(disconnect.request_socket(), lambda: self._client_gone(conn)):
                resolver = Resolver(conn, self.prefix)
                try:
                    for i, t in enumerate(targets):
                        self._bound_statements(conn, first=i == 0)
                        out.extend(self._answer(conn, resolver, t, rng, filters, memo))
                except (engine.ComputeTimeout, psycopg2.Error):
                    if self.deadline.cancelled:
                        raise disconnect.ClientGone() from None
                    raise
        return out

    def _client_gone(self, conn) -> None:
        """On the watcher thread: the engine's next deadline check fails, and the statement
        running now is cancelled (psycopg2's cancel is safe from another thread)."""
        self.deadline.cancel()
        conn.cancel()

    def _bound_statements(self, conn, first: bool) -> None:
        """One deadline for the whole request: no statement of a target may outlive it
        (SET LOCAL ends with the request's transaction), and no target after the first starts
        past it (the first always runs, bounded by what is left: a budget too small for one
        statement is then the database's timeout)."""
        if self.deadline.cancelled:
            raise disconnect.ClientGone()
        if math.isinf(self.deadline):
            return
        remaining_ms = int((self.deadline - time.monotonic()) * 1000)
        if remaining_ms <= 0 and not first:
            raise engine.ComputeTimeout("the request ran past its time budget")
        with conn.cursor() as cur:
            cur.execute("SET LOCAL statement_timeout = %s", (max(remaining_ms, 1),))

    def _answer(self, conn, resolver: Resolver, t: Target, rng: TimeRange, filters,
                memo: engine.RequestMemo) -> list:
        if t.metric == ANNOTATIONS:
            return [events(conn, resolver, t, rng)]
        metric = metric_of(t.metric)
        models = resolver.models(t.model)
        out: list = []
        for model in models:
            q = resolver.query(t, metric, model, filters)
            self._check_cost(q, rng, len(models), resolver)
            if metric.kind == "table" or q.param_dict.get("format") == "table":
                columns, rows = _table(conn, resolver, q, rng)
                out.append(TableResult(t.ref_id, metric.name, model.name, columns, rows))
                continue
            if metric.kind == "histogram":
                for s in engine.histogram_series(conn, q, rng.points, rng.step, rng.from_s, rng.to_s,
                                                   self.deadline):
                    out.append(SeriesResult(t.ref_id, metric, model.name, s, s.name))
                continue
            try:
                result = engine.series(conn, q, rng.points, rng.step, self.deadline, memo,
                                       end_at_data=True)
            except engine.QueryError as e:
                raise bad(str(e), resolver.field("window")) from None
            except (engine.ComputeTimeout, psycopg2.Error):
                raise  # the budget or the database: the whole request, never a user-metric error
            except Exception as e:  # a user's metric function failed: this target only
                if metric.source == "builtin":
                    raise
                msg = f"{metric.name} failed: {type(e).__name__}: {e}"[:300]
                out.append(FailedTarget(t.ref_id, metric.name, msg))
                continue
            for s in result:
                name = f"{model.name} {metric.name}" if len(models) > 1 else metric.name
                if q.group_by:
                    name += f" {q.group_by}={s.name}"
                out.append(SeriesResult(t.ref_id, metric, model.name, s, name, q.group_by,
                                        len(models) > 1))
        return out


    @staticmethod
    def _check_cost(q: engine.Query, rng: TimeRange, n_models: int, resolver: Resolver) -> None:
        """Points x series and the bucket grid, refused before any array is allocated."""
        groups = engine.TOP_GROUPS + 1 if q.group_by else 1
        if q.metric.kind == "histogram":
            groups = q.param_dict.get("bins") or distributions.MAX_BINS
        try:
            windows.check_cost(rng.from_s, rng.to_s, rng.step, q.window,
                               series_per_target=n_models * groups)
        except windows.WindowError as e:
            raise bad(str(e), resolver.field("window")) from None


def _table(conn, resolver: Resolver, q: engine.Query, rng: TimeRange) -> tuple[list, list]:
    if q.metric.name == "histogram":
        return engine.histogram_table(conn, q, rng.from_s, rng.to_s)
    if q.metric.name == "drift_ranking":
        spec = q.param_dict["reference"]
        pairs = []
        for col in _drift_candidates(conn, q):
            try:
                pairs.append((col, resolver.reference(q, col, spec)))
            except ClientError:
                if "/" in spec and col.kind == "score":
                    raise
                continue  # this column has no reference: not ranked
        if not pairs:
            raise bad(f"reference {spec[:40]!r} has no columns for {q.model.name}",
                      resolver.field("reference"))
        return engine.drift_table(conn, q, rng.from_s, rng.to_s, pairs)
    return engine.table(conn, q, rng.from_s, rng.to_s)


def _drift_candidates(conn, q: engine.Query) -> list[engine.Column]:
    """What a drift ranking compares: the score, every feature, every segment key."""
    out = [engine.Column("score", "score")]
    out += [engine.Column(f, "feature") for f in store.feature_names(conn, q.model)]
    out += [engine.Column(k, "segment") for k in sorted({k for seg in q.segsets.values() for k in seg})]
    return out


def events(conn, resolver: Resolver, t: Target, rng: TimeRange) -> TableResult:
    """Model events (training runs…) in the range, as an annotation table."""
    models = (resolver.models(t.model) if t.model not in (None, "", [])
              else store.list_models(conn))
    found = store.list_events(conn, [m.model_id for m in models],
                              datetime.fromtimestamp(rng.from_s, UTC),
                              datetime.fromtimestamp(rng.to_s, UTC))
    rows = []
    for ts, time_end, title, text, tags, model_name in found:
        ms = int(ts.timestamp() * 1000)
        rows.append([ms, int(time_end.timestamp() * 1000) if time_end else ms, title,
                     f"{model_name}: {text}" if text else model_name, ",".join(tags), model_name])
    return TableResult(t.ref_id, ANNOTATIONS, None, EVENT_COLUMNS, rows)


# ----------------------------------------------------------------------- discovery


def health(pool) -> bool:
    """Whether the database answers."""
    try:
        with pool.connection() as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")
    except Exception:
        return False
    return True


class Catalog:
    """What dropdowns and variables list: models, metrics, columns, segments, references."""

    def __init__(self, conn):
        self.conn = conn

    def models(self, names=None) -> list[store.Model]:
        if names in (None, "", []):
            return store.list_models(self.conn)
        return [m for m in (store.get_model(self.conn, str(n)) for n in
                            (names if isinstance(names, list) else [names])) if m]

    def model_names(self) -> list[str]:
        return [m.name for m in store.list_models(self.conn)]

    def task_of(self, names) -> str | None:
        found = self.models(names) if names not in (None, "", []) else []
        return found[0].task if found else None

    def segment_keys(self, names=None) -> list[str]:
        keys: set[str] = set()
        for model in self.models(names):
            for seg in store.segment_sets(self.conn, model.model_id).values():
                keys.update(seg)
        return sorted(keys)

    def segment_values(self, names, key: str) -> list[str]:
        values: set[str] = set()
        for model in self.models(names):
            for seg in store.segment_sets(self.conn, model.model_id).values():
                if key in seg:
                    values.add(seg[key])
        return sorted(values)

    def feature_names(self, names=None) -> list[str]:
        return sorted({f for m in self.models(names) for f in store.feature_names(self.conn, m)})

    def reference_names(self, names=None) -> list[str]:
        return sorted({r for m in self.models(names) for r in store.reference_names(self.conn, m)}
                      | {"training"})

    def series_metrics(self, names=None) -> list[metric_registry.Metric]:
        """Built-in metrics that draw as one time series of the default column, for the model's task.

        Tables, histograms and segment-only tests are chosen in their own panels.
        """
        task = self.task_of(names) if names else None
        return [m for m in metric_registry.REGISTRY.values()
                if m.kind not in ("table", "histogram") and (task is None or task in m.tasks)
                and m.source == "builtin" and m.name not in metric_registry.CATEGORICAL_ONLY]


VARIABLES = ("models", "metrics", "windows", "modes", "columns", "features", "segment_keys",
             "group_by", "segment_values")


def variable_items(catalog: Catalog, kind: str, model=None, key=None) -> list[tuple[str, str]]:
    """(text, value) pairs of a dashboard variable; None when ``kind`` is not one of VARIABLES."""
    if kind == "models":
        return [(n, n) for n in catalog.model_names()]
    if kind == "metrics":
        return [(m.label, m.name) for m in catalog.series_metrics(model)]
    if kind == "windows":
        return [(w, w) for w in windows.WINDOW_CHOICES]
    if kind == "modes":
        return [(m, m) for m in windows.MODES]
    if kind in ("columns", "features"):
        items = [("score", "score")] if kind == "columns" else []
        return items + [(f, f) for f in catalog.feature_names(model)]
    if kind in ("segment_keys", "group_by"):
        items = [("none", "none")] if kind == "group_by" else []
        return items + [(k, k) for k in catalog.segment_keys(model)]
    if kind == "segment_values":
        if not key:
            raise bad("segment_values needs a key", "key")
        return [(v, v) for v in catalog.segment_values(model, key)]
    return None


# ----------------------------------------------------------------------- the exporter's reads

Model = store.Model  # the model a route is handed (name, task, threshold, is_classifier)


def rollup_bucket_s() -> int:
    """The rollup's bucket width in seconds: windows ending on its multiples read the rollup."""
    return store.ROLLUP_BUCKET_S


def latest_prediction_ts(conn, model: store.Model) -> datetime | None:
    """The time of the model's latest stored prediction (None before the first)."""
    return store.latest_prediction_ts(conn, model)


def totals(conn, model: store.Model, columns) -> dict[str, float]:
    """All-time sums of declared partials (``n_pred``, ``tp``…) over every segment, at the
    model's threshold: one aggregate over the rollup, whatever the number of predictions."""
    return store.rollup_totals(conn, model, tuple(columns))


def retention(conn, model: store.Model) -> dict:
    """What retention dropped for a model, and the late labels it counted instead of storing."""
    return store.retention_status(conn, model.model_id)
