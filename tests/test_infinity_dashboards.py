"""The Infinity dashboards (Grafana 12+), run against a live datasource as Infinity would.

Every variable query, panel target and annotation of ``dashboards/infinity/*.json`` is
interpolated as Grafana does for Infinity (defaults of the template variables, ``${model:csv}``,
``${__from}``/``${__to}`` and ``${__interval_ms}`` in ms), sent as Infinity's HTTP GET to the
app served on a loopback port, and the answer is checked for what its panel needs: the
declared columns, epoch-ms times sorted ascending, labelled series. The data is the one of
``tests/test_dashboards.py`` (its fixture: a short real loader run).

Both flavours come from one definition, so every Infinity panel must also show exactly what
its simpod twin shows through ``POST /query``: same series names, same points.
"""

from __future__ import annotations

import json
import math
from datetime import datetime

import pytest

from tests import infinity
from tests.test_dashboards import (
    BOARDS,
    DASHBOARDS,
    GEN,
    MODEL,
    _range_of,
    _walk,
    datasource,  # noqa: F401  (the filled app, module-scoped)
    query_body,
    send,
)
from tests.test_dashboards import resolve_variables as simpod_variables

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

INFINITY_BOARDS = {name: json.loads((DASHBOARDS / "infinity" / name).read_text())
                   for name in GEN.DASHBOARDS}
PANEL_CASES = [pytest.param(name, p["id"], id=f"{name}:{p['id']}:{p['title']}")
               for name, board in INFINITY_BOARDS.items() for p in board["panels"]
               if p.get("targets")]


@pytest.fixture(scope="module")
def server(datasource):  # noqa: F811
    live = infinity.LiveServer(datasource.application)
    try:
        yield live.url
    finally:
        live.close()


def _ms(iso: str) -> int:
    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)


def time_variables(board: dict, max_points: int = 1000) -> dict:
    """Grafana's globals for the dashboard's range; the interval as the simpod emulation has it."""
    rng = _range_of(board)
    start, end = _ms(rng["from"]), _ms(rng["to"])
    return {"__from": start, "__to": end,
            "__interval_ms": max(1000, (end - start) // max_points)}


def resolve(server: str, board: dict) -> dict:
    """Each template variable's value as Grafana picks it: the saved one when offered."""
    values: dict = dict(time_variables(board))
    for v in board["templating"]["list"]:
        if v["type"] == "datasource":
            values[v["name"]] = v["current"]["value"]
            continue
        if v["type"] == "query":
            assert v["datasource"]["type"] == GEN.INFINITY
            query = v["query"]["infinityQuery"]
            assert v["query"]["queryType"] == "infinity"
            status, rows = infinity.fetch(infinity.request(server, query, values))
            assert status == 200, (v["name"], rows)
            infinity.frames(query, rows)  # the declared columns are there, as strings
            options = [(r["__text"], r["__value"]) for r in rows]
            assert options, f"variable {v['name']} has no options"
        elif v["type"] == "textbox":
            options = [(v["query"], v["query"])]
        else:
            options = [(o["text"], o["value"]) for o in v["options"]]
        want = v["current"]["value"]
        assert want in [o[1] for o in options], f"${v['name']}: default {want!r} not offered"
        values[v["name"]] = want
    return values


def run_target(server: str, target: dict, values: dict) -> list[dict]:
    status, rows = infinity.fetch(infinity.request(server, target, values))
    assert status == 200, (target["refId"], rows)
    return rows


# ----------------------------------------------------------------------- static checks


@pytest.mark.parametrize("name", sorted(INFINITY_BOARDS))
def test_infinity_dashboard_mirrors_its_simpod_twin(name):
    """Same panels, layout, dropdowns and annotation; only the query parts differ."""
    inf, simpod = INFINITY_BOARDS[name], BOARDS[name]
    assert inf["uid"] == simpod["uid"] + "-infinity" and len(inf["uid"]) <= 40
    assert [(p["id"], p["type"], p["title"], p["gridPos"]) for p in inf["panels"]] == \
        [(p["id"], p["type"], p["title"], p["gridPos"]) for p in simpod["panels"]]
    names = [v["name"] for v in inf["templating"]["list"]]
    assert names == [("filter" if v["type"] == "adhoc" else v["name"])
                     for v in simpod["templating"]["list"]]
    for p_inf, p_simpod in zip(inf["panels"], simpod["panels"], strict=True):
        assert [t["refId"] for t in p_inf.get("targets", [])] == \
            [t["refId"] for t in p_simpod.get("targets", [])]
        for t in p_inf.get("targets", []):
            assert t["parser"] == "backend" and t["source"] == "url" and t["type"] == "json"
            assert t["url"] == "/api/v1/series" and t["datasource"] == GEN.INFINITY_DS
            params = {q["key"]: q["value"] for q in t["url_options"]["params"]}
            assert params["from"] == "${__from}" and params["to"] == "${__to}"
            assert params["model"] == "${model:csv}" and params["filter"] == "${filter}"
            if t["format"] == "timeseries":
                assert params["step"] == "${__interval_ms}"
                assert [c["type"] for c in t["columns"]] == ["timestamp_epoch", "number",
                                                             "string"]
    refs = [node for _, node in _walk(inf) if isinstance(node, dict) and "datasource" in node
            and isinstance(node["datasource"], dict)]
    assert refs and all(n["datasource"] == GEN.INFINITY_DS for n in refs)
    assert "simpod" not in json.dumps(inf)


def test_infinity_interpolation_emulation():
    values = {"model": ["a", "b"], "window": "1d", "__from": 1, "__interval_ms": 5}
    assert infinity.interpolate("${model:csv} $model ${window} $__interval_ms ${__from} $x",
                                values) == "a,b {a,b} 1d 5 1 $x"
    url = infinity.request("http://h:1", {"url": "/api/v1/series", "url_options": {
        "method": "GET", "params": [{"key": "model", "value": "${model:csv}"},
                                    {"key": "filter", "value": "k=~a b"}]}}, values)
    assert url == "http://h:1/api/v1/series?model=a%2Cb&filter=k%3D~a+b"


# ----------------------------------------------------------------------- live checks


def test_every_infinity_variable_answers(server):
    for board in INFINITY_BOARDS.values():
        values = resolve(server, board)
        assert values["model"] == MODEL and values["datasource"] == GEN.INFINITY_UID


@pytest.mark.parametrize("name,panel_id", PANEL_CASES)
def test_every_infinity_panel_returns_rows_of_its_shape(server, datasource, name, panel_id):  # noqa: F811
    board = INFINITY_BOARDS[name]
    panel = next(p for p in board["panels"] if p["id"] == panel_id)
    values = resolve(server, board)
    shown: dict[str, dict] = {}
    for target in panel["targets"]:
        rows = run_target(server, target, values)
        assert rows, f"{target['refId']}: no rows"
        found = infinity.frames(target, rows)
        if target["format"] == "timeseries":
            assert panel["type"] in ("timeseries", "stat", "heatmap")
            assert any(v is not None for f in found for v in f["values"]), "every point is null"
            for f in found:  # legend: ${__field.labels.series}, or the refId's displayName
                shown[f["labels"]["series"]] = dict(zip(f["time"], f["values"], strict=True))
        else:
            assert panel["type"] in ("table", "barchart")
            declared = {c["text"] for c in target["columns"]}
            if panel["type"] == "barchart":
                excluded = panel["transformations"][0]["options"]["excludeByName"]
                assert panel["options"]["xField"] in declared and set(excluded) < declared
    if panel["type"] in ("timeseries", "stat", "heatmap"):
        assert panel["fieldConfig"]["defaults"]["displayName"] == "${__field.labels.series}"
        if panel["type"] == "heatmap":  # pre-bucketed: every series is named by a bin edge
            assert len(shown) > 1 and all(math.isfinite(float(s)) for s in shown)
        # The simpod twin through POST /query shows the same series with the same points.
        twin = next(p for p in BOARDS[name]["panels"] if p["id"] == panel_id)
        body = query_body(BOARDS[name], panel_id, twin["targets"],
                          simpod_variables(datasource, BOARDS[name]),
                          twin.get("maxDataPoints", 800))
        expected = {s["target"]: {t: v for v, t in s["datapoints"]}
                    for s in send(datasource, body)}
        assert set(shown) == set(expected)
        for series, points in shown.items():
            assert points.keys() == expected[series].keys(), series
            for t, v in points.items():
                assert (v is None and expected[series][t] is None) or \
                    math.isclose(v, expected[series][t], rel_tol=1e-12, abs_tol=1e-12), (series, t)


@pytest.mark.parametrize("name", sorted(INFINITY_BOARDS))
def test_infinity_annotations_return_model_events(server, name):
    board = INFINITY_BOARDS[name]
    values = resolve(server, board)
    (annotation,) = board["annotations"]["list"]
    rows = run_target(server, annotation["target"], values)
    found = infinity.frames(annotation["target"], rows)
    texts = [c["text"] for c in annotation["target"]["columns"]]
    assert texts[:2] == ["time", "timeEnd"] and {"title", "text", "tags"} <= set(texts)
    assert any(f["labels"]["title"].startswith("Trained") for f in found), rows


def test_segment_filter_textbox(server):
    """The default keeps every prediction; a typed filter narrows every panel."""
    board = INFINITY_BOARDS["model-quality.json"]
    values = resolve(server, board)
    panel = next(p for p in board["panels"] if p["title"].startswith("Predictions in"))
    target = dict(panel["targets"][0])
    params = [dict(p) for p in target["url_options"]["params"]]
    for p in params:
        if p["key"] == "window":
            p["value"] = "cumulative"
    target["url_options"] = {**target["url_options"], "params": params}

    def last(filter_text: str) -> float:
        rows = run_target(server, target, {**values, "filter": filter_text})
        return [r["value"] for r in rows if r["value"] is not None][-1]

    everything = last(GEN.NO_FILTER)
    status, rows = infinity.fetch(f"{server}/api/v1/variables/segment_values?key=pickup_borough"
                                  f"&model={MODEL}")
    assert status == 200 and rows
    queens = last(f"pickup_borough={rows[0]['__value']}")
    assert 0 < queens < everything
    assert last("pickup_borough!~^$") == everything  # no prediction lacks a borough
