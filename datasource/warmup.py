"""A worker answers one panel-sized query before it takes requests (WARM_UP=1, the default).

Why: the first request of a fresh process paid 30–50 ms more than the next ones, whatever it
asked (measured at 10M predictions, in-process: a binned ROC AUC panel 75–91 ms, then 33–39 ms
for other windows): the first statements of a new PostgreSQL backend (catalog and plan
caches), the first binary COPY, the first use of pandas' and numpy's paths. gunicorn starts
workers on every deploy, crash and ``max_requests``, and the first Grafana user after it
should not pay for that. The warm-up asks the query service for the last 7 days of the
first classifier's data (binned roc_auc and accuracy, 1h sliding, 5-minute step: a dashboard's
panel) through the read pool, so the connection it warms is the one the first request takes.
Why a panel's size, not a token query: much of a fresh process's first cost is its first
allocations of panel-sized buffers (the COPY's bytes, the arrays: ~10 MB at 10M predictions),
which come from the kernel page by page until the allocator keeps them (measured: after a
one-hour warm-up the first 7-day binned request through a fresh gunicorn took 69–74 ms p50 at
10M predictions, after this one 49–51 ms; the next requests 32–40 ms). It never fails the start: with no
database yet, no classifier or no data it does nothing, and an error is logged.
"""

from __future__ import annotations

import logging
import time

from datasource import query, store

log = logging.getLogger(__name__)
SPAN_S = 7 * 86_400
STEP_MS = 300_000


def run(app) -> float | None:
    """Answer the warm-up query; returns its milliseconds, or None when there was nothing to do."""
    settings = app.extensions["settings"]
    if not settings.warm_up or not app.extensions["db_gate"].ready:
        return None
    pool = app.extensions["read_pool"]
    t0 = time.perf_counter()
    try:
        with pool.connection() as conn:
            models = [m for m in store.list_models(conn) if m.is_classifier]
            latest = store.latest_prediction_ts(conn, models[0]) if models else None
            conn.rollback()
        if latest is None:
            return None
        to_ms = int(latest.timestamp() * 1000)
        rng = query.time_range(to_ms - SPAN_S * 1000, to_ms, STEP_MS, SPAN_S * 1000 // STEP_MS)
        targets = [query.Target("roc_auc", "A", model=models[0].name, window="1h",
                                params={"method": "binned"}),
                   query.Target("accuracy", "B", model=models[0].name, window="1h")]
        query.Service(pool, settings).run(targets, rng, [])
    except Exception as e:  # a warm-up must not stop the worker from serving
        log.warning("warm-up query failed (the first request will be slower): %s", e)
        return None
    return (time.perf_counter() - t0) * 1000
