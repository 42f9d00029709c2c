"""The essay's latency figure, reproduced here: PromQL join, SQL join + scikit-learn, and mlsli.

    .venv/bin/python benchmarks/promql.py                                 # N = 10K, 100K, 1M
    .venv/bin/python benchmarks/promql.py --sizes 10000 --reps 3          # quick
    .venv/bin/python benchmarks/promql.py --ours-only-sizes 10000000      # + mlsli alone at 10M
    .venv/bin/python benchmarks/promql.py --ours-only-sizes 1e7,1e8 --fill sql   # filled in SQL

Why. The essay this project answers (Shreya Shankar, "The Modern ML Monitoring Mess:
Failure Modes in Extending Prometheus", 2022) plots the latency of one number, the
cumulative accuracy, against the number of predictions made: a PromQL join of two
gauges on ``output_id`` grows to 15 s at ~360K predictions, a PostgreSQL join + Python
to ~2 s. Its timings are in ``/work/shared/reference/prometheus-vs-postgres-timing.csv``
(``--essay-csv``). This script measures the same three ways on one machine and one
data set (``common.synthesize``, as ``query.py`` uses), checks that they give the same
number, and draws the essay's figure again with its own timings overlaid:

1. **PromQL on a real Prometheus** (``/usr/bin/prometheus``, ``/usr/bin/promtool``).
   The series are the essay's (``mext``'s ``BinaryClassificationMetric``): one gauge
   ``binary_class_metric_test_prediction{output_id}`` per prediction (the score) and
   one ``binary_class_metric_test_label{output_id}`` per label (0 or 1), with the
   ``job``/``instance`` labels its scrape added (job ``inference``, target
   ``app:1000``, a 5 s scrape interval). Each series has a sample at the first scrape
   after it was set and one at the last scrape, after the last label arrived: the
   instant query at that scrape reads every series once, as the essay's did, and
   the samples in between (only older chunks) are left out. The file is written in
   OpenMetrics, turned into TSDB blocks with ``promtool tsdb create-blocks-from
   openmetrics``, and served by ``prometheus`` on 127.0.0.1 with no scrape targets,
   no remote storage and compaction off. The essay's accuracy query, verbatim, goes to
   ``GET /api/v1/query`` at the last scrape's time.
2. **The essay's join + scikit-learn**: ``query.Essay``'s ``SELECT p.score, f.label
   FROM predictions p JOIN essay_feedback f ...`` (every label, copied from the store before
   timing) fetched with psycopg2, then
   ``accuracy_score(label, score >= 0.5)`` (``query.SingleValue``, case (a)'s baseline).
3. **mlsli**: ``POST /query`` to a real gunicorn with the body Grafana sends for a
   30-day stat panel of cumulative accuracy (``query.py``'s case (a) stat: 240
   points, the last one the current value).

Every time is a p50 after a warm-up, end to end from this process (HTTP for 1 and 3,
the SQL round trip and scikit-learn for 2). PromQL's ``abs(label - score) < 0.5``
and ``score >= 0.5`` differ only at a score of exactly 0.5; the values are checked to
agree within 1e-9. The figure goes to ``docs/essay-figure.png`` (``--figure``).
The PostgreSQL server is DATABASE_URL's, else the embedded one under ``.data/bench-pg``;
the database ``mlsli_bench_promql`` is refilled for each N; the N it already holds goes first
and is not refilled.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import common
import fill_sql
import numpy as np
import query
import requests
from tqdm import tqdm

DB_NAME = "mlsli_bench_promql"
PROMETHEUS, PROMTOOL = "/usr/bin/prometheus", "/usr/bin/promtool"
ESSAY_CSV = Path("/work/shared/reference/prometheus-vs-postgres-timing.csv")
FIGURE = common.ROOT / "docs" / "essay-figure.png"
PRED, LABEL = "binary_class_metric_test_prediction", "binary_class_metric_test_label"
# the essay's accuracy query (its table, and mext's get_query_strings), verbatim
ACCURACY_PROMQL = (f"count(abs({LABEL} - on (output_id) {PRED}) < 0.5)"
                   f" / count({LABEL} - on (output_id) {PRED})")
SCRAPE_S = 5  # the essay's scrape interval (mext monitoring/prometheus.yml)
TARGET = 'job="inference",instance="app:1000"'  # the labels its scrape added
TOLERANCE = 1e-9


@dataclass
class Size:
    """What was measured at one N: p50 seconds and the value of each side (NaN: not run)."""

    n: int
    labeled: int
    fill_s: float = float("nan")
    sides: dict[str, dict] = field(default_factory=dict)  # side -> p50, value, others, reps

    def p50(self, side: str) -> float:
        return self.sides.get(side, {}).get("p50", float("nan"))


SIDES = {"promql": "PromQL join on Prometheus", "sklearn": "PostgreSQL join + scikit-learn",
         "ours": "mlsli POST /query"}


# --------------------------------------------------------------------------- Prometheus


def require_prometheus() -> str:
    """The Prometheus version; exits with a message when the Debian package is missing."""
    missing = [p for p in (PROMETHEUS, PROMTOOL) if not os.access(p, os.X_OK)]
    if missing:
        raise SystemExit(f"{' and '.join(missing)} not found: install the Debian package "
                         "(apt-get install -y prometheus), or run with --sizes '' for mlsli alone")
    out = subprocess.run([PROMETHEUS, "--version"], capture_output=True, text=True, check=True)
    return (out.stdout or out.stderr).split("\n", 1)[0].removeprefix("prometheus, version ")


def _scrape_after(ms: np.ndarray) -> np.ndarray:
    """The first scrape (a multiple of SCRAPE_S seconds) after each time, in seconds."""
    return (ms // (SCRAPE_S * 1000) + 1) * SCRAPE_S


def write_openmetrics(data: common.Synthetic, path: Path) -> int:
    """The essay's two gauges as OpenMetrics; returns the last scrape's time (epoch s).

    One series per prediction and per label, each with a sample at its first scrape
    and one at the last scrape, which comes after the last label arrived.
    """
    last = int(_scrape_after(np.array([data.fb_ts_ms.max(), data.ts_ms.max()])).max())
    families = (
        (PRED, data.ids, [repr(s) for s in data.score.tolist()], _scrape_after(data.ts_ms),
         "the model's score per output_id"),
        (LABEL, data.ids[data.fb_index], ["1" if y else "0" for y in data.fb_label.tolist()],
         _scrape_after(data.fb_ts_ms), "the true label per output_id"),
    )
    total = len(data) + len(data.fb_index)
    with open(path, "w") as f, tqdm(total=total, desc="openmetrics", unit="series",
                                    unit_scale=True, leave=False, file=sys.stderr,
                                    disable=None) as bar:
        for name, ids, values, born, help_text in families:
            f.write(f"# HELP {name} {help_text}\n# TYPE {name} gauge\n")
            for start in range(0, len(ids), 100_000):
                chunk = zip(ids[start:start + 100_000].tolist(), values[start:start + 100_000],
                            born[start:start + 100_000].tolist(), strict=True)
                f.write("".join(f'{name}{{{TARGET},output_id="{oid}"}} {v} {t}\n'
                                f'{name}{{{TARGET},output_id="{oid}"}} {v} {last}\n'
                                for oid, v, t in chunk))
                bar.update(min(100_000, len(ids) - start))
        f.write("# EOF\n")
    return last


def create_blocks(openmetrics: Path, blocks: Path) -> float:
    """``promtool tsdb create-blocks-from openmetrics`` into one block; returns seconds.

    ``--max-block-duration`` (hidden in promtool 2.42) lets the 32 days fit one block
    instead of 384 two-hour ones, each a pass over the whole file.
    """
    t0 = time.perf_counter()
    subprocess.run([PROMTOOL, "tsdb", "create-blocks-from", "openmetrics", "--quiet",
                    "--max-block-duration=1500h", str(openmetrics), str(blocks)],
                   check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


class Prometheus:
    """``prometheus`` on 127.0.0.1 over ``blocks``: no targets, no remote, no compaction.

    A context manager; the server is stopped (terminated, then killed) on exit.
    """

    def __init__(self, blocks: Path, workdir: Path, start_timeout_s: float = 300.0):
        self.blocks, self.workdir, self.start_timeout_s = blocks, workdir, start_timeout_s
        self.port = common._free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "prometheus.log"
        self.proc: subprocess.Popen | None = None

    @property
    def command(self) -> list[str]:
        config = self.workdir / "prometheus.yml"
        config.write_text("global: {}\n")  # no scrape_configs, no remote_write
        return [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={self.blocks}",
                "--storage.tsdb.retention.time=100y", f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.min-block-duration=2h", "--storage.tsdb.max-block-duration=2h",
                "--query.timeout=30m", "--log.level=warn"]

    def __enter__(self) -> Prometheus:
        log = open(self.log_path, "w")  # the child keeps its own copy
        self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                     cwd=self.workdir, start_new_session=True)
        log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n"
                                   f"{self.log_path.read_text()[-2000:]}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(self.url + "/-/ready", timeout=2).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"prometheus not ready within {self.start_timeout_s} s")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, 15)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 9)
            self.proc.wait(timeout=10)

    def __exit__(self, *exc) -> None:
        self.stop()

    def instant(self, session: requests.Session, promql: str, at_s: int) -> tuple[float, float]:
        """(seconds to the last byte, the single value) of an instant query at ``at_s``."""
        t0 = time.perf_counter()
        resp = session.get(self.url + "/api/v1/query", params={"query": promql, "time": at_s},
                           timeout=3600)
        body = resp.content
        took = time.perf_counter() - t0
        answer = json.loads(body)
        if resp.status_code != 200 or answer.get("status") != "success":
            raise RuntimeError(f"{promql!r}: {resp.status_code} {body[:300]!r}")
        result = answer["data"]["result"]
        return took, float(result[0]["value"][1]) if result else float("nan")


def measure_promql(data: common.Synthetic, reps: int, load: common.OtherLoad,
                   quiet_wait: float) -> dict:
    """Backfill the essay's series, start Prometheus, time the essay's query."""
    with tempfile.TemporaryDirectory(prefix="bench-promql-") as tmp:
        work = Path(tmp)
        openmetrics, blocks = work / "essay.om", work / "blocks"
        last_scrape = write_openmetrics(data, openmetrics)
        size_mb = openmetrics.stat().st_size / 1e6
        blocks_s = create_blocks(openmetrics, blocks)
        openmetrics.unlink()
        with Prometheus(blocks, work) as prom, requests.Session() as s:
            for name, want in ((PRED, len(data)), (LABEL, len(data.fb_index))):
                _, got = prom.instant(s, f"count({name})", last_scrape)
                if got != want:
                    raise SystemExit(f"Prometheus holds {got} series of {name}, expected {want}")
            value = prom.instant(s, ACCURACY_PROMQL, last_scrape)[1]  # warm-up
            load.wait_quiet(quiet_wait)
            t0 = load.now()
            took = [prom.instant(s, ACCURACY_PROMQL, last_scrape)[0]
                    for _ in tqdm(range(reps), desc="PromQL", leave=False, file=sys.stderr,
                                  disable=None)]
            others = load.cores(t0, load.now())
    print(f"  PromQL: {size_mb:,.0f} MB of OpenMetrics, blocks in {blocks_s:.0f} s, "
          f"p50 {common.fmt_ms(common.pct(took, 50))}", flush=True)
    return {"p50": common.pct(took, 50), "value": value, "others": others, "reps": reps}


# --------------------------------------------------------------------------- PostgreSQL


def ensure_data(server: str, data: common.Synthetic, seed: int, refill: bool) -> tuple[str, float]:
    """The database's URL, filled with ``data`` unless it holds it; and the fill's seconds."""
    url = common.with_dbname(server, DB_NAME)
    if not refill and common.database_exists(server, DB_NAME) and query._has_data(
            url, len(data), seed, len(data.fb_index)):
        print(f"  reusing database {DB_NAME} ({query._tag(len(data), seed)})", flush=True)
        return url, float("nan")
    url = common.fresh_database(server, DB_NAME)
    _, took, others = query._measured(lambda: common.bulk_fill(url, data, query._tag(len(data), seed)))
    print(f"  filled {DB_NAME} (bulk client, VACUUM ANALYZE, CHECKPOINT) in {took:.0f} s "
          f"(others' cores {common.fmt_cores(others)})", flush=True)
    return url, took


def held_size(server: str, seed: int) -> int | None:
    """The N the database holds from an earlier run (its model's fill tag), if any."""
    import psycopg2

    from datasource import db, store

    if not common.database_exists(server, DB_NAME):
        return None
    conn = db.connect(common.with_dbname(server, DB_NAME))
    try:
        model = store.get_model(conn, common.MODEL)
    except psycopg2.Error:
        return None
    finally:
        conn.close()
    prefix = query._tag(0, seed).removesuffix("0")
    if model is None or not (model.description or "").startswith(prefix):
        return None
    return int(model.description.removeprefix(prefix).split()[0])  # then " fill=sql", if so


def labeled_count(url: str) -> int:
    """The number of labels the database holds."""
    from datasource import db, store

    conn = db.connect(url, statement_timeout_ms=0)
    try:
        return store.table_counts(conn, store.get_model(conn, common.MODEL))["feedback"]
    finally:
        conn.close()


def in_fill_order(sizes: list[int], held: int | None) -> list[int]:
    """``sizes`` with the one the database already holds first: one database, fewer fills."""
    return sorted(sizes, key=lambda n: (n != held, n))


def measure_sklearn(url: str, reps: int, load: common.OtherLoad, quiet_wait: float) -> dict:
    """The essay's SQL join fetched into Python, then ``accuracy_score`` (query.py's (a))."""
    essay = query.Essay(url, budget_s=float("inf"))
    run = query.SingleValue({}, 0.5, "accuracy")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = float(run(essay).values["accuracy"][0])  # warm-up
            load.wait_quiet(quiet_wait)
            t0 = load.now()
            took = [run(essay).seconds for _ in tqdm(range(reps), desc="join + sklearn",
                                                      leave=False, file=sys.stderr, disable=None)]
            others = load.cores(t0, load.now())
    finally:
        essay.close()
    return {"p50": common.pct(took, 50), "value": value, "others": others, "reps": reps}


def measure_ours(url: str, reps: int, load: common.OtherLoad, quiet_wait: float) -> dict:
    """``POST /query`` for a 30-day stat panel of cumulative accuracy; its last value."""
    body = query.grafana_body([query.target("accuracy", window="cumulative")], days=30,
                              max_points=query.STAT_MAX_POINTS)
    # a long start: after a change to the declared partials the app rebuilds the rollup first
    with common.Gunicorn(url, start_timeout_s=1800) as server, requests.Session() as s:
        for _ in range(3):  # warm-up: the connection, caches, the OS page cache
            _, answer = query.post(s, server.url, body)
        load.wait_quiet(quiet_wait)
        t0 = load.now()
        took = [query.post(s, server.url, body)[0]
                for _ in tqdm(range(reps), desc="mlsli", leave=False, file=sys.stderr,
                              disable=None)]
        others = load.cores(t0, load.now())
    value = float(query._served(answer)[("accuracy", "")][-1])
    return {"p50": common.pct(took, 50), "value": value, "others": others, "reps": reps}


# --------------------------------------------------------------------------- one size


def measure_size(server: str, n: int, args, load: common.OtherLoad, promql: bool) -> Size:
    """Fill, then run PromQL (when ``promql``), join + sklearn (likewise) and ours at N = n."""
    if not promql and args.fill == "sql":  # ours alone: the data need not exist in numpy
        print(f"\nN = {n:,}: {fill_sql.describe(n, args.seed)}", flush=True)
        url, fill_s = query.ensure_sql_data(server, n, args.seed, args.refill, db_name=DB_NAME)
        size = Size(n, labeled_count(url), fill_s)
        size.sides["ours"] = measure_ours(url, args.http_reps, load, args.quiet_wait)
        print(f"  ours {common.fmt_ms(size.p50('ours'))} = {size.sides['ours']['value']!r}", flush=True)
        return size
    data = common.synthesize(n, args.seed)
    print(f"\nN = {n:,}: {common.describe_data(data)}", flush=True)
    size = Size(n, len(data.fb_index))
    url, size.fill_s = ensure_data(server, data, args.seed, args.refill)
    if promql:
        size.sides["promql"] = measure_promql(data, args.reps, load, args.quiet_wait)
    del data
    if promql:
        size.sides["sklearn"] = measure_sklearn(url, args.reps, load, args.quiet_wait)
    size.sides["ours"] = measure_ours(url, args.http_reps, load, args.quiet_wait)
    print("  " + ", ".join(f"{k} {common.fmt_ms(v['p50'])} = {v['value']!r}"
                           for k, v in size.sides.items()), flush=True)
    return size


def disagreement(size: Size) -> float:
    """Max |value - scikit-learn's| over the sides run (NaN when there is no reference)."""
    ref = size.sides.get("sklearn", {}).get("value")
    if ref is None:
        return float("nan")
    return max(abs(s["value"] - ref) for s in size.sides.values())


# --------------------------------------------------------------------------- report


def _ratio(a: float, b: float) -> str:
    return "–" if a != a or b != b else f"{a / b:,.0f}x" if a / b >= 10 else f"{a / b:.1f}x"


def report(sizes: list[Size]) -> str:
    rows = []
    for z in sizes:
        ours = z.p50("ours")
        diff = disagreement(z)
        others = " / ".join(common.fmt_cores(z.sides[k]["others"]) if k in z.sides else "–"
                            for k in SIDES)
        rows.append([f"{z.n:,}", f"{z.labeled:,}", common.fmt_ms(z.p50("promql")),
                     common.fmt_ms(z.p50("sklearn")), common.fmt_ms(ours),
                     _ratio(z.p50("promql"), ours), _ratio(z.p50("sklearn"), ours),
                     f"{z.sides['ours']['value']:.6f}", "–" if diff != diff else f"{diff:.0e}",
                     others])
    return common.table(["N predictions", "labeled", "PromQL p50", "join + sklearn p50",
                         "ours p50", "PromQL / ours", "join / ours", "accuracy", "max |Δ|",
                         "others' cores (PromQL / join / ours)"], rows)


def essay_timings(path: Path) -> dict[str, np.ndarray]:
    """The essay's own timings: cumulative predictions and seconds per query."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {"n": np.cumsum([int(r["num_points"]) for r in rows]),
            "promql": np.array([float(r["prometheus_metric_computation_times"]) for r in rows]),
            "sklearn": np.array([float(r["postgres_metric_computation_times"]) for r in rows])}


def draw(sizes: list[Size], essay: dict[str, np.ndarray] | None, path: Path,
         prometheus_version: str) -> None:
    """Latency (ms, p50) against N on log-log axes, the essay's timings dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.2), dpi=150)
    colors = {"promql": "tab:red", "sklearn": "tab:blue", "ours": "tab:green"}
    labels = {**SIDES, "promql": f"PromQL join, Prometheus {prometheus_version.split()[0]}"}
    if essay is not None:
        ax.plot(essay["n"], essay["promql"] * 1000, "--", color=colors["promql"], alpha=0.7,
                label="essay: PromQL join (Prometheus)")
        ax.plot(essay["n"], essay["sklearn"] * 1000, "--", color=colors["sklearn"], alpha=0.7,
                label="essay: PostgreSQL join + scikit-learn (mltrace)")
    for side in SIDES:
        pts = [(z.n, z.p50(side) * 1000) for z in sizes if side in z.sides]
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", color=colors[side], label=labels[side])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("predictions (N), ~80 % labeled here, all labeled in the essay")
    ax.set_ylabel("latency (ms)")
    ax.set_title("Cumulative accuracy: latency of one query vs. predictions made")
    fig.text(0.01, 0.005, "solid: this machine, p50 after a warm-up; dashed: the essay's CSV, "
             "one run per point", fontsize=7, color="0.4")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def _sizes(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=_sizes, default=_sizes("10000,100000,1000000"),
                    help="N for all three sides, comma-separated")
    ap.add_argument("--ours-only-sizes", type=_sizes, default=[],
                    help="N for mlsli alone (e.g. 10000000), comma-separated")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--fill", choices=("bulk", "sql"), default="bulk",
                    help="how the --ours-only-sizes are filled: the bulk client, or in PostgreSQL "
                         "(fill_sql: the same distribution, not the same values; for 10M-100M)")
    ap.add_argument("--reps", type=int, default=5, help="timed PromQL and join + sklearn runs")
    ap.add_argument("--http-reps", type=int, default=20, help="timed POST /query requests")
    ap.add_argument("--refill", action="store_true", help="refill the database even if it matches")
    ap.add_argument("--quiet-wait", type=float, default=30.0, metavar="S",
                    help="before each side wait up to S seconds for other processes to go idle")
    ap.add_argument("--essay-csv", type=Path, default=ESSAY_CSV)
    ap.add_argument("--figure", type=Path, default=FIGURE)
    args = ap.parse_args(argv)
    if min(args.reps, args.http_reps) < 1 or min(args.sizes + args.ours_only_sizes, default=1) < 1:
        ap.error("counts must be positive")

    started = time.perf_counter()
    version = require_prometheus() if args.sizes else "not run"
    pg_server = common.server_url()
    info = {**common.machine_of(pg_server), "Prometheus": version}
    plan = {n: False for n in args.ours_only_sizes} | {n: True for n in args.sizes}  # n -> PromQL
    order = in_fill_order(list(plan), held_size(pg_server, args.seed))
    load = common.OtherLoad().start()
    try:
        sizes = [measure_size(pg_server, n, args, load, promql=plan[n]) for n in order]
    finally:
        load.stop()
    sizes.sort(key=lambda z: z.n)

    print(f"\nCumulative accuracy, p50 (PromQL and join + sklearn: {args.reps} runs, "
          f"ours: {args.http_reps} requests, each after a warm-up)\n")
    print(report(sizes))
    essay = essay_timings(args.essay_csv) if args.essay_csv.exists() else None
    draw(sizes, essay, args.figure, version)
    print(f"\nfigure: {args.figure}" + ("" if essay else f" (no essay timings: {args.essay_csv})"))
    fills = ", ".join(f"{z.n:,}: {z.fill_s:.0f} s" for z in sizes if z.fill_s == z.fill_s)
    if fills:
        print(f"fills: {fills}")
    common.print_machine(info)
    print(f"\ncommand: {shlex.join([sys.executable, *sys.argv])}")
    print(f"benchmark wall time: {time.perf_counter() - started:.0f} s")
    bad = [z.n for z in sizes if disagreement(z) > TOLERANCE]
    if bad:
        raise SystemExit(f"the three values differ by more than {TOLERANCE} at N = {bad}")


if __name__ == "__main__":
    main()
