"""The flat endpoints: ``GET /api/v1/series`` and ``GET /api/v1/variables/<name>``.

Made for Grafana's Infinity datasource (backend parser, so alert rules can use
it) and for anyone with curl: query parameters in, a JSON array (or CSV) of
flat rows out, one row per point. Rows are sorted by time across the whole
answer, then by series, and every label is a string column: Infinity's
long-to-wide step turns each label set into one series, and Grafana's Math
expressions join alert queries on them. The values come from the same query
service as ``POST /query``, so the two protocols give the same numbers.
"""

from __future__ import annotations

import csv
import functools
import io
import math
import time
from importlib import resources

import numpy as np
from flask import Blueprint, Response, current_app, jsonify, request

from datasource import http, query, windows

bp = Blueprint("series", __name__, url_prefix="/api/v1")

DEFAULT_RANGE_S = 6 * 3600
DEFAULT_MAX_POINTS = 1000
_TARGET_PARAMS = ("model", "metric", "window", "mode", "threshold", "group_by", "filter", "from",
                  "to", "step", "max_points", "format")
_FILTER_OPS = ("!=", "!~", "=~", "=")  # longest first: 'a!=b' is not 'a!' = 'b'


def _read_pool():
    return current_app.extensions.get("read_pool") or current_app.extensions["pool"]


def _bad(message: str, field: str) -> Exception:
    return query.bad(message, field)


def _values(name: str) -> list[str]:
    """A repeatable parameter, each value also split on commas (``${model:csv}``)."""
    out = []
    for v in request.args.getlist(name):
        out.extend(p.strip() for p in v.split(",") if p.strip())
    return out


def _time(name: str, default: float) -> object:
    """``from``/``to``: epoch ms (``${__from}``) or ISO-8601; the query service parses them."""
    value = request.args.get(name, "").strip()
    if not value:
        return default * 1000.0
    try:
        number = float(value)
    except ValueError:
        return value
    if not math.isfinite(number):
        raise _bad(f"{name} must be epoch milliseconds or ISO-8601", name)
    return number


def _step_ms() -> float | None:
    """``step``: ``5m``-style or milliseconds; anything else (a literal ``$__interval_ms``
    sent by an alert rule) means auto."""
    value = request.args.get("step", "").strip()
    if not value:
        return None
    try:
        ms = float(value)
    except ValueError:
        try:
            w = windows.parse_window(value)
        except windows.WindowError:
            return None
        return None if w.cumulative else w.seconds * 1000.0
    if not math.isfinite(ms) or ms <= 0:
        raise _bad("step must be a positive number of milliseconds or a duration such as 5m", "step")
    return ms


def _filters() -> list[query.Filter]:
    out = []
    for i, text in enumerate(request.args.getlist("filter")):
        if not text.strip():
            continue  # an empty textbox variable: no filter
        for op in _FILTER_OPS:
            key, sep, value = text.partition(op)
            if sep and key.strip():
                out.append(query.make_filter(key.strip(), op, value, f"filter[{i}]"))
                break
        else:
            raise _bad(f"filter[{i}] must be key=value, key!=value, key=~regex or key!~regex",
                       "filter")
    return out


def _target() -> query.Target:
    metric = request.args.get("metric", "").strip()
    if not metric:
        raise _bad("metric is required (GET /api/v1/variables/metrics lists them)", "metric")
    params = {k: v for k, v in request.args.items() if k not in _TARGET_PARAMS}
    if request.args.get("format") == "table":
        params["format"] = "table"
    models = _values("model")
    return query.Target(metric, "A", model=models or None, window=request.args.get("window"),
                        mode=request.args.get("mode"), threshold=request.args.get("threshold"),
                        group_by=request.args.get("group_by"), params=params)


def _rows(results: list) -> tuple[list[dict], list[str]]:
    """Flat rows sorted by time, then series; and the column names in order."""
    rows: list[dict] = []
    columns: list[str] = []
    for r in results:
        if isinstance(r, query.TableResult):
            names = [c["text"] for c in r.columns]
            if r.metric == query.ANNOTATIONS:
                names = ["time", "time_end", "title", "text", "tags", "model"]
            for row in r.rows:
                item = dict(zip(names, row, strict=True))
                if r.metric != query.ANNOTATIONS:
                    item.update(model=r.model, metric=r.metric)
                rows.append(item)
            columns = _union(columns, names if r.metric == query.ANNOTATIONS
                             else [*names, "model", "metric"])
        elif isinstance(r, query.FailedTarget):
            raise _bad(r.message, "metric")
        else:
            labels = {"series": r.name, "model": r.model, "metric": r.metric.name}
            if r.group_by:
                labels[r.group_by] = r.series.name
            times = (r.series.times_s * 1000).astype(np.int64).tolist()
            for t, v in zip(times, r.series.values.tolist(), strict=True):
                rows.append({"time": t, "value": None if math.isnan(v) else float(v), **labels})
            columns = _union(columns, ["time", "value", *labels])
    if rows and "time" in rows[0] and not any(isinstance(r, query.TableResult)
                                              and r.metric != query.ANNOTATIONS for r in results):
        rows.sort(key=lambda row: (row["time"], str(row.get("series", ""))))
    return rows, columns


def _union(have: list[str], more: list[str]) -> list[str]:
    return have + [c for c in more if c not in have]


def _csv(rows: list[dict], columns: list[str]) -> Response:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns or ["time", "value", "series", "model", "metric"],
                            extrasaction="ignore", lineterminator="\n")
    writer.writeheader()  # always: Infinity takes an empty CSV body for an error
    writer.writerows(rows)
    return Response(buf.getvalue(), mimetype="text/csv")


@bp.get("/series")
def series():
    """One metric over time as flat rows (see the module docstring and the README)."""
    now = time.time()
    to_value = _time("to", now)
    from_value = _time("from", (to_value / 1000.0 if isinstance(to_value, float) else now)
                       - DEFAULT_RANGE_S)
    max_points = request.args.get("max_points", "").strip() or DEFAULT_MAX_POINTS
    rng = query.time_range(from_value, to_value, _step_ms(), max_points, where="from")
    target = _target()
    results = query.Service(_read_pool(),
                            current_app.extensions["settings"]).run([target], rng, _filters())
    rows, columns = _rows(results)
    if request.args.get("format") == "csv":
        return _csv(rows, columns)
    return http.json_response(rows)


@bp.get("/variables/<name>")
def variables(name: str):
    """A dashboard variable's choices as ``[{"__text", "__value"}]`` (Infinity variable queries)."""
    model = _values("model") or None
    with _read_pool().connection() as conn:
        items = query.variable_items(query.Catalog(conn), name, model, request.args.get("key"))
    if items is None:
        raise _bad(f"unknown variable {name[:40]!r}; one of: {', '.join(query.VARIABLES)}", "name")
    return jsonify([{"__text": t, "__value": v} for t, v in items])


@bp.get("/openapi.json")
def openapi():
    """This API's OpenAPI document (the ingest API and the flat read endpoints)."""
    return jsonify(_openapi_document())


@functools.cache
def _openapi_document() -> dict:
    import yaml

    return yaml.safe_load(resources.files("datasource").joinpath("openapi.yaml").read_text())
