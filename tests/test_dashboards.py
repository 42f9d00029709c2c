"""The committed dashboards, run against a live datasource the way Grafana and the plugin would.

Every query variable is sent to ``/variable``, every panel target and annotation to
``/query``, after interpolating dashboard variables as simpod-json-datasource 0.6.5 does
(``src/DataSource.ts`` ``processTarget``/``processPayload``/``cleanMatch``):

* ``target``: ``templateSrv.replace(target, scopedVars, 'regex')``;
* code-mode payloads (JSON strings): each ``$var`` replaced by its ``'json'`` value with
  surrounding quotes stripped, then ``JSON.parse`` (``{}`` when that fails);
* builder-mode payloads (objects): each value ``toString()``-ed and regex-interpolated.

The datasource is filled by a short run of the loader (``python -m loader``) at a small scale:
the January-trained taxi model, January-February backfilled and two days of March live.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from datasource import create_app
from datasource import metrics as registry
from tests import openapi
from tests.conftest import empty_database

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = ROOT / "dashboards"
PROVISIONING = ROOT / "provisioning"
PLUGIN = "simpod-json-datasource"
MODEL = "taxi-high-tip"

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _generator():
    spec = importlib.util.spec_from_file_location("dashboards_generate", DASHBOARDS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = _generator()
BOARDS = {name: json.loads((DASHBOARDS / name).read_text()) for name in GEN.DASHBOARDS
          if (DASHBOARDS / name).exists()}


# ----------------------------------------------------------------------- Grafana + plugin emulation

# templateSrv's variable syntax: $var, [[var]] / [[var:fmt]], ${var}, ${var.field}, ${var:fmt}
_VARIABLE = re.compile(r"\$(\w+)|\[\[(\w+?)(?::(\w+))?\]\]|\$\{(\w+)(?:\.([^:^}]+))?(?::([^}]+))?\}")
_REGEX_SPECIAL = re.compile(r"[\\^$*+?.()|\[\]{}/]")


def _regex_escape(value: str) -> str:
    return _REGEX_SPECIAL.sub(lambda m: "\\" + m.group(0), value)


def _format(value, fmt: str) -> str:
    if fmt == "regex":
        if isinstance(value, list):
            escaped = [_regex_escape(str(v)) for v in value]
            return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"
        return _regex_escape(str(value))
    if fmt == "json":
        return json.dumps(value)
    if fmt in ("csv", "raw"):
        return ",".join(map(str, value)) if isinstance(value, list) else str(value)
    raise AssertionError(f"format {fmt} is not emulated")


def interpolate(text: str, variables: dict, fmt: str) -> str:
    """templateSrv.replace: unknown variables stay as written."""
    def one(m: re.Match) -> str:
        name = m.group(1) or m.group(2) or m.group(4)
        explicit = m.group(3) or m.group(6)
        if name not in variables:
            return m.group(0)
        return _format(variables[name]["value"], explicit or fmt)

    return _VARIABLE.sub(one, text)


def _js_string(value) -> str:
    if value is None:
        raise TypeError("null.toString()")  # the plugin then sends the payload as {}
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def process_payload(payload, editor_mode: str | None, variables: dict) -> dict:
    """DataSource.processPayload: what the plugin puts in the request for a stored payload."""
    try:
        if isinstance(payload, str) and editor_mode != "builder":
            if not payload.strip():
                return {}

            def clean(m: re.Match) -> str:
                replaced = interpolate(m.group(0), variables, "json")
                if len(replaced) >= 2 and replaced[0] == '"' and replaced[-1] == '"':
                    return json.loads(replaced)
                return replaced

            return json.loads(_VARIABLE.sub(clean, payload))
        obj = json.loads(payload) if isinstance(payload, str) else dict(payload)
        for key, value in obj.items():
            if isinstance(value, list):
                obj[key] = [interpolate(_js_string(v), variables, "regex") for v in value]
            else:
                obj[key] = interpolate(_js_string(value), variables, "regex")
        return obj
    except (TypeError, ValueError):
        return {}


def process_target(target: dict, variables: dict) -> dict:
    out = dict(target)
    out["payload"] = process_payload(target.get("payload") or "", target.get("editorMode"),
                                     variables)
    if isinstance(target.get("target"), str):
        out["target"] = interpolate(target["target"], variables, "regex")
    return out


def scoped_vars(variables: dict) -> dict:
    return {"__interval": {"text": "6h", "value": "6h"},
            "__interval_ms": {"text": "21600000", "value": 21600000},
            **{name: {"selected": False, "text": v["text"], "value": v["value"]}
               for name, v in variables.items()}}


# ----------------------------------------------------------------------- the live datasource

def _iso(ts: datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _range_of(board: dict) -> dict:
    """The dashboard's own time range (absolute ISO or now-relative) as Grafana sends it."""
    def parse(text: str) -> datetime:
        if text == "now":
            return datetime.now(UTC)
        m = re.fullmatch(r"now-(\d+)([mhdw])", text)
        if m:
            unit = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}[m.group(2)]
            return datetime.now(UTC) - timedelta(**{unit: int(m.group(1))})
        return datetime.fromisoformat(text.replace("Z", "+00:00"))

    start, end = parse(board["time"]["from"]), parse(board["time"]["to"])
    return {"from": _iso(start), "to": _iso(end), "raw": dict(board["time"])}


LOADER_DIR = ROOT / ".data" / "test-loader"  # generated trips, kept between runs (deterministic)


def run_loader(database_url: str, *args: str) -> None:
    """``python -m loader`` as a user runs it, writing to the test database."""
    env = {**os.environ, "DATABASE_URL": database_url, "DATA_DIR": str(LOADER_DIR)}
    env.pop("DATASOURCE_URL", None)
    cmd = [sys.executable, "-m", "loader", *args, "--data-dir", str(LOADER_DIR),
           "--scale", "0.001", "--database-url", database_url]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"


@pytest.fixture(scope="module")
def datasource(database_url):
    """A filled database and the app serving it, for the whole module."""
    empty_database(database_url)
    # A short replay: train on January, backfill January-February, two days of March live.
    run_loader(database_url, "backfill", "--until", "2020-03-01", "--retrain", "--no-progress")
    run_loader(database_url, "live", "--start", "2020-03-01", "--until", "2020-03-03",
               "--speed", "1e9", "--tick", "0.01")
    app = create_app({"database_url": database_url, "pool_size": 4})
    yield app.test_client()
    app.extensions["pool"].close()


def _variable_options(http, query: str, rng: dict) -> list[dict]:
    r = http.post("/variable", json={"payload": {"target": query}, "range": rng})
    assert r.status_code == 200, (query, r.get_json())
    openapi.validate("/variable", r.get_json())
    return r.get_json()


def resolve_variables(http, board: dict, overrides: dict | None = None) -> dict:
    """Each variable's value as Grafana would pick it: the saved one when offered, else the first."""
    rng = _range_of(board)
    out: dict = {}
    for v in board["templating"]["list"]:
        name = v["name"]
        if v["type"] == "adhoc":
            continue
        if v["type"] == "datasource":
            out[name] = {"text": v["current"]["text"], "value": v["current"]["value"]}
            continue
        if v["type"] == "query":
            query = interpolate(v["query"]["query"], out, "regex")
            items = _variable_options(http, query, rng)
            options = [(i["__text"], i["__value"]) for i in items]
        else:
            options = [(o["text"], o["value"]) for o in v["options"]]
        assert options, f"variable {name} has no options"
        want = (overrides or {}).get(name, v["current"]["value"])
        chosen = next((o for o in options if o[1] == want), options[0])
        out[name] = {"text": chosen[0], "value": chosen[1]}
    return out


def query_body(board: dict, panel_id: int, targets: list, variables: dict,
               max_points: int = 1000, filters=None) -> dict:
    rng = _range_of(board)
    span_ms = (datetime.fromisoformat(rng["to"].replace("Z", "+00:00"))
               - datetime.fromisoformat(rng["from"].replace("Z", "+00:00"))).total_seconds() * 1000
    interval_ms = max(1000, int(span_ms // max_points))
    processed = [process_target(t, variables) for t in targets
                 if "target" in t and not t.get("hide")]
    return {"app": "dashboard", "requestId": f"SQR{panel_id}", "timezone": "utc",
            "panelId": panel_id, "dashboardUID": board["uid"], "range": rng,
            "rangeRaw": rng["raw"], "interval": f"{interval_ms // 1000}s",
            "intervalMs": interval_ms, "maxDataPoints": max_points, "targets": processed,
            "scopedVars": scoped_vars(variables), "filters": filters or [],
            "startTime": 1_700_000_000_000}


def send(http, body: dict) -> list:
    r = http.post("/query", json=body)
    assert r.status_code == 200, (body["targets"], r.get_json())
    out = r.get_json()
    openapi.validate("/query", out)
    return out


def check_timeseries(out: list, refs: list[str]) -> None:
    assert isinstance(out, list) and out, "no series"
    for item in out:
        assert isinstance(item.get("target"), str) and isinstance(item.get("datapoints"), list)
        for value, ts in item["datapoints"]:
            assert isinstance(ts, int) and (value is None or isinstance(value, (int, float)))
    for ref in refs:
        series = [s for s in out if s["refId"] == ref]
        assert series, f"no series for refId {ref}"
        assert any(v is not None for s in series for v, _ in s["datapoints"]), \
            f"refId {ref}: every point is null"


def check_table(out: list, refs: list[str]) -> list[dict]:
    tables = [t for t in out if t.get("type") == "table"]
    assert {t["refId"] for t in tables} >= set(refs)
    for t in tables:
        assert t["columns"] and t["rows"], "empty table"
        assert all(len(row) == len(t["columns"]) for row in t["rows"])
    return tables


def _panels(board: dict) -> list[dict]:
    return [p for p in board["panels"] if p["type"] != "row"]


def _walk(node, path=""):
    if isinstance(node, dict):
        yield path, node
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


PANEL_CASES = [pytest.param(name, p["id"], id=f"{name}:{p['id']}:{p['title']}")
               for name, board in BOARDS.items() for p in _panels(board) if p.get("targets")]


# ----------------------------------------------------------------------- static checks

def test_committed_json_is_the_generators_output():
    built = GEN.build()
    committed = {f.relative_to(DASHBOARDS).as_posix()
                 for f in [*DASHBOARDS.glob("*.json"), *DASHBOARDS.glob("infinity/*.json")]}
    assert committed == set(built), "run: python dashboards/generate.py"
    assert set(BOARDS) == {n for n in built if "/" not in n}
    for name, text in built.items():
        assert (DASHBOARDS / name).read_text() == text, \
            f"dashboards/{name} is stale: run python dashboards/generate.py and commit the JSON"


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_dashboard_structure(name):
    board = BOARDS[name]
    assert board["schemaVersion"] == 39 and "id" not in board
    assert board["uid"] and board["title"] and board["time"]["from"] and board["refresh"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in _panels(board):
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps another panel"
                cells.add((x, y))
        assert p.get("description"), f"{p['title']}: no description"
        defaults = p["fieldConfig"]["defaults"]
        assert defaults.get("unit"), f"{p['title']}: no unit"
        assert defaults["thresholds"]["steps"][0]["value"] is None, f"{p['title']}: thresholds"
        refs = [t["refId"] for t in p.get("targets", [])]
        assert len(refs) == len(set(refs))
        for t in p.get("targets", []):
            assert "target" in t and t["editorMode"] in ("code", "builder")
            if t["editorMode"] == "code":
                assert isinstance(t["payload"], str)
                json.loads(t["payload"])  # valid JSON before interpolation too
            else:
                assert isinstance(t["payload"], dict)
                assert all(isinstance(v, str) for v in t["payload"].values())
        if p["type"] == "text":
            assert p["options"]["content"].strip()
        else:
            assert p.get("targets"), f"{p['title']}: no query"
    names = [v["name"] for v in board["templating"]["list"]]
    assert names[0] == "datasource" and len(names) == len(set(names))


def test_model_quality_has_the_promised_controls():
    board = BOARDS["model-quality.json"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    for name in ("model", "metric", "window", "mode", "group_by", "column"):
        assert variables[name]["type"] == "query"
    assert variables["threshold"]["type"] == "custom"
    assert any(v["type"] == "adhoc" for v in variables.values())
    metrics_used = {t["target"] for p in _panels(board) for t in p.get("targets", [])}
    assert {"$metric", "accuracy", "precision", "recall", "f1", "label_coverage", "label_delay",
            "prediction_count", "positive_rate", "base_rate", "confusion_matrix",
            "calibration"} <= metrics_used
    kinds = {p["type"] for p in _panels(board)}
    assert {"timeseries", "stat", "table"} <= kinds
    annotation = board["annotations"]["list"][0]
    assert annotation["target"]["target"] == "annotations" and annotation["enable"]


def test_prometheus_replaced_quotes_all_six_queries():
    board = BOARDS["prometheus-replaced.json"]
    texts = "\n".join(p["options"]["content"] for p in _panels(board) if p["type"] == "text")
    essay = next((ROOT.parent / "shared" / "seed").glob("*.txt"), None)
    for query in GEN.PROMQL.values():
        assert query in texts
        if essay is not None:  # the queries are the essay's, verbatim up to line breaks
            flat = " ".join(query.split())
            assert flat.replace("( ", "(") in " ".join(essay.read_text().replace("&lt;", "<")
                                                       .split()).replace("( ", "(")
    live = {t["target"] for p in _panels(board) for t in p.get("targets", [])}
    assert {"accuracy", "precision", "recall", "mean_score", "quantile", "histogram"} <= live


def test_datasource_uid_matches_provisioning():
    provisioned = yaml.safe_load((PROVISIONING / "datasources" / "mlsli.yaml").read_text())
    (ds,) = provisioned["datasources"]
    assert ds["type"] == PLUGIN and ds["access"] == "proxy" and ds["uid"] == GEN.DS_UID
    for name, board in BOARDS.items():
        var = board["templating"]["list"][0]
        assert var["type"] == "datasource" and var["query"] == PLUGIN
        assert var["current"] == {"selected": True, "text": ds["name"], "value": ds["uid"]}
        refs = [(path, node["datasource"]) for path, node in _walk(board)
                if isinstance(node.get("datasource"), dict)]
        assert len(refs) > 10
        for path, ref in refs:
            assert ref == {"type": PLUGIN, "uid": "${datasource}"}, f"{name}{path}"


def test_dashboard_provider_matches_compose_mounts():
    """Each Grafana service sees its own flavour at the provider's path, home page included."""
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "mlsli.yaml").read_text())
    (p,) = provider["providers"]
    path = p["options"]["path"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for service, source in (("grafana", DASHBOARDS / "infinity"), ("grafana11", DASHBOARDS)):
        grafana = compose["services"][service]
        mounts = {dst: src for src, dst in (v.split(":")[:2] for v in grafana["volumes"])}
        assert mounts["/etc/grafana/provisioning/dashboards/mlsli.yaml"] == \
            "./provisioning/dashboards/mlsli.yaml"
        seen = {}
        for dst, src in mounts.items():
            if dst == path:  # a directory of dashboards
                seen.update({f.name: f for f in (ROOT / src).glob("*.json")})
            elif dst.startswith(path + "/"):
                seen[dst.rsplit("/", 1)[1]] = ROOT / src
        assert set(seen) == set(GEN.DASHBOARDS), service
        assert all(f.resolve().parent == source for f in seen.values()), service
        home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
        assert home.startswith(path + "/")
        assert json.loads(seen[home.rsplit("/", 1)[1]].read_text())["title"] == "Model quality"


def test_unit_overrides_give_every_metric_its_unit():
    overrides = GEN.unit_overrides()
    for m in registry.REGISTRY.values():
        if m.source != "builtin" or m.kind == "table":
            continue
        for name in (m.name, f"{m.name} pickup_borough=Queens", f"{MODEL} {m.name}"):
            hits = [o for o in overrides if re.fullmatch(o["matcher"]["options"], name)]
            units = [p["value"] for o in hits for p in o["properties"] if p["id"] == "unit"]
            assert units == ([] if m.unit == "percentunit" else [m.unit]), name


def test_interpolation_emulation():
    variables = {"model": {"text": "a.b", "value": "a.b"}, "many": {"text": "x", "value": ["x", "y"]}}
    assert interpolate("$model ${model} [[model]]", variables, "regex") == "a\\.b a\\.b a\\.b"
    assert interpolate("$many $unknown", variables, "regex") == "(x|y) $unknown"
    assert process_payload('{"m":"$model","l":$many}', "code", variables) == \
        {"m": "a.b", "l": ["x", "y"]}
    assert process_payload('{"l":"$many"}', "code", variables) == {}  # quoted multi-value
    assert process_payload({"m": "$model", "n": 1}, "builder", variables) == {"m": "a\\.b", "n": "1"}
    assert process_payload({"m": None}, "builder", variables) == {}


# ----------------------------------------------------------------------- live checks

def test_every_variable_query_answers(datasource):
    for name, board in BOARDS.items():
        rng = _range_of(board)
        values = resolve_variables(datasource, board)
        for v in board["templating"]["list"]:
            if v["type"] != "query":
                continue
            items = _variable_options(datasource, interpolate(v["query"]["query"], values,
                                                              "regex"), rng)
            offered = [i["__value"] for i in items]
            assert v["current"]["value"] in offered, f"{name}: ${v['name']} default not offered"
        assert values["model"]["value"] == MODEL


@pytest.mark.parametrize("name,panel_id", PANEL_CASES)
def test_every_panel_returns_data_of_its_shape(datasource, name, panel_id):
    board = BOARDS[name]
    panel = next(p for p in board["panels"] if p["id"] == panel_id)
    variables = resolve_variables(datasource, board)
    body = query_body(board, panel_id, panel["targets"], variables,
                      panel.get("maxDataPoints", 800))
    for stored, sent in zip(panel["targets"], body["targets"], strict=True):
        if stored.get("payload"):
            assert sent["payload"], f"{stored['refId']}: the plugin would send an empty payload"
        assert "$" not in json.dumps(sent["payload"]) + sent["target"]
    out = send(datasource, body)
    refs = [t["refId"] for t in panel["targets"]]
    if panel["type"] in ("timeseries", "stat", "heatmap"):
        check_timeseries(out, refs)
        if panel["type"] == "heatmap":  # pre-bucketed: every series is named by a bin edge
            assert len(out) > 1 and all(float(s["target"]) == float(s["target"]) for s in out)
        named = {o["matcher"]["options"]: prop["value"] for o in panel["fieldConfig"]["overrides"]
                 if o["matcher"]["id"] == "byFrameRefID" for prop in o["properties"]
                 if prop["id"] == "displayName"}
        shown = [named.get(s["refId"], s["target"]) for s in out]
        assert len(shown) == len(set(shown)), f"two series would be named alike: {shown}"
    elif panel["type"] in ("table", "barchart"):
        tables = check_table(out, refs)
        if panel["type"] == "barchart":
            columns = {c["text"] for c in tables[0]["columns"]}
            excluded = panel["transformations"][0]["options"]["excludeByName"]
            assert panel["options"]["xField"] in columns and set(excluded) < columns
    else:
        raise AssertionError(f"no shape check for panel type {panel['type']}")


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_annotations_return_model_events(datasource, name):
    board = BOARDS[name]
    variables = resolve_variables(datasource, board)
    for annotation in board["annotations"]["list"]:
        body = query_body(board, 0, [annotation["target"]], variables)
        (table,) = check_table(send(datasource, body), ["Anno"])
        columns = [c["text"] for c in table["columns"]]
        assert columns[:2] == ["time", "timeEnd"] and "text" in columns
        assert all(isinstance(row[0], int) for row in table["rows"])
        titles = [row[columns.index("title")] for row in table["rows"]]
        assert any(t.startswith("Trained") for t in titles), titles


def _sli_panel(board):
    return next(p for p in _panels(board) if p["type"] == "timeseries"
                and p["targets"][0]["target"] == "$metric")


def test_selected_sli_for_every_metric_choice(datasource):
    board = BOARDS["model-quality.json"]
    panel = _sli_panel(board)
    metrics = [i["__value"] for i in _variable_options(datasource, f"metrics {MODEL}",
                                                       _range_of(board))]
    assert "accuracy" in metrics and len(metrics) > 10
    assert not set(metrics) & registry.CATEGORICAL_ONLY  # they need a segment column
    for metric in metrics:
        variables = resolve_variables(datasource, board, {"metric": metric})
        body = query_body(board, panel["id"], panel["targets"], variables)
        check_timeseries(send(datasource, body), ["A"])


def test_group_by_and_segment_filters(datasource):
    board = BOARDS["model-quality.json"]
    panel = _sli_panel(board)
    choices = [i["__value"] for i in _variable_options(datasource, f"group_by {MODEL}",
                                                       _range_of(board))]
    assert choices[0] == "none" and {"pickup_borough", "vendor", "time_of_day"} <= set(choices)
    for key in choices[1:]:
        variables = resolve_variables(datasource, board, {"group_by": key})
        out = send(datasource, query_body(board, panel["id"], panel["targets"], variables))
        check_timeseries(out, ["A"])
        assert len(out) > 1 and all(f" {key}=" in s["target"] for s in out)
    variables = resolve_variables(datasource, board)
    keys = [k["text"] for k in datasource.post("/tag-keys", json={}).get_json()]
    values = [v["text"] for v in datasource.post("/tag-values", json={"key": keys[0]}).get_json()]
    total = send(datasource, query_body(board, 1, [_count_target()], variables))
    only = send(datasource, query_body(board, 1, [_count_target()], variables,
                                       filters=[{"key": keys[0], "operator": "=",
                                                 "value": values[0]}]))
    last = [_last(total), _last(only)]
    assert 0 < last[1] < last[0]


def _count_target() -> dict:
    return GEN.code_target("A", "prediction_count", model="$model", window="cumulative")


def _last(out: list) -> float:
    return next(v for v, _ in reversed(out[0]["datapoints"]) if v is not None)


def test_threshold_choices_change_the_answer(datasource):
    board = BOARDS["model-quality.json"]
    panel = next(p for p in _panels(board) if p["title"].startswith("Confusion"))
    seen = set()
    for threshold in GEN.THRESHOLD_CHOICES:
        variables = resolve_variables(datasource, board, {"threshold": threshold})
        (table,) = check_table(send(datasource, query_body(board, panel["id"], panel["targets"],
                                                           variables)), ["A"])
        seen.add(json.dumps(table["rows"]))
    assert len(seen) > 2


def test_stat_panels_show_a_current_value(datasource):
    board = BOARDS["model-quality.json"]
    variables = resolve_variables(datasource, board)
    for panel in (p for p in _panels(board) if p["type"] == "stat"):
        out = send(datasource, query_body(board, panel["id"], panel["targets"], variables,
                                          panel["maxDataPoints"]))
        value = _last(out)
        assert math.isfinite(value), panel["title"]
