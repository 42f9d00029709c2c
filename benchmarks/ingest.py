"""Ingest throughput: predictions and feedback per second, bulk client and HTTP.

    .venv/bin/python benchmarks/ingest.py              # 1M predictions + their ~800K feedback
    .venv/bin/python benchmarks/ingest.py --rows 100000

Two paths, each into a fresh database (``mlsli_bench_ingest``) on the benchmark
server (DATABASE_URL's, else the embedded PostgreSQL under ``.data/bench-pg``):

* **bulk**: ``Client.local(url)`` (validation, COPY into staging tables, upsert
  and rollup upkeep in one transaction per 50,000-record batch);
* **HTTP**: a real ``gunicorn -w 2 --threads 4 "datasource:create_app()"`` on
  127.0.0.1 and ``Client.remote(url)`` posting 1,000-record JSON batches, one
  sender by default (``--http-senders`` for more).

Predictions are written in timestamp order, then feedback in arrival order
(sorted by feedback time, up to 2 days after its prediction), as a pipeline
would. Records are built before the clock starts; the time covers the client
call (JSON encoding, HTTP, validation, SQL, commit). After the bulk run the
rollup is checked against a rebuild from raw rows (not timed).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import common
from tqdm import tqdm

from datasource import db, store
from datasource.client import Client

DB_NAME = "mlsli_bench_ingest"


LOAD = common.OtherLoad()


QUIET_WAIT = [30.0]  # --quiet-wait


def _phase(label: str, write, records: list[dict], batch: int, senders: int = 1) -> dict:
    """Write ``records`` in batches through ``write(batch_records)``; time each call."""
    bounds = [(lo, min(lo + batch, len(records))) for lo in range(0, len(records), batch)]
    latencies: list[float] = [0.0] * len(bounds)
    bar = tqdm(total=len(records), desc=label, unit="rows", unit_scale=True, leave=False,
               file=sys.stderr, mininterval=0.5, disable=None)
    lock = threading.Lock()

    def run(k: int) -> None:
        lo, hi = bounds[k]
        t0 = time.perf_counter()
        n = write(k, records[lo:hi])
        latencies[k] = time.perf_counter() - t0
        if n != hi - lo:
            raise RuntimeError(f"{label}: batch {k} wrote {n} of {hi - lo} records")
        with lock:
            bar.update(hi - lo)

    LOAD.wait_quiet(QUIET_WAIT[0])
    mark = LOAD.now()
    t0 = time.perf_counter()
    try:
        if senders == 1:
            for k in range(len(bounds)):
                run(k)
        else:
            with ThreadPoolExecutor(senders) as pool:
                list(pool.map(run, range(len(bounds))))
    finally:
        bar.close()
    wall = time.perf_counter() - t0
    others = LOAD.cores(mark, LOAD.now())
    return {"label": label, "rows": len(records), "seconds": wall, "batches": len(bounds),
            "others": others,
            "batch_size": batch, "p50": common.pct(latencies, 50), "p95": common.pct(latencies, 95)}


def _records(data: common.Synthetic) -> tuple[list[dict], list[dict]]:
    t0 = time.perf_counter()
    preds = common.prediction_records(data, 0, len(data))
    fbs = common.feedback_records(data, 0, len(data.fb_index))
    print(f"  built {len(preds):,} + {len(fbs):,} records in {time.perf_counter() - t0:.1f} s "
          "(not timed)", flush=True)
    return preds, fbs


def run_bulk(server: str, data: common.Synthetic, batch: int, check: bool) -> list[dict]:
    url = common.fresh_database(server, DB_NAME)
    preds, fbs = _records(data)
    with Client.local(database_url=url, batch_size=batch) as client:
        client.register_model(common.MODEL)
        out = [
            _phase("bulk predictions", lambda k, b: client.write_predictions(common.MODEL, b),
                   preds, batch),
            _phase("bulk feedback", lambda k, b: client.write_feedback(common.MODEL, b), fbs, batch),
        ]
    if check:
        conn = db.connect(url, statement_timeout_ms=0)
        try:
            model = store.get_model(conn, common.MODEL)
            counts = store.table_counts(conn, model)
            t0 = time.perf_counter()
            diffs = store.check_rollup(conn, model)
            conn.rollback()
        finally:
            conn.close()
        print(f"  bulk: tables {counts}; rollup vs rebuild from raw rows: "
              f"{'consistent' if not diffs else f'{len(diffs)} differences!'} "
              f"(checked in {time.perf_counter() - t0:.1f} s)", flush=True)
        if diffs or counts["predictions"] != len(data) or counts["feedback"] != len(data.fb_index):
            raise SystemExit("bulk ingest left inconsistent tables")
    return out


def run_http(server: str, data: common.Synthetic, batch: int, senders: int) -> list[dict]:
    url = common.fresh_database(server, DB_NAME)
    preds, fbs = _records(data)
    with common.Gunicorn(url) as g:
        clients = [Client.remote(g.url, batch_size=batch) for _ in range(senders)]
        try:
            clients[0].register_model(common.MODEL)

            def send(kind):
                def write(k, b):
                    c = clients[k % senders]
                    return (c.write_predictions if kind == "p" else c.write_feedback)(common.MODEL, b)
                return write

            suffix = f" ({senders} senders)" if senders > 1 else ""
            out = [_phase(f"HTTP predictions{suffix}", send("p"), preds, batch, senders),
                   _phase(f"HTTP feedback{suffix}", send("f"), fbs, batch, senders)]
        finally:
            for c in clients:
                c.close()
    conn = db.connect(url)
    try:
        counts = store.table_counts(conn, store.get_model(conn, common.MODEL))
    finally:
        conn.close()
    print(f"  HTTP: tables {counts}", flush=True)
    if counts["predictions"] != len(data) or counts["feedback"] != len(data.fb_index):
        raise SystemExit("HTTP ingest left the wrong row counts")
    return out


def _rows(results: list[dict], total_label: str) -> list[list[str]]:
    rows = []
    for r in results:
        rows.append([r["label"], f"{r['rows']:,}", f"{r['batches']:,} x {r['batch_size']:,}",
                     f"{r['seconds']:.1f}", f"{r['rows'] / r['seconds']:,.0f}",
                     common.fmt_ms(r["p50"]), common.fmt_ms(r["p95"]),
                     common.fmt_cores(r["others"])])
    n = sum(r["rows"] for r in results)
    s = sum(r["seconds"] for r in results)
    rows.append([total_label, f"{n:,}", "", f"{s:.1f}", f"{n / s:,.0f}", "", "", ""])
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="predictions (default 1,000,000)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--bulk-batch", type=int, default=50_000, help="records per bulk transaction")
    ap.add_argument("--http-batch", type=int, default=1_000, help="records per HTTP request")
    ap.add_argument("--http-senders", type=int, default=1, help="concurrent HTTP senders")
    ap.add_argument("--skip-bulk", action="store_true")
    ap.add_argument("--skip-http", action="store_true")
    ap.add_argument("--no-check", action="store_true", help="skip the rollup consistency check")
    ap.add_argument("--quiet-wait", type=float, default=30.0, metavar="S",
                    help="before each phase wait up to S seconds for other processes to go idle")
    args = ap.parse_args(argv)
    if args.rows < 1 or args.http_senders < 1 or args.bulk_batch < 1 or args.http_batch < 1:
        ap.error("--rows, --http-senders and batch sizes must be positive")

    QUIET_WAIT[0] = args.quiet_wait
    started = time.perf_counter()
    server = common.server_url()
    info = common.machine_of(server)
    data = common.synthesize(args.rows, args.seed)
    print(f"ingest benchmark: {common.describe_data(data)}; seed {args.seed}", flush=True)

    results = []
    LOAD.start()
    try:
        if not args.skip_bulk:
            bulk = run_bulk(server, data, args.bulk_batch, check=not args.no_check)
            results.extend(_rows(bulk, "bulk total"))
        if not args.skip_http:
            http = run_http(server, data, args.http_batch, args.http_senders)
            results.extend(_rows(http, "HTTP total"))
    finally:
        LOAD.stop()

    print("\nIngest throughput (records built before timing; time = client call to commit)\n")
    print(common.table(["path", "rows", "batches", "seconds", "rows/s", "batch p50", "batch p95",
                        "others' cores"], results))
    print("\nothers' cores: average CPU used meanwhile by processes that are not this benchmark,"
          " its gunicorn or its PostgreSQL (the machine may be shared)")
    common.print_machine(info)
    print(f"\ncommand: {shlex.join([sys.executable, *sys.argv])}")
    print(f"benchmark wall time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
