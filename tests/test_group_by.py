"""group_by with more segment values than a panel shows: the TOP_GROUPS values with most
predictions are series of their own, the rest one series named "other", and every series equals
scikit-learn on the rows of its values, through the three paths a grouped panel takes (rollup
partials, score bins, raw rows)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, roc_auc_score

from datasource import engine
from tests.test_metrics_oracle import T0_MS, _iso

N_VALUES = engine.TOP_GROUPS + 3
HOURS = 6


def _write(http, rng):
    """Value k of segment z gets 30 + 12 k predictions (distinct volumes: a clear top ten);
    a few predictions lack z (the "(none)" value, the smallest group)."""
    assert http.post("/api/v1/models", json={"name": "m", "threshold": 0.5}).status_code in (200, 201)
    rows = []
    for k in range(N_VALUES):
        for _ in range(30 + 12 * k):
            rows.append({"z": f"v{k:02d}", "ts": T0_MS + int(rng.integers(0, HOURS * 3600_000))})
    rows += [{"z": None, "ts": T0_MS + int(rng.integers(0, HOURS * 3600_000))} for _ in range(5)]
    score = rng.random(len(rows))
    label = (rng.random(len(rows)) < score).astype(int)
    preds = [{"id": f"p{i}", "ts": r["ts"], "score": float(s),
              "segments": {"b": "x"} if r["z"] is None else {"z": r["z"], "b": "x"}}
             for i, (r, s) in enumerate(zip(rows, score, strict=True))]
    fbs = [{"id": p["id"], "ts": p["ts"] + 1000, "label": int(y)} for p, y in zip(preds, label, strict=True)]
    for path, recs in (("/api/v1/predictions", preds), ("/api/v1/feedback", fbs)):
        r = http.post(path, json={"model": "m", "records": recs})
        assert r.status_code == 200, r.get_json()
    values = np.array([r["z"] or "(none)" for r in rows])
    return values, score, label


def test_the_top_groups_and_other_equal_sklearn_on_their_rows(http):
    values, score, label = _write(http, np.random.default_rng(5))
    top = [f"v{k:02d}" for k in range(N_VALUES - 1, N_VALUES - 1 - engine.TOP_GROUPS, -1)]
    expected_names = sorted([*top, engine.OTHER])
    end = T0_MS + HOURS * 3600_000
    targets = [{"refId": ref, "target": metric,
                "payload": {"model": "m", "window": "cumulative", "group_by": "z", **extra}}
               for ref, metric, extra in (("A", "accuracy", {}), ("B", "roc_auc", {}),
                                          ("C", "roc_auc", {"method": "binned"}))]
    body = {"range": {"from": _iso(T0_MS), "to": _iso(end)}, "intervalMs": 3600_000,
            "maxDataPoints": 100, "targets": targets}
    r = http.post("/query", json=body)
    assert r.status_code == 200, r.get_json()
    series = r.get_json()
    checked = 0
    for ref, oracle in (("A", lambda y, s: accuracy_score(y, s >= 0.5)), ("B", roc_auc_score)):
        items = [i for i in series if i["refId"] == ref]
        assert sorted(i["target"].split("z=", 1)[1] for i in items) == expected_names, ref
        for item in items:
            name = item["target"].split("z=", 1)[1]
            rows = ~np.isin(values, top) if name == engine.OTHER else values == name
            value = [v for v, t in item["datapoints"] if t == end][0]
            assert abs(value - oracle(label[rows], score[rows])) < 1e-12, (ref, name)
            checked += 1
    binned = {i["target"].split("z=", 1)[1] for i in series if i["refId"] == "C"}
    assert binned == set(expected_names)  # its values: tests/test_score_bins.py
    assert checked == 2 * len(expected_names)
