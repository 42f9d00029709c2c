"""A cumulative line ends one step after the model's latest prediction (issue 14): a panel
whose range runs past the data shows a gap there, not a flat line into the future."""

from __future__ import annotations

T0_MS = 1580515200000  # 2020-02-01T00:00:00Z


def test_cumulative_line_stops_after_the_latest_prediction(http):
    assert http.post("/api/v1/models", json={"name": "m", "threshold": 0.5}).status_code == 201
    preds = [{"id": f"p{i}", "ts": T0_MS + i * 60_000, "score": (i % 10) / 10} for i in range(120)]
    assert http.post("/api/v1/predictions", json={"model": "m", "records": preds}).status_code == 200
    fbs = [{"id": f"p{i}", "ts": T0_MS + i * 60_000 + 1, "label": i % 2} for i in range(120)]
    assert http.post("/api/v1/feedback", json={"model": "m", "records": fbs}).status_code == 200
    latest = T0_MS + 119 * 60_000
    body = {"range": {"from": "2020-02-01T00:00:00Z", "to": "2020-02-01T06:00:00Z"},
            "intervalMs": 600_000, "maxDataPoints": 100,
            "targets": [{"refId": "A", "target": m, "payload": {"model": "m", "window": w}}
                        for m, w in (("accuracy", "cumulative"), ("prediction_count", "cumulative"),
                                     ("accuracy", "1h"))]}
    r = http.post("/query", json=body)
    assert r.status_code == 200, r.get_json()
    cum, count, sliding = r.get_json()
    for item in (cum, count):
        for value, t in item["datapoints"]:
            if t - 600_000 >= latest:
                assert value is None, (t, value)
            else:
                assert value is not None, (t, value)
    assert [v for v, t in count["datapoints"] if v is not None][-1] == 120
    # bounded windows are unchanged: the sliding hour after the data is empty, hence null anyway
    assert any(v is not None for v, _ in sliding["datapoints"])
