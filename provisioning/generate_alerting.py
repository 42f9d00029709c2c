"""Grafana-managed alert rules, contact point and notification policy, written as Python.

    python provisioning/generate_alerting.py           # rewrite provisioning/alerting/*.yaml
    python provisioning/generate_alerting.py --check   # exit 1 when the committed YAML is stale

Every objective, threshold and window lives in ``OBJECTIVES`` below: change it there, run
this script, commit the YAML (``tests/test_alerting.py`` fails when it is stale). The YAML is
Grafana's file-provisioning format, loaded by the Grafana 12 service of docker-compose.yml
from ``/etc/grafana/provisioning/alerting``. This script sits outside that directory on
purpose: Grafana refuses files there that are not YAML or JSON.

Why the rules look as they do (see /work/shared/docs/grafana-infinity-and-alerting.md):

* Alert queries go through the Infinity datasource (uid ``mlsli-infinity``) with the
  ``backend`` parser, the only one that runs outside the browser.
* Alert rules cannot use dashboard variables nor ``$__interval_ms``: every rule covers all
  models at once (``group_by=model``, so each model is its own alert instance, labelled
  ``model``) and names its window and step literally. ``${__from}``/``${__to}`` are
  substituted by Infinity's backend macros from each query's ``relativeTimeRange``.
* Only ``value`` and the label columns are declared: every string column becomes a label, and
  Math expressions join queries on equal labels, so ``metric`` and ``series`` are left out.
* "Instant" queries (``max_points=1`` over a range of one step) answer one row per model,
  which Grafana reads as labelled numbers; time series queries go through Reduce.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
OUT = HERE / "alerting"

DATASOURCE_UID = "mlsli-infinity"  # provisioning/datasources/mlsli-infinity.yaml
DATASOURCE = {"type": "yesoreyeram-infinity-datasource", "uid": DATASOURCE_UID}
FOLDER = "ML SLIs"
GROUP = "mlsli-model-quality"
INTERVAL = "5m"  # how often the group is evaluated
STEP_S = 300  # the step of every time series query: the same as the evaluation interval

# The one place for objectives. Shares are in [0, 1]; windows use the datasource's grammar.
OBJECTIVES = {
    # (1) accuracy of the last day below the objective, judged only when enough labels came in
    "accuracy_objective": 0.70,
    "accuracy_window": "1d",
    "accuracy_min_coverage": 0.50,
    # (2) label coverage of a day, measured after a grace for late feedback, below this share
    "coverage_floor": 0.50,
    "coverage_window": "1d",
    "coverage_grace_s": 3600,
    # (3) no predictions at all in this window (no data counts as zero)
    "volume_window": "1h",
    # (4) PSI of any ranked column (features, score, segments) over this range above the limit
    "psi_limit": 0.20,
    "psi_range_s": 7 * 86400,  # a week: a single day would always differ in weekday and hour
    "psi_reference": "training",
    # how long a condition must hold before the alert fires
    "for": "15m",
}

# Where notifications go. A webhook needing no secret, on the Grafana container itself by
# default: nothing listens there, so deliveries fail visibly in Grafana's log until you point
# it at your receiver. Change WEBHOOK_URL (or the receiver type: email, slack, ...) and rerun.
WEBHOOK_URL = "http://localhost:9999/mlsli-alerts"
CONTACT_POINT = "mlsli-webhook"


# ----------------------------------------------------------------------- building blocks


def series_query(ref: str, metric: str, *, window: str, range_s: int, to_s: int = 0,
                 instant: bool = False, labels=("model",), extra=()) -> dict:
    """An Infinity query of GET /api/v1/series for every model, one model per label set."""
    params = [{"key": "metric", "value": metric}, {"key": "window", "value": window},
              {"key": "group_by", "value": "model"}, *extra,
              {"key": "from", "value": "${__from}"}, {"key": "to", "value": "${__to}"}]
    if instant:
        params.append({"key": "max_points", "value": "1"})
    else:
        params.append({"key": "step", "value": f"{STEP_S // 60}m"})
    columns = [] if instant else [{"selector": "time", "text": "time", "type": "timestamp_epoch"}]
    columns += [{"selector": "value", "text": "value", "type": "number"}]
    columns += [{"selector": name, "text": name, "type": "string"} for name in labels]
    return infinity(ref, params, columns, "table" if instant else "timeseries", range_s, to_s)


def infinity(ref: str, params: list, columns: list, fmt: str, range_s: int, to_s: int) -> dict:
    return {"refId": ref, "relativeTimeRange": {"from": range_s, "to": to_s},
            "datasourceUid": DATASOURCE_UID,
            "model": {"refId": ref, "datasource": dict(DATASOURCE), "type": "json",
                      "source": "url", "parser": "backend", "format": fmt,
                      "url": "/api/v1/series", "root_selector": "",
                      "url_options": {"method": "GET", "data": "", "headers": [],
                                      "params": params},
                      "columns": columns}}


def expression(ref: str, **model) -> dict:
    return {"refId": ref, "datasourceUid": "__expr__",
            "model": {"refId": ref, "datasource": {"type": "__expr__", "uid": "__expr__"},
                      **model}}


def reduce_last(ref: str, of: str) -> dict:
    """The last non-null point of each series (dropNN: a trailing gap is not NaN)."""
    return expression(ref, type="reduce", expression=of, reducer="last",
                      settings={"mode": "dropNN"})


def threshold(ref: str, of: str, op: str, value: float) -> dict:
    return expression(ref, type="threshold", expression=of,
                      conditions=[{"evaluator": {"type": op, "params": [value]}}])


def rule(uid: str, title: str, condition: str, data: list, *, no_data: str, summary: str,
         description: str, severity: str = "warning") -> dict:
    return {"uid": uid, "title": title, "condition": condition, "data": data,
            "for": OBJECTIVES["for"], "noDataState": no_data, "execErrState": "Error",
            "isPaused": False, "labels": {"severity": severity, "team": "ml"},
            "annotations": {"summary": summary, "description": description}}


# ----------------------------------------------------------------------- the rules


def rules() -> list[dict]:
    o = OBJECTIVES
    acc, share = o["accuracy_objective"], o["accuracy_min_coverage"]
    accuracy = rule(
        "mlsli-accuracy-below-objective",
        f"Accuracy of the last {o['accuracy_window']} below {acc:g}",
        "E",
        [series_query("A", "accuracy", window=o["accuracy_window"], range_s=3600),
         reduce_last("B", "A"),
         series_query("D", "label_coverage", window=o["accuracy_window"], range_s=STEP_S,
                      instant=True),
         expression("E", type="math", expression=f"$B < {acc:g} && $D >= {share:g}")],
        no_data="OK",  # no labels yet: the coverage and volume rules speak for that
        summary="{{ .Labels.model }}: accuracy {{ humanize .Values.B.Value }} over the last "
                f"{o['accuracy_window']}, objective {acc:g}",
        description=f"Fires only while label coverage of the window is at least {share:g}, "
                    "so a window whose feedback has not arrived yet is not judged on a few "
                    "early labels.")
    coverage = rule(
        "mlsli-label-coverage-collapsed",
        f"Label coverage below {o['coverage_floor']:g}",
        "C",
        [series_query("A", "label_coverage", window=o["coverage_window"],
                      range_s=o["coverage_grace_s"] + STEP_S, to_s=o["coverage_grace_s"],
                      instant=True),
         threshold("C", "A", "lt", o["coverage_floor"])],
        no_data="OK",  # no predictions at all is the volume rule's alert
        summary="{{ .Labels.model }}: only {{ humanizePercentage .Values.A.Value }} of the "
                f"predictions of a {o['coverage_window']} window have feedback",
        description=f"Coverage of the {o['coverage_window']} ending "
                    f"{o['coverage_grace_s'] // 60} minutes ago (a grace for late labels): "
                    "the feedback pipeline may be down.")
    volume = rule(
        "mlsli-prediction-volume-zero",
        f"No predictions in the last {o['volume_window']}",
        "C",
        [series_query("A", "prediction_count", window=o["volume_window"], range_s=STEP_S,
                      instant=True),
         threshold("C", "A", "lt", 1)],
        no_data="Alerting",  # an empty or all-null answer means no predictions either
        severity="critical",
        summary="{{ .Labels.model }}: no predictions in the last " + o["volume_window"],
        description="The model stopped writing predictions, or the datasource lost them.")
    drift = rule(
        "mlsli-psi-drift",
        f"Input drift: PSI above {o['psi_limit']:g} against {o['psi_reference']}",
        "C",
        [infinity("A", [{"key": "metric", "value": "drift_ranking"},
                        {"key": "group_by", "value": "model"},
                        {"key": "reference", "value": o["psi_reference"]},
                        {"key": "from", "value": "${__from}"}, {"key": "to", "value": "${__to}"}],
                  [{"selector": "psi", "text": "psi", "type": "number"},
                   {"selector": "model", "text": "model", "type": "string"},
                   {"selector": "column", "text": "column", "type": "string"}],
                  "table", o["psi_range_s"], 0),
         threshold("C", "A", "gt", o["psi_limit"])],
        no_data="OK",
        summary="{{ .Labels.model }}: {{ .Labels.column }} drifted, PSI "
                "{{ humanize .Values.A.Value }} over the last "
                f"{o['psi_range_s'] // 86400} days",
        description="One alert per drifted column of the drift ranking (features, the score "
                    f"and segments) against the '{o['psi_reference']}' reference; above "
                    "0.25 a distribution is usually read as shifted.")
    return [accuracy, coverage, volume, drift]


def rules_file() -> dict:
    return {"apiVersion": 1,
            "groups": [{"orgId": 1, "name": GROUP, "folder": FOLDER, "interval": INTERVAL,
                        "rules": rules()}]}


def notifications_file() -> dict:
    return {"apiVersion": 1,
            "contactPoints": [{"orgId": 1, "name": CONTACT_POINT, "receivers": [
                {"uid": "mlsli-webhook-local", "type": "webhook", "disableResolveMessage": False,
                 "settings": {"url": WEBHOOK_URL, "httpMethod": "POST"}}]}],
            # Replaces the organisation's whole policy tree: everything goes to the webhook.
            "policies": [{"orgId": 1, "receiver": CONTACT_POINT,
                          "group_by": ["grafana_folder", "alertname", "model"],
                          "group_wait": "30s", "group_interval": "5m", "repeat_interval": "4h",
                          "routes": [{"receiver": CONTACT_POINT,
                                      "object_matchers": [["severity", "=", "critical"]],
                                      "group_wait": "10s", "repeat_interval": "1h"}]}]}


HEADER = ("# Generated by provisioning/generate_alerting.py from its OBJECTIVES: edit that and\n"
          "# rerun it, do not edit this file. Grafana file provisioning (Grafana 12 service).\n")
FILES = {"mlsli-rules.yaml": rules_file, "mlsli-notifications.yaml": notifications_file}


def build() -> dict[str, str]:
    """File name -> YAML text."""
    return {name: HEADER + yaml.safe_dump(fn(), sort_keys=False, width=100, allow_unicode=True)
            for name, fn in FILES.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 if a committed file differs")
    args = parser.parse_args(argv)
    stale = []
    for name, text in build().items():
        path = OUT / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
            continue
        OUT.mkdir(exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    if stale:
        print(f"stale: {', '.join(stale)}; run: python provisioning/generate_alerting.py",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
