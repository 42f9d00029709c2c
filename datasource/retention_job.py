"""RETENTION in the server: each process drops the weeks of raw rows past it, once an hour.

Why in the server: nothing else has to be scheduled for the store to stay bounded. Several
processes may try at once; the drop function serializes them and the later ones find nothing
left to drop. A failure (the database down) is logged and tried again at the next hour.
"""

from __future__ import annotations

import logging
import threading

from datasource import store

log = logging.getLogger(__name__)
INTERVAL_S = 3600.0
FIRST_DELAY_S = 60.0  # after start-up, once the readiness gate has had a chance to migrate


def start(pool, days: int, stop: threading.Event | None = None) -> threading.Thread | None:
    """A daemon thread applying ``days`` of retention through ``pool`` (None when days <= 0)."""
    if days <= 0:
        return None
    stop = stop or threading.Event()

    def run() -> None:
        delay = FIRST_DELAY_S
        while not stop.wait(delay):
            delay = INTERVAL_S
            try:
                with pool.connection() as conn:
                    n = store.apply_retention(conn, days)
                if n:
                    log.warning("retention (%d days): dropped %d weekly partition(s) of raw rows", days, n)
            except Exception as e:  # the next hour tries again
                log.warning("retention failed: %s", e)

    thread = threading.Thread(target=run, name="mlsli-retention", daemon=True)
    thread.start()
    return thread
