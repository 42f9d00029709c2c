"""Ingest throughput: predictions and feedback per second, bulk client and HTTP.

    .venv/bin/python benchmarks/ingest.py              # 1M predictions + their ~800K feedback
    .venv/bin/python benchmarks/ingest.py --rows 100000

Two paths, each into a fresh database (``mlsli_bench_ingest``) on the benchmark
server (DATABASE_URL's, else the embedded PostgreSQL under ``.data/bench-pg``):

* **bulk**: ``Client.local(url, writers=N)`` given each phase's records in one call, as a
  backfill calls it (validation, COPY into staging tables, upsert and rollup upkeep in one
  transaction per 50,000-record batch; with N writers, up to N batches in flight at once:
  ``store.locks``; default 3, the client's). ``--bulk-writers 1,3`` runs one bulk load per
  value, side by side; the "batch" columns are the intervals between the client taking one
  batch and the next;
* **HTTP**: a real ``gunicorn -w 2 --threads 4 "datasource:create_app()"`` on
  127.0.0.1 and ``Client.remote(url)`` posting 1,000-record JSON batches, one
  sender by default (``--http-senders`` for more). ``--compare-parse`` runs two such
  servers side by side, each on its own fresh database: one with ``FAST_PARSE=0``
  (records.py validates every body, as before the msgspec fast path), one with the fast
  path (``datasource.fastparse``); every batch goes to both, alternately.

``--statements K`` prints, per bulk phase, the K SQL statements that took longest (each
statement of a multi-statement string timed apart) and the Python time left over (with
two writers the statements of both connections are summed: they overlap).

``--profile N`` then splits the server time of N 1,000-record HTTP batches of each kind,
in-process through the Flask test client on a fresh database, into body checks, decoding,
validation, model lookup, segment ids, COPY, the other SQL (upsert, rollup deltas), commit
and the rest (Flask), for both parse paths (``--cprofile K`` also prints cProfile's top K).

Predictions are written in timestamp order, then feedback in arrival order
(sorted by feedback time, up to 2 days after its prediction), as a pipeline
would. Records are built before the clock starts; the time covers the client
call (JSON encoding, HTTP, validation, SQL, commit). After the bulk run the
rollup is checked against a rebuild from raw rows (not timed).
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import common
import numpy as np
import psycopg2.extensions
from tqdm import tqdm

from datasource import db, store
from datasource.client import Client

DB_NAME = "mlsli_bench_ingest"


LOAD = common.OtherLoad()


QUIET_WAIT = [30.0]  # --quiet-wait


def _phase(label: str, write, records: list[dict], batch: int, senders: int = 1,
           one_call: bool = False) -> dict:
    """Write ``records`` in batches through ``write(k, batch_records)``; time each call.

    ``one_call``: all records in one ``write(0, records)`` (an iterator the client cuts into
    batches itself, as a backfill calls it); the "batch" times are then the intervals between
    the client taking one batch's first record and the next's."""
    bounds = [(lo, min(lo + batch, len(records))) for lo in range(0, len(records), batch)]
    latencies: list[float] = [0.0] * len(bounds)
    bar = tqdm(total=len(records), desc=label, unit="rows", unit_scale=True, leave=False,
               file=sys.stderr, mininterval=0.5, disable=None)
    lock = threading.Lock()
    if one_call:
        return _one_call(label, write, records, bounds, bar)

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


class _StatementTimes:
    """Wall time per SQL statement of the bulk client's connection (``--statements``): a
    cursor class that times ``execute`` and ``copy_expert``, each statement of a
    multi-statement string apart. What is left of a phase's time is Python."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        times = self.seconds

        def timed(fn, sql):
            t0 = time.perf_counter()
            try:
                return fn()
            finally:
                key = " ".join(sql.split())[:100]
                times[key] = times.get(key, 0.0) + time.perf_counter() - t0

        class Cursor(psycopg2.extensions.cursor):
            def execute(self, sql, params=None):
                parts = [q for q in sql.split(";\n") if q.strip()] if isinstance(sql, str) else [sql]
                for q in parts:
                    timed(lambda q=q: super(Cursor, self).execute(q, params), str(q))

            def copy_expert(self, sql, file, size=8192):
                return timed(lambda: super(Cursor, self).copy_expert(sql, file, size), sql)

        self.cursor = Cursor

    def take(self) -> dict[str, float]:
        out = dict(self.seconds)
        self.seconds.clear()
        return out


def _print_statements(label: str, phase: dict, seconds: dict[str, float], top: int) -> None:
    sql = sum(seconds.values())
    print(f"\n{label}: {phase['seconds']:.2f} s, of it SQL {sql:.2f} s and Python (validation runs "
          f"in a thread alongside) {phase['seconds'] - sql:.2f} s; top {top} statements:")
    for key, s in sorted(seconds.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {s:6.2f} s  {100 * s / phase['seconds']:4.1f} %  {key}")


def run_bulk(server: str, data: common.Synthetic, batch: int, check: bool,
             statements: int = 0, writers: int = 2) -> list[dict]:
    url = common.fresh_database(server, DB_NAME)
    preds, fbs = _records(data)
    times = _StatementTimes()
    with Client.local(database_url=url, batch_size=batch, writers=writers) as client:
        client.register_model(common.MODEL)
        if statements:
            for conn in client._t.conns:
                conn.cursor_factory = times.cursor
        out, split = [], []
        for label, write, recs in (("bulk predictions", client.write_predictions, preds),
                                   ("bulk feedback", client.write_feedback, fbs)):
            times.take()
            out.append(_phase(f"{label} ({writers} writer{'s' if writers > 1 else ''})",
                              lambda k, b, write=write: write(common.MODEL, b), recs, batch, one_call=True))
            split.append(times.take())
    for phase, seconds in zip(out, split, strict=True) if statements else ():
        _print_statements(phase["label"], phase, seconds, statements)
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
    _check_counts(url, data)
    return out


def _check_counts(url: str, data: common.Synthetic) -> None:
    conn = db.connect(url)
    try:
        counts = store.table_counts(conn, store.get_model(conn, common.MODEL))
    finally:
        conn.close()
    print(f"  HTTP: tables {counts}", flush=True)
    if counts["predictions"] != len(data) or counts["feedback"] != len(data.fb_index):
        raise SystemExit("HTTP ingest left the wrong row counts")


PATHS = (("records.py only", "0"), ("fast path", "1"))  # FAST_PARSE of each server


def _proc_ticks(pids) -> dict[int, int]:
    ticks = {}
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks[pid] = int(fields[11]) + int(fields[12])  # utime + stime
    return ticks


def _cpu_ticks(g: common.Gunicorn, url: str) -> tuple[dict[int, int], dict[int, int]]:
    """CPU ticks so far of the gunicorn's workers and of its database's client backends."""
    conn = db.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                        " AND backend_type = 'client backend' AND pid <> pg_backend_pid()")
            backends = [r[0] for r in cur.fetchall()]
        conn.rollback()
    finally:
        conn.close()
    return g._worker_cpu_ticks(), _proc_ticks(backends)


def run_http_paired(server: str, data: common.Synthetic, batch: int) -> list[dict]:
    """--compare-parse: two gunicorns on two fresh databases, FAST_PARSE=0 and 1, each sent
    every batch, alternately (batch k to one then the other, the order swapped each batch),
    so that a shared machine's load falls on both paths alike. A path's seconds are the sum
    of its own calls."""
    preds, fbs = _records(data)
    urls = [common.fresh_database(server, f"{DB_NAME}_{flag}") for _, flag in PATHS]
    out = []
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(common.Gunicorn(url, extra_env={"FAST_PARSE": flag}))
                   for url, (_, flag) in zip(urls, PATHS, strict=True)]
        clients = [Client.remote(g.url, batch_size=batch) for g in servers]
        for c in clients:
            stack.callback(c.close)
            c.register_model(common.MODEL)
        for kind, recs in (("predictions", preds), ("feedback", fbs)):
            bounds = [(lo, min(lo + batch, len(recs))) for lo in range(0, len(recs), batch)]
            latencies = [[], []]
            LOAD.wait_quiet(QUIET_WAIT[0])
            mark = LOAD.now()
            cpu_before = [_cpu_ticks(g, url) for g, url in zip(servers, urls, strict=True)]
            for k, (lo, hi) in enumerate(tqdm(bounds, desc=f"HTTP {kind}, both paths", leave=False,
                                              file=sys.stderr, mininterval=0.5, disable=None)):
                for i in ((0, 1) if k % 2 == 0 else (1, 0)):
                    c = clients[i]
                    t0 = time.perf_counter()
                    n = (c.write_predictions if kind == "predictions" else c.write_feedback)(
                        common.MODEL, recs[lo:hi])
                    latencies[i].append(time.perf_counter() - t0)
                    if n != hi - lo:
                        raise RuntimeError(f"{kind}: batch {k} wrote {n} of {hi - lo} records")
            others = LOAD.cores(mark, LOAD.now())
            cpu_after = [_cpu_ticks(g, url) for g, url in zip(servers, urls, strict=True)]
            for (name, _), lat, before, after in zip(PATHS, latencies, cpu_before, cpu_after,
                                                     strict=True):
                cpu = [sum(a.get(pid, 0) - b.get(pid, 0) for pid in a) / LOAD.hz / len(bounds)
                       for a, b in zip(after, before, strict=True)]
                out.append({"label": f"HTTP {kind} ({name})", "rows": len(recs), "seconds": sum(lat),
                            "batches": len(bounds), "others": others, "batch_size": batch,
                            "p50": common.pct(lat, 50), "p95": common.pct(lat, 95),
                            "gunicorn_cpu": cpu[0], "postgres_cpu": cpu[1]})
    for url in urls:
        _check_counts(url, data)
    return out


# --------------------------------------------------------------------------- --profile

PARTS = ["body checks", "decode", "validate", "model lookup", "segment ids", "COPY",
         "upsert + rollup SQL", "commit", "rest (Flask)"]


class _Timers:
    """Wall time spent in named functions, by wrapping them (a few calls per request: no
    profiler overhead inflates the per-record Python of one path more than the other's)."""

    def __init__(self):
        self.total: dict[str, float] = {}  # wall time
        self.cpu: dict[str, float] = {}  # this thread's CPU time (immune to others' load)
        self.undo: list = []

    def add(self, part: str, seconds: float, cpu: float = 0.0) -> None:
        self.total[part] = self.total.get(part, 0.0) + seconds
        self.cpu[part] = self.cpu.get(part, 0.0) + cpu

    def wrap(self, owner, name: str, part: str, inner: tuple[str, ...] = ()) -> None:
        """Time ``owner.name`` as ``part``, less the time of the parts nested in it."""
        real = getattr(owner, name)
        timers = self

        def timed(*args, **kwargs):
            before = {p: (timers.total.get(p, 0.0), timers.cpu.get(p, 0.0)) for p in inner}
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return real(*args, **kwargs)
            finally:
                wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
                for p in inner:
                    wall -= timers.total.get(p, 0.0) - before[p][0]
                    cpu -= timers.cpu.get(p, 0.0) - before[p][1]
                timers.add(part, wall, cpu)

        setattr(owner, name, timed)
        self.undo.append((owner, name, real))

    def restore(self) -> None:
        for owner, name, real in reversed(self.undo):
            setattr(owner, name, real)
        self.undo.clear()


def _instrument(t: _Timers) -> None:
    import contextlib
    import json as json_module
    import types

    from datasource import fastparse, http, ingest, records
    from datasource.store import writes

    t.wrap(http, "plain", "body checks")
    t.wrap(http, "loads", "body checks", inner=("decode",))  # its NUL/number/depth checks
    http_json = types.SimpleNamespace(**vars(json_module))
    http_json.loads = json_module.loads
    t.wrap(http_json, "loads", "decode")
    t.undo.append((http, "json", http.json))
    http.json = http_json
    for kind, decoder in list(fastparse._DECODERS.items()):
        proxy = types.SimpleNamespace(decode=decoder.decode)
        t.wrap(proxy, "decode", "decode")
        t.undo.append((fastparse._DECODERS, None, (kind, decoder)))
        fastparse._DECODERS[kind] = proxy
    t.wrap(fastparse, "decode", "validate", inner=("body checks", "decode"))
    t.wrap(records, "parse_predictions", "validate")
    t.wrap(records, "parse_feedback", "validate")
    t.wrap(ingest, "require_model", "model lookup")
    t.wrap(writes, "_segset_ids", "segment ids")
    t.wrap(writes.binary_copy, "copy_in", "COPY")  # the staged rows and the rollup deltas
    from datasource import db, store

    for name in ("write_predictions", "write_feedback"):  # ingest.write_rows calls store.<name>
        t.wrap(store, name, "upsert + rollup SQL", inner=("segment ids", "COPY"))
    real_connection = db.Pool.connection

    @contextlib.contextmanager
    def connection(self):
        t0 = None
        with real_connection(self) as conn:
            yield conn
            t0, c0 = time.perf_counter(), time.thread_time()
        if t0 is not None:  # COMMIT and the connection's return
            t.add("commit", time.perf_counter() - t0, time.thread_time() - c0)

    db.Pool.connection = connection
    t.undo.append((db.Pool, "connection", real_connection))


def _restore_dict_entries(t: _Timers) -> None:
    for i, (owner, name, real) in enumerate(t.undo):
        if name is None:
            owner[real[0]] = real[1]
            t.undo[i] = None
    t.undo = [u for u in t.undo if u is not None]


def run_profile(server: str, data: common.Synthetic, batch: int, n_batches: int,
                cprofile: int) -> list[list[str]]:
    """Server time of ``n_batches`` JSON batches of each kind, in-process, split by part: two
    apps (FAST_PARSE=0 and 1) on two fresh databases, each sent every batch, alternately."""
    import json as json_module

    from datasource import create_app
    from datasource.client import _jsonable

    preds_all, fbs_all = _records(data)
    apps = []
    for name, flag in PATHS:
        url = common.fresh_database(server, f"{DB_NAME}_{flag}")
        app = create_app({"database_url": url, "pool_size": 2, "fast_parse": int(flag)})
        client = app.test_client()
        assert client.post("/api/v1/models", json={"name": common.MODEL}).status_code == 201
        apps.append((name, app, client))
    warm = 20
    rows = []
    try:
        for kind, recs in (("predictions", preds_all), ("feedback", fbs_all)):
            bodies, encode = [], []
            for lo in range(0, min(len(recs), (warm + n_batches) * batch), batch):
                t0 = time.perf_counter()  # what Client.remote does before sending
                bodies.append(json_module.dumps({"model": common.MODEL, "records": recs[lo:lo + batch]},
                                                default=_jsonable).encode())
                encode.append(time.perf_counter() - t0)
            profiler = None
            if cprofile:
                import cProfile
                profiler = cProfile.Profile()
            for k, body in enumerate(bodies[:warm]):  # tables with rows, statistics, warm caches
                for name, _, client in apps:
                    on = profiler is not None and name == "fast path" and k >= warm // 2
                    if on:  # cProfile on warm-up batches only: not on the timed ones
                        profiler.enable()
                    r = client.post(f"/api/v1/{kind}", data=body, content_type="application/json")
                    if on:
                        profiler.disable()
                    assert r.status_code == 200, r.get_json()
            timed = bodies[warm:]
            LOAD.wait_quiet(QUIET_WAIT[0])
            mark = LOAD.now()
            t = _Timers()
            totals, cpus = [{}, {}], [{}, {}]
            walls, wall_cpus = [[], []], [[], []]
            _instrument(t)
            try:
                for k, body in enumerate(timed):
                    for i in ((0, 1) if k % 2 == 0 else (1, 0)):
                        t.total, t.cpu = totals[i], cpus[i]
                        t0, c0 = time.perf_counter(), time.thread_time()
                        r = apps[i][2].post(f"/api/v1/{kind}", data=body, content_type="application/json")
                        walls[i].append(time.perf_counter() - t0)
                        wall_cpus[i].append(time.thread_time() - c0)
                        assert r.status_code == 200, r.get_json()
            finally:
                _restore_dict_entries(t)
                t.restore()
            others = LOAD.cores(mark, LOAD.now())
            n = len(timed)
            for (name, _, _), total, cpu, wall, wall_cpu in zip(apps, totals, cpus, walls, wall_cpus,
                                                                 strict=True):
                for clock, parts_s, request_s in (("wall", total, wall), ("CPU", cpu, wall_cpu)):
                    parts = {p: parts_s.get(p, 0.0) / n for p in PARTS}
                    parts["rest (Flask)"] = sum(request_s) / n - sum(
                        v for p, v in parts.items() if p != "rest (Flask)")
                    rows.append([f"{kind}, {name}", clock, common.fmt_ms(sum(request_s) / n),
                                 *(common.fmt_ms(parts[p]) for p in PARTS),
                                 common.fmt_ms(sum(encode[warm:]) / n), common.fmt_cores(others)])
            if profiler:
                import io
                import pstats
                out = io.StringIO()
                pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(cprofile)
                print(f"\ncProfile of {warm - warm // 2} warm-up {kind} batches (fast path), "
                      f"top {cprofile} by own time:")
                print("\n".join(out.getvalue().strip().splitlines()[-cprofile - 2:]), flush=True)
    finally:
        for _, app, _ in apps:
            app.extensions["pool"].close()
    return rows


def _one_call(label: str, write, records: list[dict], bounds, bar) -> dict:
    taken: list[float] = []

    def feed():
        for lo, hi in bounds:
            taken.append(time.perf_counter())
            yield from records[lo:hi]
            bar.update(hi - lo)

    LOAD.wait_quiet(QUIET_WAIT[0])
    mark = LOAD.now()
    t0 = time.perf_counter()
    try:
        n = write(0, feed())
    finally:
        bar.close()
    wall = time.perf_counter() - t0
    if n != len(records):
        raise RuntimeError(f"{label}: wrote {n} of {len(records)} records")
    intervals = np.diff(taken + [t0 + wall]).tolist()
    return {"label": label, "rows": len(records), "seconds": wall, "batches": len(bounds),
            "others": LOAD.cores(mark, LOAD.now()), "batch_size": bounds[0][1] - bounds[0][0] if bounds else 0,
            "p50": common.pct(intervals, 50), "p95": common.pct(intervals, 95)}


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
    ap.add_argument("--bulk-writers", type=lambda v: [int(x) for x in v.split(",")], default=[3],
                    metavar="N[,N…]", help="Client.local(writers=N) for the bulk path; several: one "
                                          "bulk run each, in this order (default 3)")
    ap.add_argument("--http-batch", type=int, default=1_000, help="records per HTTP request")
    ap.add_argument("--http-senders", type=int, default=1, help="concurrent HTTP senders")
    ap.add_argument("--skip-bulk", action="store_true")
    ap.add_argument("--skip-http", action="store_true")
    ap.add_argument("--compare-parse", action="store_true",
                    help="HTTP twice: FAST_PARSE=0 (records.py only), then the fast path")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="split the server time of N 1,000-record batches of each kind by part")
    ap.add_argument("--cprofile", type=int, default=0, metavar="K",
                    help="with --profile: print cProfile's top K functions (fast path)")
    ap.add_argument("--statements", type=int, default=0, metavar="K",
                    help="bulk: print the K SQL statements that took longest, per phase")
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
        for writers in () if args.skip_bulk else args.bulk_writers:
            bulk = run_bulk(server, data, args.bulk_batch, check=not args.no_check,
                            statements=args.statements, writers=writers)
            results.extend(_rows(bulk, f"bulk total ({writers} writer{'s' if writers > 1 else ''})"))
        cpu_rows = []
        if not args.skip_http and args.compare_parse:
            paired = run_http_paired(server, data, args.http_batch)
            for name, _ in PATHS:
                results.extend(_rows([r for r in paired if name in r["label"]], f"HTTP total ({name})"))
            cpu_rows = [[r["label"], common.fmt_ms(r["gunicorn_cpu"]), common.fmt_ms(r["postgres_cpu"])]
                        for r in paired]
        elif not args.skip_http:
            http = run_http(server, data, args.http_batch, args.http_senders)
            results.extend(_rows(http, "HTTP total"))
        if results:
            print("\nIngest throughput (records built before timing; time = client call to commit)\n")
            print(common.table(["path", "rows", "batches", "seconds", "rows/s", "batch p50",
                                "batch p95", "others' cores"], results))
            print("\nothers' cores: average CPU used meanwhile by processes that are not this "
                  "benchmark, its gunicorn or its PostgreSQL (the machine may be shared)", flush=True)
        if cpu_rows:
            print(f"\nCPU per {args.http_batch:,}-record batch (what others' load inflates least): "
                  "the gunicorn workers', and its database's client backends' (PostgreSQL)\n")
            print(common.table(["path", "gunicorn CPU", "PostgreSQL CPU"], cpu_rows), flush=True)
        profile = (run_profile(server, data, args.http_batch, args.profile, args.cprofile)
                   if args.profile else [])
    finally:
        LOAD.stop()

    if profile:
        print(f"\nWhere the server time of one {args.http_batch:,}-record JSON batch goes (mean of "
              f"{args.profile} batches, in-process through the Flask test client; client JSON "
              "encoding measured apart)\n")
        print(common.table(["batch kind, parse path", "clock", "server", *PARTS, "client encode",
                            "others' cores"], profile))
        print("\nwall: elapsed time; CPU: this server thread's CPU time (what others' load does "
              "not inflate; PostgreSQL's own work is in the wall time only)")
    common.print_machine(info)
    print(f"\ncommand: {shlex.join([sys.executable, *sys.argv])}")
    print(f"benchmark wall time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
