"""Grafana alert provisioning (provisioning/alerting/*.yaml): complete, current, and right.

No Grafana runs here, so three things are checked instead:

* the files carry every field Grafana's file provisioning requires, and are the output of
  ``provisioning/generate_alerting.py`` (the one place for objectives);
* every Infinity query of every rule, with ``${__from}``/``${__to}`` substituted from its
  ``relativeTimeRange`` as Infinity's backend macros do, answers data from the live app;
* an emulation of Grafana's evaluation (Infinity frames, Reduce last with dropNN, Threshold,
  Math joined by labels, no-data handling) over a taxi replay whose accuracy decays fires the
  accuracy rule in April 2020 and not in February, with the accuracy it judges equal to
  scikit-learn's on the window's rows.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import psycopg2
import pytest
import yaml
from sklearn.metrics import accuracy_score

from datasource import create_app
from tests import infinity
from tests.conftest import empty_database

ROOT = Path(__file__).resolve().parent.parent
ALERTING = ROOT / "provisioning" / "alerting"
MODEL = "taxi-high-tip"
LOADER_DIR = ROOT / ".data" / "test-loader-alerting"  # generated trips, kept between runs
SCALE = "0.01"  # ~60 April trips a day: enough for a day's accuracy to show the decay

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _generator():
    spec = importlib.util.spec_from_file_location("generate_alerting",
                                                  ROOT / "provisioning" / "generate_alerting.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = _generator()
RULES = yaml.safe_load((ALERTING / "mlsli-rules.yaml").read_text())
NOTIFY = yaml.safe_load((ALERTING / "mlsli-notifications.yaml").read_text())
ALL_RULES = [r for g in RULES["groups"] for r in g["rules"]]
STATES = {"noDataState": {"NoData", "Alerting", "OK", "KeepLast"},
          "execErrState": {"Error", "Alerting", "OK", "KeepLast"}}
_DURATION = re.compile(r"(\d+[smhdw])+")


def _by_uid(uid: str) -> dict:
    return next(r for r in ALL_RULES if r["uid"] == uid)


# ----------------------------------------------------------------------- static checks


def test_committed_yaml_is_the_generators_output():
    built = GEN.build()
    assert {p.name for p in ALERTING.iterdir()} == set(built), \
        "only generated YAML in provisioning/alerting (Grafana refuses other files there)"
    for name, text in built.items():
        assert (ALERTING / name).read_text() == text, \
            f"{name} is stale: run python provisioning/generate_alerting.py and commit it"


def test_rule_groups_have_every_field_file_provisioning_requires():
    assert RULES["apiVersion"] == 1
    uids = [r["uid"] for r in ALL_RULES]
    assert len(uids) == len(set(uids)) == 4
    provisioned = yaml.safe_load((ROOT / "provisioning" / "datasources" /
                                  "mlsli-infinity.yaml").read_text())["datasources"]
    (ds,) = provisioned
    assert ds["type"] == "yesoreyeram-infinity-datasource" and ds["uid"] == GEN.DATASOURCE_UID
    assert ds["url"] in ds["jsonData"]["allowedHosts"]
    for group in RULES["groups"]:
        assert group["orgId"] == 1 and group["name"] and group["folder"]
        assert _DURATION.fullmatch(group["interval"])
        for rule in group["rules"]:
            assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", rule["uid"]), rule["uid"]
            assert rule["title"] and "$" not in rule["title"]
            assert _DURATION.fullmatch(rule["for"])
            for key, allowed in STATES.items():
                assert rule[key] in allowed, (rule["uid"], key)
            refs = [d["refId"] for d in rule["data"]]
            assert len(refs) == len(set(refs)) and rule["condition"] in refs
            for d in rule["data"]:
                assert d["model"]["refId"] == d["refId"] and d["datasourceUid"]
                if d["datasourceUid"] == "__expr__":
                    _check_expression(d["model"], refs)
                else:
                    _check_infinity(d, ds["uid"])
            # Strings outside `model` go through environment expansion: no literal `$`.
            for text in [*rule["annotations"].values(), *rule["labels"].values()]:
                assert "$" not in text, text


def _check_expression(model: dict, refs: list[str]) -> None:
    kind = model["type"]
    assert kind in ("reduce", "threshold", "math")
    if kind == "math":
        used = re.findall(r"\$(\w+)", model["expression"])
        assert used and set(used) <= set(refs)
    else:
        assert model["expression"] in refs
    if kind == "reduce":
        assert model["reducer"] == "last" and model["settings"]["mode"] == "dropNN"
    if kind == "threshold":
        (cond,) = model["conditions"]
        assert cond["evaluator"]["type"] in ("gt", "lt") and len(cond["evaluator"]["params"]) == 1


def _check_infinity(d: dict, uid: str) -> None:
    rtr = d["relativeTimeRange"]
    assert rtr["from"] > rtr["to"] >= 0
    model = d["model"]
    assert d["datasourceUid"] == uid and model["datasource"]["uid"] == uid
    assert model["parser"] == "backend" and model["source"] == "url" and model["type"] == "json"
    assert model["format"] in ("timeseries", "table") and model["url"] == "/api/v1/series"
    params = model["url_options"]["params"]
    keys = [p["key"] for p in params]
    assert {"from", "to", "metric", "group_by"} <= set(keys)
    for p in params:  # alerts substitute only Infinity's macros: no dashboard variables
        assert not re.sub(r"\$\{__(from|to)\}", "", p["value"]).count("$"), p
    # only `value` and labels: Math joins on labels, extra numbers would be extra series
    numbers = [c for c in model["columns"] if c["type"] == "number"]
    assert len(numbers) == 1
    assert "metric" not in {c["text"] for c in model["columns"]}


def test_contact_point_and_policy():
    assert NOTIFY["apiVersion"] == 1
    (cp,) = NOTIFY["contactPoints"]
    assert cp["orgId"] == 1 and cp["name"]
    for receiver in cp["receivers"]:
        assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", receiver["uid"])
        assert receiver["type"] == "webhook" and receiver["settings"]["url"].startswith("http")
        assert not {"authorization_credentials", "password"} & set(receiver["settings"])
    (policy,) = NOTIFY["policies"]
    assert policy["orgId"] == 1 and policy["receiver"] == cp["name"]
    assert "model" in policy["group_by"]
    assert all(r["receiver"] == cp["name"] for r in policy.get("routes", []))


def test_objectives_are_declared_once():
    """The thresholds the rules use are the declaration's, and nowhere else."""
    o = GEN.OBJECTIVES
    math_expr = _by_uid("mlsli-accuracy-below-objective")["data"][-1]["model"]["expression"]
    assert math_expr == f"$B < {o['accuracy_objective']:g} && $D >= {o['accuracy_min_coverage']:g}"
    thresholds = {r["uid"]: r["data"][-1]["model"]["conditions"][0]["evaluator"]["params"][0]
                  for r in ALL_RULES if r["data"][-1]["model"]["type"] == "threshold"}
    assert thresholds == {"mlsli-label-coverage-collapsed": o["coverage_floor"],
                          "mlsli-prediction-volume-zero": 1, "mlsli-psi-drift": o["psi_limit"]}


# ----------------------------------------------------------------------- Grafana's evaluation


def _key(labels: dict) -> frozenset:
    return frozenset(labels.items())


def run_query(server: str, node: dict, now_ms: int):
    """One Infinity query at ``now_ms``: its frames, as labelled series or numbers."""
    rtr = node["relativeTimeRange"]
    macros = {"__from": now_ms - rtr["from"] * 1000, "__to": now_ms - rtr["to"] * 1000}
    status, rows = infinity.fetch(infinity.request(server, node["model"], macros))
    assert status == 200, rows
    frames = infinity.frames(node["model"], rows)
    if node["model"]["format"] == "timeseries":
        return "series", {_key(f["labels"]): f["values"] for f in frames}
    numbers = {}
    for f in frames:
        assert _key(f["labels"]) not in numbers, "two rows with the same labels"
        numbers[_key(f["labels"])] = f["values"][0]
    return "numbers", numbers


def _nan(v) -> float:
    return math.nan if v is None else float(v)


def _join(operands: dict[str, dict]) -> list[tuple[frozenset, dict]]:
    """Math's union by labels: items join when one label set is a subset of the other."""
    first, *rest = operands
    out = []
    for key, value in operands[first].items():
        values, labels = {first: value}, key
        for name in rest:
            match = [(k, v) for k, v in operands[name].items() if k <= labels or labels <= k]
            if len(match) != 1:
                break
            values[name] = match[0][1]
            labels = labels | match[0][0]
        else:
            out.append((labels, values))
    return out


_CLAUSE = re.compile(r"\s*\$(\w+)\s*(<|<=|>|>=)\s*([0-9.]+)\s*")
_OPS = {"<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
        ">=": lambda a, b: a >= b}


def evaluate(rule: dict, server: str, now_ms: int) -> tuple[str, dict, dict]:
    """(state, {labels: condition value}, every node's result) of one evaluation at now_ms."""
    results: dict[str, tuple[str, dict]] = {}
    no_data = False
    for node in rule["data"]:
        m = node["model"]
        if node["datasourceUid"] != "__expr__":
            kind, found = run_query(server, node, now_ms)
            values = [v for vs in found.values() for v in (vs if kind == "series" else [vs])]
            no_data |= all(v is None for v in values)  # no rows, or only nulls: NoData
            results[node["refId"]] = (kind, found)
        elif m["type"] == "reduce":
            kind, found = results[m["expression"]]
            assert kind == "series"
            last = {k: next((v for v in reversed(vs) if v is not None), None)
                    for k, vs in found.items()}
            results[node["refId"]] = ("numbers", {k: _nan(v) for k, v in last.items()})
        elif m["type"] == "threshold":
            kind, found = results[m["expression"]]
            assert kind == "numbers", "a threshold on a time series needs a Reduce first"
            ev = m["conditions"][0]["evaluator"]
            op = {"gt": ">", "lt": "<"}[ev["type"]]
            results[node["refId"]] = ("numbers", {k: float(_OPS[op](_nan(v), ev["params"][0]))
                                                  for k, v in found.items()})
        else:
            clauses = [_CLAUSE.fullmatch(c) for c in m["expression"].split("&&")]
            assert all(clauses), m["expression"]
            operands = {}
            for c in clauses:
                kind, found = results[c.group(1)]
                assert kind == "numbers"
                operands[c.group(1)] = {k: _nan(v) for k, v in found.items()}
            joined = _join(operands)
            results[node["refId"]] = ("numbers", {
                labels: float(all(_OPS[c.group(2)](vals[c.group(1)], float(c.group(3)))
                                  for c in clauses)) for labels, vals in joined})
    if no_data:
        return {"NoData": "NoData", "Alerting": "Alerting", "OK": "Normal",
                "KeepLast": "KeepLast"}[rule["noDataState"]], {}, results
    condition = results[rule["condition"]][1]
    firing = {k: v for k, v in condition.items() if v == v and v != 0}
    return ("Alerting" if firing else "Normal"), condition, results


# ----------------------------------------------------------------------- live checks

FEB = "2020-02-14T12:00:00Z"
APR = "2020-04-15T12:00:00Z"
AFTER = "2020-05-20T12:00:00Z"  # the replay stops at the end of April


def _ms(iso: str) -> int:
    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)


@pytest.fixture(scope="module")
def filled(database_url):
    """A replay through April (the model decays), served over HTTP on a loopback port."""
    empty_database(database_url)
    env = {**os.environ, "DATABASE_URL": database_url, "DATA_DIR": str(LOADER_DIR)}
    env.pop("DATASOURCE_URL", None)
    cmd = [sys.executable, "-m", "loader", "backfill", "--until", "2020-05-01", "--retrain",
           "--no-progress", "--data-dir", str(LOADER_DIR), "--scale", SCALE,
           "--database-url", database_url]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    app = create_app({"database_url": database_url, "pool_size": 4})
    live = infinity.LiveServer(app)
    try:
        yield live.url, database_url
    finally:
        live.close()
        app.extensions["pool"].close()


@pytest.mark.parametrize("uid", [r["uid"] for r in ALL_RULES])
def test_every_rule_query_answers_from_the_live_server(filled, uid):
    server, _ = filled
    rule = _by_uid(uid)
    for node in rule["data"]:
        if node["datasourceUid"] == "__expr__":
            continue
        kind, found = run_query(server, node, _ms(APR))
        assert found, f"{node['refId']}: no frames"
        values = [v for vs in found.values() for v in (vs if kind == "series" else [vs])]
        assert any(v is not None for v in values), f"{node['refId']}: only nulls"
        assert all(dict(k).get("model") == MODEL for k in found)


def _oracle_accuracy(database_url: str, end_ms: int, window_s: int) -> tuple[float, float]:
    """scikit-learn's accuracy and the label coverage of (end - window, end], from the tables."""
    conn = psycopg2.connect(database_url)
    with conn.cursor() as cur:
        cur.execute("""SELECT p.score, p.label, m.threshold FROM predictions p
                       JOIN models m USING (model_id)
                       WHERE m.name = %s AND p.ts > %s AND p.ts <= %s""",
                    (MODEL, datetime.fromtimestamp(end_ms / 1000 - window_s, UTC),
                     datetime.fromtimestamp(end_ms / 1000, UTC)))
        rows = cur.fetchall()
    conn.close()
    labeled = [(s, y, 0.5 if t is None else t) for s, y, t in rows if y is not None]
    acc = accuracy_score([int(y) for _, y, _ in labeled], [int(s >= t) for s, _, t in labeled])
    return acc, len(labeled) / len(rows)


def test_accuracy_rule_fires_in_april_not_in_february(filled):
    server, database_url = filled
    rule = _by_uid("mlsli-accuracy-below-objective")
    o = GEN.OBJECTIVES
    seen = {}
    for when in (FEB, APR):
        state, condition, results = evaluate(rule, server, _ms(when))
        (accuracy,) = results["B"][1].values()
        (coverage,) = results["D"][1].values()
        want_acc, want_cov = _oracle_accuracy(database_url, _ms(when), 86400)
        assert math.isclose(accuracy, want_acc, abs_tol=1e-9), when
        assert math.isclose(coverage, want_cov, abs_tol=1e-9), when
        assert coverage >= o["accuracy_min_coverage"]
        assert list(condition) == [_key({"model": MODEL})]
        seen[when] = state, accuracy
    assert seen[FEB][0] == "Normal" and seen[FEB][1] >= o["accuracy_objective"]
    assert seen[APR][0] == "Alerting" and seen[APR][1] < o["accuracy_objective"]


def test_accuracy_rule_needs_the_coverage(filled):
    """The same April window with a coverage share above what arrived does not fire."""
    server, _ = filled
    rule = _by_uid("mlsli-accuracy-below-objective")
    strict = {**rule, "data": [*rule["data"][:-1], {
        **rule["data"][-1], "model": {**rule["data"][-1]["model"],
                                      "expression": "$B < 0.7 && $D >= 0.999"}}]}
    assert evaluate(rule, server, _ms(APR))[0] == "Alerting"
    assert evaluate(strict, server, _ms(APR))[0] == "Normal"


def test_other_rules_over_the_replay(filled):
    server, _ = filled
    states = {(uid, when): evaluate(_by_uid(uid), server, _ms(when))[0]
              for uid in ("mlsli-label-coverage-collapsed", "mlsli-prediction-volume-zero",
                          "mlsli-psi-drift") for when in (FEB, APR, AFTER)}
    # feedback keeps arriving: coverage never collapses; after the replay there is nothing
    assert states[("mlsli-label-coverage-collapsed", FEB)] == "Normal"
    assert states[("mlsli-label-coverage-collapsed", APR)] == "Normal"
    assert states[("mlsli-label-coverage-collapsed", AFTER)] == "Normal"  # noDataState OK
    # predictions flow in February and April; none once the replay stopped
    assert states[("mlsli-prediction-volume-zero", FEB)] == "Normal"
    assert states[("mlsli-prediction-volume-zero", APR)] == "Normal"
    assert states[("mlsli-prediction-volume-zero", AFTER)] == "Alerting"
    # the lockdown moves the inputs away from January's: drift in April, not in February
    assert states[("mlsli-psi-drift", FEB)] == "Normal"
    assert states[("mlsli-psi-drift", APR)] == "Alerting"


def test_drift_rule_fires_per_column(filled):
    server, _ = filled
    state, condition, results = evaluate(_by_uid("mlsli-psi-drift"), server, _ms(APR))
    psi = {dict(k)["column"]: v for k, v in results["A"][1].items()}
    firing = {dict(k)["column"] for k, v in condition.items() if v}
    assert firing == {c for c, v in psi.items() if v is not None and v > GEN.OBJECTIVES["psi_limit"]}
    assert firing and "score" in psi
