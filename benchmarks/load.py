"""Fifty Grafana-shaped readers and one writer against a real gunicorn (issue 12).

    .venv/bin/python benchmarks/load.py                         # 1M predictions, 50 readers, 60 s
    .venv/bin/python benchmarks/load.py --predictions 300000 --seconds 30
    .venv/bin/python benchmarks/load.py --refresh 10            # each reader refreshes every 10 s
    .venv/bin/python benchmarks/load.py --refresh 10 --live     # writes inside the panels' range
    .venv/bin/python benchmarks/load.py --gthread               # gunicorn's own worker (before)
    .venv/bin/python benchmarks/load.py --env READ_CONCURRENCY=1

Data: query.py's database (``mlsli_bench_query``: 30 days of predictions, ~80 % labeled,
borough x vendor), filled by ``query.ensure_data`` and reused while ``--predictions`` and
``--seed`` match. Each run works on a copy, ``mlsli_bench_load`` (``CREATE DATABASE …
TEMPLATE``), so the writer's rows never reach query.py's database.

Server: ``common.Gunicorn`` (2 workers x 4 threads) with what the Dockerfile adds:
``-c datasource/gunicorn_conf.py`` (its worker class: writes on threads of their own),
``--timeout 60``, an access log and Prometheus multiprocess files. ``--gthread`` runs
gunicorn's own gthread worker instead, every request in one first-come queue (the
server before issue 12's write threads); ``--env NAME=VALUE`` sets a server variable
(``READ_CONCURRENCY``, ``POOL_SIZE``…).

Readers (``--readers``, 50 threads, one ``requests.Session`` each): viewers of the model-quality
dashboard. Each sends the panels below one after the other, each reader starting at another
panel, as ``POST /query`` bodies built by query.py's ``grafana_body``/``target``; the
response is read to its last byte, not decoded. ``--refresh 0`` (the default) sends them back
to back: the worst case, every reader always waiting for an answer. ``--refresh S`` sends one
dashboard (the five panels) every S seconds per reader, as Grafana's auto-refresh does (the
provisioned dashboards refresh every 10 s), the readers' first refreshes spread over S.

    refresh  8-metric refresh: accuracy … base_rate, 7 days, 1h sliding, 5 m step (query.py (d))
    stat     cumulative accuracy stat panel, 30 days (query.py (a) stat)
    grouped  1h-sliding accuracy grouped by borough, 7 days (query.py (e) (b) grouped)
    roc_auc  1h-sliding roc_auc, 7 days (query.py (c): exact, cached per worker once computed)
    drift    drift ranking table (score, borough, vendor) of the last 7 days against the stored
             "training" reference (a 10,000-row sample, as the loader stores one)

Writer: one process of its own (the readers' threads do not take its GIL), one
``requests.Session`` posting ``POST /api/v1/predictions`` batches of ``--batch`` (1,000)
records, each followed by the ``POST /api/v1/feedback`` batches of 1,000 labels that have
arrived by then, as a pipeline replaying ``common.synthesize`` would. Its predictions are
for the readers' model but stamped after the panels' range (March 2020: live data arriving
after the dashboards' "now"), so the panels' numbers stay put while the writer competes with
them for threads, connections, CPU and the same tables. ``--live`` puts them in the panels' last
two days instead, as a model serving while its dashboards are watched: the rows the panels read
are updated under them (rollup upserts, score-bin parts, labels on raw rows), and each write
invalidates the cached roc_auc windows it touches. Rows/s counts both kinds.

Phases: a warm-up (every panel on both workers, not measured), the writer alone for
``--alone-seconds`` (15: its unloaded rate), then readers and writer for ``--seconds`` (60).
Errors are non-200 answers and failed requests. Server RSS is the sum over gunicorn's master
and workers, sampled every 0.5 s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import shlex
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace

import common
import numpy as np
import psutil
import psycopg2
import query as qb
import requests
from tqdm import tqdm

DB_NAME = "mlsli_bench_load"
JSON = {"Content-Type": "application/json"}
KINDS = ("refresh", "stat", "grouped", "roc_auc", "drift")
AIM_P99_S = 1.0
STAGGER_S = 0.02  # between back-to-back viewers' first requests
AIM_RSS_BYTES = 2**30


# --------------------------------------------------------------------------- the requests


def panel_bodies() -> dict[str, bytes]:
    """The mix: each kind's POST /query body, as Grafana sends it."""
    week = {"days": 7, "max_points": qb.PANEL_7D_MAX_POINTS}
    stat = {"days": 30, "max_points": qb.STAT_MAX_POINTS}
    drift = {"refId": "A", "datasource": qb.DS, "editorMode": "builder", "target": "drift_ranking",
             "payload": {"model": common.MODEL, "reference": "training"}}
    bodies = {
        "refresh": qb.grafana_body([qb.target(m, chr(ord("A") + i))
                                    for i, m in enumerate(qb.DASHBOARD_METRICS)], **week),
        "stat": qb.grafana_body([qb.target("accuracy", window="cumulative")], **stat),
        "grouped": qb.grafana_body([qb.target("accuracy", group_by="borough")], **week),
        "roc_auc": qb.grafana_body([qb.target("roc_auc")], **week),
        "drift": qb.grafana_body([drift], **week),
    }
    return {k: json.dumps(bodies[k]).encode() for k in KINDS}


@dataclass
class Sample:
    kind: str  # a panel, or the writer's predictions / feedback
    start: float  # time.monotonic(), comparable across processes on Linux
    seconds: float
    status: int  # 0: the request failed (connection, timeout)
    rows: int = 0
    detail: str = ""
    reader: int = -1


def _post(session: requests.Session, url: str, body: bytes, kind: str, rows: int = 0) -> Sample:
    t0 = time.monotonic()
    try:
        r = session.post(url, data=body, headers=JSON, timeout=120)
        content = r.content
        status = r.status_code
        detail = "" if status == 200 else content[:200].decode(errors="replace")
    except requests.RequestException as e:
        status, detail = 0, f"{type(e).__name__}: {str(e)[:160]}"
    return Sample(kind, t0, time.monotonic() - t0, status, rows, detail)


# --------------------------------------------------------------------------- readers


def reader(i: int, n: int, base: str, bodies: dict[str, bytes], refresh_s: float, start: float,
           stop: threading.Event, out: list) -> None:
    """Viewer ``i`` of ``n``: the dashboard's panels in turn from panel i % 5, until ``stop``;
    with ``refresh_s`` one dashboard every ``refresh_s`` seconds, the first at
    start + refresh_s * i / n (viewers do not refresh in step); back to back, viewers arrive
    STAGGER_S apart."""
    order = [KINDS[(i + k) % len(KINDS)] for k in range(len(KINDS))]
    mine = []
    next_at = start + (refresh_s * i / n if refresh_s > 0 else STAGGER_S * i)
    with requests.Session() as s:
        while not stop.wait(max(0.0, next_at - time.monotonic())):
            for kind in order:
                if stop.is_set():
                    break
                mine.append(_post(s, base + "/query", bodies[kind], kind))
            next_at += refresh_s
    for sample in mine:
        sample.reader = i
    out.extend(mine)


def store_reference(base: str, seed: int, n: int = 10_000) -> None:
    """The "training" reference the drift panel compares with: ``n`` synthetic predictions."""
    d = common.synthesize(n, seed)
    columns = {"score": d.score.tolist(), "borough": [common.BOROUGHS[b] for b in d.borough],
               "vendor": [common.VENDORS[v] for v in d.vendor]}
    r = requests.post(base + "/api/v1/references", json={"model": common.MODEL, "name": "training",
                                                         "columns": columns}, timeout=60)
    if r.status_code != 201:
        raise SystemExit(f"storing the reference answered {r.status_code}: {r.text[:300]}")


# --------------------------------------------------------------------------- the writer


LIVE_DAYS = 2  # --live: the writer's predictions fall in the panels' last two days


def writer_data(n: int, seed: int, live: bool = False) -> common.Synthetic:
    """``n`` predictions of the readers' model, 30 days after the benchmark's (March 2020); with
    ``live``, squeezed into the last LIVE_DAYS days of the panels' range instead (each label
    keeps its delay after its prediction): the rollup rows, score bins and raw rows the panels
    read change under them, and their cached raw-metric windows with them."""
    d = common.synthesize(n, seed)
    ids = np.char.add("live-", d.ids)
    if not live:
        shift = common.SPAN_DAYS * common.DAY_S * 1000
        return replace(d, ids=ids, ts_ms=d.ts_ms + shift, fb_ts_ms=d.fb_ts_ms + shift)
    start_ms, span_ms = common.START_S * 1000, common.SPAN_DAYS * common.DAY_S * 1000
    end_ms = start_ms + span_ms
    ts = end_ms - LIVE_DAYS * common.DAY_S * 1000 + (d.ts_ms - start_ms) * LIVE_DAYS // common.SPAN_DAYS
    fb_ts = ts[d.fb_index] + (d.fb_ts_ms - d.ts_ms[d.fb_index])
    order = np.argsort(fb_ts, kind="stable")
    return replace(d, ids=ids, ts_ms=ts, fb_index=d.fb_index[order], fb_ts_ms=fb_ts[order],
                   fb_label=d.fb_label[order])


def _jsonable(o):
    return o.isoformat()


def writer_main(base: str, data: common.Synthetic, batch: int, stop, out) -> None:
    """Predictions in batches, each followed by the full feedback batches arrived by then."""
    samples = []
    p = f = 0
    with requests.Session() as s:
        while not stop.is_set() and p < len(data):
            hi = min(p + batch, len(data))
            body = json.dumps({"model": common.MODEL, "records": common.prediction_records(data, p, hi)},
                              default=_jsonable).encode()
            samples.append(_post(s, base + "/api/v1/predictions", body, "predictions", hi - p))
            p = hi
            arrived = int(np.searchsorted(data.fb_ts_ms, data.ts_ms[hi - 1], side="right"))
            while arrived - f >= batch and not stop.is_set():
                body = json.dumps({"model": common.MODEL,
                                   "records": common.feedback_records(data, f, f + batch)},
                                  default=_jsonable).encode()
                samples.append(_post(s, base + "/api/v1/feedback", body, "feedback", batch))
                f += batch
    out.send([s.__dict__ for s in samples])
    out.close()


# --------------------------------------------------------------------------- the server


def load_database(server: str, source: str, wait_s: float = 600.0) -> str:
    """A fresh copy of query.py's filled database for this run; its URL.

    A template must have no other sessions: while query.py (or another copy) uses it, wait."""
    admin = psycopg2.connect(server)
    admin.autocommit = True
    strategy = " STRATEGY FILE_COPY"
    deadline = time.monotonic() + wait_s
    try:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')
            while True:
                try:
                    cur.execute(f'CREATE DATABASE "{DB_NAME}" TEMPLATE "{source}"{strategy}')
                    break
                except psycopg2.errors.SyntaxError:  # PostgreSQL before 15
                    strategy = ""
                except psycopg2.errors.ObjectInUse:
                    if time.monotonic() > deadline:
                        raise SystemExit(f"{source} stayed in use by other sessions for "
                                         f"{wait_s:.0f} s") from None
                    print(f"{source} is in use by another session; waiting", file=sys.stderr)
                    time.sleep(10)
    finally:
        admin.close()
    return common.with_dbname(server, DB_NAME)


class RSS:
    """Resident memory of gunicorn's master and workers, sampled every 0.5 s."""

    def __init__(self, pid: int):
        self.master = psutil.Process(pid)
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        total = 0
        for p in [self.master, *self.master.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            with contextlib.suppress(psutil.Error):
                self.samples.append((time.monotonic(), self.now()))

    def start(self) -> RSS:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def connections(self, port: int) -> list[int]:
        """Established client connections to ``port`` held by each worker."""
        out = []
        for p in self.master.children():
            with contextlib.suppress(psutil.Error):
                out.append(sum(1 for c in p.net_connections(kind="tcp")
                               if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port))
        return sorted(out)

    def peak(self, t0: float, t1: float) -> int:
        return max((b for t, b in self.samples if t0 <= t <= t1), default=0)


# --------------------------------------------------------------------------- reporting


@dataclass
class Phase:
    name: str
    t0: float
    t1: float
    others: float = float("nan")
    rss_peak: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return self.t1 - self.t0

    def inside(self, samples: list[Sample]) -> list[Sample]:
        """Requests that ended in the phase."""
        return [s for s in samples if self.t0 <= s.start + s.seconds <= self.t1]

    def started(self, samples: list[Sample]) -> list[Sample]:
        """Requests that started in the phase (however long after it they ended)."""
        return [s for s in samples if self.t0 <= s.start <= self.t1]


def _latency_row(label: str, samples: list[Sample], phase: Phase) -> list[str]:
    """Latencies and errors of the requests started in ``phase``; req/s of those that ended in it."""
    started = phase.started(samples)
    lat = [s.seconds for s in started]
    errors = sum(1 for s in started if s.status != 200)
    return [label, f"{len(started):,}", f"{len(phase.inside(samples)) / phase.seconds:,.1f}",
            common.fmt_ms(common.pct(lat, 50)), common.fmt_ms(common.pct(lat, 95)),
            common.fmt_ms(common.pct(lat, 99)), common.fmt_ms(max(lat, default=float("nan"))),
            f"{errors:,}"]


def _writer_row(phase: Phase, samples: list[Sample]) -> tuple[list[str], float]:
    done = phase.inside(samples)
    ok = [s for s in done if s.status == 200]
    rows = sum(s.rows for s in ok)
    rate = rows / phase.seconds
    lat_p = [s.seconds for s in done if s.kind == "predictions"]
    lat_f = [s.seconds for s in done if s.kind == "feedback"]
    return ([phase.name, f"{phase.seconds:.1f}", f"{len(done):,}", f"{rows:,}", f"{rate:,.0f}",
             f"{common.fmt_ms(common.pct(lat_p, 50))} / {common.fmt_ms(common.pct(lat_p, 95))}",
             f"{common.fmt_ms(common.pct(lat_f, 50))} / {common.fmt_ms(common.pct(lat_f, 95))}",
             f"{len(done) - len(ok):,}", common.fmt_cores(phase.others)], rate)


def _first_errors(samples: list[Sample], n: int = 5) -> list[str]:
    return [f"{s.kind}: {s.status} {s.detail}" for s in samples if s.status != 200][:n]


# --------------------------------------------------------------------------- main


def warm_up(base: str, bodies: dict[str, bytes], rounds: int) -> None:
    """Every panel on every worker: 8 concurrent sessions, ``rounds`` passes of the mix each."""
    def run(_):
        with requests.Session() as s:
            for _ in range(rounds):
                for kind in KINDS:
                    r = _post(s, base + "/query", bodies[kind], kind)
                    if r.status != 200:
                        raise SystemExit(f"warm-up: {kind} answered {r.status}: {r.detail}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _countdown(label: str, seconds: float, stop: threading.Event) -> None:
    with tqdm(total=int(seconds), desc=label, unit="s", leave=False, file=sys.stderr,
              disable=None) as bar:
        end = time.monotonic() + seconds
        while not stop.is_set() and (left := end - time.monotonic()) > 0:
            stop.wait(min(1.0, left))
            bar.n = min(int(seconds), int(seconds - max(0.0, end - time.monotonic())))
            bar.refresh()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--predictions", type=int, default=1_000_000, help="predictions in the store")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--readers", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=60.0, help="readers + writer")
    ap.add_argument("--alone-seconds", type=float, default=15.0, help="the writer alone, first")
    ap.add_argument("--refresh", type=float, default=0.0, metavar="S",
                    help="each reader sends its dashboard every S seconds (0: back to back)")
    ap.add_argument("--batch", type=int, default=1_000, help="records per writer request")
    ap.add_argument("--writer-predictions", type=int, default=1_500_000,
                    help="predictions the writer has to send (it stops early when they run out)")
    ap.add_argument("--live", action="store_true",
                    help="the writer's predictions and labels land in the panels' last two days")
    ap.add_argument("--warmup-rounds", type=int, default=3)
    ap.add_argument("--refill", action="store_true", help="refill query.py's database")
    ap.add_argument("--gthread", action="store_true",
                    help="gunicorn's own gthread worker: no threads of their own for writes")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="an environment variable for the server (repeatable)")
    ap.add_argument("--quiet-wait", type=float, default=30.0, metavar="S",
                    help="first wait up to S seconds for other processes to go idle")
    args = ap.parse_args(argv)
    if min(args.predictions, args.readers, args.batch, args.writer_predictions) < 1 or \
            min(args.seconds, args.alone_seconds) <= 0 or args.refresh < 0:
        ap.error("counts and durations must be positive")

    started = time.perf_counter()
    pg_server = common.server_url()
    info = common.machine_of(pg_server)
    data = common.synthesize(args.predictions, args.seed)
    print(f"load benchmark: {common.describe_data(data)}; seed {args.seed}", flush=True)
    qb.ensure_data(pg_server, data, args.seed, args.refill)
    del data
    t = time.perf_counter()
    url = load_database(pg_server, qb.DB_NAME)
    print(f"copied {qb.DB_NAME} to {DB_NAME} in {time.perf_counter() - t:.1f} s", flush=True)
    wdata = writer_data(args.writer_predictions, args.seed + 1, args.live)
    bodies = panel_bodies()

    load = common.OtherLoad().start()
    prom = tempfile.TemporaryDirectory(prefix="bench-load-prom-")
    worker = "-k gthread" if args.gthread else ""
    env = {"GUNICORN_CMD_ARGS": f"-c datasource/gunicorn_conf.py {worker} --timeout 60 --access-logfile -",
           "PROMETHEUS_MULTIPROC_DIR": prom.name,
           **dict(e.split("=", 1) for e in args.env)}
    samples: list[Sample] = []
    wsamples: list[Sample] = []
    try:
        with common.Gunicorn(url, extra_env=env) as server:
            store_reference(server.url, args.seed + 2)
            t = time.perf_counter()
            warm_up(server.url, bodies, args.warmup_rounds)
            print(f"warm-up: {8 * args.warmup_rounds} passes of the mix in "
                  f"{time.perf_counter() - t:.1f} s", flush=True)
            rss = RSS(server.proc.pid).start()
            load.wait_quiet(args.quiet_wait)

            ctx = mp.get_context("fork")
            wstop = ctx.Event()
            receive, send = ctx.Pipe(duplex=False)
            writer = ctx.Process(target=writer_main, args=(server.url, wdata, args.batch, wstop, send),
                                 daemon=True)
            t0 = load.now()
            writer.start()
            never = threading.Event()
            _countdown("writer alone", args.alone_seconds, never)
            t1 = load.now()

            stop = threading.Event()
            threads = [threading.Thread(target=reader, args=(i, args.readers, server.url, bodies,
                                                              args.refresh, t1, stop, samples), daemon=True)
                       for i in range(args.readers)]
            for th in threads:
                th.start()
            _countdown(f"{args.readers} readers + writer", args.seconds / 2, never)
            per_worker = rss.connections(server.port)
            _countdown(f"{args.readers} readers + writer", args.seconds / 2, never)
            t2 = load.now()
            stop.set()
            wstop.set()
            wsamples = [Sample(**d) for d in receive.recv()]
            writer.join(30)
            for th in threads:
                th.join(150)
            rss.stop()
            rss_end = rss.now()
    finally:
        load.stop()
        prom.cleanup()

    alone = Phase("writer alone", t0, t1, load.cores(t0, t1), rss.peak(t0, t1))
    loaded = Phase(f"{args.readers} readers + writer", t1, t2, load.cores(t1, t2), rss.peak(t1, t2))
    reads = loaded.started(samples)
    mode = "back to back" if args.refresh == 0 else f"one dashboard every {args.refresh:g} s"

    print(f"\nReaders: {args.readers} Grafana viewers ({mode}) for {loaded.seconds:.0f} s, "
          "with the writer: the requests that started then (each answered or failed, however "
          "late); req/s counts those answered within the phase\n")
    rows = [_latency_row(k, [s for s in samples if s.kind == k], loaded) for k in KINDS]
    rows.append(_latency_row("all", samples, loaded))
    print(common.table(["kind", "requests", "req/s", "p50", "p95", "p99", "max", "errors"], rows))
    by_reader: dict[int, list[float]] = {}
    for sample in reads:
        by_reader.setdefault(sample.reader, []).append(sample.seconds)
    means = sorted(float(np.mean(v)) for v in by_reader.values())
    if means:
        print(f"\nMean latency per reader: {common.fmt_ms(means[0])} to {common.fmt_ms(means[-1])} "
              f"(median {common.fmt_ms(float(np.median(means)))}); client connections per worker "
              f"mid-phase: {' and '.join(map(str, per_worker))}")

    print(f"\nWriter: {args.batch:,}-record batches over HTTP, predictions then the feedback "
          "arrived by then\n")
    w_alone, r_alone = _writer_row(alone, wsamples)
    w_loaded, r_loaded = _writer_row(loaded, wsamples)
    print(common.table(["phase", "seconds", "batches", "rows", "rows/s",
                        "predictions p50 / p95", "feedback p50 / p95", "errors", "others' cores"],
                       [w_alone, w_loaded]))

    all_p99 = common.pct([s.seconds for s in reads], 99)
    errors = sum(1 for s in reads if s.status != 200) + sum(
        1 for s in alone.inside(wsamples) + loaded.inside(wsamples) if s.status != 200)
    ratio = r_loaded / r_alone if r_alone else float("nan")
    peak = max(alone.rss_peak, loaded.rss_peak)
    print(f"\nServer RSS (gunicorn master + {server.workers} workers): peak {peak / 2**20:,.0f} MiB "
          f"(writer alone {alone.rss_peak / 2**20:,.0f} MiB, with readers "
          f"{loaded.rss_peak / 2**20:,.0f} MiB), {rss_end / 2**20:,.0f} MiB at the end")
    print("\n| aim (2 cores) | result |\n|---|---|")
    print(f"| 0 errors | {'met' if errors == 0 else 'missed'}: {errors} |")
    print(f"| p99 under 1 s for the mix | {'met' if all_p99 < AIM_P99_S else 'missed'}: "
          f"{common.fmt_ms(all_p99)} |")
    print(f"| writer at least half its unloaded rate | {'met' if ratio >= 0.5 else 'missed'}: "
          f"{r_loaded:,.0f} of {r_alone:,.0f} rows/s ({ratio:.0%}) |")
    print(f"| RSS under 1 GB | {'met' if peak < AIM_RSS_BYTES else 'missed'}: "
          f"{peak / 2**20:,.0f} MiB |")
    for line in _first_errors(reads) + _first_errors(wsamples):
        print(f"  error: {line}")
    common.print_machine(info)
    print(f"\ncommand: {shlex.join([sys.executable, *sys.argv])}")
    print(f"benchmark wall time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
