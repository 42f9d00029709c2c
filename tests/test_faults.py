"""Failing parts, for real: a throwaway PostgreSQL 15 cluster (started, stopped and restarted
here) behind a real gunicorn (2 workers x 4 threads).

* gunicorn started before the database answers JSON 503s, then serves once it is up;
* a database restart while a writer and a reader run: only JSON 503s, recovery within 5 s,
  no acknowledged row lost, the rollup consistent with the raw rows;
* kill -9 of the workers in the middle of a batch: none of its rows written.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg2
import pytest
import requests

from datasource import db, store

ROOT = Path(__file__).resolve().parent.parent
PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
GUNICORN = Path(sys.executable).with_name("gunicorn")
T0 = 1580515200000

pytestmark = pytest.mark.skipif(not (PG_BIN / "initdb").exists() or shutil.which("runuser") is None,
                                reason="needs the PostgreSQL 15 server binaries and runuser")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A PostgreSQL cluster in a temporary directory, reachable only by its Unix socket."""

    def __init__(self, root: Path):
        self.root = root
        self.data = root / "data"
        self.port = _free_port()
        self.url = f"postgresql://postgres@/postgres?host={root}&port={self.port}"
        self._as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*self._as_postgres, str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres",
                        "--auth=trust", "--no-sync"], check=True, capture_output=True)

    def _ctl(self, *args: str) -> None:
        subprocess.run([*self._as_postgres, str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-w", "-t", "20",
                        "-l", str(self.root / "log"), *args], check=True, capture_output=True)

    def start(self) -> None:
        self._ctl("-o", f"-k {self.root} -c listen_addresses='' -p {self.port} -c fsync=off", "start")

    def stop(self) -> None:
        self._ctl("-m", "fast", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()


@pytest.fixture
def cluster():
    root = Path(tempfile.mkdtemp(prefix="mlsli-h3-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    c = Cluster(root)
    try:
        yield c
    finally:
        if c.running():
            subprocess.run([*c._as_postgres, str(PG_BIN / "pg_ctl"), "-D", str(c.data), "-m", "immediate",
                            "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


class Gunicorn:
    def __init__(self, database_url: str, log: Path):
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "DATABASE_URL": database_url, "STATEMENT_TIMEOUT_MS": "10000", "POOL_SIZE": "8"}
        env.pop("INGEST_TOKEN", None)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(
            [str(GUNICORN), "-w", "2", "--threads", "4", "-b", f"127.0.0.1:{self.port}", "--timeout", "60",
             "--no-control-socket", "datasource:create_app()"], cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_listening(self, seconds: float = 60.0) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "gunicorn exited"
            try:
                requests.get(self.base + "/", timeout=10)  # a booting worker takes seconds
                return
            except (requests.ConnectionError, requests.Timeout):
                time.sleep(0.1)
        raise AssertionError("gunicorn did not listen")

    def workers(self) -> list[int]:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture
def server(cluster, tmp_path):
    started = []

    def start() -> Gunicorn:
        g = Gunicorn(cluster.url, tmp_path / "gunicorn.log")
        started.append(g)
        g.wait_listening()
        return g

    yield start
    for g in started:
        g.stop()


def _json_503(r: requests.Response) -> bool:
    try:
        return r.status_code == 503 and bool(r.json()["message"])
    except ValueError:
        return False


def _model(base: str) -> None:
    r = requests.post(base + "/api/v1/models", json={"name": "m", "task": "binary_classification"}, timeout=10)
    assert r.status_code in (200, 201), r.text


QUERY = {"range": {"from": "2020-02-01T00:00:00Z", "to": "2020-02-02T00:00:00Z"}, "intervalMs": 3_600_000,
         "maxDataPoints": 100, "targets": [{"refId": "A", "target": "prediction_count",
                                            "payload": {"model": "m", "window": "cumulative"}}]}


def _check_store(url: str, ids: set[str]) -> None:
    """Every acknowledged id stored once, and the rollup equal to a rebuild from raw rows."""
    conn = db.connect(url)
    try:
        model = store.get_model(conn, "m")
        with conn.cursor() as cur:
            cur.execute("SELECT output_id FROM predictions WHERE model_id = %s", (model.model_id,))
            stored = {r[0] for r in cur.fetchall()}
        assert ids <= stored, f"{len(ids - stored)} acknowledged rows lost"
        assert store.check_rollup(conn, model) == []
    finally:
        conn.close()


def _fill_pools(base: str, n: int = 16) -> None:
    """Open several connections in each worker's pool with concurrent requests."""
    def hit():
        for _ in range(3):
            requests.post(base + "/query", json=QUERY, timeout=30)

    threads = [threading.Thread(target=hit) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)


def test_gunicorn_starts_before_the_database_and_serves_once_it_is_up(cluster, server):
    g = server()  # the cluster exists but is not running
    for method, path, body in (("get", "/", None), ("get", "/api/v1/models", None), ("post", "/query", QUERY),
                               ("post", "/api/v1/predictions", {"model": "m", "records": []})):
        r = getattr(requests, method)(g.base + path, json=body, timeout=10)
        assert _json_503(r), (path, r.status_code, r.text[:200])
    assert g.proc.poll() is None
    cluster.start()
    up = time.monotonic()
    while requests.get(g.base + "/", timeout=10).status_code != 200:
        assert time.monotonic() - up < 5, "not serving 5 s after the database came up"
        time.sleep(0.1)
    # every worker re-checks the database at most every 0.5 s: within the 5 s both serve
    while (r := requests.post(g.base + "/api/v1/models", timeout=10,
                              json={"name": "m", "task": "binary_classification"})).status_code == 503:
        assert _json_503(r) and time.monotonic() - up < 5, "a worker not serving 5 s after"
        time.sleep(0.1)
    assert r.status_code in (200, 201), r.text  # migrated by the first worker through
    served = 0
    while served < 8:  # 8 answers in a row, whichever worker takes them
        r = requests.get(g.base + "/api/v1/models", timeout=10)
        if r.status_code == 503:
            assert time.monotonic() - up < 5, "a worker not serving 5 s after the database came up"
            served = 0
            time.sleep(0.1)
            continue
        assert r.json()[0]["name"] == "m"
        served += 1


def test_database_restart_under_load_loses_nothing_acknowledged(cluster, server):
    cluster.start()
    g = server()
    _model(g.base)
    acked: set[str] = set()
    statuses: list[tuple[float, int, bool]] = []
    stop = threading.Event()
    lock = threading.Lock()

    def record(r: requests.Response) -> None:
        started = time.monotonic() - r.elapsed.total_seconds()
        with lock:
            statuses.append((started, r.status_code, r.status_code == 200 or _json_503(r)))

    def writer(n: int) -> None:
        batch = 0
        while not stop.is_set():
            ids = [f"w{n}-{batch}-{i}" for i in range(50)]
            recs = [{"id": oid, "ts": T0 + (batch * 50 + i) * 1000, "score": (i % 10) / 10,
                     "segments": {"k": str(i % 3)}} for i, oid in enumerate(ids)]
            r = requests.post(g.base + "/api/v1/predictions", json={"model": "m", "records": recs}, timeout=30)
            record(r)
            if r.status_code == 200:
                with lock:
                    acked.update(ids)
                fb = [{"id": oid, "ts": T0 + 3_600_000, "label": i % 2} for i, oid in enumerate(ids)]
                record(requests.post(g.base + "/api/v1/feedback", json={"model": "m", "records": fb}, timeout=30))
            batch += 1

    def reader() -> None:
        while not stop.is_set():
            record(requests.post(g.base + "/query", json=QUERY, timeout=30))
            record(requests.get(g.base + "/api/v1/models/m", timeout=30))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(2)] + [threading.Thread(target=reader)]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        cluster.stop()
        time.sleep(1.5)
        cluster.start()
        back = time.monotonic()
        time.sleep(6)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    bad = [(s, ok) for _, s, ok in statuses if not ok]
    assert not bad, f"not 200 and not a JSON 503: {bad[:5]}"
    assert any(s == 503 for _, s, _ in statuses), "the restart was not seen"
    late = [t - back for t, s, _ in statuses if s != 200 and t > back]
    assert not late or max(late) < 5, f"503 {max(late):.1f} s after the database was back"
    # Stale pooled connections are checked before use: a request that starts once the database
    # is back is answered (the old pool handed out dead connections: 503s after the restart).
    after = [s for t, s, _ in statuses if t > back + 0.5]
    assert len(after) > 20 and all(s == 200 for s in after), after.count(503)
    _check_store(cluster.url, acked)

    # An idle restart: every pooled connection is dead when traffic resumes. The old pool handed
    # them out (2 of the next 40 requests answered 503); each is now checked before use.
    _fill_pools(g.base)
    cluster.stop()
    cluster.start()
    answers = [requests.get(g.base + "/api/v1/models/m", timeout=10).status_code for _ in range(20)]
    answers += [requests.post(g.base + "/query", json=QUERY, timeout=10).status_code for _ in range(20)]
    assert answers == [200] * 40, answers


def _post_into(base: str, body: bytes, outcome: dict) -> None:
    try:
        outcome["r"] = requests.post(base + "/api/v1/predictions", data=body,
                                     headers={"Content-Type": "application/json"}, timeout=60)
    except requests.RequestException as e:
        outcome["error"] = e


def test_kill_9_of_the_workers_mid_batch_writes_nothing_of_it(cluster, server):
    cluster.start()
    g = server()
    _model(g.base)

    def batch(prefix: str, n: int = 10_000) -> bytes:
        recs = [{"id": f"{prefix}{i}", "ts": T0 + i * 100, "score": (i % 10) / 10, "segments": {"k": str(i % 5)},
                 "features": {"f": float(i % 7)}} for i in range(n)]
        return json.dumps({"model": "m", "records": recs}).encode()

    def post_until_ok(body: bytes, seconds: float = 30.0) -> float:
        """Post until a 200 (workers may be restarting); the last post's duration."""
        deadline = time.monotonic() + seconds
        while True:
            t = time.monotonic()
            try:
                r = requests.post(g.base + "/api/v1/predictions", data=body,
                                  headers={"Content-Type": "application/json"}, timeout=30)
                if r.status_code == 200:
                    return time.monotonic() - t
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "no 200 after the workers were killed"
            time.sleep(0.2)

    post_until_ok(batch("warm", 100))  # both workers booted and connected
    duration = post_until_ok(batch("warm"))
    n = 10_000
    killed = False
    for attempt, fraction in enumerate((0.5, 0.3, 0.7, 0.15)):  # a loaded machine shifts timings
        outcome = {}
        body = batch(f"kill{attempt}-", n)

        thread = threading.Thread(target=_post_into, args=(g.base, body, outcome))
        thread.start()
        time.sleep(duration * fraction)  # the batch is being validated or written
        for pid in g.workers():
            os.kill(pid, signal.SIGKILL)
        thread.join(60)
        conn = psycopg2.connect(cluster.url)
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM predictions WHERE output_id LIKE %s", (f"kill{attempt}-%",))
            stored = cur.fetchone()[0]
        conn.close()
        acknowledged = "r" in outcome and outcome["r"].status_code == 200
        # all or nothing; all when acknowledged (a kill between the commit and the answer
        # leaves all of it unacknowledged: the client sends it again, an upsert)
        assert stored in ((n,) if acknowledged else (0, n)), f"{stored} of {n} rows of a killed batch"
        # The master replaced the workers; the model's lock went with the dead transaction.
        post_until_ok(batch(f"after{attempt}-", 100))
        if not acknowledged and stored == 0:
            killed = True
            break
    assert killed, "every batch finished before the kill"
    _check_store(cluster.url, {f"warm{i}" for i in range(n)})
