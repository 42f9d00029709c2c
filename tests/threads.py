"""A call run in a thread of its own, for tests where one writer waits for another."""

from __future__ import annotations

import threading


def in_thread(fn) -> tuple[threading.Thread, dict]:
    """Start ``fn()`` in a daemon thread; the dict gets its "value", or the "error" it raised."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except Exception as e:  # noqa: BLE001 - handed to the test thread
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out
