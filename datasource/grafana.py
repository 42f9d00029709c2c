"""Grafana's JSON datasource protocol (plugin simpod-json-datasource 0.6.x).

Routes parse what the plugin sends (code-mode and builder-mode payloads,
regex-escaped or multi-value variables, ad hoc filters) into neutral targets,
hand them to the query service (``datasource.query``) and shape its answer in
the plugin's JSON; they hold no SQL, no name resolution and no metric logic.
"""

from __future__ import annotations

import json
import re

import numpy as np
from flask import Blueprint, current_app, jsonify, request

from datasource import browser, engine, http, query, windows
from datasource import metrics as metric_registry
from datasource.errors import ClientError

bp = Blueprint("grafana", __name__)

ANNOTATION_TARGETS = ("annotations", "events")
_REGEX_ESCAPED = re.compile(r"\\([\\^$*+?.()|\[\]{}/])")
_VAR_REF = re.compile(r"^\$(\w+)$|^\$\{(\w+)(?::[\w:]+)?\}$|^\[\[(\w+)\]\]$")


def _pool():
    """Every route here only reads: the read-only role's pool where DATABASE_READ_URL is set."""
    return current_app.extensions.get("read_pool") or current_app.extensions["pool"]


def _body() -> dict:
    """The request's JSON object (the one body parser: application/json only, depth, NUL and
    NaN checked); a blank body is {} as the plugin sends for some calls."""
    return http.json_body(request, expect=dict, empty={})


def _bad(message: str, field: str | None = None) -> ClientError:
    errors = [{"index": None, "field": field, "message": message}] if field else None
    return ClientError(message, errors)


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


# ----------------------------------------------------------------------- responses


def _datapoints(s: engine.Series) -> list:
    """[value, time ms] pairs, NaN as null (``v != v``: np.isnan on each Python float cost
    ~3 us a point, most of a grouped panel's encoding, measured)."""
    times = (s.times_s * 1000).astype(np.int64).tolist()
    values = np.asarray(s.values, np.float64).tolist()
    return [[None if v != v else v, t] for v, t in zip(values, times, strict=True)]


@bp.get("/")
def health():
    """The health check the plugins call; a browser (Accept: text/html) gets the SLI browser."""
    if browser.wants_html(request):
        return browser.page_response()
    if not query.health(_pool()):
        return jsonify({"status": "error", "message": "the database does not answer"}), 503
    return jsonify({"status": "ok", "message": "database answers"})


def _target(t: dict, scoped: dict) -> query.Target | None:
    """A simpod target as a neutral one (None: hidden, or nothing to compute)."""
    if not isinstance(t, dict) or t.get("hide") is True:
        return None
    ref = t.get("refId", "A")
    name = resolve_value(t.get("target") or "", scoped)
    name = _single(name, "target") if isinstance(name, list) else name
    payload = _payload(t, scoped)
    if name in ANNOTATION_TARGETS or (not name and ref == "Anno"):
        return query.Target(query.ANNOTATIONS, ref, model=payload.get("model"))
    if not name:
        return None
    fields = ("model", "window", "mode", "threshold", "group_by")
    return query.Target(name, ref, **{f: payload.get(f) for f in fields},
                        params={k: v for k, v in payload.items() if k not in fields})


@bp.post("/query")
def query_route():
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
    time_range = query.time_range(rng.get("from"), rng.get("to"), body.get("intervalMs"),
                                  body.get("maxDataPoints"))
    filters = query.parse_filters(body.get("filters") or body.get("adhocFilters"))
    neutral = [n for n in (_target(t, scoped) for t in targets) if n is not None]
    service = query.Service(_pool(), current_app.extensions["settings"], prefix="payload.")
    return http.json_response([_simpod(r) for r in service.run(neutral, time_range, filters)])


def _simpod(r) -> dict:
    """A neutral result in the plugin's shapes: timeseries, table, or an errored target."""
    if isinstance(r, query.TableResult):
        if r.metric == query.ANNOTATIONS:  # the plugin's annotation table has no model column
            return {"type": "table", "refId": r.ref_id, "columns": r.columns[:5],
                    "rows": [row[:5] for row in r.rows]}
        return {"type": "table", "refId": r.ref_id, "columns": r.columns, "rows": r.rows}
    if isinstance(r, query.FailedTarget):
        current_app.logger.warning("metric %s failed: %s", r.metric, r.message)
        return {"target": f"{r.metric}: {r.message}", "refId": r.ref_id, "datapoints": [],
                "error": r.message, "meta": {"notices": [{"severity": "error", "text": r.message}]}}
    item = {"target": r.name, "refId": r.ref_id, "datapoints": _datapoints(r.series)}
    if r.metric.kind == "histogram":
        return item
    item["unit"] = r.metric.unit
    tags = {**r.series.tags, **({"model": r.model} if r.many_models else {})}
    if tags:
        # title: Grafana's display name, which would otherwise repeat the labels
        item.update(tags=tags, title=r.name)
    return item


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
    if metric.kind in ("partial", "raw") and not metric.name.startswith("estimated_"):
        fields.append({"name": "as_of", "label": "As of", "type": "input", "width": 14,
                       "placeholder": "latest | point | a time"})
    if "calibration" in metric.payloads:
        fields.append({"name": "calibration", "label": "Calibration", "type": "select", "width": 12,
                       "options": [{"label": c, "value": c} for c in metric_registry.CALIBRATIONS]})
    if "of" in metric.payloads:
        fields.append({"name": "of", "label": "SLI", "type": "input", "width": 14,
                       "placeholder": "accuracy"})
    if "method" in metric.payloads:
        fields.append({"name": "method", "label": "Method", "type": "select", "width": 12,
                       "options": [{"label": m, "value": m} for m in metric_registry.METHODS]})
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
            task = query.Catalog(conn).task_of(model_name)
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


@bp.post("/metric-payload-options")
def metric_payload_options():
    body = _body()
    name = body.get("name")
    payload = body.get("payload") if isinstance(body.get("payload"), dict) else {}
    payload = {k: resolve_value(v, {}) for k, v in payload.items()}
    model = payload.get("model")
    with _pool().connection() as conn:
        catalog = query.Catalog(conn)
        if name == "model":
            values = catalog.model_names()
        elif name == "group_by":
            values = ["none", *catalog.segment_keys(model)]
        elif name == "window":
            values = list(windows.WINDOW_CHOICES)
        elif name == "mode":
            values = list(windows.MODES)
        elif name == "column":
            values = ["score", *catalog.feature_names(model), *catalog.segment_keys(model)]
        elif name == "reference":
            values = catalog.reference_names(model)
        else:
            values = []
    return jsonify([{"label": v, "value": v} for v in values])


def _variable_items(values) -> list[dict]:
    return [{"__text": t, "__value": v, "text": t, "value": v} for t, v in values]


_VARIABLE_HELP = ("payload.target must be one of: models, metrics [model], windows, modes, "
                  "columns [model], features [model], segment_keys [model], group_by [model], "
                  "segment_values <key> [model]")


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
    if kind == "segment_values":
        key = payload.get("key") or (args[0] if args else None)
        if not key:
            raise _bad("segment_values needs a key: 'segment_values <key>'", "payload.target")
        model = payload.get("model") or (args[1] if len(args) > 1 else None)
    else:
        key = None
        model = payload.get("model") or (args[0] if args else None)
    with _pool().connection() as conn:
        items = query.variable_items(query.Catalog(conn), kind, model, key)
    if items is None:
        raise _bad(_VARIABLE_HELP, "payload.target")
    return jsonify(_variable_items(items))


@bp.post("/tag-keys")
def tag_keys():
    _body()
    with _pool().connection() as conn:
        return jsonify([{"type": "string", "text": k} for k in query.Catalog(conn).segment_keys()])


@bp.post("/tag-values")
def tag_values():
    body = _body()
    key = body.get("key")
    if not isinstance(key, str) or not key:
        raise _bad("key is required", "key")
    with _pool().connection() as conn:
        return jsonify([{"text": v} for v in query.Catalog(conn).segment_values(None, key)])
