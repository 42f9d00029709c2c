"""Prometheus scrape latency: ``GET /metrics`` through a real gunicorn, warm and cold.

    .venv/bin/python benchmarks/scrape.py                         # 1M predictions, 30 days
    .venv/bin/python benchmarks/scrape.py --predictions 200000 --cold-reps 5

The database ``mlsli_bench_scrape`` is filled once with the bulk client (the
same synthetic data as ``benchmarks/query.py``: 30 days, ~80 % labeled, borough
x vendor); a later run with the same size and seed reuses it. The server is
``gunicorn -w 2 --threads 4 -c datasource/gunicorn_conf.py`` in Prometheus
multiprocess mode, with EXPORT_WINDOW_END=latest (the data is from 2020).

* **warm**: the SLI snapshot is cached (TTL ``exporter.SNAPSHOT_TTL_S``): the
  cost of a scrape Prometheus makes more often than the TTL, i.e. merging the
  workers' metric files and formatting;
* **cold**: each scrape after the TTL has expired in both workers: the engine
  computes every exported SLI and the all-time counters from the rollup.

Each value is checked: the served accuracy over 1d equals scikit-learn on the
window's rows, printed as the max |difference|.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time

import common
import numpy as np
import psycopg2
import requests
from prometheus_client.parser import text_string_to_metric_families

from datasource import db, exporter, store

DB_NAME = "mlsli_bench_scrape"
DATA_VERSION = 1


def _tag(n: int, seed: int) -> str:
    return f"scrape benchmark data v{DATA_VERSION}: seed={seed} predictions={n}"


def ensure_data(server: str, data: common.Synthetic, seed: int, refill: bool) -> str:
    url = common.with_dbname(server, DB_NAME)
    if not refill and common.database_exists(server, DB_NAME):
        conn = db.connect(url)
        try:
            model = store.get_model(conn, common.MODEL)
            if model is not None and model.description == _tag(len(data), seed):
                print(f"reusing database {DB_NAME} ({_tag(len(data), seed)})", flush=True)
                return url
        except psycopg2.Error:
            pass
        finally:
            conn.close()
    url = common.fresh_database(server, DB_NAME)
    t0 = time.perf_counter()
    common.bulk_fill(url, data, _tag(len(data), seed))
    print(f"filled {DB_NAME} in {time.perf_counter() - t0:.0f} s", flush=True)
    return url


class MultiprocGunicorn(common.Gunicorn):
    """The benchmark gunicorn with the project's gunicorn config (multiprocess metrics)."""

    @property
    def command(self) -> list[str]:
        cmd = super().command
        return [*cmd[:-1], "-c", "datasource/gunicorn_conf.py", cmd[-1]]


def _oracle_accuracy_1d(data: common.Synthetic) -> float:
    """scikit-learn's accuracy on the predictions in the last day's window, from the arrays."""
    import sklearn.metrics as skm

    end = exporter.window_end(data.ts_ms.max() / 1000.0)
    keep = (data.ts_ms / 1000.0 > end - common.DAY_S) & (data.ts_ms / 1000.0 <= end)
    label = np.full(len(data), np.nan)
    label[data.fb_index] = data.fb_label  # ids are unique: every feedback is final
    lab = keep & ~np.isnan(label)
    return float(skm.accuracy_score(label[lab].astype(int), (data.score[lab] >= 0.5).astype(int)))


def _served_accuracy(text: str) -> float:
    """The served 1d accuracy (NaN if absent: then the check fails loudly)."""
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "mlsli_sli" and s.labels.get("metric") == "accuracy" \
                    and s.labels.get("window") == "1d":
                return s.value
    return float("nan")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--predictions", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--reps", type=int, default=200, help="warm scrapes")
    ap.add_argument("--cold-reps", type=int, default=8, help="cold scrapes (one per TTL)")
    ap.add_argument("--refill", action="store_true")
    args = ap.parse_args(argv)
    if min(args.predictions, args.reps, args.cold_reps) < 1:
        ap.error("counts must be positive")

    started = time.perf_counter()
    server = common.server_url()
    info = common.machine_of(server)
    data = common.synthesize(args.predictions, args.seed)
    print(f"scrape benchmark: {common.describe_data(data)}; seed {args.seed}", flush=True)
    url = ensure_data(server, data, args.seed, args.refill)
    want = _oracle_accuracy_1d(data)
    del data

    load = common.OtherLoad().start()
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="mlsli-multiproc-") as mp, \
                MultiprocGunicorn(url, extra_env={"PROMETHEUS_MULTIPROC_DIR": mp,
                                                  "EXPORT_WINDOW_END": "latest"}) as gun:
            session = requests.Session()
            # cold: wait out the TTL in both workers, then one scrape (a fresh connection,
            # so either worker may answer)
            cold, diffs, size = [], [], 0
            for _ in range(args.cold_reps):
                time.sleep(exporter.SNAPSHOT_TTL_S + 0.5)
                t0 = load.now()
                t = time.perf_counter()
                r = requests.get(gun.url + "/metrics", timeout=120)
                cold.append(time.perf_counter() - t)
                r.raise_for_status()
                diffs.append(abs(_served_accuracy(r.text) - want))
                size = len(r.content)
            cold_load = load.cores(t0, load.now())
            for _ in range(2 * 2):  # both workers warm
                session.get(gun.url + "/metrics", timeout=120)
            warm = []
            t0 = load.now()
            for _ in range(args.reps):
                t = time.perf_counter()
                r = session.get(gun.url + "/metrics", timeout=120)
                warm.append(time.perf_counter() - t)
                r.raise_for_status()
                diffs.append(abs(_served_accuracy(r.text) - want))
            warm_load = load.cores(t0, load.now())
            n_series = sum(len(f.samples) for f in text_string_to_metric_families(r.text))
    finally:
        load.stop()
    for name, times, others in (("warm (snapshot cached)", warm, warm_load),
                                ("cold (SLIs recomputed)", cold, cold_load)):
        rows.append([name, str(len(times)), common.fmt_ms(common.pct(times, 50)),
                     common.fmt_ms(common.pct(times, 95)), common.fmt_ms(max(times)),
                     common.fmt_cores(others)])
    print(f"\nGET /metrics through gunicorn -w 2 (multiprocess), {args.predictions:,} predictions; "
          f"{n_series} samples, {size:,} bytes; max |accuracy_1d - sklearn| = "
          f"{np.nanmax(diffs):.2e} over {len(diffs)} scrapes, missing in "
          f"{int(np.isnan(diffs).sum())}\n")
    print(common.table(["case", "scrapes", "p50", "p95", "max", "others' cores"], rows))
    common.print_machine(info)
    print(f"\ncommand: {shlex.join([sys.executable, *sys.argv])}")
    print(f"benchmark wall time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
