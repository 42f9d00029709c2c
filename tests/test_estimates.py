"""Label-free estimates (CBPE with scores as calibrated probabilities).

The random-window oracle (tests/test_metrics_oracle.py) checks every estimated_* metric
against the formulas written out in tests/oracle.estimated; here: on perfectly calibrated
synthetic scores (label ~ Bernoulli(score)) the estimate over all predictions agrees with the
realized metric once labels have arrived, within a stated statistical tolerance, and it is
served before any label exists.
"""

from __future__ import annotations

import numpy as np

T0_MS = 1580515200000  # 2020-02-01
N = 20_000


def _post_query(http, target, a, b, threshold=None):
    payload = {"model": "m", "window": "cumulative"}
    if threshold:
        payload["threshold"] = threshold
    r = http.post("/query", json={"range": {"from": a, "to": b}, "intervalMs": 3_600_000,
                                  "maxDataPoints": 100,
                                  "targets": [{"refId": "A", "target": target, "payload": payload}]})
    assert r.status_code == 200, r.get_json()
    return [v for v, _ in r.get_json()[0]["datapoints"]]


def test_estimates_need_no_labels_and_converge_to_the_realized_metrics(http):
    rng = np.random.default_rng(41)
    assert http.post("/api/v1/models", json={"name": "m", "threshold": 0.5}).status_code == 201
    scores = rng.beta(2, 3, N)
    labels = (rng.random(N) < scores).astype(int)  # calibrated by construction
    ts = T0_MS + np.sort(rng.integers(0, 86_400_000, N))
    preds = [{"id": f"o{i}", "ts": int(ts[i]), "score": float(scores[i])} for i in range(N)]
    for k in range(0, N, 5000):
        assert http.post("/api/v1/predictions", json={"model": "m", "records": preds[k:k + 5000]}).status_code == 200
    a, b = T0_MS, T0_MS + 86_400_000
    before = _post_query(http, "estimated_accuracy", a, b)
    assert before[-1] is not None  # served with no label at all
    assert all(v is None for v in _post_query(http, "accuracy", a, b))
    fb = [{"id": f"o{i}", "ts": int(ts[i]) + 60_000, "label": int(labels[i])} for i in range(N)]
    for k in range(0, N, 5000):
        assert http.post("/api/v1/feedback", json={"model": "m", "records": fb[k:k + 5000]}).status_code == 200
    for est, real, thr in [("estimated_accuracy", "accuracy", None), ("estimated_precision", "precision", None),
                           ("estimated_recall", "recall", "0.3"), ("estimated_f1", "f1", "0.6"),
                           ("estimated_roc_auc", "roc_auc", None)]:
        e, r = _post_query(http, est, a, b, thr)[-1], _post_query(http, real, a, b, thr)[-1]
        # Binomial standard error of a share over N predictions is at most 0.5/sqrt(N) = 0.0035;
        # four of them (0.014) bound a calibrated estimate's gap with probability > 0.9999.
        assert abs(e - r) < 4 * 0.5 / np.sqrt(N), (est, e, r)
    # the estimate ignores labels: the same before and after they arrived (the rollup's float
    # sums were re-added in another order when feedback came: equal to 1e-12)
    after = _post_query(http, "estimated_accuracy", a, b)
    np.testing.assert_allclose(np.array(after, dtype=float), np.array(before, dtype=float), rtol=1e-12)
