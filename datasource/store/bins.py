"""Score bins stored as one packed list of bin records per bucket and segment set.

Why: a 7-day panel at a 5-minute step covers 2,016 buckets with ~66 non-empty bins each.
Stored as one row per bin that was 133K rows, 35 ms of PostgreSQL for one grid threshold and
100 ms for binned ROC AUC at 1M predictions; stored as one ``bytea`` per bucket and segment
set it is 2,016 rows. A value holds only the non-empty bins (most segment sets are sparse),
each a 41-byte little-endian record (the bin, then the BIN_PARTIALS as float64), sorted by
bin: at most 101 records (4,141 bytes), kept inline in the row (``toast_tuple_target`` 8160,
``STORAGE PLAIN``: no compression, no TOAST to detoast at read).

Upkeep is read, add, write back: writers of one model are serialized by its advisory lock,
so no other writer changes a row between the read and the write. A bin whose count drops to
0 is removed, with its float sums (which would otherwise keep rounding residue); a row whose
bins all empty keeps an empty value.

Reads and writes move the bytes in bulk: a read is one binary COPY of the rows (string_agg of
the values measured 4x slower), a write sends every changed row in one binary COPY.
"""

from __future__ import annotations

import io
import struct

import numpy as np
import pandas as pd

from datasource.store.binary_copy import staging_table
from datasource.store.deltas import group_sum
from datasource.store.partials import BIN_PARTIALS

NAMES = list(BIN_PARTIALS)
RECORD = np.dtype([("bin", "u1")] + [(c, "<f8") for c in NAMES])  # packed: 41 bytes
_ROW = struct.Struct(">hiqiqi")  # a binary COPY row's field count, then 8-byte fields' lengths and values
KEYS = ["segset_id", "bucket_end", "bin"]
COLUMNS = [*KEYS, *NAMES]


def empty() -> pd.DataFrame:
    return pd.DataFrame({c: np.empty(0, np.int64 if c in ("segset_id", "bucket_end", "bin")
                                     else np.float64) for c in COLUMNS})


def _records(keys: np.ndarray, blob: bytes) -> dict[str, np.ndarray]:
    """Records of the rows (keys: segset_id, bucket_end, byte length) whose concatenated values
    a read returned, as arrays (COLUMNS), in the rows' order, each row's bins ascending."""
    rec = np.frombuffer(blob, dtype=RECORD)
    counts = keys[:, 2] // RECORD.itemsize
    out = {"segset_id": np.repeat(keys[:, 0], counts), "bucket_end": np.repeat(keys[:, 1], counts),
           "bin": rec["bin"].astype(np.int64)}
    out.update({c: rec[c].astype(np.float64) for c in NAMES})
    return out


def frame(records: dict[str, np.ndarray]) -> pd.DataFrame:
    return pd.DataFrame(records, columns=list(records)) if len(records["bin"]) else empty()[list(records)]


def concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return parts[0] if len(parts) == 1 else {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}


def read_records(conn, table: str, where: str, params: dict,
                 source: str | None = None) -> dict[str, np.ndarray]:
    """The records of ``table``'s rows matching ``where`` (SQL over segset_id, bucket_end
    with ``params``; identifiers only from constants), or of ``source`` (a FROM clause naming
    the table ``t``): arrays segset_id, bucket_end, bin, BIN_PARTIALS."""
    sql = (f"SELECT t.segset_id::int8, t.bucket_end, t.bins FROM {source or f'{table} t'}"
           f" WHERE {where} ORDER BY t.segset_id, t.bucket_end")
    with conn.cursor() as cur:
        query = cur.mogrify(sql, params).decode()
        buf = io.BytesIO()
        cur.copy_expert(f"COPY ({query}) TO STDOUT WITH (FORMAT binary)", buf)
    data = buf.getvalue()
    off = 19 + int.from_bytes(data[15:19], "big")  # signature, flags, extension
    end = len(data) - 2  # the -1 trailer
    view = memoryview(data)
    keys, chunks = [], []
    row = _ROW.unpack_from
    while off < end:  # each row: 3 fields, int8 and int8 (length 8 each), bytea
        _, _, seg, _, bucket, n = row(data, off)
        off += _ROW.size
        keys.append((seg, bucket, n))
        chunks.append(view[off:off + n])
        off += n
    return _records(np.array(keys, dtype=np.int64).reshape(-1, 3), b"".join(chunks))


def read(conn, table: str, where: str, params: dict, source: str | None = None) -> pd.DataFrame:
    """``read_records`` as a DataFrame."""
    return frame(read_records(conn, table, where, params, source))


def aggregate(records: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Sums of the bin partials per (segset_id, bucket_end, bin), sorted by them."""
    return group_sum(records, KEYS, NAMES)


def _encode(records: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, list[bytes]]:
    """Rows (segset_id, bucket_end, value) of records sorted by segset, bucket and bin."""
    n = len(records["bin"])
    if n == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64), []
    rec = np.empty(n, dtype=RECORD)
    rec["bin"] = records["bin"]
    for c in NAMES:
        rec[c] = records[c]
    seg = np.asarray(records["segset_id"], np.int64)
    bucket = np.asarray(records["bucket_end"], np.int64)
    starts = np.flatnonzero(np.r_[True, (seg[1:] != seg[:-1]) | (bucket[1:] != bucket[:-1])])
    ends = np.r_[starts[1:], n]
    raw = rec.tobytes()
    size = RECORD.itemsize
    values = [raw[a * size:b * size] for a, b in zip(starts.tolist(), ends.tolist(), strict=True)]
    return seg[starts], bucket[starts], values


def _copy_in(cur, table: str, model_id: int, seg, bucket, values, width: int | None = None) -> None:
    """One binary COPY of (model_id, segset_id, bucket_end, bins) rows into ``table``, and
    the level ``width`` of every row when given (into the staging table ``bins_new``)."""
    fields = [("count", ">i2"), ("l_model", ">i4"), ("model", ">i4"), ("l_seg", ">i4"), ("seg", ">i4"),
              ("l_bucket", ">i4"), ("bucket", ">i8")]
    fields += [("l_width", ">i4"), ("width", ">i4")] if width is not None else []
    head = np.empty(len(values), np.dtype(fields + [("l_bins", ">i4")]))  # all fixed fields at once
    head["count"] = 4 if width is None else 5
    head["l_model"], head["model"], head["l_seg"], head["seg"] = 4, model_id, 4, seg
    head["l_bucket"], head["bucket"] = 8, bucket
    if width is not None:
        head["l_width"], head["width"] = 4, width
    head["l_bins"] = [len(v) for v in values]
    raw, size = head.tobytes(), head.dtype.itemsize
    body = b"".join([part for i, v in enumerate(values) for part in (raw[i * size:(i + 1) * size], v)])
    buf = io.BytesIO(b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0) + body + struct.pack(">h", -1))
    columns = "model_id, segset_id, bucket_end" + (", width" if width is not None else "") + ", bins"
    cur.copy_expert(f"COPY {table} ({columns}) FROM STDIN WITH (FORMAT binary)", buf)


def merge_levels(cur, tables: dict[int, str], model_id: int, deltas: dict[int, dict[str, np.ndarray]]) -> None:
    """Add each level's ``deltas`` (records: segset_id, bucket_end of that level, bin,
    BIN_PARTIALS; any order, keys may repeat) to the stored rows of ``tables[width]``. The
    caller holds the model's write lock.

    On arrays throughout, not DataFrames: an HTTP batch of 1,000 labels merges three levels,
    and pandas' per-call overhead (concat, drop_duplicates, an indicator merge) was most of
    the 57 ms each merge took. The new values of every level go to PostgreSQL in one COPY."""
    staging_table(cur, "bins_new", "width int, model_id int, segset_id int, bucket_end bigint, bins bytea")
    written = []
    for width, delta in deltas.items():
        if len(delta["bin"]) == 0:
            continue
        seg, bucket, values = _merged(cur, tables[width], model_id, delta)
        _copy_in(cur, "bins_new", model_id, seg, bucket, values, width)
        written.append(width)
    cur.execute("".join(
        f"""
        INSERT INTO {tables[w]} (model_id, segset_id, bucket_end, bins)
        SELECT model_id, segset_id, bucket_end, bins FROM bins_new WHERE width = {int(w)}
        ON CONFLICT (model_id, segset_id, bucket_end) DO UPDATE SET bins = excluded.bins;
        """ for w in written) or "SELECT 1")


def _merged(cur, table: str, model_id: int, delta: dict[str, np.ndarray]):
    """The rows (segset_id, bucket_end, value) that ``delta`` leaves in ``table``."""
    pair_seg, pair_bucket = _distinct_pairs(delta["segset_id"], delta["bucket_end"])
    # array literals as text: psycopg2 adapts a list element by element (0.6 s per 200K rows)
    params = {"m": model_id, "s": _array_literal(pair_seg), "b": _array_literal(pair_bucket)}
    # one index probe per key: a LATERAL subquery with LIMIT (a key has at most one row) is
    # not flattened into a join, which the planner hashed against a scan of the whole table
    # (measured: 20 ms for 1,500 keys on a 38K-row table, growing with it; probes: 10 ms)
    stored = read_records(cur.connection, table, "true", params,
                          f"unnest(%(s)s::int[], %(b)s::bigint[]) AS k(s, b) CROSS JOIN LATERAL"
                          f" (SELECT * FROM {table} x WHERE x.model_id = %(m)s AND x.segset_id = k.s"
                          f" AND x.bucket_end = k.b LIMIT 1) t")
    total = aggregate(concat([stored, {c: np.asarray(delta[c], stored[c].dtype) for c in COLUMNS}]))
    keep = total["n"] != 0  # an emptied bin leaves no rounding residue behind
    seg, bucket, values = _encode({c: v[keep] for c, v in total.items()})
    # (seg, bucket) pairs are sorted and distinct on both sides: the rows left with no record
    emptied = np.ones(len(pair_seg), bool)
    emptied[np.searchsorted(pair_seg * _PAIR + pair_bucket, seg * _PAIR + bucket)] = False
    if emptied.any():  # every bin of the row emptied: an empty value (no records)
        seg = np.r_[seg, pair_seg[emptied]]
        bucket = np.r_[bucket, pair_bucket[emptied]]
        values = values + [b""] * int(emptied.sum())
    return seg, bucket, values


_PAIR = 1 << 34  # segset_id * _PAIR + bucket_end orders pairs as (segset_id, bucket_end) do


def _distinct_pairs(seg: np.ndarray, bucket: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct (segset_id, bucket_end) pairs, sorted (bucket ends, in seconds, stay below
    2^34 until the year 2514)."""
    key = np.unique(np.asarray(seg, np.int64) * _PAIR + np.asarray(bucket, np.int64))
    return key // _PAIR, key % _PAIR


def _array_literal(values: np.ndarray) -> str:
    """Integers as a PostgreSQL array literal ('{1,2,3}')."""
    return "{" + ",".join(map(str, np.asarray(values, np.int64).tolist())) + "}"


def insert_new(cur, table: str, model_id: int, records: dict[str, np.ndarray]) -> int:
    """Write ``records`` (aggregated per key and bin) as new rows of ``table``, whose buckets
    hold no row of the model (a rebuild deleted them); returns the number of rows written."""
    total = aggregate(records)
    keep = total["n"] != 0
    seg, bucket, values = _encode({c: v[keep] for c, v in total.items()})
    _copy_in(cur, table, model_id, seg, bucket, values)
    return len(values)
