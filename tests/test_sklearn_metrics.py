"""Every ``sklearn.<name>`` metric of the explicit list equals its published formula, written out
in tests/oracle.py (not scikit-learn called on the arrays the engine passed), on random windows."""

from __future__ import annotations

import numpy as np
import pytest

from datasource import metrics as registry
from tests import oracle
from tests.test_metrics_oracle import SPAN_MS, T0_MS, THRESHOLDS, _load

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

WIDTHS = {"15m": 900_000, "1h": 3_600_000, "6h": 21_600_000}


def test_the_list_is_explicit_and_complete():
    names = {k for k, m in registry.REGISTRY.items() if m.source == "sklearn"}
    assert names == {f"sklearn.{f}" for f, _, _ in registry.SKLEARN_METRICS}
    assert {f for f, second, _ in registry.SKLEARN_METRICS if second == "score"} == set(oracle.SCORE_FUNCTIONS)


@pytest.mark.parametrize("task", ["binary_classification", "regression"])
def test_sklearn_metrics_equal_their_formulas(http, task):
    rng = np.random.default_rng(31 if task == "regression" else 37)
    truth = _load(http, rng, task, threshold=0.5 if task == "binary_classification" else None)
    entries = [f for f, _, t in registry.SKLEARN_METRICS if t == task]
    failures, checked = [], 0
    for k in range(len(entries) * 4):
        fname = entries[k % len(entries)]
        window = str(rng.choice(list(WIDTHS)))
        a = T0_MS + int(rng.integers(0, SPAN_MS // 2))
        b = a + int(rng.integers(3 * 3600_000, 12 * 3600_000))
        params = {"model": "m", "metric": f"sklearn.{fname}", "window": window,
                  "from": str(a), "to": str(b), "step": "1800000", "max_points": "60"}
        thr = 0.5
        if task == "binary_classification":
            thr_text = THRESHOLDS[int(rng.integers(0, len(THRESHOLDS)))]
            if thr_text:
                params["threshold"], thr = thr_text, float(thr_text)
        r = http.get("/api/v1/series", query_string=params)
        assert r.status_code == 200, (params, r.get_json())
        for row in r.get_json():
            t = row["time"]
            sel = (truth.ts_ms > t - WIDTHS[window]) & (truth.ts_ms <= t) & ~np.isnan(truth.label)
            y, s = truth.label[sel], truth.score[sel]
            second = s if fname in oracle.SCORE_FUNCTIONS or task == "regression" else (s >= thr).astype(float)
            expected = oracle.sklearn_formula(fname, y, second)
            if not oracle.close(row["value"], expected, rel=1e-7):
                failures.append(f"{fname} {window} thr={thr} t={t}: got {row['value']}, expected {expected}")
            checked += 1
    assert not failures, f"{len(failures)} of {checked} differ:\n" + "\n".join(failures[:20])
    assert checked > 500
