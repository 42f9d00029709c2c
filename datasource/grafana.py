"""Grafana's JSON datasource protocol (plugin simpod-json-datasource 0.6.x).

Routes parse what the plugin sends (code-mode and builder-mode payloads,
regex-escaped or multi-value variables, ad hoc filters), call the engine and
shape its answer; they hold no SQL and no metric logic.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import replace
from datetime import UTC, datetime

import numpy as np
from flask import Blueprint, current_app, jsonify, request

from datasource import engine, store, windows
from datasource import metrics as metric_registry
from datasource.records import BatchError

bp = Blueprint("grafana", __name__)

ANNOTATION_TARGETS = ("annotations", "events")
_REGEX_ESCAPED = re.compile(r"\\([\\^$*+?.()|\[\]{}/])")
_VAR_REF = re.compile(r"^\$(\w+)$|^\$\{(\w+)(?::[\w:]+)?\}$|^\[\[(\w+)\]\]$")
_FILTER_OPS = ("=", "!=", "=~", "!~")


def _pool():
    return current_app.extensions["pool"]


def _body() -> dict:
    raw = request.get_data(cache=False)
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BatchError(f"request body is not valid JSON: {getattr(e, 'msg', str(e))}") from None
    if not isinstance(body, dict):
        raise BatchError("request body must be a JSON object")
    return body


def _bad(message: str, field: str | None = None) -> BatchError:
    errors = [{"index": None, "field": field, "message": message}] if field else None
    return BatchError(message, errors)


# ----------------------------------------------------------------------- variable values


def _regex_escape(text: str) -> str:
    return re.sub(r"([\\^$*+?.()|\[\]{}/])", r"\\\1", text)


def scoped_forms(scoped: dict) -> dict[str, object]:
    """How each dashboard variable's value can arrive after the plugin interpolated it.

    Maps the regex-escaped form (``0\\.5``, ``(a|b)``) and the JSON form of each
    value in ``scopedVars`` back to the value itself, so that values are read
    from scopedVars first and only then unescaped by rule.
    """
    forms: dict[str, object] = {}
    for name, var in scoped.items():
        if not isinstance(var, dict) or name.startswith("__"):
            continue
        value = var.get("value")
        if isinstance(value, str):
            forms[_regex_escape(value)] = value
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            forms["(" + "|".join(_regex_escape(v) for v in value) + ")"] = list(value)
            forms[json.dumps(value)] = list(value)
    return forms


def resolve_value(value, scoped: dict, forms: dict | None = None):
    """A payload value as the user meant it.

    Leftover ``$var`` references and interpolated forms of dashboard variables
    come from ``scopedVars``; otherwise regex escapes (``0\\.5``) are undone and
    ``(a|b)``, JSON arrays and ``a,b`` become lists.
    """
    if forms is None:
        forms = scoped_forms(scoped) if scoped else {}
    if isinstance(value, str) and value.strip() in forms:
        return forms[value.strip()]
    if isinstance(value, list):
        out = []
        for v in value:
            r = resolve_value(v, scoped, forms)
            out.extend(r if isinstance(r, list) else [r])
        return out
    if not isinstance(value, str):
        return value
    text = value.strip()
    m = _VAR_REF.match(text)
    if m:
        name = next(g for g in m.groups() if g)
        if name in scoped and isinstance(scoped[name], dict):
            return scoped[name].get("value")
    if text.startswith("[") and text.endswith("]"):
        try:
            parsed = json.loads(text)
            if isinstance(parsed, list):
                return [str(v) for v in parsed]
        except json.JSONDecodeError:
            pass
    if text.startswith("(") and text.endswith(")") and "|" in text:
        return [_REGEX_ESCAPED.sub(r"\1", v) for v in re.split(r"(?<!\\)\|", text[1:-1])]
    text = _REGEX_ESCAPED.sub(r"\1", text)
    if "," in text and not text.startswith("{"):
        return [v.strip() for v in text.split(",") if v.strip()]
    return text


def _single(value, field: str):
    if isinstance(value, list):
        if len(value) != 1:
            raise _bad(f"payload.{field} takes one value, got {len(value)}", f"payload.{field}")
        return value[0]
    return value


def _payload(target: dict, scoped: dict) -> dict:
    payload = target.get("payload") or {}
    if isinstance(payload, str):  # a code-mode payload the plugin did not parse
        try:
            payload = json.loads(payload) if payload.strip() else {}
        except json.JSONDecodeError:
            raise _bad("payload is not valid JSON", "payload") from None
    if not isinstance(payload, dict):
        raise _bad("payload must be a JSON object", "payload")
    forms = scoped_forms(scoped)
    return {k: resolve_value(v, scoped, forms) for k, v in payload.items()}


# ----------------------------------------------------------------------- query parsing


def _models(conn, value) -> list[store.Model]:
    names = value if isinstance(value, list) else [value]
    names = [n for n in names if n not in (None, "")]
    if not names:
        all_models = store.list_models(conn)
        if len(all_models) == 1:
            return all_models
        raise _bad("payload.model is required (POST /variable with 'models' lists them)", "payload.model")
    out = []
    for name in names:
        model = store.get_model(conn, str(name))
        if model is None:
            raise _bad(f"unknown model {str(name)[:80]!r}", "payload.model")
        out.append(model)
    return out


def _threshold(value, model: store.Model) -> float | None:
    if not model.is_classifier:
        return None
    value = _single(value, "threshold")
    if value in (None, "", "default"):
        return model.threshold
    try:
        thr = float(value)
    except (TypeError, ValueError):
        raise _bad(f"threshold {str(value)[:40]!r} is not a number", "payload.threshold") from None
    if not 0.0 <= thr <= 1.0:
        raise _bad("threshold must be in [0, 1]", "payload.threshold")
    return thr


MAX_HISTOGRAM_BINS = 1000


def _metric_params(metric: metric_registry.Metric, payload: dict) -> tuple:
    params = {}
    if "bins" in metric.payloads and payload.get("bins") not in (None, "", "auto"):
        bins = _single(payload.get("bins"), "bins")
        try:
            bins = int(str(bins))
        except ValueError:
            raise _bad("bins must be a whole number (or empty for Freedman–Diaconis)", "payload.bins") from None
        if not 1 <= bins <= MAX_HISTOGRAM_BINS:
            raise _bad(f"bins must be between 1 and {MAX_HISTOGRAM_BINS}", "payload.bins")
        params["bins"] = bins
    if "format" in metric.payloads:
        fmt = _single(payload.get("format"), "format") or "heatmap"
        if fmt not in ("heatmap", "table"):
            raise _bad("format must be heatmap or table", "payload.format")
        params["format"] = fmt
    if "reference" in metric.payloads:
        params["reference"] = str(_single(payload.get("reference"), "reference") or "training")
    if "quantile" in metric.payloads:
        q = _single(payload.get("quantile"), "quantile")
        try:
            q = 0.5 if q in (None, "") else float(q)
        except (TypeError, ValueError):
            raise _bad("quantile must be a number in (0, 1)", "payload.quantile") from None
        if not 0.0 < q < 1.0:
            raise _bad("quantile must be in (0, 1)", "payload.quantile")
        params["quantile"] = q
    return tuple(sorted(params.items()))


def _column(conn, model: store.Model, segsets: dict, metric: metric_registry.Metric,
            payload: dict) -> engine.Column:
    """payload.column: ``score``, a feature name or a segment key (``feature:``/``segment:`` to disambiguate)."""
    name = _single(payload.get("column"), "column") or "score"
    name = str(name)
    features = set(store.feature_names(conn, model))
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
        raise _bad(f"unknown column {name[:80]!r} for {model.name}: use score, a feature or a segment key",
                   "payload.column")
    if not col.numeric and metric.name in metric_registry.NUMERIC_ONLY:
        raise _bad(f"{metric.name} needs a numeric column; {col.name} is a segment", "payload.column")
    if col.numeric and metric.name in metric_registry.CATEGORICAL_ONLY:
        raise _bad(f"{metric.name} needs a segment column; {col.name} is numeric", "payload.column")
    return col


def _reference(conn, q: engine.Query, col: engine.Column, spec: str):
    """The reference sample of a column: a stored reference by name, or a time range 'from/to'."""
    if "/" in spec:
        a, _, b = spec.partition("/")
        try:
            lo, hi = windows.parse_time(_number_or_text(a), "from"), windows.parse_time(_number_or_text(b), "to")
        except windows.WindowError:
            raise _bad("reference must be a stored reference name or a time range 'from/to'",
                       "payload.reference") from None
        if hi <= lo:
            raise _bad("reference range must end after it starts", "payload.reference")
        values = engine.column_values(conn, q, col, lo, hi)
        if len(values) == 0:
            raise _bad(f"reference range {spec[:80]} has no data for {col.name}", "payload.reference")
        return values
    values = store.reference_column(conn, q.model, spec, col.name)
    if values is None:
        raise _bad(f"reference {spec[:40]!r} of {q.model.name} has no column {col.name!r}"
                   " (the loader stores 'training')", "payload.reference")
    if col.numeric:
        if isinstance(values, list):
            raise _bad(f"reference column {col.name!r} is categorical", "payload.reference")
        values = values[~np.isnan(values)]
    return values


def _number_or_text(v: str):
    v = v.strip()
    return int(v) if v.isdigit() else v


def _segset_filter(segsets: dict[int, dict], filters: list) -> tuple[int, ...] | None:
    """Ids of the segment sets matching every ad hoc filter (None: no filter)."""
    if not filters:
        return None
    ids = []
    for sid, seg in segsets.items():
        if all(_matches(seg, f) for f in filters):
            ids.append(sid)
    return tuple(sorted(ids))


def _matches(seg: dict, f: tuple) -> bool:
    key, op, value = f
    have = seg.get(key)
    if op == "=":
        return have == value
    if op == "!=":
        return have != value
    hit = have is not None and value.fullmatch(have) is not None
    return hit if op == "=~" else not hit


def _parse_filters(raw) -> list[tuple]:
    if raw in (None, ""):
        return []
    if not isinstance(raw, list):
        raise _bad("filters must be a list of {key, operator, value}", "filters")
    out = []
    for i, f in enumerate(raw):
        if not isinstance(f, dict) or not isinstance(f.get("key"), str):
            raise _bad(f"filters[{i}] must be an object with a string key", "filters")
        op = f.get("operator", "=")
        if op not in _FILTER_OPS:
            raise _bad(f"filters[{i}].operator must be one of {', '.join(_FILTER_OPS)}", "filters")
        value = f.get("value")
        value = "" if value is None else str(value)
        if op in ("=~", "!~"):
            if len(value) > 200:
                raise _bad(f"filters[{i}].value regex is too long", "filters")
            try:
                value = re.compile(value)
            except re.error as e:
                raise _bad(f"filters[{i}].value is not a valid regex: {e}", "filters") from None
        out.append((f["key"], op, value))
    return out


def _group_by(value) -> str | None:
    value = _single(value, "group_by")
    if value in (None, "", "none", "None", "$__all"):
        return None
    if not isinstance(value, str) or len(value) > 64:
        raise _bad("group_by must be a segment key", "payload.group_by")
    return value


# ----------------------------------------------------------------------- responses


def _datapoints(s: engine.Series) -> list:
    times = (s.times_s * 1000).astype(np.int64).tolist()
    return [[None if np.isnan(v) else float(v), t] for v, t in zip(s.values.tolist(), times, strict=True)]


def _series_name(metric: str, model: str, many_models: bool, s: engine.Series, group_by) -> str:
    name = f"{model} {metric}" if many_models else metric
    if group_by:
        name += f" {group_by}={s.name}"
    return name


@bp.get("/")
def health():
    try:
        with _pool().connection() as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")
    except Exception:
        return jsonify({"status": "error", "message": "the database does not answer"}), 503
    return jsonify({"status": "ok", "message": "database answers"})


@bp.post("/query")
def query():
    body = _body()
    targets = body.get("targets") or []
    if not isinstance(targets, list):
        raise _bad("targets must be a list", "targets")
    scoped = body.get("scopedVars") or {}
    if not isinstance(scoped, dict):
        scoped = {}
    rng = body.get("range") or {}
    if not isinstance(rng, dict) or "from" not in rng or "to" not in rng:
        raise _bad("range with from and to is required", "range")
    try:
        from_s = windows.parse_time(rng.get("from"), "from")
        to_s = windows.parse_time(rng.get("to"), "to")
        step = windows.choose_step(from_s, to_s, body.get("intervalMs"), body.get("maxDataPoints"))
    except windows.WindowError as e:
        raise _bad(str(e), "range") from None
    points = windows.grid_points(from_s, to_s, step)
    filters = _parse_filters(body.get("filters") or body.get("adhocFilters"))
    out = []
    budget_s = current_app.extensions["settings"].statement_timeout_ms / 1000.0
    deadline = time.monotonic() + budget_s if budget_s > 0 else None
    memo = engine.RequestMemo.for_metrics(_target_metrics(targets, scoped))
    with _pool().connection() as conn:
        for t in targets:
            if not isinstance(t, dict) or t.get("hide") is True:
                continue
            out.extend(_answer_target(conn, t, scoped, filters, from_s, to_s, step, points,
                                      deadline, memo))
    return jsonify(out)


def _target_metrics(targets: list, scoped: dict) -> list:
    """The known metrics among the visible targets (unknown ones fail later, with a message)."""
    found = []
    for t in targets:
        if isinstance(t, dict) and t.get("hide") is not True:
            name = resolve_value(t.get("target") or "", scoped)
            if isinstance(name, str) and name in metric_registry.REGISTRY:
                found.append(metric_registry.REGISTRY[name])
    return found


def _answer_target(conn, t: dict, scoped: dict, filters, from_s, to_s, step, points,
                   deadline: float | None, memo: engine.RequestMemo) -> list:
    ref = t.get("refId", "A")
    name = resolve_value(t.get("target") or "", scoped)
    name = _single(name, "target") if isinstance(name, list) else name
    payload = _payload(t, scoped)
    if name in ANNOTATION_TARGETS or (not name and ref == "Anno"):
        return [_annotations(conn, payload, from_s, to_s, ref)]
    if not name:
        return []
    try:
        metric = metric_registry.get(name)
    except metric_registry.MetricError as e:
        raise _bad(str(e), "target") from None
    models = _models(conn, payload.get("model"))
    try:
        window = windows.parse_window(_single(payload.get("window"), "window"))
        mode = windows.parse_mode(_single(payload.get("mode"), "mode"))
    except windows.WindowError as e:
        raise _bad(str(e), "payload.window") from None
    group_by = _group_by(payload.get("group_by"))
    params = _metric_params(metric, payload)
    out = []
    for model in models:
        if model.task not in metric.tasks:
            raise _bad(f"metric {metric.name} does not apply to {model.name} ({model.task})", "target")
        segsets = store.segment_sets(conn, model.model_id)
        q = engine.Query(model, metric, window, mode, _threshold(payload.get("threshold"), model),
                         _segset_filter(segsets, filters), group_by, segsets, params)
        if "column" in metric.payloads:
            col = _column(conn, model, segsets, metric, payload)
            q = replace(q, column=col, params=tuple(sorted({**q.param_dict, "column": f"{col.kind}:{col.name}"}.items())))
            if metric.kind == "drift":
                q = replace(q, reference=_reference(conn, q, col, q.param_dict["reference"]))
        if metric.kind == "table" or q.param_dict.get("format") == "table":
            columns, rows = _table(conn, q, from_s, to_s, segsets)
            out.append({"type": "table", "refId": ref, "columns": columns, "rows": rows})
            continue
        if metric.kind == "histogram":
            for s in engine.histogram_series(conn, q, points, step, from_s, to_s):
                out.append({"target": s.name, "refId": ref, "datapoints": _datapoints(s)})
            continue
        try:
            result = engine.series(conn, q, points, step, deadline, memo)
        except engine.QueryError as e:
            raise _bad(str(e), "payload.window") from None
        except engine.ComputeTimeout:
            raise
        except Exception as e:  # a user's metric function failed: this target only
            if metric.source == "builtin":
                raise
            current_app.logger.warning("metric %s failed: %s", metric.name, e)
            msg = f"{metric.name} failed: {type(e).__name__}: {e}"[:300]
            out.append({"target": f"{metric.name}: {msg}", "refId": ref, "datapoints": [],
                        "error": msg, "meta": {"notices": [{"severity": "error", "text": msg}]}})
            continue
        for s in result:
            name = _series_name(metric.name, model.name, len(models) > 1, s, group_by)
            item = {"target": name, "refId": ref, "datapoints": _datapoints(s), "unit": metric.unit}
            tags = {**s.tags, **({"model": model.name} if len(models) > 1 else {})}
            if tags:
                # title: Grafana's display name, which would otherwise repeat the labels
                item.update(tags=tags, title=name)
            out.append(item)
    return out


def _table(conn, q: engine.Query, from_s: float, to_s: float, segsets: dict) -> tuple[list, list]:
    if q.metric.name == "histogram":
        return engine.histogram_table(conn, q, from_s, to_s)
    if q.metric.name == "drift_ranking":
        spec = q.param_dict["reference"]
        candidates = [engine.Column("score", "score")]
        candidates += [engine.Column(f, "feature") for f in store.feature_names(conn, q.model)]
        candidates += [engine.Column(k, "segment") for k in sorted({k for seg in segsets.values() for k in seg})]
        pairs = []
        for col in candidates:
            try:
                pairs.append((col, _reference(conn, q, col, spec)))
            except BatchError:
                if "/" in spec and col.kind == "score":
                    raise
                continue  # this column has no reference: not ranked
        if not pairs:
            raise _bad(f"reference {spec[:40]!r} has no columns for {q.model.name}", "payload.reference")
        return engine.drift_table(conn, q, from_s, to_s, pairs)
    return engine.table(conn, q, from_s, to_s)


def _annotations(conn, payload: dict, from_s: float, to_s: float, ref: str) -> dict:
    model_value = payload.get("model")
    models = _models(conn, model_value) if model_value not in (None, "") else store.list_models(conn)
    events = store.list_events(conn, [m.model_id for m in models],
                               datetime.fromtimestamp(from_s, UTC), datetime.fromtimestamp(to_s, UTC))
    rows = []
    for ts, time_end, title, text, tags, model_name in events:
        ms = int(ts.timestamp() * 1000)
        rows.append([ms, int(time_end.timestamp() * 1000) if time_end else ms, title,
                     f"{model_name}: {text}" if text else model_name, ",".join(tags)])
    return {"type": "table", "refId": ref,
            "columns": [{"text": "time", "type": "time"}, {"text": "timeEnd", "type": "time"},
                        {"text": "title", "type": "string"}, {"text": "text", "type": "string"},
                        {"text": "tags", "type": "string"}],
            "rows": rows}


# ----------------------------------------------------------------------- discovery


def _payload_fields(metric: metric_registry.Metric) -> list[dict]:
    fields = [
        {"name": "model", "label": "Model", "type": "select", "width": 24, "reloadMetric": True},
        {"name": "window", "label": "Window", "type": "select", "width": 14,
         "options": [{"label": w, "value": w} for w in windows.WINDOW_CHOICES]},
        {"name": "mode", "label": "Mode", "type": "select", "width": 14,
         "options": [{"label": m, "value": m} for m in windows.MODES]},
        {"name": "group_by", "label": "Group by", "type": "select", "width": 20},
    ]
    if metric_registry.CLF in metric.tasks and metric.uses_threshold:
        fields.insert(3, {"name": "threshold", "label": "Threshold", "type": "input", "width": 10,
                          "placeholder": "model default"})
    if "column" in metric.payloads:
        fields.insert(1, {"name": "column", "label": "Column", "type": "select", "width": 20,
                          "placeholder": "score"})
    if "quantile" in metric.payloads:
        fields.append({"name": "quantile", "label": "Quantile", "type": "input", "width": 10,
                       "placeholder": "0.5"})
    if "reference" in metric.payloads:
        fields.append({"name": "reference", "label": "Reference", "type": "select", "width": 24,
                       "placeholder": "training"})
    if "bins" in metric.payloads:
        fields.append({"name": "bins", "label": "Bins", "type": "input", "width": 10,
                       "placeholder": "auto (Freedman–Diaconis)"})
    if "format" in metric.payloads:
        fields.append({"name": "format", "label": "Format", "type": "select", "width": 12,
                       "options": [{"label": "heatmap", "value": "heatmap"},
                                   {"label": "table", "value": "table"}]})
    if metric.kind in ("table", "histogram"):
        fields = [f for f in fields if f["name"] != "group_by"]
    if metric.kind == "table":
        fields = [f for f in fields if f["name"] not in ("window", "mode")]
    return fields


@bp.post("/metrics")
def list_metrics():
    body = _body()
    payload = body.get("payload") if isinstance(body.get("payload"), dict) else {}
    task = None
    model_name = resolve_value(payload.get("model"), {}) if payload else None
    if isinstance(model_name, str) and model_name:
        with _pool().connection() as conn:
            model = store.get_model(conn, model_name)
        task = model.task if model else None
    out = []
    for m in metric_registry.REGISTRY.values():
        if task and task not in m.tasks:
            continue
        out.append({"value": m.name, "label": m.label, "payloads": _payload_fields(m)})
    out.append({"value": "annotations", "label": "Model events (annotations)",
                "payloads": [{"name": "model", "label": "Model", "type": "select"}]})
    return jsonify(out)


@bp.post("/search")
def search():
    """Legacy endpoint (plugin < 0.6): metric names."""
    return jsonify(list(metric_registry.REGISTRY))


def _segment_keys(conn, model_names) -> list[str]:
    keys: set[str] = set()
    for model in _models_or_all(conn, model_names):
        for seg in store.segment_sets(conn, model.model_id).values():
            keys.update(seg)
    return sorted(keys)


def _segment_values(conn, model_names, key: str) -> list[str]:
    values: set[str] = set()
    for model in _models_or_all(conn, model_names):
        for seg in store.segment_sets(conn, model.model_id).values():
            if key in seg:
                values.add(seg[key])
    return sorted(values)


def _feature_names(conn, model_names) -> list[str]:
    return sorted({f for m in _models_or_all(conn, model_names) for f in store.feature_names(conn, m)})


def _models_or_all(conn, names) -> list[store.Model]:
    if names in (None, "", []):
        return store.list_models(conn)
    return [m for m in (store.get_model(conn, str(n)) for n in
                        (names if isinstance(names, list) else [names])) if m]


@bp.post("/metric-payload-options")
def metric_payload_options():
    body = _body()
    name = body.get("name")
    payload = body.get("payload") if isinstance(body.get("payload"), dict) else {}
    payload = {k: resolve_value(v, {}) for k, v in payload.items()}
    with _pool().connection() as conn:
        if name == "model":
            values = [m.name for m in store.list_models(conn)]
        elif name == "group_by":
            values = ["none", *_segment_keys(conn, payload.get("model"))]
        elif name == "window":
            values = list(windows.WINDOW_CHOICES)
        elif name == "mode":
            values = list(windows.MODES)
        elif name == "column":
            values = ["score", *_feature_names(conn, payload.get("model")),
                      *_segment_keys(conn, payload.get("model"))]
        elif name == "reference":
            values = sorted({r for m in _models_or_all(conn, payload.get("model"))
                             for r in store.reference_names(conn, m)} | {"training"})
        else:
            values = []
    return jsonify([{"label": v, "value": v} for v in values])


def _variable_items(values) -> list[dict]:
    return [{"__text": t, "__value": v, "text": t, "value": v} for t, v in values]


@bp.post("/variable")
def variable():
    body = _body()
    payload = body.get("payload") if isinstance(body.get("payload"), dict) else {}
    target = payload.get("target", "")
    if not isinstance(target, str):
        raise _bad("payload.target must be a string", "payload.target")
    words = resolve_value(target, {}) if target.strip().startswith("[") else target.split()
    words = words if isinstance(words, list) else [words]
    kind = words[0] if words else ""
    args = words[1:]
    model = payload.get("model") or (
        args[0] if kind in ("metrics", "segment_keys", "group_by", "columns", "features") and args else None)
    with _pool().connection() as conn:
        if kind == "models":
            items = [(m.name, m.name) for m in store.list_models(conn)]
        elif kind == "metrics":
            task = None
            if model:
                ms = _models_or_all(conn, model)
                task = ms[0].task if ms else None
            # Time series of the default column: tables, histograms and segment-only tests are
            # chosen in their own panels.
            items = [(m.label, m.name) for m in metric_registry.REGISTRY.values()
                     if m.kind not in ("table", "histogram") and (task is None or task in m.tasks)
                     and m.source == "builtin" and m.name not in metric_registry.CATEGORICAL_ONLY]
        elif kind == "windows":
            items = [(w, w) for w in windows.WINDOW_CHOICES]
        elif kind == "modes":
            items = [(m, m) for m in windows.MODES]
        elif kind in ("columns", "features"):
            items = [("score", "score")] if kind == "columns" else []
            items += [(f, f) for f in _feature_names(conn, model)]
        elif kind in ("segment_keys", "group_by"):
            items = [("none", "none")] if kind == "group_by" else []
            items += [(k, k) for k in _segment_keys(conn, model)]
        elif kind == "segment_values":
            key = payload.get("key") or (args[0] if args else None)
            if not key:
                raise _bad("segment_values needs a key: 'segment_values <key>'", "payload.target")
            model = payload.get("model") or (args[1] if len(args) > 1 else None)
            items = [(v, v) for v in _segment_values(conn, model, key)]
        else:
            raise _bad("payload.target must be one of: models, metrics [model], windows, modes, "
                       "columns [model], features [model], segment_keys [model], group_by [model], "
                       "segment_values <key> [model]",
                       "payload.target")
    return jsonify(_variable_items(items))


@bp.post("/tag-keys")
def tag_keys():
    _body()
    with _pool().connection() as conn:
        return jsonify([{"type": "string", "text": k} for k in _segment_keys(conn, None)])


@bp.post("/tag-values")
def tag_values():
    body = _body()
    key = body.get("key")
    if not isinstance(key, str) or not key:
        raise _bad("key is required", "key")
    with _pool().connection() as conn:
        return jsonify([{"text": v} for v in _segment_values(conn, None, key)])
