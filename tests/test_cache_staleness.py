"""RAW_CACHE_STALE_S: how long a raw-path value may be served after a write touched its window.

The server's default is 10 s (the test suite runs with 0, see conftest.py): under a writer
inside a watched range, a raw-path value is recomputed at most once per that many seconds
instead of at every viewer's refresh, and it is exact again once the period has passed.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from datasource import create_app, engine

T0_MS = 1_580_515_200_000  # 2020-02-01
N = 240  # one prediction every 30 s over 2 hours
END_MS = T0_MS + N * 30_000


def _write(http, kind: str, records: list[dict]) -> None:
    r = http.post(f"/api/v1/{kind}", json={"model": "m", "records": records})
    assert r.status_code == 200, r.get_json()


def _last_hour_auc(http) -> float:
    body = {"range": {"from": T0_MS, "to": END_MS}, "intervalMs": 600_000, "maxDataPoints": 50,
            "targets": [{"refId": "A", "target": "roc_auc", "payload": {"model": "m", "window": "1h"}}]}
    r = http.post("/query", json=body)
    assert r.status_code == 200, r.get_json()
    points = {t: v for v, t in r.get_json()[0]["datapoints"]}
    return points[END_MS]


def _oracle(ts: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> float:
    inside = (ts > END_MS - 3600_000) & (ts <= END_MS)  # the 1h window ending at END_MS
    return roc_auc_score(labels[inside], scores[inside])


def test_a_written_window_is_served_stale_for_the_period_then_exact(http, monkeypatch):
    rng = np.random.default_rng(5)
    ts = T0_MS + 30_000 * np.arange(1, N + 1)
    scores = rng.random(N)
    labels = (rng.random(N) < scores).astype(int)
    assert http.post("/api/v1/models", json={"name": "m"}).status_code in (200, 201)
    _write(http, "predictions", [{"id": f"p{i}", "ts": int(ts[i]), "score": float(scores[i])} for i in range(N)])
    _write(http, "feedback", [{"id": f"p{i}", "ts": int(ts[i]) + 1, "label": int(labels[i])} for i in range(N)])
    monkeypatch.setattr(engine, "RAW_CACHE_STALE_S", 1.0)

    before = _last_hour_auc(http)
    assert before == pytest.approx(_oracle(ts, scores, labels), abs=1e-12)
    flipped = labels.copy()
    late = np.flatnonzero(ts > END_MS - 3600_000)[:40]
    flipped[late] = 1 - flipped[late]  # corrected labels inside the window
    t_write = time.monotonic()
    _write(http, "feedback", [{"id": f"p{i}", "ts": int(ts[i]) + 2, "label": int(flipped[i])} for i in late])
    after = _oracle(ts, scores, flipped)
    assert abs(after - before) > 0.01  # the correction changes the window's value
    if time.monotonic() - t_write < 0.8:  # still within the period: the value computed before
        assert _last_hour_auc(http) == before
    time.sleep(max(0.0, 1.05 - (time.monotonic() - t_write)))
    assert _last_hour_auc(http) == pytest.approx(after, abs=1e-12)  # then recomputed, exact


def test_the_server_default_is_ten_seconds_and_zero_is_always_exact(clean_db, monkeypatch):
    monkeypatch.setattr(engine, "RAW_CACHE_STALE_S", engine.RAW_CACHE_STALE_S)  # restored after
    monkeypatch.delenv("RAW_CACHE_STALE_S")
    create_app({"database_url": clean_db})
    assert engine.RAW_CACHE_STALE_S == 10.0
    create_app({"database_url": clean_db, "raw_cache_stale_s": 0})
    assert engine.RAW_CACHE_STALE_S == 0.0
    cache = engine._Cache()
    cache.put("k", 1, 0.5)
    assert cache.get("k", 1) is not None and cache.get("k", 2) is None  # 0: a new revision misses


def test_a_waiter_for_a_panel_in_flight_keeps_its_own_deadline():
    """A request waiting for the same raw panel computed by another gives up at its own
    deadline (ComputeTimeout, a 503), not when the other computation ends; without a
    deadline it takes that computation's answer."""
    import threading

    started, release = threading.Event(), threading.Event()
    answers = []

    def slow():
        started.set()
        release.wait(5)
        answers.append("computed")
        return "computed"

    def lookup():
        return answers[0] if answers else None

    first = threading.Thread(target=lambda: engine._computed_once("k", lookup, slow))
    first.start()
    assert started.wait(5)
    t0 = time.monotonic()
    with pytest.raises(engine.ComputeTimeout):
        engine._computed_once("k", lookup, slow, deadline=time.monotonic() + 0.2)
    assert time.monotonic() - t0 < 1.0
    late = []
    waiter = threading.Thread(target=lambda: late.append(engine._computed_once("k", lookup, slow)))
    waiter.start()
    release.set()
    first.join(5)
    waiter.join(5)
    assert late == ["computed"] and answers == ["computed"]  # computed once, shared
