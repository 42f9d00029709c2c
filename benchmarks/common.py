"""Shared pieces of the benchmarks: the database, synthetic data, a real gunicorn, reporting.

Imported by ``benchmarks/ingest.py`` and ``benchmarks/query.py`` (run as scripts,
so this directory is on ``sys.path``); importing it puts the repository root on
``sys.path`` too, which makes ``datasource`` importable from a clean clone.

* The server is DATABASE_URL's when set, else an embedded PostgreSQL under
  ``.data/bench-pg``. Benchmarks never touch the database named in the URL:
  each uses its own (``mlsli_bench_ingest``, ``mlsli_bench_query``).
* The data is synthetic and seeded: 30 days of binary-classification
  predictions (a high-tip model), segmented by borough x vendor, about 80 %
  of them labeled after a delay of up to 2 days. ``synthesize`` returns numpy
  arrays; ``prediction_records`` / ``feedback_records`` turn slices of them into
  the dicts the client takes.
* ``Gunicorn`` runs the real server as the README deploys it, on 127.0.0.1 only,
  and is always stopped on exit from its ``with`` block.
"""

from __future__ import annotations

import contextlib
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")

DAY_S = 86_400
START = datetime(2020, 2, 1, tzinfo=UTC)  # the essay's deployment starts on 1 February 2020
START_S = int(START.timestamp())
SPAN_DAYS = 30
END_S = START_S + SPAN_DAYS * DAY_S
LABELED_SHARE = 0.8
MAX_DELAY_S = 2 * DAY_S
BOROUGHS = ("Manhattan", "Brooklyn", "Queens", "Bronx", "Staten Island")
BOROUGH_WEIGHTS = (0.62, 0.15, 0.14, 0.06, 0.03)
VENDORS = ("1", "2")
VENDOR_WEIGHTS = (0.35, 0.65)
MODEL = "high_tip"


# --------------------------------------------------------------------------- database


def with_dbname(url: str, name: str) -> str:
    """The same server URL pointing at database ``name`` (query string, e.g. host=, kept)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


def server_url() -> str:
    """DATABASE_URL's server, else the embedded PostgreSQL under ``.data/bench-pg``."""
    from datasource import db

    return os.environ.get("DATABASE_URL") or db.embedded_url(ROOT / ".data" / "bench-pg")


def database_exists(server: str, name: str) -> bool:
    import psycopg2

    admin = psycopg2.connect(server)
    try:
        with admin.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            return cur.fetchone() is not None
    finally:
        admin.close()


def fresh_database(server: str, name: str) -> str:
    """Drop and create database ``name`` on the server, apply migrations; return its URL."""
    import psycopg2

    from datasource import db

    if not name.startswith("mlsli_bench"):
        raise ValueError("benchmarks only drop their own mlsli_bench* databases")
    admin = psycopg2.connect(server)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        admin.close()
    url = with_dbname(server, name)
    conn = db.connect(url, statement_timeout_ms=0)
    try:
        db.migrate(conn)
    finally:
        conn.close()
    return url


# --------------------------------------------------------------------------- the machine


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _ram_gib() -> float:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024**2
    return float("nan")


def machine_of(server: str) -> dict:
    """``machine()`` read over a short-lived connection to ``server``."""
    from datasource import db

    conn = db.connect(server)
    try:
        return machine(conn)
    finally:
        conn.close()


def machine(conn) -> dict[str, str]:
    """What the numbers were measured on, including the PostgreSQL server and its settings."""
    with conn.cursor() as cur:
        cur.execute("SHOW server_version")
        pg = cur.fetchone()[0]
        settings = []
        for name in ("shared_buffers", "work_mem", "synchronous_commit", "jit", "wal_buffers", "max_wal_size"):
            cur.execute(f"SHOW {name}")
            settings.append(f"{name}={cur.fetchone()[0]}")
    conn.rollback()
    info = {}
    for key, value in host().items():
        info[key] = value
        if key == "Python":
            info["PostgreSQL"] = (f"{pg} ({'DATABASE_URL' if os.environ.get('DATABASE_URL') else 'embedded'}; "
                                  f"{', '.join(settings)})")
    return info


def host() -> dict[str, str]:
    """The machine and code without the database (for benchmarks that run no SQL)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cores": str(cores),
        "RAM": f"{_ram_gib():.1f} GiB",
        "CPU": _cpu_model(),
        "OS": f"{platform.system()} {platform.release()}",
        "Python": platform.python_version(),
        "load average at start": " ".join(f"{x:.2f}" for x in load),
        "code": _git_state(),
    }


def _git_state() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def print_machine(info: dict[str, str]) -> None:
    print("\nMachine")
    for k, v in info.items():
        print(f"  {k:<22} {v}")


# --------------------------------------------------------------------------- synthetic data


@dataclass
class Synthetic:
    """Predictions (sorted by ts) and their feedback; times are epoch milliseconds."""

    ids: np.ndarray  # str
    ts_ms: np.ndarray  # int64
    score: np.ndarray  # float64 in [0, 1]
    borough: np.ndarray  # index into BOROUGHS
    vendor: np.ndarray  # index into VENDORS
    fb_index: np.ndarray  # prediction index of each feedback, in arrival order
    fb_ts_ms: np.ndarray  # int64, sorted ascending
    fb_label: np.ndarray  # 0.0 / 1.0
    zone: np.ndarray | None = None  # index into zones(k), when the data has a zone segment

    def __len__(self) -> int:
        return len(self.ids)


def synthesize(n: int, seed: int, zones: int = 1) -> Synthetic:
    """``n`` predictions over 30 days from 2020-02-01 with ~80 % labeled, in arrival order.

    The score is a calibrated probability at deployment; the true rate drifts down
    over the month (as tips did in spring 2020), so accuracy decays and panels move.
    Delays follow 2 days x Beta(1, 3): mean 12 h, at most 2 days.
    ``zones`` > 1 adds a third segment, ``zone``, uniform over that many values and drawn
    from its own generator (the other columns stay those of zones=1): 10 x zones segment
    sets, to see what more segment sets cost (issue 11).
    """
    rng = np.random.default_rng(seed)
    ts_ms = np.sort(rng.integers(START_S * 1000, END_S * 1000, size=n, endpoint=True))
    borough = rng.choice(len(BOROUGHS), size=n, p=BOROUGH_WEIGHTS)
    vendor = rng.choice(len(VENDORS), size=n, p=VENDOR_WEIGHTS)
    offset = np.array([0.9, 0.3, 0.2, -0.3, -0.1])[borough] + np.array([-0.2, 0.1])[vendor]
    z = rng.normal(offset, 1.6)
    score = 1.0 / (1.0 + np.exp(-z))
    drift = 0.9 * (ts_ms / 1000.0 - START_S) / (END_S - START_S)
    label = (rng.random(n) < 1.0 / (1.0 + np.exp(-(z - drift)))).astype(np.float64)
    labeled = np.flatnonzero(rng.random(n) < LABELED_SHARE)
    delay_ms = (rng.beta(1.0, 3.0, size=len(labeled)) * MAX_DELAY_S * 1000).astype(np.int64)
    fb_ts = ts_ms[labeled] + np.maximum(delay_ms, 1)
    order = np.argsort(fb_ts, kind="stable")
    ids = np.char.add(f"s{seed}-", np.arange(n).astype(str))
    zone = np.random.default_rng([seed, zones]).integers(0, zones, size=n) if zones > 1 else None
    return Synthetic(ids, ts_ms, score, borough, vendor, labeled[order], fb_ts[order],
                     label[labeled][order], zone)


_SEGMENTS = [[{"borough": b, "vendor": v} for v in VENDORS] for b in BOROUGHS]


def _datetimes(ms: np.ndarray) -> list[datetime]:
    return (ms.astype("datetime64[ms]").astype("datetime64[us]").astype(object)
            .tolist())


def prediction_records(d: Synthetic, lo: int, hi: int) -> list[dict]:
    """Predictions lo..hi-1 as client records (``ts`` as aware UTC datetimes)."""
    ts = _datetimes(d.ts_ms[lo:hi])
    out = [{"id": oid, "ts": t.replace(tzinfo=UTC), "score": s, "segments": _SEGMENTS[b][v]}
           for oid, t, s, b, v in zip(d.ids[lo:hi].tolist(), ts, d.score[lo:hi].tolist(),
                                      d.borough[lo:hi].tolist(), d.vendor[lo:hi].tolist(),
                                      strict=True)]
    if d.zone is not None:
        for rec, z in zip(out, d.zone[lo:hi].tolist(), strict=True):
            rec["segments"] = {**rec["segments"], "zone": f"z{z}"}
    return out


def feedback_records(d: Synthetic, lo: int, hi: int) -> list[dict]:
    """Feedback lo..hi-1 (arrival order) as client records."""
    ts = _datetimes(d.fb_ts_ms[lo:hi])
    ids = d.ids[d.fb_index[lo:hi]].tolist()
    return [{"id": oid, "ts": t.replace(tzinfo=UTC), "label": y}
            for oid, t, y in zip(ids, ts, d.fb_label[lo:hi].tolist(), strict=True)]


def describe_data(d: Synthetic) -> str:
    return (f"{len(d):,} predictions {START:%Y-%m-%d} + {SPAN_DAYS} days, "
            f"{len(d.fb_index):,} feedback ({len(d.fb_index) / max(len(d), 1):.0%}), "
            f"delay <= 2 days (mean {np.mean(d.fb_ts_ms - d.ts_ms[d.fb_index]) / 3.6e6:.1f} h), "
            f"{len(BOROUGHS)} boroughs x {len(VENDORS)} vendors"
            + ("" if d.zone is None else f" x {int(d.zone.max()) + 1} zones"))


# --------------------------------------------------------------------------- gunicorn


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Gunicorn:
    """``gunicorn -w 2 --threads 4 "datasource:create_app()"`` on 127.0.0.1 as a subprocess.

    Use as a context manager; the process group is terminated (then killed) on exit.
    """

    def __init__(self, database_url: str, workers: int = 2, threads: int = 4,
                 start_timeout_s: float = 90.0, extra_env: dict | None = None):
        self.database_url = database_url
        self.workers = workers
        self.threads = threads
        self.start_timeout_s = start_timeout_s
        self.extra_env = extra_env or {}
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = tempfile.NamedTemporaryFile(prefix="bench-gunicorn-", suffix=".log", delete=False)

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "gunicorn", "-w", str(self.workers), "--threads",
                str(self.threads), "-b", f"127.0.0.1:{self.port}", "datasource:create_app()"]

    def __enter__(self) -> Gunicorn:
        import requests

        env = {**os.environ, **self.extra_env, "DATABASE_URL": self.database_url,
               "PYTHONPATH": str(ROOT)}
        env.pop("INGEST_TOKEN", None)
        self.proc = subprocess.Popen(self.command, cwd=ROOT, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout_s
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"gunicorn exited with {self.proc.returncode}; "
                                       f"see {self.log.name}")
                with contextlib.suppress(requests.RequestException):
                    if requests.get(self.url + "/", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"gunicorn did not answer within {self.start_timeout_s}s; "
                                       f"see {self.log.name}")
                time.sleep(0.1)
            self._wait_for_workers(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def _worker_cpu_ticks(self) -> dict[int, int]:
        """utime + stime of each child of the master (the workers), from /proc."""
        ticks = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == self.proc.pid:  # ppid
                    ticks[int(stat.parent.name)] = int(fields[11]) + int(fields[12])
        return ticks

    def _wait_for_workers(self, deadline: float) -> None:
        """Return once all workers exist and have stopped using CPU (the app is built)."""
        if not Path("/proc").is_dir():
            time.sleep(5.0)
            return
        last, quiet = None, 0
        while time.monotonic() < deadline and quiet < 3:
            time.sleep(0.3)
            now = self._worker_cpu_ticks()
            quiet = quiet + 1 if (len(now) >= self.workers and now == last) else 0
            last = now

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, 15)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 9)
            self.proc.wait(timeout=10)

    def __exit__(self, *exc) -> None:
        self.stop()
        self.log.close()
        if exc[0] is None:
            with contextlib.suppress(OSError):
                os.unlink(self.log.name)


# --------------------------------------------------------------------------- other load


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, utime + stime ticks) for every process we can read."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            out[int(stat.parent.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    return out


def _busy_ticks() -> int:
    """Non-idle CPU ticks of the whole machine since boot (/proc/stat)."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(v[:3]) + sum(v[5:8])  # user nice system, irq softirq steal


def _postmaster_pid() -> int | None:
    pidfile = ROOT / ".data" / "bench-pg" / "pg" / "postmaster.pid"
    if os.environ.get("DATABASE_URL") or not pidfile.exists():
        return None
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(pidfile.read_text().split()[0])
    return None


class OtherLoad:
    """CPU used by processes that are not ours while a benchmark runs.

    Ours: this process, its children (gunicorn) and the embedded PostgreSQL's
    processes. The machine may be shared; numbers measured while others use
    the CPU are slower than on an idle machine, so every result carries the
    average number of cores the others used meanwhile. Linux only (else NaN).
    """

    def __init__(self, interval_s: float = 1.0):
        self.interval_s = interval_s
        self.samples: list[tuple[float, int, int]] = []  # (monotonic, busy, ours) cumulative
        self._ours_total = 0
        self._last: dict[int, int] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the sampler thread and now() both sample
        self._thread: threading.Thread | None = None
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.enabled = Path("/proc/stat").exists()

    def _sample(self) -> float:
        with self._lock:
            return self._sample_locked()

    def _sample_locked(self) -> float:
        procs = _proc_table()
        roots = {os.getpid()} | ({pm} if (pm := _postmaster_pid()) else set())
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in procs.items():
            children.setdefault(ppid, []).append(pid)
        ours, todo = set(), list(roots)
        while todo:
            pid = todo.pop()
            if pid in procs and pid not in ours:
                ours.add(pid)
                todo.extend(children.get(pid, ()))
        now = {pid: procs[pid][1] for pid in ours}
        first = not self.samples
        for pid, ticks in now.items():
            if not first:
                self._ours_total += ticks - self._last.get(pid, 0)
        self._last = now
        stamp = time.monotonic()
        self.samples.append((stamp, _busy_ticks(), self._ours_total))
        return stamp

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            with contextlib.suppress(Exception):
                self._sample()

    def start(self) -> OtherLoad:
        if self.enabled:
            self._sample()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def now(self) -> float:
        """Take a sample now and return its time, a mark for ``cores``."""
        if self.enabled:
            with contextlib.suppress(Exception):
                return self._sample()
        return time.monotonic()

    def cores(self, t0: float, t1: float) -> float:
        """Average cores used by other processes between two ``now()`` marks."""
        inside = [s for s in self.samples if t0 - 1e-6 <= s[0] <= t1 + 1e-6]
        if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
            return float("nan")
        (a_t, a_busy, a_ours), (b_t, b_busy, b_ours) = inside[0], inside[-1]
        others = max(0, (b_busy - a_busy) - (b_ours - a_ours))
        return others / self.hz / (b_t - a_t)


    def wait_quiet(self, max_wait_s: float, threshold: float = 0.3, window_s: float = 2.0) -> float:
        """Wait (at most ``max_wait_s``) until others use < ``threshold`` cores; return their load."""
        if not self.enabled or max_wait_s <= 0:
            return float("nan")
        deadline = time.monotonic() + max_wait_s
        while True:
            t0 = self.now()
            time.sleep(window_s)
            load = self.cores(t0, self.now())
            if load < threshold or time.monotonic() >= deadline:
                return load


def fmt_cores(x: float) -> str:
    return "–" if x != x else f"{x:.2f}"


# --------------------------------------------------------------------------- reporting


def pct(values, q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else float("nan")


def fmt_ms(seconds: float) -> str:
    if seconds != seconds:  # nan
        return "–"
    ms = seconds * 1000
    if ms >= 10_000:
        return f"{ms / 1000:,.1f} s"
    return f"{ms:,.1f} ms" if ms < 100 else f"{ms:,.0f} ms"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (pipes), readable on a terminal too."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def bulk_fill(url: str, data: Synthetic, description: str, batch: int = 50_000) -> None:
    """Write ``data`` into a fresh database with the bulk client (progress bars on stderr), mark
    the model with ``description`` (how a later run recognizes the fill), then VACUUM ANALYZE
    and CHECKPOINT, so that the load's dirty pages are not written while a benchmark measures."""
    from tqdm import tqdm

    from datasource import db
    from datasource.client import Client

    with Client.local(database_url=url, batch_size=batch) as client:
        client.register_model(MODEL, description="filling")
        for kind, n, make, write in (
                ("predictions", len(data), prediction_records, client.write_predictions),
                ("feedback", len(data.fb_index), feedback_records, client.write_feedback)):
            with tqdm(total=n, desc=f"fill {kind}", unit="rows", unit_scale=True, leave=False,
                      file=sys.stderr, mininterval=0.5, disable=None) as bar:
                for lo in range(0, n, batch):
                    hi = min(lo + batch, n)
                    write(MODEL, make(data, lo, hi))
                    bar.update(hi - lo)
        client.register_model(MODEL, description=description)
    conn = db.connect(url, statement_timeout_ms=0)
    try:
        settle(conn)
    finally:
        conn.close()


def settle(conn) -> None:
    """After a fill: every model's score bins folded (what the server's hourly upkeep does,
    ``datasource.maintenance``), then VACUUM ANALYZE and CHECKPOINT (the connection left in
    autocommit): the statistics are fresh and the load's dirty pages are not written while a
    benchmark measures."""
    import psycopg2

    from datasource import store

    conn.autocommit = False
    for model in store.list_models(conn):
        store.fold_score_bins(conn, model)
    conn.commit()
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("VACUUM ANALYZE")
        try:
            cur.execute("CHECKPOINT")
        except psycopg2.Error:
            pass  # needs superuser or pg_checkpoint on a shared server
