"""Store upkeep in the server, once an hour in each process: RETENTION drops the weeks of raw
rows past it, and the score bins' parts are folded.

Why in the server: nothing else has to be scheduled for the store to stay bounded and its
reads fast. A write batch adds its score-bin deltas as rows of their own and folds a key only
when it reaches ``bins.MAX_PARTS`` rows, so the buckets still receiving labels are read as up
to 15 rows each; once an hour every key is folded back into one. Several processes may run at
once: the drop function and the models' write locks serialize them, and the later ones find
nothing left to do. A failure (the database down) is logged and tried again at the next hour.
"""

from __future__ import annotations

import logging
import threading

from datasource import store

log = logging.getLogger(__name__)
INTERVAL_S = 3600.0
FIRST_DELAY_S = 60.0  # after start-up, once the readiness gate has had a chance to migrate


def run_once(pool, days: int) -> None:
    """One round: retention (``days`` > 0), then every model's score bins folded."""
    if days > 0:
        with pool.connection() as conn:
            n = store.apply_retention(conn, days)
        if n:
            log.warning("retention (%d days): dropped %d weekly partition(s) of raw rows", days, n)
    with pool.connection() as conn:
        models = store.list_models(conn)
        conn.commit()  # no lock on models held through the folds (a TRUNCATE took them in turn)
        folded = sum(store.fold_score_bins(conn, m) for m in models)
    if folded:
        log.info("folded %d score-bin rows into their keys", folded)


def start(pool, days: int, stop: threading.Event | None = None) -> threading.Thread:
    """A daemon thread running ``run_once`` through ``pool`` every INTERVAL_S."""
    stop = stop or threading.Event()

    def run() -> None:
        delay = FIRST_DELAY_S
        while not stop.wait(delay):
            delay = INTERVAL_S
            if pool.closed:  # the app was closed (a test's, a reloaded one's): nothing to keep
                return
            try:
                run_once(pool, days)
            except Exception as e:  # the next hour tries again
                log.warning("store upkeep failed: %s", e)

    thread = threading.Thread(target=run, name="mlsli-maintenance", daemon=True)
    thread.start()
    return thread
