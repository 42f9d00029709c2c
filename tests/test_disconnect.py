"""A client that gives up stops its query, and reads do not starve a write (issue 12): real
gunicorn (as the image runs it: ``-c datasource/gunicorn_conf.py``), real PostgreSQL.

A request whose client closes its socket mid-computation has its PostgreSQL statement
cancelled and its Python loops stopped; its pooled connection goes back rolled back
(``idle``, not ``idle in transaction``), nothing keeps computing, and the next request is
answered. Two slow requests: three exact ranking metrics over 8,641 cumulative windows each
(the engine's Python loop; uncancelled it ran into the 10 s deadline here) and a series whose SQL waits behind a table lock (as behind an
operator's ``VACUUM FULL``). The server's deadline is 10 s; the work must stop within 2.5 s
of the close. Then a batch of predictions posted behind twelve such reads is answered before
any of them (writes have threads and connections of their own). Last, the pieces alone: the
watcher, the deadline, the worker's peek at the request line and the pools' shares.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import threading
import time
import types

import numpy as np
import psutil
import psycopg2
import pytest
import requests

from datasource import db, disconnect
from datasource.worker import request_kind
from tests.conftest import empty_database
from tests.test_faults import Gunicorn

T0 = 1580515200000  # 2020-02-01T00:00:00Z
N = 3000
STOPPED_WITHIN_S = 2.5  # after the close; the server's own deadline is 10 s
BUSY = ("active", "idle in transaction", "idle in transaction (aborted)")

SLOW_QUERY = {  # exact ranking metrics, cumulative over 30 days at a 5 m step: 8,641 windows each
    "range": {"from": "2020-02-01T00:00:00Z", "to": "2020-03-02T00:00:00Z"}, "intervalMs": 60_000,
    "maxDataPoints": 11_000,
    "targets": [{"refId": ref, "target": metric, "payload": {"model": "m", "window": "cumulative"}}
                for ref, metric in (("A", "roc_auc"), ("B", "average_precision"),
                                    ("C", "sklearn.roc_auc_score"))]}
SERIES = ("/api/v1/series?model=m&metric=roc_auc&window=1d&from=2020-02-01T00:00:00Z"
          "&to=2020-03-02T00:00:00Z&step=1h")


@pytest.fixture(scope="module")
def served(database_url, tmp_path_factory):
    """3,000 labeled predictions over 30 days behind gunicorn 2x4 (the image's worker and
    pools) with an access log."""
    from datasource.client import Client

    empty_database(database_url)
    rng = np.random.default_rng(12)
    ts = np.sort(rng.integers(T0, T0 + 30 * 86_400_000, N))
    score = rng.random(N)
    with Client.local(database_url=database_url) as client:
        client.register_model("m")
        client.write_predictions("m", [{"id": f"p{i}", "ts": int(ts[i]), "score": float(score[i]),
                                        "segments": {"k": str(i % 3)}} for i in range(N)])
        client.write_feedback("m", [{"id": f"p{i}", "ts": int(ts[i]) + 1000,
                                     "label": int(rng.random() < score[i])} for i in range(N)])
    log = tmp_path_factory.mktemp("disconnect") / "gunicorn.log"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GUNICORN_CMD_ARGS", "-c datasource/gunicorn_conf.py --access-logfile -")
        g = Gunicorn(database_url, log)
    try:
        g.wait_listening()
        _wait_booted(g)
        yield g, log, database_url
    finally:
        if g.proc.poll() is None:  # nothing to finish gracefully: a quick stop
            g.proc.send_signal(signal.SIGQUIT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                g.proc.wait(5)
        g.stop()
        empty_database(database_url)


def _backends(conn) -> dict[int, str]:
    """pid -> state of the server's connections to this database."""
    with conn.cursor() as cur:
        cur.execute("SELECT pid, state FROM pg_stat_activity WHERE datname = current_database()"
                    " AND application_name = 'mlsli' AND backend_type = 'client backend'"
                    " AND pid <> pg_backend_pid()")  # not the parallel workers of a query
        return dict(cur.fetchall())


def _send(port: int, request: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(request)
    return s


def _post(path: str, body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


def _get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()


def _worker_cpu_s(g: Gunicorn) -> float:
    return sum(sum(p.cpu_times()[:2]) for p in psutil.Process(g.proc.pid).children())


def _wait_booted(g: Gunicorn, seconds: float = 30.0) -> None:
    """Until both workers exist and use no CPU (the second may still be importing)."""
    deadline = time.monotonic() + seconds
    last = None
    while time.monotonic() < deadline:
        workers = psutil.Process(g.proc.pid).children()
        now = round(_worker_cpu_s(g), 2) if len(workers) == 2 else None
        if now is not None and now == last:
            return
        last = now
        time.sleep(0.5)


def _abandon_and_check(g: Gunicorn, log, watcher, request: bytes, line: str) -> None:
    """Send ``request``, see it busy in PostgreSQL, close at 0.5 s; then all must stop."""
    idle_before = set(_backends(watcher))
    sent = time.monotonic()
    s = _send(g.port, request)
    busy: set[int] = set()
    while time.monotonic() - sent < 0.45:
        busy = {pid for pid, state in _backends(watcher).items() if state in BUSY}
        if busy:
            break
        time.sleep(0.02)
    assert busy, "the request was not running in PostgreSQL"
    time.sleep(max(0.0, 0.5 - (time.monotonic() - sent)))
    s.close()
    closed = time.monotonic()
    while True:
        states = _backends(watcher)
        if not any(state in BUSY for state in states.values()):
            break
        assert time.monotonic() - closed < STOPPED_WITHIN_S, f"still busy after the close: {states}"
        time.sleep(0.05)
    # The request's connection is back in its pool, rolled back: open and idle, not closed.
    assert all(states.get(pid) == "idle" for pid in busy), (busy, states)
    assert set(states) >= idle_before
    cpu = _worker_cpu_s(g)
    time.sleep(0.5)
    assert _worker_cpu_s(g) - cpu < 0.15, "a worker kept computing after the client left"
    deadline = time.monotonic() + 2
    while f'"{line}" 499' not in log.read_text():  # the cancel path answered the gone client
        assert time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.05)


def test_an_abandoned_roc_auc_query_stops_computing(served):
    g, log, url = served
    watcher = psycopg2.connect(url)
    watcher.autocommit = True
    try:
        _abandon_and_check(g, log, watcher, _post("/query", SLOW_QUERY), "POST /query HTTP/1.1")
    finally:
        watcher.close()
    small = dict(SLOW_QUERY, range={"from": "2020-02-01T00:00:00Z", "to": "2020-02-02T00:00:00Z"},
                 maxDataPoints=100)
    r = requests.post(g.base + "/query", json=small, timeout=10)
    assert r.status_code == 200 and len(r.json()) == 3, r.text[:300]


def test_an_abandoned_series_waiting_on_a_lock_is_cancelled(served):
    g, log, url = served
    watcher = psycopg2.connect(url)
    watcher.autocommit = True
    locker = psycopg2.connect(url)
    try:
        with locker.cursor() as cur:  # the series' SQL waits here until it is cancelled
            cur.execute("LOCK TABLE predictions IN ACCESS EXCLUSIVE MODE")
        _abandon_and_check(g, log, watcher, _get(SERIES), f"GET {SERIES} HTTP/1.1")
        with watcher.cursor() as cur:  # nothing of the server's waits on the lock any more
            cur.execute("SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
                        " WHERE NOT l.granted AND a.application_name = 'mlsli'")
            assert cur.fetchone()[0] == 0
        locker.rollback()
        r = requests.get(g.base + SERIES, timeout=10)
        assert r.status_code == 200 and len(r.json()) == 721, r.text[:300]
    finally:
        locker.close()
        watcher.close()


def _answered(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        return s.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return False
    finally:
        s.setblocking(True)


def test_a_write_is_answered_while_reads_fill_the_server(served):
    """Twelve slow reads (distinct: nothing cached) take every read thread of both workers; a
    batch of 1,000 predictions posted after them is answered before any of them. (gthread's
    one first-come queue answered it only after the reads ahead of it.)"""
    g, _, url = served
    r = requests.post(g.base + "/api/v1/models", json={"name": "w"}, timeout=10)
    assert r.status_code in (200, 201), r.text
    reads = []
    for i in range(12):  # roc_auc ignores the threshold, but each one is its own cache entry
        target = {"refId": "A", "target": "roc_auc",
                  "payload": {"model": "m", "window": "cumulative", "threshold": f"{0.01 * (i + 1):.2f}"}}
        reads.append(_send(g.port, _post("/query", dict(SLOW_QUERY, targets=[target]))))
    watcher = psycopg2.connect(url)
    watcher.autocommit = True
    try:
        time.sleep(0.5)  # every read accepted: computing, or waiting for a thread or a connection
        recs = [{"id": f"w{i}", "ts": T0 + 31 * 86_400_000 + i * 1000, "score": (i % 10) / 10}
                for i in range(1000)]
        t = time.monotonic()
        r = requests.post(g.base + "/api/v1/predictions", json={"model": "w", "records": recs},
                          timeout=60)
        took = time.monotonic() - t
        assert r.status_code == 200 and r.json()["written"] == 1000, r.text
        answered = sum(_answered(s) for s in reads)
        assert answered == 0, f"{answered} of 12 reads were answered before the write ({took:.1f} s)"
    finally:
        for s in reads:  # gone clients: the watcher cancels their queries
            s.close()
    try:
        deadline = time.monotonic() + 10
        while any(state in BUSY for state in _backends(watcher).values()):
            assert time.monotonic() < deadline, _backends(watcher)
            time.sleep(0.1)
    finally:
        watcher.close()


# ----------------------------------------------------------------------- the pieces alone


def test_watch_fires_on_close_not_on_pipelined_bytes_and_never_after_the_block():
    fired = []
    a, b = socket.socketpair()
    with disconnect.watch(a, lambda: fired.append("pipelined")):
        b.sendall(b"GET / HTTP/1.1\r\n\r\n")  # a keep-alive client's next request
        time.sleep(3 * disconnect.POLL_S)
    assert fired == []
    a.close()
    b.close()

    a, b = socket.socketpair()
    with disconnect.watch(a, lambda: fired.append("closed")):
        b.close()
        deadline = time.monotonic() + 2
        while not fired and time.monotonic() < deadline:
            time.sleep(0.01)
    assert fired == ["closed"]
    a.close()

    a, b = socket.socketpair()
    with disconnect.watch(a, lambda: fired.append("late")):
        pass
    b.close()
    time.sleep(3 * disconnect.POLL_S)
    assert fired == ["closed"]
    a.close()
    assert disconnect.watch(None, lambda: None).__enter__() is None


def test_a_cancelled_deadline_has_passed_for_the_engine():
    d = disconnect.Deadline(time.monotonic() + 60)
    assert not time.monotonic() > d and time.monotonic() < d
    d.cancel()
    assert time.monotonic() > d and d < time.monotonic() and not time.monotonic() < d
    assert 59 < d - time.monotonic() <= 60  # arithmetic stays plain float


def test_request_kind_peeks_at_the_request_line_without_consuming_it():
    a, b = socket.socketpair()
    conn = types.SimpleNamespace(sock=a, parser=None)
    try:
        assert request_kind(conn) is None  # nothing sent yet: wait for it in the poller
        b.sendall(b"POST /api/v1/predictions HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.05)
        assert request_kind(conn) == "write"
        assert a.recv(4096).startswith(b"POST /api/v1/predictions")  # still all there
        b.sendall(b"POST /query HTTP/1.1\r\n\r\n")
        time.sleep(0.05)
        assert request_kind(conn) == "read"
        a.recv(4096)
        b.sendall(b"GET /api/v1/models HTTP/1.1\r\n\r\n")
        time.sleep(0.05)
        assert request_kind(conn) == "read"
    finally:
        a.close()
        b.close()


def test_reads_leave_connections_for_writes(database_url, monkeypatch):
    """A pool of 4: reads hold at most READ_CONCURRENCY (2) at once and never the last 2;
    writes get one while reads hold theirs; a third read waits, then answers busy."""
    monkeypatch.setattr(db, "POOL_WAIT_S", 0.3)
    pool = db.Pool(database_url, size=4)
    reads = db.read_share(pool, limit=2)
    assert reads.size == 2 and db.read_share(pool).size == 2 and db.read_share(pool, 8).size == 2
    assert db.read_share(db.Pool(database_url, size=1)).size == 1  # one connection: shared
    held, release = [], threading.Event()

    def hold():
        with reads.connection() as conn:
            held.append(conn)
            release.wait(10)

    threads = [threading.Thread(target=hold) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        while len(held) < 2:
            time.sleep(0.01)
        with pool.connection() as w1, pool.connection() as w2:  # the writes' connections
            assert w1 not in held and w2 not in held
        with pytest.raises(db.PoolBusy), reads.connection():
            pass
    finally:
        release.set()
        for t in threads:
            t.join(10)
        pool.close()
    reads.close()  # closing the share closes its pool, once


def test_slots_serve_waiters_in_arrival_order_and_time_out():
    slots = db.Slots(1)
    assert slots.acquire(timeout=0)
    order, threads = [], []
    for i in range(3):
        def wait(i=i):
            if slots.acquire(timeout=5):
                order.append(i)
        threads.append(threading.Thread(target=wait))
        threads[-1].start()
        time.sleep(0.05)  # queued in this order
    assert not slots.acquire(timeout=0.05)  # a newcomer does not jump the queue
    for _ in range(3):
        slots.release()  # handed to the longest waiter
        time.sleep(0.05)
    for t in threads:
        t.join(5)
    assert order == [0, 1, 2]
    slots.release()
    assert slots.acquire(timeout=0)
