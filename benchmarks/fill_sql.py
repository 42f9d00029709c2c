"""Fill a benchmark database inside PostgreSQL: ``common.synthesize``'s model by INSERT … SELECT.

Why: the bulk client writes ~27K rows/s on a 2-core machine (10M predictions + 8M labels
~12 min, 100M ~2 h), and ``synthesize`` holds every row in numpy (at 100M the ids alone are
~4 GB). Here PostgreSQL generates the rows itself, a chunk of row numbers at a time
(``generate_series``), and writes them as the write path leaves them: each prediction with its
label and label time on the row (``feedback`` holds only labels that wait for their
prediction: none here), the segment sets, the weekly partitions
(``retention.ensure_partitions``). Then ``store.rebuild_rollup`` makes the rollup
levels and score bins (in chunks of days, bounded memory), and VACUUM ANALYZE, CHECKPOINT.

The same distribution as ``synthesize``, not the same values (numpy's generator is not
reproduced): row i's random numbers are 53 bits of seeded hashes of its number
(``hashtextextended(i::text, 16 * seed + k)``), so a row is the same whatever the chunk size.

* time: uniform over the 30 days, as there, but row i is drawn in its own slot
  [i, i + 1) of n equal slots (numpy sorts n independent draws): the rows come in time order,
  and a window's count varies a little less than with independent draws;
* borough, vendor (and zone): inverse CDF of the same weights, as numpy's ``choice``;
* z = offset(borough, vendor) + 1.6 · N(0, 1), the normal from Box–Muller; score = σ(z);
  label = [u < σ(z − 0.9 · (t − start) / span)]: the same drift;
* labeled with probability 0.8, after 2 days × Beta(1, 3) (inverse CDF 1 − (1 − u)^(1/3)),
  truncated to ms and at least 1 ms, as there.

``tests/test_sql_fill.py`` compares counts per segment, labeled share, mean score, delay
quantiles and the label-rate drift with ``synthesize`` at the same n.
"""

from __future__ import annotations

import resource
import sys
import time

import common
import numpy as np
from tqdm import tqdm

from datasource import db, ingest, store
from datasource.store import retention
from datasource.store.catalog import _segset_ids

CHUNK_ROWS = 1_000_000  # predictions per INSERT (one transaction each)
_RAW_TABLES = ("predictions", "feedback")
_BOROUGH_OFFSET = (0.9, 0.3, 0.2, -0.3, -0.1)  # synthesize's, per borough and vendor
_VENDOR_OFFSET = (-0.2, 0.1)


def _uniform(k: int) -> str:
    """SQL: row ``s.i``'s k-th uniform in [0, 1): 53 bits of a hash of its number."""
    return (f"((hashtextextended(s.i_text, %(seed)s * 16 + {k}) >> 11) & {2**53 - 1})::float8"
            f" / {float(2**53)!r}")


def _inverse_cdf(u: str, weights: tuple[float, ...]) -> str:
    """SQL: the index of the first cumulative weight above ``u`` (numpy's ``choice``)."""
    cdf = np.cumsum(weights) / np.sum(weights)
    whens = " ".join(f"WHEN {u} < {c!r} THEN {k}" for k, c in enumerate(cdf[:-1].tolist()))
    return f"CASE {whens} ELSE {len(weights) - 1} END"


def _array(values) -> str:
    return "ARRAY[" + ", ".join(repr(float(v)) for v in values) + "]"


def rows_sql(zones: int = 1) -> str:
    """SQL: rows %(lo)s … %(hi)s − 1 of %(n)s (seed %(seed)s): output_id, ts, score, segset_id
    (from %(segsets)s, indexed by borough, vendor, zone), label and label_ts (NULL: none).
    Each level is fenced (OFFSET 0) so that its values are computed once per row."""
    span_ms = (common.END_S - common.START_S) * 1000
    n_vendors = len(common.VENDORS)
    zone = f"floor({_uniform(8)} * {zones})::int" if zones > 1 else "0"
    return f"""
    SELECT output_id, to_timestamp(ts_ms / 1000.0) AS ts, score, segset_id,
           CASE WHEN labeled THEN label END AS label,
           CASE WHEN labeled THEN to_timestamp((ts_ms + delay_ms) / 1000.0) END AS label_ts
    FROM (
      SELECT output_id, ts_ms, 1 / (1 + exp(-z)) AS score,
             (%(segsets)s::int[])[(borough * {n_vendors} + vendor) * {zones} + zone + 1] AS segset_id,
             (u_label < 1 / (1 + exp(-(z - 0.9 * (ts_ms / 1000.0 - {common.START_S}) / {common.END_S - common.START_S}))))::int::float8 AS label,
             u_labeled < {common.LABELED_SHARE!r} AS labeled,
             greatest(floor((1 - (1 - u_delay) ^ (1 / 3.0)) * {common.MAX_DELAY_S * 1000})::int8, 1) AS delay_ms
      FROM (
        SELECT output_id, ts_ms, borough, vendor, zone, u_label, u_labeled, u_delay,
               ({_array(_BOROUGH_OFFSET)})[borough + 1] + ({_array(_VENDOR_OFFSET)})[vendor + 1]
               + 1.6 * sqrt(-2 * ln(1 - u_normal1)) * cos(2 * pi() * u_normal2) AS z
        FROM (
          SELECT %(prefix)s || s.i_text AS output_id,
                 {common.START_S * 1000} + floor((s.i + {_uniform(0)}) * {span_ms + 1} / %(n)s)::int8 AS ts_ms,
                 {_inverse_cdf(_uniform(1), common.BOROUGH_WEIGHTS)} AS borough,
                 {_inverse_cdf(_uniform(2), common.VENDOR_WEIGHTS)} AS vendor,
                 {zone} AS zone,
                 {_uniform(3)} AS u_normal1, {_uniform(4)} AS u_normal2, {_uniform(5)} AS u_label,
                 {_uniform(6)} AS u_labeled, {_uniform(7)} AS u_delay
          FROM (SELECT i, i::text AS i_text FROM generate_series(%(lo)s::int8, %(hi)s::int8 - 1) AS g(i)
                OFFSET 0) s
          OFFSET 0) u
        OFFSET 0) v
      OFFSET 0) w
    """


def _insert_sql(zones: int) -> str:
    """One chunk of predictions, each with its label."""
    return f"""
    WITH r AS ({rows_sql(zones)})
    INSERT INTO predictions (model_id, output_id, ts, score, segset_id, label, label_ts)
    SELECT %(m)s, output_id, ts, score, segset_id, label, label_ts FROM r
    """


def segments(zones: int = 1) -> list[dict]:
    """The segment sets in ``rows_sql``'s order (borough, then vendor, then zone), as
    ``common.prediction_records`` writes them."""
    return [{"borough": b, "vendor": v, **({"zone": f"z{z}"} if zones > 1 else {})}
            for b in common.BOROUGHS for v in common.VENDORS for z in range(zones)]


def describe(n: int, seed: int, zones: int = 1) -> str:
    return (f"{n:,} predictions {common.START:%Y-%m-%d} + {common.SPAN_DAYS} days, "
            f"~{common.LABELED_SHARE:.0%} labeled after 2 days x Beta(1, 3), "
            f"{len(common.BOROUGHS)} boroughs x {len(common.VENDORS)} vendors"
            + (f" x {zones} zones" if zones > 1 else "") + f", generated in PostgreSQL (seed {seed})")


def _raw_indexes(cur) -> list[tuple[str, str]]:
    """(name, definition) of the indexes on the raw tables themselves (their partitions'
    follow them)."""
    cur.execute("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema()"
                " AND tablename = ANY(%(t)s) ORDER BY indexname", {"t": list(_RAW_TABLES)})
    return cur.fetchall()


def table_sizes(conn) -> dict[str, int]:
    """Bytes on disk (pg_total_relation_size: heap, TOAST, indexes) of the raw tables (all their
    partitions), the rollup levels and the score bins."""
    from datasource.store.partials import BIN_TABLES, ROLLUP_TABLES

    names = [*_RAW_TABLES, *ROLLUP_TABLES.values(), *BIN_TABLES.values()]
    with conn.cursor() as cur:
        cur.execute("SELECT t, coalesce((SELECT sum(pg_total_relation_size(relid))"
                    " FROM pg_partition_tree(t::regclass)), pg_total_relation_size(t::regclass))"
                    " FROM unnest(%(t)s::text[]) t", {"t": names})
        sizes = {t: int(b or 0) for t, b in cur.fetchall()}
    conn.rollback()
    return sizes


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fill(url: str, n: int, seed: int, description: str, zones: int = 1,
         chunk_rows: int = CHUNK_ROWS) -> dict[str, float]:
    """Fill the fresh (migrated) database at ``url`` with n predictions and their labels, the
    rollup and score bins; mark the model with ``description`` last (a later run reuses a
    database only when it carries it). Returns the seconds of each phase."""
    conn = db.connect(url, statement_timeout_ms=0)
    seconds = {}
    try:
        model, _ = ingest.register_model(conn, {"name": common.MODEL, "description": "filling"})
        segsets = _segset_ids(conn, model.model_id, segments(zones))
        with conn.cursor() as cur:
            cur.execute("SET synchronous_commit = off; SET maintenance_work_mem = '1GB'")
            days_us = np.arange(common.START_S, common.END_S + common.MAX_DELAY_S + common.DAY_S,
                                common.DAY_S) * 10**6
            retention.ensure_partitions(cur, "predictions", days_us[days_us <= common.END_S * 10**6])
            # The rows go in labeled here; a live store writes them unlabeled into half-empty
            # pages (migration 012) that its labels then fill (1M by the bulk client: 178 MB of
            # prediction partitions). Filled at 50 % they would take ~2x the pages (a table
            # unlike a live one); at 85 % they take about what the live store does.
            cur.execute("SELECT inhrelid::regclass::text FROM pg_inherits"
                        " WHERE inhparent = 'predictions'::regclass")
            for (part,) in cur.fetchall():
                cur.execute(f"ALTER TABLE {part} SET (fillfactor = 85)")
            # no index while the rows go in: one sort per index afterwards instead of ~200M
            # inserts at random places of the output_id index (its definitions are kept)
            indexes = _raw_indexes(cur)
            for name, _ in indexes:
                cur.execute(f'DROP INDEX "{name}"')
        conn.commit()

        params = {"m": model.model_id, "n": n, "seed": seed, "prefix": f"s{seed}-",
                  "segsets": segsets}
        sql = _insert_sql(zones)
        t0 = time.perf_counter()
        try:
            with conn.cursor() as cur, tqdm(total=n, desc="fill predictions and labels (SQL)",
                                            unit="rows", unit_scale=True, file=sys.stderr,
                                            mininterval=1, disable=None) as bar:
                for lo in range(0, n, chunk_rows):
                    hi = min(lo + chunk_rows, n)
                    cur.execute(sql, {**params, "lo": lo, "hi": hi})
                    conn.commit()
                    bar.update(hi - lo)
            seconds["raw rows"] = time.perf_counter() - t0
        finally:  # the indexes back, whatever happened
            t0 = time.perf_counter()
            conn.rollback()
            conn.autocommit = True
            with conn.cursor() as cur:
                for _, definition in tqdm(indexes, desc="indexes", file=sys.stderr, disable=None):
                    # pg_indexes shows an index of a partitioned table "ON ONLY" it (the
                    # parent's alone, left invalid); without ONLY it is built on every partition
                    cur.execute(definition.replace(" ON ONLY ", " ON ", 1))
        with conn.cursor() as cur:
            cur.execute("VACUUM ANALYZE predictions, feedback")  # visibility map and statistics
        conn.autocommit = False
        seconds["indexes, vacuum"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        with tqdm(total=common.SPAN_DAYS, desc="rollup and score bins", unit="days", file=sys.stderr,
                  disable=None) as bar:
            def advance(chunk_end_s: int) -> None:
                bar.update(min(common.SPAN_DAYS, -(-(chunk_end_s - common.START_S) // common.DAY_S)) - bar.n)
            store.rebuild_rollup(conn, model, progress=advance)
        ingest.register_model(conn, {"name": common.MODEL, "description": description})
        conn.commit()
        seconds["rollup"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        common.settle(conn)
        seconds["vacuum analyze, checkpoint"] = time.perf_counter() - t0
    finally:
        conn.close()
    return seconds
