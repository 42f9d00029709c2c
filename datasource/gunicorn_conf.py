"""gunicorn settings: ``gunicorn -c datasource/gunicorn_conf.py`` (as the image runs it).

The worker class is ``datasource.worker.Worker``: gthread, with ingest writes on threads of
their own, so that a writer's batch never queues behind Grafana's reads (issue 12).

Prometheus multiprocess mode: each worker writes its counters and histograms to files in
``PROMETHEUS_MULTIPROC_DIR`` and a scrape (any worker) sums them. The variable
must be set in the environment before gunicorn starts (the Dockerfile does),
because prometheus_client picks its storage when first imported. Files left by
an earlier run would be added to the new counts, so the master empties the
directory before it forks; a dead worker's live gauges are dropped.
Without the variable the hooks below do nothing.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

worker_class = "datasource.worker.Worker"


def on_starting(server) -> None:
    """Master, before any worker: an empty multiprocess directory."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return
    path = Path(directory)
    if path.is_dir():
        for child in path.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    path.mkdir(parents=True, exist_ok=True)


def child_exit(server, worker) -> None:
    """Master, when a worker exits: forget its live gauges (counters keep their counts)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
