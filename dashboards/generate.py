"""The Grafana dashboards, written as Python; the JSON files beside this one are its output.

    python dashboards/generate.py           # rewrite dashboards/*.json and dashboards/infinity/*.json
    python dashboards/generate.py --check   # exit 1 when the committed JSON is stale

Two flavours of every dashboard come from the one definition below:

* ``dashboards/*.json``: Grafana 10-11 with ``simpod-json-datasource`` (``POST /query``);
* ``dashboards/infinity/*.json``: Grafana 12+ with Grafana Labs' Infinity datasource
  (``yesoreyeram-infinity-datasource``, backend parser, ``GET /api/v1/series``).

Panels, variables and annotations are declared once; a flavour (``Simpod``, ``Infinity``)
renders only the parts that differ: the datasource reference, each target, each query
variable, the segment filter and the annotation query. ``build()`` renders every dashboard
under each flavour in turn.

Why generate: every panel needs the same datasource reference, payload shape,
unit, thresholds and description, and the six "Prometheus, replaced" rows share
one layout. Writing them once here keeps the two dashboards consistent, and
``tests/test_dashboards.py`` checks the committed JSON equals this output.

Conventions (see the protocol notes in the README and ``datasource/grafana.py``):

* Every panel, variable and annotation uses the datasource ``${datasource}``, a
  template variable of type ``simpod-json-datasource`` whose default is the
  provisioned datasource (uid ``mlsli``). The dashboards therefore import into
  any Grafana that has one datasource of that type, whatever its uid.
* Model quality uses code-mode targets (payload stored as a JSON string, each
  ``$var`` inside quotes); Prometheus, replaced uses builder-mode targets
  (payload stored as an object). Both are what the plugin 0.6.5 interpolates.
* Query variables are answered by ``POST /variable`` (``models``,
  ``metrics $model``, ``columns $model``, ``windows``, ``modes``, ``group_by $model``); ad hoc
  filters (segments) come from ``/tag-keys`` and ``/tag-values``.
* Infinity flavour: the datasource variable is of type ``yesoreyeram-infinity-datasource``
  (default uid ``mlsli-infinity``); targets are ``GET /api/v1/series`` with the backend
  parser, the variables as URL parameters (``${model:csv}``), ``${__from}``/``${__to}`` and
  ``${__interval_ms}``; query variables are Infinity queries of ``/api/v1/variables/<name>``;
  Infinity has no ad hoc filters, so segments are a ``filter`` textbox. Dashboard uids end in
  ``-infinity`` so both flavours can live in one Grafana.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(HERE.parent))

from datasource import metrics as metric_registry  # noqa: E402

SCHEMA_VERSION = 39
PLUGIN = "simpod-json-datasource"
PLUGIN_VERSION = "0.6.5"
DS_UID = "mlsli"  # provisioning/datasources/mlsli.yaml
DS_NAME = "ML SLIs"
DS = {"type": PLUGIN, "uid": "${datasource}"}
TAGS = ["mlsli", "ml-monitoring"]
MODEL_QUALITY_UID = "mlsli-model-quality"
PROMETHEUS_UID = "mlsli-prometheus-replaced"
# The replay writes the taxi months of 2020 with their own timestamps: January and
# February are backfilled, March onwards arrives live, so the graphs grow rightwards.
TIME = {"from": "2020-01-01T00:00:00.000Z", "to": "2020-06-01T00:00:00.000Z"}
REFRESH = "10s"
MAX_DATA_POINTS = 1000
HEATMAP_BINS = 20  # a heatmap of 20 bins x 1000 points stays a light answer every refresh
DEFAULT_MODEL = "taxi-high-tip"
THRESHOLD_CHOICES = ("default", "0.3", "0.4", "0.5", "0.6", "0.7")

# Thresholds (Grafana colour steps): higher is better for these SLIs.
GOOD_SLI = [("red", None), ("orange", 0.6), ("green", 0.7)]
COVERAGE = [("red", None), ("orange", 0.5), ("green", 0.8)]
DELAY = [("green", None), ("orange", 6 * 3600), ("red", 24 * 3600)]
NEUTRAL = [("blue", None)]
RATE = [("blue", None)]


# ----------------------------------------------------------------------- flavours

INFINITY = "yesoreyeram-infinity-datasource"
INFINITY_VERSION = "3.11.1"
INFINITY_UID = "mlsli-infinity"  # provisioning/datasources/mlsli-infinity.yaml
INFINITY_NAME = "ML SLIs (Infinity)"
INFINITY_DS = {"type": INFINITY, "uid": "${datasource}"}
# The segment filter of the Infinity flavour: a textbox sent as the `filter` parameter; its
# default is empty, which the server takes as no filter.
NO_FILTER = ""
# Columns of each table metric, as GET /api/v1/series answers them (datasource/engine.py); the
# backend parser keeps only declared columns. tests/test_infinity_dashboards.py checks them.
TABLE_COLUMNS = {
    "confusion_matrix": (("actual", "string"), ("predicted 0", "number"),
                         ("predicted 1", "number"), ("total", "number")),
    "calibration": (("bin", "string"), ("lower", "number"), ("upper", "number"),
                    ("mean score", "number"), ("observed rate", "number"), ("count", "number")),
    "histogram": (("bin", "string"), ("lower", "number"), ("upper", "number"),
                  ("count", "number")),
    "drift_ranking": (("column", "string"), ("kind", "string"), ("values", "number"),
                      ("psi", "number"), ("js_distance", "number"), ("ks_pvalue", "number"),
                      ("ks_statistic", "number"), ("wasserstein", "number"),
                      ("chi2_pvalue", "number"), ("chi2_statistic", "number")),
    "label_settling": (("day", "string"), ("predictions", "number"), ("after 1h", "number"),
                       ("after 6h", "number"), ("after 1d", "number"), ("after 2d", "number"),
                       ("after 7d", "number"), ("now", "number")),
}
SERIES_COLUMNS = (("time", "timestamp_epoch"), ("value", "number"), ("series", "string"))
ANNOTATION_COLUMNS = (("time", "time", "timestamp_epoch"), ("time_end", "timeEnd", "timestamp_epoch"),
                      ("title", "title", "string"), ("text", "text", "string"),
                      ("tags", "tags", "string"))


def columns(spec) -> list[dict]:
    """Infinity column declarations from (name, type) or (selector, text, type) tuples."""
    out = []
    for c in spec:
        selector, text, kind = (c[0], c[0], c[1]) if len(c) == 2 else c
        out.append({"selector": selector, "text": text, "type": kind})
    return out


class Simpod:
    """Grafana 10-11, simpod-json-datasource 0.6.5: the original dashboards, unchanged."""

    subdir = ""
    ds = DS

    def uid(self, uid: str) -> str:
        return uid

    def code(self, ref: str, metric: str, payload: dict) -> dict:
        """A code-mode target: the payload is a JSON string; ``$var`` sits inside quotes."""
        return {"refId": ref, "datasource": self.ds, "editorMode": "code", "target": metric,
                "payload": json.dumps(payload, separators=(",", ":"))}

    def builder(self, ref: str, metric: str, payload: dict) -> dict:
        """A builder-mode target: the payload is an object of strings (regex-interpolated)."""
        return {"refId": ref, "datasource": self.ds, "editorMode": "builder", "target": metric,
                "payload": dict(payload)}

    def datasource_variable(self) -> dict:
        return {"type": "datasource", "name": "datasource", "label": "Datasource",
                "query": PLUGIN, "current": {"selected": True, "text": DS_NAME, "value": DS_UID},
                "options": [], "refresh": 1, "regex": "", "hide": 0, "multi": False,
                "includeAll": False,
                "description": "A simpod-json-datasource pointing at the mlsli server"}

    def variable_query(self, query: str, name: str) -> dict:
        return {"query": {"query": query, "format": "string", "refId": name},
                "definition": query}

    def segments_variable(self) -> dict:
        return {"type": "adhoc", "name": "filters", "label": "Segments", "datasource": self.ds,
                "filters": [], "hide": 0,
                "description": "Restrict every panel to predictions whose segments match"}

    def annotation(self) -> dict:
        return {"name": "Model events", "enable": True, "hide": False, "iconColor": "purple",
                "datasource": self.ds,
                "target": self.code("Anno", "annotations", {"model": "$model"})}

    def panel(self, panel: dict) -> dict:
        return panel


class Infinity(Simpod):
    """Grafana 12+, Infinity 3.11: GET /api/v1/series with the backend parser.

    Every query names its variables in URL parameters, so Grafana re-runs it when a dropdown
    changes; ``${__from}``/``${__to}`` are epoch ms and ``${__interval_ms}`` the step. Series
    come as flat rows (time, value, series): Infinity's long-to-wide step makes one series per
    ``series`` label, which names the legend like the simpod flavour's target names.
    """

    subdir = "infinity"
    ds = INFINITY_DS

    def uid(self, uid: str) -> str:
        return uid + "-infinity"

    @staticmethod
    def _value(value: str) -> str:
        # ${model:csv}: the server splits on commas; Infinity's default format (glob) would
        # send a multi-value as {a,b}.
        return "${model:csv}" if value == "$model" else value

    def target(self, ref: str, metric: str, payload: dict) -> dict:
        is_table = payload.get("format") == "table" or (
            metric in metric_registry.REGISTRY and metric_registry.REGISTRY[metric].kind == "table")
        params = [{"key": "model", "value": self._value(payload.get("model", "$model"))},
                  {"key": "metric", "value": metric}]
        params += [{"key": k, "value": self._value(v)} for k, v in payload.items() if k != "model"]
        params += [{"key": "filter", "value": "${filter}"},
                   {"key": "from", "value": "${__from}"}, {"key": "to", "value": "${__to}"}]
        if not is_table:
            params.append({"key": "step", "value": "${__interval_ms}"})
        spec = TABLE_COLUMNS[metric] if is_table else SERIES_COLUMNS
        return {"refId": ref, "datasource": self.ds, "type": "json", "source": "url",
                "parser": "backend", "format": "table" if is_table else "timeseries",
                "url": "/api/v1/series",
                "url_options": {"method": "GET", "data": "", "headers": [], "params": params},
                "root_selector": "", "filterExpression": "", "computed_columns": [],
                "columns": columns(spec)}

    def code(self, ref: str, metric: str, payload: dict) -> dict:
        return self.target(ref, metric, payload)

    builder = code

    def datasource_variable(self) -> dict:
        return {"type": "datasource", "name": "datasource", "label": "Datasource",
                "query": INFINITY,
                "current": {"selected": True, "text": INFINITY_NAME, "value": INFINITY_UID},
                "options": [], "refresh": 1, "regex": "", "hide": 0, "multi": False,
                "includeAll": False,
                "description": "An Infinity datasource whose base URL is the mlsli server"}

    def variable_query(self, query: str, name: str) -> dict:
        """``metrics $model`` (the simpod query) becomes GET /api/v1/variables/metrics?model=."""
        kind, *args = query.split()
        params = [{"key": "model", "value": self._value(a)} for a in args]
        url = f"/api/v1/variables/{kind}"
        infinity = {"refId": "variable", "type": "json", "source": "url", "parser": "backend",
                    "format": "table", "url": url,
                    "url_options": {"method": "GET", "data": "", "headers": [], "params": params},
                    "root_selector": "",
                    "columns": columns((("__text", "string"), ("__value", "string")))}
        return {"query": {"queryType": "infinity", "refId": "variable", "infinityQuery": infinity},
                "definition": url + "".join(f"?model={a}" for a in args)}

    def segments_variable(self) -> dict:
        return {"type": "textbox", "name": "filter", "label": "Segment filter",
                "query": NO_FILTER, "hide": 0, "skipUrlSync": False,
                "current": {"selected": False, "text": NO_FILTER, "value": NO_FILTER},
                "options": [{"selected": True, "text": NO_FILTER, "value": NO_FILTER}],
                "description": "Restrict every panel to predictions whose segment matches: "
                               "key=value, key!=value, key=~regex or key!~regex (for example "
                               "pickup_borough=Queens); empty keeps them all"}

    def annotation(self) -> dict:
        params = [{"key": "model", "value": "${model:csv}"},
                  {"key": "metric", "value": "annotations"},
                  {"key": "from", "value": "${__from}"}, {"key": "to", "value": "${__to}"}]
        target = {"refId": "Anno", "datasource": self.ds, "type": "json", "source": "url",
                  "parser": "backend", "format": "table", "url": "/api/v1/series",
                  "url_options": {"method": "GET", "data": "", "headers": [], "params": params},
                  "root_selector": "", "filterExpression": "", "computed_columns": [],
                  "columns": columns(ANNOTATION_COLUMNS)}
        return {"name": "Model events", "enable": True, "hide": False, "iconColor": "purple",
                "datasource": self.ds, "target": target}

    def panel(self, panel: dict) -> dict:
        if panel["type"] in ("timeseries", "stat", "heatmap"):
            # One series per `series` label after long-to-wide: name it like the simpod target.
            panel["fieldConfig"]["defaults"]["displayName"] = "${__field.labels.series}"
        return panel


FLAVOURS = (Simpod(), Infinity())
_flavour: Simpod = FLAVOURS[0]  # the one being rendered (build() switches it)


# ----------------------------------------------------------------------- building blocks


def _steps(steps) -> dict:
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for c, v in steps]}


def unit_overrides() -> list[dict]:
    """Field overrides giving each built-in metric its unit when the metric is a variable.

    Series are named ``[<model> ]<metric>[ <key>=<value>]`` by the datasource, so a
    regex on the display name finds the metric. Metrics in percent (the default
    unit of the SLI panels) need no override.
    """
    by_unit: dict[str, list[str]] = {}
    for m in metric_registry.REGISTRY.values():
        if m.source == "builtin" and m.kind != "table" and m.unit != "percentunit":
            by_unit.setdefault(m.unit, []).append(m.name)
    out = []
    for unit in sorted(by_unit):
        names = "|".join(sorted(by_unit[unit]))
        out.append({"matcher": {"id": "byRegexp", "options": f"(.* )?({names})( .*)?"},
                    "properties": [{"id": "unit", "value": unit},
                                   {"id": "min"}, {"id": "max"}]})
    return out


def code_target(ref: str, metric: str, **payload: str) -> dict:
    """A code-mode target (simpod) or its Infinity equivalent."""
    return _flavour.code(ref, metric, payload)


def builder_target(ref: str, metric: str, **payload: str) -> dict:
    """A builder-mode target (simpod) or its Infinity equivalent."""
    return _flavour.builder(ref, metric, payload)


def _panel(kind: str, title: str, description: str, grid: tuple[int, int, int, int], *,
           targets: list | None = None, unit: str = "none", steps=NEUTRAL,
           minmax: tuple | None = None, custom: dict | None = None, overrides=None,
           options: dict | None = None, transformations=None, decimals: int | None = None) -> dict:
    x, y, w, h = grid
    defaults: dict = {"unit": unit, "thresholds": _steps(steps), "color": {"mode": "palette-classic"}}
    if kind in ("stat",):
        defaults["color"] = {"mode": "thresholds"}
    for key, value in zip(("min", "max"), minmax or (), strict=False):
        if value is not None:
            defaults[key] = value
    if decimals is not None:
        defaults["decimals"] = decimals
    if custom:
        defaults["custom"] = custom
    panel = {"type": kind, "title": title, "description": description,
             "gridPos": {"h": h, "w": w, "x": x, "y": y}, "datasource": _flavour.ds,
             "fieldConfig": {"defaults": defaults, "overrides": overrides or []},
             "options": options or {}}
    if targets is not None:
        panel["targets"] = targets
    if transformations:
        panel["transformations"] = transformations
    return _flavour.panel(panel)


def display_names(names: dict[str, str]) -> list[dict]:
    """Overrides naming the series of each query: two queries of one metric share its name."""
    return [{"matcher": {"id": "byFrameRefID", "options": ref},
             "properties": [{"id": "displayName", "value": name}]} for ref, name in names.items()]


def timeseries(title, description, grid, targets, *, unit="percentunit", steps=GOOD_SLI,
               minmax=None, overrides=None, threshold_style="off", fill=10,
               names: dict[str, str] | None = None) -> dict:
    custom = {"drawStyle": "line", "lineWidth": 2, "fillOpacity": fill, "spanNulls": False,
              "showPoints": "never", "pointSize": 4, "lineInterpolation": "linear",
              "axisPlacement": "auto", "thresholdsStyle": {"mode": threshold_style}}
    if unit == "percentunit" and minmax is None:
        custom["axisSoftMin"], custom["axisSoftMax"] = 0, 1
    options = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True,
                          "calcs": []},
               "tooltip": {"mode": "multi", "sort": "none"}}
    overrides = [*(overrides or []), *display_names(names or {})]
    return _panel("timeseries", title, description, grid, targets=targets, unit=unit,
                  steps=steps, minmax=minmax, custom=custom, overrides=overrides, options=options)


def stat(title, description, grid, targets, *, unit="percentunit", steps=GOOD_SLI,
         overrides=None, decimals=None) -> dict:
    options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
               "colorMode": "value", "graphMode": "area", "justifyMode": "auto",
               "orientation": "auto", "textMode": "auto", "wideLayout": True,
               "showPercentChange": False}
    return _panel("stat", title, description, grid, targets=targets, unit=unit, steps=steps,
                  overrides=overrides, options=options, decimals=decimals)


def table(title, description, grid, targets, *, unit="none", steps=NEUTRAL,
          overrides=None) -> dict:
    options = {"showHeader": True, "cellHeight": "sm",
               "footer": {"show": False, "reducer": ["sum"], "fields": "", "countRows": False}}
    custom = {"align": "auto", "cellOptions": {"type": "auto"}, "inspect": False}
    return _panel("table", title, description, grid, targets=targets, unit=unit, steps=steps,
                  custom=custom, overrides=overrides, options=options)


def barchart(title, description, grid, targets, *, keep: list[str], columns: tuple[str, ...],
             unit="percentunit", minmax=(0, 1), steps=NEUTRAL) -> dict:
    """A bar chart of table columns ``keep`` against the ``bin`` column; ``columns`` are all the
    columns the table target answers (the others are hidden)."""
    exclude = {c: True for c in columns if c not in keep}
    options = {"xField": "bin", "orientation": "vertical", "showValue": "never",
               "groupWidth": 0.8, "barWidth": 0.9, "stacking": "none", "xTickLabelRotation": 0,
               "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True,
                          "calcs": []},
               "tooltip": {"mode": "multi", "sort": "none"}}
    custom = {"fillOpacity": 80, "lineWidth": 1, "gradientMode": "none", "axisPlacement": "auto"}
    return _panel("barchart", title, description, grid, targets=targets, unit=unit, steps=steps,
                  minmax=minmax, custom=custom, options=options,
                  transformations=[{"id": "organize", "options": {"excludeByName": exclude}}])


def heatmap(title, description, grid, targets) -> dict:
    """Pre-bucketed counts: one series per bin, named by its upper edge (a ``histogram``)."""
    options = {"calculate": False, "cellGap": 1, "rowsFrame": {"layout": "le"},
               "yAxis": {"axisPlacement": "left", "unit": "none", "decimals": 2},
               "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64, "exponent": 0.5,
                         "fill": "dark-orange", "reverse": False},
               "filterValues": {"le": 1e-9}, "showValue": "never",
               "cellValues": {"unit": "short"}, "legend": {"show": True},
               "tooltip": {"mode": "single", "yHistogram": False, "showColorScale": False},
               "exemplars": {"color": "rgba(255,0,255,0.7)"}}
    custom = {"hideFrom": {"legend": False, "tooltip": False, "viz": False},
              "scaleDistribution": {"type": "linear"}}
    return _panel("heatmap", title, description, grid, targets=targets, unit="short",
                  steps=NEUTRAL, custom=custom, options=options)


def text(title, description, grid, content: str) -> dict:
    return _panel("text", title, description, grid,
                  options={"mode": "markdown", "content": content.strip() + "\n",
                           "code": {"language": "plaintext", "showLineNumbers": False,
                                    "showMiniMap": False}})


def datasource_variable() -> dict:
    return _flavour.datasource_variable()


def query_variable(name: str, label: str, query: str, default: str, description: str) -> dict:
    """Answered by POST /variable; refreshed with the time range, so a dashboard opened
    before the loader registered the model fills its dropdowns at the next refresh."""
    return {"type": "query", "name": name, "label": label, "description": description,
            "datasource": _flavour.ds, **_flavour.variable_query(query, name), "refresh": 2, "regex": "", "sort": 0, "multi": False,
            "includeAll": False, "hide": 0, "skipUrlSync": False,
            "current": {"selected": True, "text": default, "value": default}, "options": []}


def custom_variable(name: str, label: str, choices, default: str, description: str) -> dict:
    return {"type": "custom", "name": name, "label": label, "description": description,
            "query": ",".join(choices), "multi": False, "includeAll": False, "hide": 0,
            "skipUrlSync": False,
            "current": {"selected": True, "text": default, "value": default},
            "options": [{"selected": c == default, "text": c, "value": c} for c in choices]}


def adhoc_variable() -> dict:
    """Segments: ad hoc filters (simpod) or a filter textbox (Infinity has no ad hoc filters)."""
    return _flavour.segments_variable()


def model_events_annotation() -> dict:
    return _flavour.annotation()


def dashboard(uid: str, title: str, description: str, variables: list, panels: list) -> dict:
    for i, p in enumerate(panels, start=1):
        p["id"] = i
        if p["type"] in ("timeseries", "stat", "heatmap"):
            # Grafana sends the panel width in pixels otherwise: a narrow stat would get a
            # coarse step and its "now" value would lag the replay.
            p["maxDataPoints"] = MAX_DATA_POINTS
    return {
        "uid": _flavour.uid(uid), "title": title, "description": description, "tags": TAGS,
        "schemaVersion": SCHEMA_VERSION, "version": 1, "editable": True,
        "graphTooltip": 1, "timezone": "utc", "fiscalYearStartMonth": 0, "liveNow": False,
        "time": dict(TIME), "refresh": REFRESH,
        "timepicker": {"refresh_intervals": ["5s", "10s", "30s", "1m", "5m"]},
        "templating": {"list": variables},
        "annotations": {"list": [model_events_annotation()]},
        "links": [{"type": "dashboards", "tags": ["mlsli"], "asDropdown": False,
                   "includeVars": True, "keepTime": True, "title": "ML SLIs",
                   "icon": "external link", "targetBlank": False, "tooltip": ""}],
        "panels": panels,
    }


# ----------------------------------------------------------------------- Model quality


def _sli_payload(group_by="none") -> dict:
    return {"model": "$model", "window": "$window", "mode": "$mode",
            "threshold": "$threshold", "group_by": group_by}


def model_quality() -> dict:
    units = unit_overrides()
    sli = _sli_payload()
    variables = [
        datasource_variable(),
        query_variable("model", "Model", "models", DEFAULT_MODEL,
                       "The model whose predictions and feedback are shown"),
        query_variable("metric", "Metric", "metrics $model", "accuracy",
                       "The SLI of the first stat and the big panel"),
        query_variable("column", "Column", "columns $model", "score",
                       "What distribution and drift metrics (quantile, histogram, psi, ...) "
                       "measure: the score or a feature; SLIs ignore it"),
        query_variable("window", "Window", "windows", "1d",
                       "Each point covers the predictions of this window ending at the point"),
        query_variable("mode", "Mode", "modes", "sliding",
                       "sliding: a window ends at every point; tumbling: windows do not overlap"),
        custom_variable("threshold", "Threshold", THRESHOLD_CHOICES, "default",
                        "Score at or above which a prediction counts as positive "
                        "(default: the model's own); type any value in [0, 1]"),
        query_variable("group_by", "Group by", "group_by $model", "none",
                       "Split the selected SLI into one series per value of this segment"),
        adhoc_variable(),
    ]
    panels = [
        stat("${metric} now", "The selected metric over the last window of the range "
             "($window, $mode, threshold $threshold).", (0, 0, 4, 4),
             [code_target("A", "$metric", **sli, column="$column")], overrides=units),
        stat("Accuracy now", "Share of labeled predictions that are right at the threshold, "
             "over the last $window of the range.", (4, 0, 4, 4),
             [code_target("A", "accuracy", **sli)]),
        stat("F1 now", "Harmonic mean of precision and recall over the last $window.",
             (8, 0, 4, 4), [code_target("A", "f1", **sli)]),
        stat("Label coverage now", "Share of the last $window's predictions whose feedback "
             "has arrived.", (12, 0, 4, 4), [code_target("A", "label_coverage", **sli)],
             steps=COVERAGE),
        stat("Label delay now (median)", "Median time from prediction to feedback for the "
             "labeled predictions of the last $window.", (16, 0, 4, 4),
             [code_target("A", "label_delay", **sli, quantile="0.5")], unit="s", steps=DELAY),
        stat("Predictions in the last ${window}", "Number of predictions in the last window "
             "of the range.", (20, 0, 4, 4), [code_target("A", "prediction_count", **sli)],
             unit="short", steps=NEUTRAL, decimals=0),
        timeseries("${metric} over time (${window} ${mode}, by ${group_by})",
                   "The selected SLI; each point covers the $window ending at it. Group by "
                   "splits it into one series per segment value (the 10 largest, the rest as "
                   "'other'); Segments filters apply to every panel.", (0, 4, 24, 9),
                   [code_target("A", "$metric", **_sli_payload(group_by="$group_by"),
                                column="$column")],
                   overrides=units, threshold_style="dashed"),
        timeseries("Accuracy, precision, recall and F1", "The four threshold SLIs side by side "
                   "over the same $window, at threshold $threshold.", (0, 13, 12, 8),
                   [code_target(r, m, **sli) for r, m in
                    zip("ABCD", ("accuracy", "precision", "recall", "f1"), strict=True)]),
        timeseries("Predicted positive rate against observed base rate", "Share of "
                   "predictions at or above the threshold against the share of labels that are "
                   "1: a gap between them is prior shift or a miscalibrated threshold.",
                   (12, 13, 12, 8),
                   [code_target("A", "positive_rate", **sli), code_target("B", "base_rate", **sli)],
                   steps=RATE),
        timeseries("Label coverage", "Labeled predictions / predictions per $window: feedback "
                   "arrives late, so the newest windows are the least covered.", (0, 21, 8, 8),
                   [code_target("A", "label_coverage", **sli)], steps=COVERAGE,
                   threshold_style="dashed"),
        timeseries("Label delay (median and p90)", "Time from prediction to feedback, among "
                   "the labeled predictions of each $window.", (8, 21, 8, 8),
                   [code_target("A", "label_delay", **sli, quantile="0.5"),
                    code_target("B", "label_delay", **sli, quantile="0.9")],
                   names={"A": "median", "B": "p90"},
                   unit="s", steps=DELAY, minmax=(0, None)),
        timeseries("Prediction volume", "Predictions and labeled predictions per $window.",
                   (16, 21, 8, 8),
                   [code_target("A", "prediction_count", **sli),
                    code_target("B", "label_count", **sli)],
                   unit="short", steps=NEUTRAL, minmax=(0, None)),
        table("Confusion matrix (selected range)", "Labeled predictions of the whole time "
              "range, actual class by predicted class at threshold $threshold.",
              (0, 29, 8, 8),
              [code_target("A", "confusion_matrix", model="$model", threshold="$threshold")],
              unit="short"),
        barchart("Calibration (selected range)", "Per score bin: the mean score against the "
                 "share of labels that are 1. A calibrated model has equal bars.",
                 (8, 29, 10, 8), [code_target("A", "calibration", model="$model")],
                 keep=["mean score", "observed rate"],
                 columns=("bin", "lower", "upper", "mean score", "observed rate", "count")),
        table("Calibration table", "Score bins over the selected range: bounds, mean score, "
              "observed positive rate and count.", (18, 29, 6, 8),
              [code_target("A", "calibration", model="$model")],
              overrides=[{"matcher": {"id": "byRegexp", "options": "mean score|observed rate"},
                          "properties": [{"id": "unit", "value": "percentunit"},
                                         {"id": "decimals", "value": 1}]},
                         {"matcher": {"id": "byName", "options": "count"},
                          "properties": [{"id": "unit", "value": "short"}]}]),
        timeseries("Estimated (CBPE) and realized accuracy", "Accuracy estimated from the "
                   "scores of every prediction, labeled or not (NannyML's CBPE, scores "
                   "calibrated by isotonic regression on the 'training' reference), against the "
                   "accuracy of the labeled ones: the estimate is there before the labels; the "
                   "gap once labels arrive is its error. CBPE sees shifts in the scores, not "
                   "concept drift (a changed relation between features and labels).",
                   (0, 37, 8, 8),
                   [code_target("A", "accuracy", **sli),
                    code_target("B", "estimated_accuracy", **sli, calibration="isotonic",
                                reference="training")],
                   names={"A": "realized", "B": "estimated (CBPE)"}),
        timeseries("Estimate's error (CBPE minus realized accuracy)", "The CBPE estimate over "
                   "all predictions minus the accuracy of the labeled ones, per window, once "
                   "labels have arrived (empty before). Near 0 while the scores stay calibrated; "
                   "a persistent gap means the relation between features and labels changed "
                   "(concept drift), which the estimate cannot see.", (8, 37, 8, 8),
                   [code_target("A", "estimation_error", **sli, of="accuracy",
                                calibration="isotonic", reference="training")],
                   names={"A": "estimate - realized"}, steps=NEUTRAL, minmax=(None, None)),
        timeseries("Accuracy as known at the time, and now", "Each point of the first series "
                   "uses only the feedback that had arrived by its time (as_of = point): what a "
                   "live dashboard or an alert saw then. The second uses every label known now. "
                   "The gap is the late-label bias.", (16, 37, 8, 8),
                   [code_target("A", "accuracy", **sli, as_of="point"),
                    code_target("B", "accuracy", **sli)],
                   names={"A": "as known at the time", "B": "as known now"}),
        table("Label settling (selected range)", "Per day: accuracy as it was known 1 h, 6 h, "
              "1 d, 2 d and 7 d after the day closed, and now; how long to wait before a day's "
              "value can be trusted.", (0, 45, 24, 8),
              [code_target("A", "label_settling", model="$model", threshold="$threshold",
                           of="accuracy")]),
    ]
    return dashboard(MODEL_QUALITY_UID, "Model quality",
                     "Joined SLIs of a model: predictions and delayed feedback over any window, "
                     "threshold and segment.", variables, panels)


# ----------------------------------------------------------------------- Prometheus, replaced

PROMQL = {
    "accuracy": "count(abs(binary_class_metric_test_label - on (output_id) "
                "binary_class_metric_test_prediction) < 0.5)\n/ count(binary_class_metric_test_label"
                " - on (output_id) binary_class_metric_test_prediction)",
    "precision": "count((binary_class_metric_test_label * on (output_id) "
                 "binary_class_metric_test_prediction) > 0.5)\n/ count((binary_class_metric_test_"
                 "prediction and on (output_id) binary_class_metric_test_label) > 0.5)",
    "recall": "count((binary_class_metric_test_label * on (output_id) "
              "binary_class_metric_test_prediction) > 0.5)\n/ count((binary_class_metric_test_"
              "label and on (output_id) binary_class_metric_test_prediction) == 1)",
    "average": "sum(rate(model_output_sum[5m])) / sum(rate(model_output_count[5m]))",
    "median": "histogram_quantile(0.5, sum by (le) (rate(model_output_bucket[5m])))",
    "distribution": "sum(rate(model_output_bucket[5m])) by (le)",
}

def _promql_text(name: str, key: str, now: str, why: str) -> str:
    return f"""
#### {name}: the essay's PromQL

```
{PROMQL[key]}
```

**Now:** {now}

{why}
"""


def prometheus_replaced() -> dict:
    variables = [
        datasource_variable(),
        query_variable("model", "Model", "models", DEFAULT_MODEL,
                       "The model whose predictions and feedback are shown"),
        query_variable("window", "Sliding window", "windows", "1d",
                       "The window of the second series of each row (5m is the essay's)"),
        adhoc_variable(),
    ]
    cum = {"model": "$model", "window": "cumulative", "mode": "sliding"}
    sliding = {"model": "$model", "window": "$window", "mode": "sliding"}
    five = {"model": "$model", "window": "5m", "mode": "sliding"}
    median = {"column": "score", "quantile": "0.5"}
    mq = f"/d/{_flavour.uid(MODEL_QUALITY_UID)}/model-quality?var-model=$model"
    panels = [text(
        "Six PromQL queries and what replaces them",
        "How each query of 'Failure Modes in Extending Prometheus' maps to this datasource.",
        (0, 0, 24, 5), f"""
The essay monitors a taxi "high tip" model with Prometheus: two gauges joined on a
high-cardinality `output_id`, scraped every few seconds, and a histogram with buckets fixed up
front. Each row below shows one of its six PromQL queries on the left and, on the right, the
panel that now gives the same answer from PostgreSQL: exactly (no scrape interval, no bucket
interpolation) and over any window. On [Model quality]({mq}) each is a choice of Metric and
Window. The second series of each row uses the sliding window chosen above, which PromQL could
not do for the joined SLIs; the last row shows all three over it.
""")]
    rows = [
        ("Accuracy", "accuracy", "accuracy", "`metric = accuracy`, `window = cumulative`, "
         "threshold `default` (0.5, as `< 0.5` above).",
         "The second series is the same join over a sliding `$window`: PromQL has no way to "
         "window a join on `output_id`, so the essay could only show cumulative accuracy."),
        ("Precision", "precision", "precision", "`metric = precision`, `window = cumulative`.",
         "Sliding `$window` in the second series; predictions whose feedback has not arrived "
         "are left out, as the `and on (output_id)` join did."),
        ("Recall", "recall", "recall", "`metric = recall`, `window = cumulative`.",
         "Sliding `$window` in the second series."),
    ]
    y = 5
    for name, key, metric, now, why in rows:
        panels.append(text(f"{name}: PromQL", f"The essay's PromQL for {name.lower()}, and the "
                           "dropdown choice that replaces it.", (0, y, 10, 8),
                           _promql_text(name, key, now, why)))
        panels.append(timeseries(
            f"{name}: cumulative and sliding ${{window}}",
            f"{name} at the model's threshold: cumulative since the first prediction (the "
            "essay's SLI) and over a sliding $window (what PromQL could not express).",
            (10, y, 14, 8),
            [builder_target("A", metric, **cum), builder_target("B", metric, **sliding)],
            names={"A": f"{metric} (cumulative)", "B": f"{metric} (sliding ${{window}})"}))
        y += 8
    panels.append(text("Average output [5m]: PromQL", "The essay's PromQL for the mean model "
                       "output, and the dropdown choice that replaces it.", (0, y, 10, 8),
                       _promql_text("Average output [5m]", "average",
                                    "`metric = mean_score`, `window = 5m`, `mode = sliding`.",
                                    "Exact: every prediction counts, with no scrape interval. "
                                    "The replay compresses time, so 5 minutes of 2020 hold few "
                                    "trips; the second series uses the sliding `$window`.")))
    panels.append(timeseries("Average output: sliding 5m and ${window}", "Mean model score "
                             "over the 5 minutes (the essay's window) and the $window ending at "
                             "each point.", (10, y, 14, 8),
                             [builder_target("A", "mean_score", **five),
                              builder_target("B", "mean_score", **sliding)],
                             unit="none", steps=NEUTRAL, minmax=(0, 1),
                             names={"A": "mean score (5m)", "B": "mean score (${window})"}))
    y += 8
    panels.append(text("Median output [5m]: PromQL", "The essay's PromQL for the median model "
                       "output, and the dropdown choice that replaces it.", (0, y, 10, 8),
                       _promql_text("Median output [5m]", "median",
                                    "`metric = quantile`, `quantile = 0.5`, `column = score`, "
                                    "`window = 5m`.",
                                    "The exact median of the scores themselves, where "
                                    "`histogram_quantile` interpolates inside buckets fixed "
                                    "before anyone knew the distribution.")))
    panels.append(timeseries("Median output: sliding 5m and ${window}", "Exact median model "
                             "score over the 5 minutes (the essay's window) and the $window "
                             "ending at each point.", (10, y, 14, 8),
                             [builder_target("A", "quantile", **five, **median),
                              builder_target("B", "quantile", **sliding, **median)],
                             unit="none", steps=NEUTRAL, minmax=(0, 1),
                             names={"A": "median score (5m)", "B": "median score (${window})"}))
    y += 8
    panels.append(text("Distribution of outputs [5m]: PromQL", "The essay's PromQL for the "
                       "output distribution, and the dropdown choice that replaces it.",
                       (0, y, 10, 8),
                       _promql_text("Probability distribution of outputs [5m]", "distribution",
                                    "`metric = histogram`, `column = score`, `window = 5m` "
                                    "(here the sliding `$window`), drawn as a heatmap.",
                                    "The bins span the scores of the selected range (here 20 "
                                    "equal bins; without `bins`, Freedman–Diaconis) instead of "
                                    "buckets declared in the instrumentation, so they still fit "
                                    "when the scores drift.")))
    panels.append(heatmap("Score distribution over a sliding ${window}", "Predictions per "
                          "score bin in the $window ending at each point; 20 equal bins "
                          "spanning the scores of the whole range.", (10, y, 14, 8),
                          [builder_target("A", "histogram", **sliding, column="score",
                                          bins=str(HEATMAP_BINS))]))
    y += 8
    panels.append(text("Sliding-window joined SLIs", "What the essay could not express in "
                       "PromQL.", (0, y, 10, 8), """
#### Joined SLIs over a sliding window

The essay: *"I could not figure out how to compute any of the first 3 metrics
(cross-component) over fixed window sizes."*

**Now:** any of them with `window = 5m … 7d` and `mode = sliding` (a window ends at every
point) or `tumbling` (windows do not overlap). The datasource keeps exact per-minute partial
sums of the joined predictions and feedback, so a window is a difference of two prefix sums,
whatever the number of predictions.
"""))
    panels.append(timeseries("Accuracy, precision and recall over a sliding ${window}",
                             "The three joined SLIs over the same sliding window.",
                             (10, y, 14, 8),
                             [builder_target(r, m, **sliding) for r, m in
                              zip("ABC", ("accuracy", "precision", "recall"), strict=True)]))
    return dashboard(PROMETHEUS_UID, "Prometheus, replaced",
                     "The six PromQL queries of the essay beside the panels that now answer "
                     "them.", variables, panels)


# ----------------------------------------------------------------------- output

# ----------------------------------------------------------------------- Outputs and drift

DRIFT_UID = "mlsli-outputs-and-drift"
PSI_STEPS = [("green", None), ("orange", 0.1), ("red", 0.25)]  # the usual PSI reading
KS_STEPS = [("green", None), ("orange", 0.1), ("red", 0.2)]


def outputs_and_drift() -> dict:
    window = {"model": "$model", "window": "$window", "mode": "$mode"}
    variables = [
        datasource_variable(),
        query_variable("model", "Model", "models", DEFAULT_MODEL,
                       "The model whose outputs and inputs are shown"),
        query_variable("feature", "Feature", "features $model", "congestion_surcharge",
                       "The input whose distribution and drift are shown"),
        query_variable("window", "Window", "windows", "1d",
                       "Each point covers the predictions of this window ending at the point"),
        query_variable("mode", "Mode", "modes", "tumbling",
                       "sliding: a window ends at every point; tumbling: windows do not overlap"),
        custom_variable("reference", "Reference", ("training",), "training",
                        "What drift compares with: the training data the loader recorded, or "
                        "type a time range such as 2020-02-01T00:00:00Z/2020-03-01T00:00:00Z"),
        adhoc_variable(),
    ]
    panels = [
        heatmap("Score distribution over time",
                "Counts of predictions per score bin and window; the bins are chosen from the "
                "scores of the selected range, no buckets fixed up front.", (0, 0, 12, 9),
                [code_target("A", "histogram", column="score", bins=str(HEATMAP_BINS), **window)]),
        timeseries("Median and p90 score",
                   "Exact quantiles of the model's output per window (not interpolated in "
                   "buckets, unlike PromQL's histogram_quantile).", (12, 0, 12, 9),
                   [code_target("A", "quantile", column="score", quantile="0.5", **window),
                    code_target("B", "quantile", column="score", quantile="0.9", **window)],
                   unit="none", steps=NEUTRAL, minmax=(0, 1),
                   overrides=display_names({"A": "median score", "B": "p90 score"})),
        timeseries("$feature: median, p10 and p90",
                   "The chosen feature per window; compare with its training distribution in "
                   "the drift panels on the right.", (0, 9, 12, 8),
                   [code_target("A", "quantile", column="$feature", quantile="0.5", **window),
                    code_target("B", "quantile", column="$feature", quantile="0.1", **window),
                    code_target("C", "quantile", column="$feature", quantile="0.9", **window)],
                   unit="none", steps=NEUTRAL,
                   overrides=display_names({"A": "median", "B": "p10", "C": "p90"})),
        timeseries("$feature: PSI against the reference",
                   "Population stability index of each window against the reference's deciles: "
                   "below 0.1 stable, 0.1-0.25 moving, above 0.25 shifted.", (12, 9, 12, 8),
                   [code_target("A", "psi", column="$feature", reference="$reference", **window)],
                   unit="none", steps=PSI_STEPS),
        timeseries("$feature: Kolmogorov-Smirnov against the reference",
                   "Two-sample KS statistic (largest gap between the two CDFs) and its p-value.",
                   (0, 17, 12, 8),
                   [code_target("A", "ks_statistic", column="$feature", reference="$reference",
                                **window),
                    code_target("B", "ks_pvalue", column="$feature", reference="$reference",
                                **window)],
                   unit="none", steps=KS_STEPS,
                   overrides=display_names({"A": "KS statistic", "B": "KS p-value"})),
        table("Which input moved: drift ranking for the selected range",
              "Every feature, the score and each segment against the reference, ranked by PSI "
              "(segments: chi-squared test and PSI over categories).", (12, 17, 12, 8),
              [code_target("A", "drift_ranking", model="$model", reference="$reference")]),
        timeseries("$feature: missing rate",
                   "Share of predictions sent without this feature.", (0, 25, 12, 6),
                   [code_target("A", "missing_rate", column="$feature", **window)],
                   unit="percentunit", steps=NEUTRAL, minmax=(0, 1)),
        barchart("$feature: histogram of the selected range",
                 "Counts per bin over the whole range (Freedman-Diaconis bins).", (12, 25, 12, 6),
                 [code_target("A", "histogram", model="$model", column="$feature",
                              format="table")], keep=["bin", "count"],
                 columns=("bin", "lower", "upper", "count"), unit="short", minmax=(0, None),
                 steps=NEUTRAL),
    ]
    return dashboard(DRIFT_UID, "Outputs and drift",
                     "Distributions of the model's output and inputs over any window, and their "
                     "drift against the training data, with no buckets fixed up front.",
                     variables, panels)


DASHBOARDS = {"model-quality.json": model_quality, "prometheus-replaced.json": prometheus_replaced,
              "outputs-and-drift.json": outputs_and_drift}


def render(board: dict) -> str:
    return json.dumps(board, indent=2, ensure_ascii=False) + "\n"


def build() -> dict[str, str]:
    """Path relative to dashboards/ -> JSON text of every dashboard in every flavour."""
    global _flavour
    out = {}
    try:
        for flavour in FLAVOURS:
            _flavour = flavour
            for name, fn in DASHBOARDS.items():
                out[str(Path(flavour.subdir) / name)] = render(fn())
    finally:
        _flavour = FLAVOURS[0]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 if a committed file differs")
    parser.add_argument("--out", type=Path, default=HERE, help="directory to write to")
    args = parser.parse_args(argv)
    stale = []
    for name, content in build().items():
        path = args.out / name
        if args.check:
            if not path.exists() or path.read_text() != content:
                stale.append(name)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        print(f"wrote {path}")
    if stale:
        print(f"stale: {', '.join(stale)}; run: python dashboards/generate.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
