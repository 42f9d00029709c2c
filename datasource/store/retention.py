"""Weekly partitions of the raw tables, and retention: dropping the weeks older than N days.

Why weeks: a partition per week keeps the count small (52 a year) for the writers, whose
key lookup probes every partition's index, while RETENTION still drops raw rows to within
a week of what it asks. The rollup levels and score bins are not partitioned and stay:
SLIs served from them outlive the raw rows. What needs raw rows before the horizon (a
non-mergeable metric, a threshold off the grid, as-of) is refused with a message saying so,
and a late label whose prediction was dropped is counted (``retention_counts``), not stored.

The DDL runs in two SECURITY DEFINER functions of the schema owner (migration 008), which
only the server's write role may execute: the server owns no table.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import numpy as np

from datasource.errors import ClientError
from datasource.records import epoch_us
from datasource.store.partials import LOCK_NAMESPACE

WEEK_DAYS = 7
EPOCH_DAY = date(1970, 1, 1)
MAX_NEW_PARTITIONS = 64  # per write batch: a batch spread over centuries must not make thousands
RAW_TABLES = ("predictions", "feedback")


class RawRowsDropped(ClientError):
    """A read needs raw rows that retention has dropped."""

    def __init__(self, lo: datetime | None, horizon: datetime):
        since = "the beginning" if lo is None else lo.isoformat()
        super().__init__(
            f"this query reads raw rows from {since}, but raw rows before {horizon.isoformat()} "
            "were dropped by retention (RETENTION); metrics served from the rollup (counts, "
            "rates and sums at the model's threshold or a threshold on the 0.01 grid, binned "
            "ROC AUC, calibration) still answer over that range, or start the window after it",
            [{"index": None, "field": "range", "message": f"starts before {horizon.isoformat()}"}],
            status=422)


def week_start(ts: datetime) -> date:
    """The first day of the weekly partition holding ``ts`` (weeks of 7 days from the epoch)."""
    return week_starts(epoch_us([ts]))[0]


def week_starts(us: np.ndarray) -> list[date]:
    """The distinct ``week_start`` of times in µs since the epoch, ascending (vectorized: a
    write batch holds up to 50,000 times, which one by one cost ~1 s of Python per 200K rows)."""
    if not len(us):
        return []
    week_us = WEEK_DAYS * 86_400 * 10**6
    return [EPOCH_DAY + timedelta(days=int(w) * WEEK_DAYS) for w in np.unique(us // week_us)]


def raw_horizon(conn) -> datetime | None:
    """The time before which raw rows were dropped (None: none were)."""
    with conn.cursor() as cur:
        cur.execute("SELECT horizon FROM raw_horizon WHERE id = 1")
        row = cur.fetchone()
    return row[0] if row else None


# Writers hold this advisory lock shared from before they read the horizon to their commit,
# retention holds it exclusively while it drops: a batch cannot pass the horizon check and
# then find its week dropped (the insert would fail with no partition for the row: a 500).
# Retention takes it before any table lock and writers before theirs, so they cannot deadlock.
HORIZON_LOCK = (LOCK_NAMESPACE, -2)


def hold_horizon(conn) -> datetime | None:
    """Take the horizon lock shared for this transaction, then read the horizon."""
    with conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock_shared(%s, %s)", HORIZON_LOCK)
    return raw_horizon(conn)


def require_retained(conn, lo_s: float | None) -> None:
    """Refuse (``RawRowsDropped``, a 422) a raw read of rows with ts > lo_s (None: all) when
    retention dropped some of them."""
    horizon = raw_horizon(conn)
    if horizon is not None and (lo_s is None or lo_s < horizon.timestamp()):
        lo = None if lo_s is None else datetime.fromtimestamp(lo_s, UTC)
        raise RawRowsDropped(lo, horizon)


def ensure_partitions(cur, table: str, us: np.ndarray) -> int:
    """Create the weekly partitions of ``table`` that rows at times ``us`` (µs since the
    epoch) need, in the caller's transaction; returns how many were made. More than
    MAX_NEW_PARTITIONS at once: a 422."""
    weeks = week_starts(us)
    if not weeks:
        return 0
    cur.execute(
        "SELECT coalesce(array_agg(w ORDER BY w), '{}') FROM unnest(%(w)s::date[]) w"
        " WHERE to_regclass(format('%%I', %(t)s || '_p' || to_char(w, 'YYYYMMDD'))) IS NULL",
        {"w": weeks, "t": table})
    missing = cur.fetchone()[0]
    if not missing:
        return 0
    if len(missing) > MAX_NEW_PARTITIONS:
        raise ClientError(
            f"this batch's times fall in {len(missing)} weeks that hold no {table} yet; one batch "
            f"may open at most {MAX_NEW_PARTITIONS} (send the records in time order, or in "
            "smaller batches)", [{"index": None, "field": "ts",
                                  "message": f"{missing[0]} to {missing[-1]}"}], status=422)
    cur.execute("SELECT mlsli_add_partitions(%(t)s, %(w)s::date[])", {"t": table, "w": missing})
    return int(cur.fetchone()[0])


def apply_retention(conn, days: int, now: datetime | None = None) -> int:
    """Drop the weekly partitions of raw rows that ended more than ``days`` days before
    ``now`` (default: the database's clock), and forget the keys of predictions dropped
    ``days`` or more ago (late labels for them are then no longer told apart from labels
    whose prediction is still to come); returns the number of partitions dropped. Commits."""
    if days <= 0:
        return 0
    with conn.cursor() as cur:
        if now is None:
            cur.execute("SELECT now()")
            now = cur.fetchone()[0]
        cutoff = now - timedelta(days=days)
        cur.execute("SELECT pg_advisory_xact_lock(%s, %s)", HORIZON_LOCK)  # writers finish first
        cur.execute("SELECT mlsli_drop_partitions(%(c)s, %(k)s)",
                    {"c": cutoff, "k": cutoff - timedelta(days=days)})
        dropped = int(cur.fetchone()[0])
    conn.commit()
    return dropped


def count_late_labels(cur, model_id: int, n: int, last_ts: datetime | None) -> None:
    """Add ``n`` late labels (their prediction dropped, or their own time before the horizon)."""
    if n:
        cur.execute(
            "INSERT INTO retention_counts AS r (model_id, late_labels, late_label_last_ts)"
            " VALUES (%(m)s, %(n)s, %(t)s) ON CONFLICT (model_id) DO UPDATE SET"
            " late_labels = r.late_labels + excluded.late_labels,"
            " late_label_last_ts = greatest(r.late_label_last_ts, excluded.late_label_last_ts)",
            {"m": model_id, "n": n, "t": last_ts})


def retention_status(conn, model_id: int) -> dict:
    """What retention did to a model: horizon, rows dropped, late labels counted."""
    horizon = raw_horizon(conn)
    with conn.cursor() as cur:
        cur.execute("SELECT predictions_dropped, feedback_dropped, late_labels, late_label_last_ts"
                    " FROM retention_counts WHERE model_id = %(m)s", {"m": model_id})
        row = cur.fetchone() or (0, 0, 0, None)
    return {"raw_horizon": horizon.isoformat() if horizon else None,
            "predictions_dropped": int(row[0]), "feedback_dropped": int(row[1]),
            "late_labels_dropped": int(row[2]),
            "late_label_last_ts": row[3].isoformat() if row[3] else None}


def partitions(conn, table: str) -> list[date]:
    """The first days of ``table``'s weekly partitions, ascending."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT to_date(right(c.relname, 8), 'YYYYMMDD') FROM pg_inherits i"
            " JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = to_regclass(%(t)s)"
            " ORDER BY 1", {"t": table})
        return [r[0] for r in cur.fetchall()]
