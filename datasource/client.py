"""A Python client for writing predictions, feedback and model events.

Two transports, one behaviour:

* ``Client.local()`` talks to PostgreSQL directly (COPY into staging tables,
  the bulk path for backfills);
* ``Client.remote(url)`` posts JSON batches to a running server.

Both go through the write service ``datasource.ingest`` (the remote one on the
server side), so they validate and write alike and leave identical tables behind.

``Client.remote`` needs only ``requests`` (the base install, ``pip install mlsli``):
nothing of the server (Flask, pandas, numpy, psycopg2) is imported until
``Client.local`` is called, which needs ``pip install "mlsli[server]"``.
"""

from __future__ import annotations

import json
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from itertools import islice

from datasource.config import Settings
from datasource.errors import ClientError  # records.BatchError is this class


def _batches(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


def _jsonable(value):
    if isinstance(value, datetime):
        return value.isoformat()
    if hasattr(value, "isoformat"):  # pandas.Timestamp, numpy datetime via pandas
        return value.isoformat()
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"cannot send {type(value).__name__} as JSON")


def _parse_iso(text: str) -> datetime:
    """The server's ISO-8601 time as aware UTC (as ``records.parse_ts`` reads it, without numpy)."""
    ts = datetime.fromisoformat(text.strip())
    return (ts if ts.tzinfo else ts.replace(tzinfo=UTC)).astimezone(UTC)


def _jsonable_value(v):
    return v.item() if hasattr(v, "item") else v


class Client:
    """Write API; use ``Client.local()`` or ``Client.remote()`` to build one."""

    def __init__(self, transport):
        self._t = transport

    @classmethod
    def local(cls, database_url: str | None = None, data_dir: str | None = None,
              batch_size: int = 50_000, writers: int = 3) -> Client:
        """``writers``: connections that write consecutive batches at once (``_Local.write_all``).
        On 2 cores, 1M predictions + 800K labels: 1 writer 57-60K rows/s, 3 writers a median
        of 106.8K in eleven runs (the server with db.WRITE_PATH_SETTINGS); 4 writers no faster
        than 3 (benchmarks/README.md)."""
        settings = Settings.from_env(database_url=database_url, data_dir=data_dir)
        return cls(_Local(settings, batch_size, writers))

    @classmethod
    def remote(cls, base_url: str, token: str | None = None, batch_size: int = 5_000,
               timeout: float = 120.0, retries: int = 8) -> Client:
        """``retries``: how often a request is sent again while the server is down or answers
        502/503/504 (waits of 0.5 s doubling to 10 s: about a minute with the default)."""
        return cls(_Remote(base_url, token, batch_size, timeout, retries))

    def register_model(self, name: str, task: str = "binary_classification",
                       threshold: float | None = None, description: str = "") -> dict:
        body = {"name": name, "task": task, "description": description}
        if threshold is not None:
            body["threshold"] = threshold
        return self._t.register_model(body)

    def write_predictions(self, model: str, recs: Iterable[dict]) -> int:
        """Upsert predictions ``{"id", "ts", "score", "segments", "features"}``; returns count.

        Records go in batches (``batch_size``), each its own transaction.
        """
        return self._t.write_all("predictions", model, _batches(recs, self._t.batch_size))

    def write_feedback(self, model: str, recs: Iterable[dict]) -> int:
        """Upsert feedback ``{"id", "ts", "label"}``; returns count."""
        return self._t.write_all("feedback", model, _batches(recs, self._t.batch_size))

    def add_event(self, model: str, ts, title: str, text: str = "", tags: Iterable[str] = (),
                  time_end=None, kind: str = "event") -> int:
        body = {"ts": ts, "title": title, "text": text, "tags": list(tags),
                "time_end": time_end, "kind": kind}
        return self._t.add_event(model, body)

    def latest_prediction_ts(self, model: str) -> datetime | None:
        return self._t.latest_prediction_ts(model)

    def set_reference(self, model: str, columns: dict, name: str = "training") -> int:
        """Store a reference distribution for drift: ``{column: [numbers or strings]}``.

        Numeric columns may hold None/NaN for missing values. Replaces any
        reference of the same name.
        """
        clean = {k: [None if isinstance(v, float) and v != v else _jsonable_value(v) for v in vals]
                 for k, vals in columns.items()}
        return self._t.set_reference(model, {"name": name, "columns": clean})

    def close(self) -> None:
        self._t.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _server_modules():
    """The write service and the database layer: the local transport's (server) dependencies."""
    try:
        from datasource import db, ingest
    except ImportError as e:  # a base install: requests only
        if (e.name or "datasource").startswith("datasource"):
            raise
        raise ImportError(f"Client.local needs the server's dependencies ({e.name} is missing): "
                          'pip install "mlsli[server]"; Client.remote needs only requests') from e
    return db, ingest


def start_embedded(data_dir) -> str:
    """Start (or join) the embedded PostgreSQL under ``data_dir/pg``, migrated, and return
    its URL: the database ``Client.local`` uses without ``DATABASE_URL``, for processes that
    share it (``make demo`` hands it to the server and the loader)."""
    db, _ = _server_modules()
    url = db.embedded_url(data_dir)
    conn = db.connect(url, statement_timeout_ms=0)
    try:
        db.migrate(conn)
    finally:
        conn.close()
    return url


def stop_embedded() -> None:
    """Leave the embedded PostgreSQL servers this process joined (the last to leave stops it)."""
    db, _ = _server_modules()
    db.stop_embedded()


DEADLOCK_RETRIES = 3  # a local write transaction PostgreSQL aborted to break a deadlock is sent again
# The interpreter's GIL switch interval while the bulk client writes (the default is 5 ms).
# psycopg2 takes the GIL back for every row a COPY returns and every chunk it sends; while
# another of the client's threads computes, each of those waits up to the interval: a
# 50,000-label batch returns 50,000 rows. See write_all.
BULK_SWITCH_INTERVAL_S = 0.0005


class _Local:
    def __init__(self, settings: Settings, batch_size: int, writers: int):
        db, self.ingest = _server_modules()
        from datasource import store
        from datasource.store import locks

        self.store, self.locks = store, locks
        self.settings = settings
        self.batch_size = batch_size
        url = db.resolve_url(settings.database_url, settings.data_dir)
        self.conn = db.connect(url, statement_timeout_ms=0)  # backfills may run long
        db.migrate(self.conn)
        # with several writers, this one takes the bulk lock and makes partitions; each writer its own
        self.conns = [self.conn] if writers <= 1 else [
            db.connect(url, statement_timeout_ms=0) for _ in range(writers)]

    def _tx(self, fn, *args, conn=None):
        """``fn(conn, *args)`` in one transaction, committed; run again (at most
        DEADLOCK_RETRIES times) when PostgreSQL aborted it to break a deadlock."""
        from psycopg2 import errors

        conn = conn or self.conn
        for attempt in range(DEADLOCK_RETRIES + 1):
            try:
                result = fn(conn, *args)
                conn.commit()
                return result
            except errors.DeadlockDetected:
                conn.rollback()
                if attempt == DEADLOCK_RETRIES:
                    raise
            except BaseException:
                conn.rollback()
                raise

    def register_model(self, body: dict) -> dict:
        model, created = self._tx(self.ingest.register_model, body)
        return {"name": model.name, "task": model.task, "threshold": model.threshold,
                "created": created}

    def write_all(self, kind: str, model: str, batches: Iterator[list]) -> int:
        """Validate batch n+1 in a thread while PostgreSQL writes batch n; with several
        connections, up to one batch per connection in flight: batch n+1 writes its raw rows
        while batch n adds its deltas and commits.

        psycopg2 releases the GIL while the server works, so validating, and one batch's
        Python (its deltas), overlap with another's SQL. A batch starts only when its keys
        are disjoint from every batch in flight (else it waits for them): they all hold the
        model's lock shared, under the model's bulk lock, which this client holds for the call
        (one bulk client per model; a server's writer waits for the model's lock). The rollup
        lock orders their deltas and write revisions; each batch is one transaction
        (``store.locks``). Each batch's weeks are made before it, in a transaction of their
        own (``store.make_weeks``), by the thread that validates it, on the connection that
        holds the bulk lock (the main thread uses it before and after the loop only)."""
        ingest = self.ingest
        target = self._tx(ingest.require_model, model)
        concurrent = len(self.conns) > 1

        def prepare():
            batch = next(batches, None)
            if batch is None:
                return None
            rows = ingest.parse_batch(kind, target, batch, max(len(batch), 1), python_records=True)
            if concurrent:  # its weeks made beforehand, in a transaction of their own
                self._tx(self.store.make_weeks, kind, rows)
            return rows, frozenset(rows.ids) if concurrent else None

        total = 0
        if concurrent:
            self.locks.hold_bulk(self.conn, target.model_id)
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(BULK_SWITCH_INTERVAL_S)
        writers = [ThreadPoolExecutor(max_workers=1) for _ in self.conns]
        in_flight: deque[tuple[Future, frozenset | None]] = deque()
        try:
            with ThreadPoolExecutor(max_workers=1) as pool:
                pending = pool.submit(prepare)
                n = 0
                while (item := pending.result()) is not None:
                    pending = pool.submit(prepare)
                    rows, keys = item
                    while in_flight and (len(in_flight) >= len(self.conns) or any(
                            not k.isdisjoint(keys) for _, k in in_flight)):
                        total += in_flight.popleft()[0].result()
                    conn = self.conns[n % len(self.conns)]
                    in_flight.append((writers[n % len(writers)].submit(
                        self._tx, ingest.write_rows, kind, target, rows, concurrent, conn=conn), keys))
                    n += 1
            while in_flight:
                total += in_flight.popleft()[0].result()
        finally:
            for writer in writers:
                writer.shutdown(wait=True, cancel_futures=True)
            sys.setswitchinterval(switch_interval)
            if concurrent:
                self.locks.release_bulk(self.conn, target.model_id)
        return total

    def add_event(self, model: str, body: dict) -> int:
        return self._tx(self.ingest.add_event, model, body)

    def latest_prediction_ts(self, model: str):
        return self._tx(self.ingest.latest_prediction_ts, model)

    def set_reference(self, model: str, body: dict) -> int:
        return self._tx(self.ingest.set_reference, model, body)

    def close(self) -> None:
        for conn in {id(c): c for c in [self.conn, *self.conns]}.values():
            conn.close()


class _Remote:
    def __init__(self, base_url: str, token: str | None, batch_size: int, timeout: float,
                 retries: int = 8):
        import requests

        self.retries = retries  # about a minute of 0.5 s … 10 s waits
        self.base = base_url.rstrip("/")
        self.batch_size = batch_size
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers["Content-Type"] = "application/json"
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def _post(self, path: str, body: dict) -> dict:
        data = json.dumps(body, default=_jsonable)
        resp = self._send(lambda: self.session.post(self.base + path, data=data, timeout=self.timeout))
        payload = resp.json() if resp.content else {}
        if resp.status_code >= 400:
            raise ClientError(payload.get("message", resp.text), payload.get("errors"),
                              status=resp.status_code)
        return payload

    def _send(self, request):
        """Send, retrying while the server is unreachable or answers 502/503/504 (a restart, the
        database coming back): writes are upserts, so sending a batch again changes nothing."""
        import requests

        delay = 0.5
        for attempt in range(self.retries + 1):
            try:
                resp = request()
            except requests.ConnectionError:
                if attempt == self.retries:
                    raise
            else:
                if resp.status_code not in (502, 503, 504) or attempt == self.retries:
                    return resp
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
        raise AssertionError("unreachable")

    def register_model(self, body: dict) -> dict:
        return self._post("/api/v1/models", body)

    def write_all(self, kind: str, model: str, batches: Iterator[list]) -> int:
        return sum(self._post(f"/api/v1/{kind}", {"model": model, "records": b})["written"]
                   for b in batches)

    def add_event(self, model: str, body: dict) -> int:
        return self._post("/api/v1/events", {"model": model, **body})["event_id"]

    def set_reference(self, model: str, body: dict) -> int:
        return self._post("/api/v1/references", {"model": model, **body})["columns"]

    def latest_prediction_ts(self, model: str):
        resp = self._send(lambda: self.session.get(f"{self.base}/api/v1/models/{model}",
                                                   timeout=self.timeout))
        if resp.status_code >= 400:
            raise ClientError(resp.json().get("message", resp.text), status=resp.status_code)
        latest = resp.json().get("latest_prediction_ts")
        return _parse_iso(latest) if latest else None

    def close(self) -> None:
        self.session.close()
