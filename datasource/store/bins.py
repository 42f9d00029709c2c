"""Score bins stored as one packed list of bin records per bucket and segment set.

Why: a 7-day panel at a 5-minute step covers 2,016 buckets with ~66 non-empty bins each.
Stored as one row per bin that was 133K rows, 35 ms of PostgreSQL for one grid threshold and
100 ms for binned ROC AUC at 1M predictions; stored as one ``bytea`` per bucket and segment
set it is 2,016 rows. A value holds only the non-empty bins (most segment sets are sparse),
each a 41-byte little-endian record (the bin, then the BIN_PARTIALS as float64), sorted by
bin: at most 101 records (4,141 bytes), kept inline in the row (``toast_tuple_target`` 8160,
``STORAGE PLAIN``: no compression, no TOAST to detoast at read).

Upkeep appends: a write batch adds, per key it changed, a row holding its delta
(``insert_levels``, before the model's rollup lock), and reads sum a key's rows. A key that
reaches MAX_PARTS rows is folded into one under the rollup lock (``fold_full``, ``fold``):
there a bin whose count summed to 0 is removed, with its float sums (which would otherwise
keep rounding residue), and a key whose bins all emptied keeps no row.

Reads and writes move the bytes in bulk: a read is one binary COPY of the rows (string_agg of
the values measured 4x slower), a write sends every changed row in one binary COPY.
"""

from __future__ import annotations

import io
import struct

import numpy as np
import pandas as pd

from datasource.store.binary_copy import copy_out, staging_table
from datasource.store.deltas import group_sum
from datasource.store.partials import BIN_PARTIALS, N_BINS, THRESHOLD_FROM_BINS

NAMES = list(BIN_PARTIALS)
RECORD = np.dtype([("bin", "u1")] + [(c, "<f8") for c in NAMES])  # packed: 41 bytes
# The bin columns a grid threshold sums over the bins >= k, kept as suffix sums (see _suffixes).
SUFFIX_NAMES = list(dict.fromkeys(THRESHOLD_FROM_BINS.values()))
SUFFIX = np.dtype([(c, "<f8") for c in SUFFIX_NAMES])  # 32 bytes
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


def threshold_sums(conn, sources: list[tuple[str, str]], k: int, params: dict) -> dict[str, np.ndarray]:
    """Per row matching one of ``sources`` ((table, where) pairs, the rows of each table
    matching its ``where``, read in one statement: a panel's levels cost one round trip):
    segset_id, bucket_end and the sums of SUFFIX_NAMES over the bins >= k, read from the row's
    suffix record (32 bytes a row: each row returns one record, of zeros where no bin is >= k)."""
    size = SUFFIX.itemsize
    columns = {"segset_id": "int8", "bucket_end": "int8", "sums": f"bytes{size}"}
    selects = [f"SELECT t.segset_id::int8, t.bucket_end, substring(t.suffix FROM"
               f" {N_BINS + 1} + {size} * get_byte(t.suffix, %(k)s) FOR {size}) FROM {table} t WHERE {where}"
               for table, where in sources]
    rows = copy_out(conn, " UNION ALL ".join(selects), {**params, "k": int(k)}, columns)
    sums = rows.pop("sums").view(SUFFIX)
    return {**rows, **{c: sums[c].astype(np.float64) for c in SUFFIX_NAMES}}


def suffix_mismatches(conn, table: str, where: str, params: dict) -> list[tuple[int, int]]:
    """(segset_id, bucket_end) of the rows matching ``where`` whose stored suffix value is not
    the one their bins give (``check_rollup``'s look at the threshold sums)."""
    with conn.cursor() as cur:
        query = cur.mogrify(f"SELECT t.segset_id::int8, t.bucket_end, t.bins, t.suffix FROM {table} t"
                            f" WHERE {where} ORDER BY t.segset_id, t.bucket_end", params).decode()
        buf = io.BytesIO()
        cur.copy_expert(f"COPY ({query}) TO STDOUT WITH (FORMAT binary)", buf)
    data = buf.getvalue()
    off, end = 19 + int.from_bytes(data[15:19], "big"), len(data) - 2
    keys, values, stored = [], [], []
    while off < end:  # each row: 4 fields, int8, int8, bytea, bytea
        _, _, seg, _, bucket, n = _ROW.unpack_from(data, off)
        off += _ROW.size
        values.append(data[off:off + n])
        m = int.from_bytes(data[off + n:off + n + 4], "big")
        stored.append(data[off + n + 4:off + n + 4 + m])
        off += n + 4 + m
        keys.append((seg, bucket))
    return [key for key, value, suffix in zip(keys, values, stored, strict=True)
            if suffix_of(value) != suffix]


def suffix_of(value: bytes) -> bytes:
    """The suffix value of one row's bins value (as its writer computes it)."""
    rec = np.frombuffer(value, dtype=RECORD)
    if not len(rec):
        return _EMPTY_SUFFIX
    records = {"bin": rec["bin"].astype(np.int64), **{c: rec[c].astype(np.float64) for c in NAMES}}
    return _suffixes(records, np.array([0]), np.array([len(rec)]))[0]


def read(conn, table: str, where: str, params: dict, source: str | None = None) -> pd.DataFrame:
    """``read_records`` as a DataFrame."""
    return frame(read_records(conn, table, where, params, source))


def aggregate(records: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Sums of the bin partials per (segset_id, bucket_end, bin), sorted by them."""
    return group_sum(records, KEYS, NAMES)


def _encode(records: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, list[bytes], list[bytes]]:
    """Rows (segset_id, bucket_end, bins value, suffix value) of records sorted by segset,
    bucket and bin."""
    n = len(records["bin"])
    if n == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64), [], []
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
    return seg[starts], bucket[starts], values, _suffixes(records, starts, ends)


def _suffixes(records: dict[str, np.ndarray], starts: np.ndarray, ends: np.ndarray) -> list[bytes]:
    """Each row's ``suffix`` value, from its records (sorted by bin): N_BINS header bytes, byte
    k the number of records with bin < k, then per record the sums of SUFFIX_NAMES over that
    record's bin and every bin above it, then one record of zeros.

    Why: a panel at a grid threshold k/100 needs, per bucket, only those four sums over the
    bins >= k; the record that holds them is found by header byte k, so PostgreSQL returns
    32 bytes per row (``threshold_sums``) instead of the whole list of bins (2.7 KB per
    5-minute row at 1M predictions, 5.5 MB for a 7-day panel). Each row's sums are a cumsum
    over its own records alone, from its last record down, starting from +0.0 (the rows laid
    side by side, padded with at least one zero after their records: a signed delta's -0.0
    then always becomes +0.0), so the same records always give the same bytes, whatever rows
    they were written with (``check_rollup`` compares them exactly)."""
    counts = ends - starts
    n_rows = len(starts)
    if not n_rows:
        return []
    row = np.repeat(np.arange(n_rows), counts)
    at = np.arange(len(row)) - np.repeat(starts, counts)  # a record's place in its row
    width = int(counts.max()) + 1  # every row ends in a zero: its sums start from +0.0, not -0.0
    sums = np.empty(len(row), SUFFIX)
    for c in SUFFIX_NAMES:
        side_by_side = np.zeros((n_rows, width))
        side_by_side[row, at] = records[c][starts[0]:ends[-1]]
        sums[c] = np.cumsum(side_by_side[:, ::-1], axis=1)[:, ::-1][row, at]
    cell = row * (N_BINS + 1) + np.asarray(records["bin"][starts[0]:ends[-1]], np.int64) + 1
    at_bin = np.bincount(cell, minlength=n_rows * (N_BINS + 1)).reshape(n_rows, N_BINS + 1)
    heads = np.cumsum(at_bin, axis=1).astype(np.uint8)[:, :N_BINS].tobytes()  # records with bin < k
    raw, size, zero = sums.tobytes(), SUFFIX.itemsize, bytes(SUFFIX.itemsize)
    base = int(starts[0])
    return [heads[r * N_BINS:(r + 1) * N_BINS] + raw[(a - base) * size:(b - base) * size] + zero
            for r, (a, b) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True))]


_EMPTY_SUFFIX = bytes(N_BINS + SUFFIX.itemsize)  # a row with no records: sums of zeros


def _copy_in(cur, table: str, model_id: int, seg, bucket, values, suffixes, revision: int,
             width: int | None = None) -> None:
    """One binary COPY of (model_id, segset_id, bucket_end, revision, bins, suffix) rows into
    ``table``, and the level ``width`` of every row when given (into ``bins_new``)."""
    fields = [("count", ">i2"), ("l_model", ">i4"), ("model", ">i4"), ("l_seg", ">i4"), ("seg", ">i4"),
              ("l_bucket", ">i4"), ("bucket", ">i8"), ("l_rev", ">i4"), ("rev", ">i8")]
    fields += [("l_width", ">i4"), ("width", ">i4")] if width is not None else []
    head = np.empty(len(values), np.dtype(fields + [("l_bins", ">i4")]))  # all fixed fields at once
    head["count"] = 6 if width is None else 7
    head["l_model"], head["model"], head["l_seg"], head["seg"] = 4, model_id, 4, seg
    head["l_bucket"], head["bucket"], head["l_rev"], head["rev"] = 8, bucket, 8, revision
    if width is not None:
        head["l_width"], head["width"] = 4, width
    head["l_bins"] = [len(v) for v in values]
    raw, size = head.tobytes(), head.dtype.itemsize
    body = b"".join([part for i, (v, x) in enumerate(zip(values, suffixes, strict=True))
                     for part in (raw[i * size:(i + 1) * size], v, len(x).to_bytes(4, "big"), x)])
    buf = io.BytesIO(b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0) + body + struct.pack(">h", -1))
    columns = ("model_id, segset_id, bucket_end, revision" + (", width" if width is not None else "")
               + ", bins, suffix")
    cur.copy_expert(f"COPY {table} ({columns}) FROM STDIN WITH (FORMAT binary)", buf)


MAX_PARTS = 16  # rows a (bucket, segment set) may hold before its writer folds them into one


def encode_levels(deltas: dict[int, dict[str, np.ndarray]]) -> dict[int, tuple]:
    """Each level's ``deltas`` (records: segset_id, bucket_end of that level, bin,
    BIN_PARTIALS, signed; any order, keys may repeat) summed per key and encoded as the rows
    ``insert_levels`` writes (no database work: done before the model's rollup lock is taken,
    so that the batches waiting for it wait less). Levels whose delta is all zeros are left out."""
    encoded = {}
    for width, delta in deltas.items():
        total = aggregate(delta)
        # a label moved between classes leaves n unchanged: a delta keeps every non-zero record
        changed = np.any([total[c] != 0 for c in NAMES], axis=0) if len(total["bin"]) else np.zeros(0, bool)
        seg, bucket, values, suffixes = _encode({c: v[changed] for c, v in total.items()})
        if values:
            encoded[width] = (seg, bucket, values, suffixes)
    return encoded


def stage_levels(cur, model_id: int, encoded: dict[int, tuple]) -> None:
    """Send the encoded deltas (``encode_levels``) to the staging table ``bins_new`` by one
    binary COPY per level, for ``insert_levels``."""
    # not compressed on the way in (a value compressed here stays compressed in the target
    # table, whose own STORAGE PLAIN only governs values it compresses itself: every read
    # would then decompress it)
    staging_table(cur, "bins_new", "width int, model_id int, segset_id int, bucket_end bigint,"
                                   " revision bigint, bins bytea, suffix bytea", "toast_tuple_target = 8160")
    for width, (seg, bucket, values, suffixes) in encoded.items():
        _copy_in(cur, "bins_new", model_id, seg, bucket, values, suffixes, 0, width)


def insert_levels(cur, tables: dict[int, str], encoded: dict[int, tuple]) -> None:
    """Add each level's delta (``encode_levels``, staged by ``stage_levels``) to
    ``tables[width]``: one new row per key holding the key's delta, before the model's rollup
    lock is taken. Its ``revision`` only tells the key's rows apart (reads take revisions from
    the rollup): a number of the write-revision sequence, taken by the insert, which no other
    row of any key holds. A new row is no row another writer updates, so concurrent batches
    insert theirs without waiting for each other (a batch of 50,000 labels spent ~70 ms of
    its time under the rollup lock here).

    Why rows of deltas: a late label changes one bin of a key whose row holds up to 101 bins
    and their suffix sums (~5 KB); read, added to and written back whole, a batch of 1,000
    labels spread over two days rewrote ~1,500 such rows per level. A delta row holds the bins
    the batch changed, and nothing is read. Reads sum a key's rows as they sum the rows of the
    levels a bucket spans; at most MAX_PARTS of them (``fold_full``)."""
    if not encoded:
        return
    cur.execute("".join(
        f"""
        INSERT INTO {tables[w]} (model_id, segset_id, bucket_end, revision, bins, suffix)
        SELECT model_id, segset_id, bucket_end, part.rev, bins, suffix
        FROM bins_new, (SELECT nextval('write_revision') AS rev) part WHERE width = {int(w)};
        """ for w in encoded))


# How far below MAX_PARTS a key's rows are counted before the rollup lock (``count_near_full``).
FOLD_SLACK = 8


def count_near_full(cur, tables: dict[int, str], model_id: int, encoded: dict[int, tuple]) -> tuple:
    """Before the model's rollup lock, after ``insert_levels``: the batch's keys holding
    MAX_PARTS - FOLD_SLACK rows or more, with their counts, and the write-revision sequence's
    last value read just before (``fold_full`` takes it from there).

    Why: counting the rows of every key of a batch (~11,000 five-minute keys for 50,000 labels
    spread over four days) took ~46 ms of the batch's time under the rollup lock, for keys of
    which almost none is near MAX_PARTS."""
    if not encoded:
        return 0, {}
    cur.execute("SELECT last_value FROM write_revision")
    before = int(cur.fetchone()[0])
    near = {w: _keys(cur, tables[w], model_id, seg, bucket, MAX_PARTS - FOLD_SLACK)
            for w, (seg, bucket, _, _) in encoded.items()}
    return before, near


def fold_full(cur, tables: dict[int, str], model_id: int, encoded: dict[int, tuple],
              revision: int, counted: tuple) -> None:
    """Fold into one row each key of the batch (``encode_levels``) that holds MAX_PARTS rows
    or more, under the model's rollup lock (held to the commit, by every writer of the model
    since its deltas): a batch counts the rows that every batch before it committed, and its
    own, which is what the key holds once it commits.

    ``counted`` (``count_near_full``) holds the keys' counts from before the lock. Since then
    the model's writers committed at most ``revision - before`` batches (one for the holder
    of the lock when they were counted, whose revision may be older, and one per revision
    taken since: each commit takes the lock, and a revision under it), each adding at most
    one row per key. So only the keys whose count plus that many can reach MAX_PARTS are
    counted again here; all of them when more than FOLD_SLACK revisions were taken (the
    sequence is shared by every model: a busy server)."""
    before, near = counted
    since = revision - before
    for width, (seg, bucket, _, _) in encoded.items():
        if since > FOLD_SLACK:
            candidates = seg, bucket
        else:
            s, b, n = near[width]
            could = n + since >= MAX_PARTS
            candidates = s[could], b[could]
        if len(candidates[0]):
            full = _keys(cur, tables[width], model_id, *candidates, MAX_PARTS)
            if len(full[0]):
                fold(cur, tables[width], model_id, *full[:2], revision)


def _lateral(table: str, columns: str) -> str:
    """FROM the keys %(s)s, %(b)s (array literals), each probing ``table``'s primary key: a
    LATERAL subquery is not flattened into a join, which the planner hashed against a scan of
    the whole table (measured: 20 ms for 1,500 keys on a 38K-row table, growing with it)."""
    return (f"unnest(%(s)s::int[], %(b)s::bigint[]) AS k(s, b) CROSS JOIN LATERAL"
            f" (SELECT {columns} FROM {table} x WHERE x.model_id = %(m)s AND x.segset_id = k.s"
            f" AND x.bucket_end = k.b OFFSET 0) t")


def _key_params(model_id: int, seg: np.ndarray, bucket: np.ndarray) -> dict:
    # array literals as text: psycopg2 adapts a list element by element (0.6 s per 200K rows)
    return {"m": model_id, "s": array_literal(seg), "b": array_literal(bucket)}


def _keys(cur, table: str, model_id: int, seg, bucket,
          at_least: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The keys among (seg, bucket) held in ``at_least`` rows or more, and their counts."""
    found = copy_out(cur.connection, f"SELECT k.s::int8, k.b, count(*) FROM {_lateral(table, 'x.revision')}"
                                     f" GROUP BY k.s, k.b HAVING count(*) >= {int(at_least)}",
                     _key_params(model_id, seg, bucket), {"s": "int8", "b": "int8", "n": "int8"})
    return found["s"], found["b"], found["n"]


def fold(cur, table: str, model_id: int, seg: np.ndarray, bucket: np.ndarray, revision: int) -> int:
    """Replace the rows of each key (seg, bucket) by one holding their sum, without the bins
    whose count summed to 0 (and the float sums' rounding residue there); a key whose every
    bin emptied keeps no row. Returns the number of rows removed."""
    params = _key_params(model_id, seg, bucket)
    records = aggregate(read_records(cur.connection, table, "true", params, _lateral(table, "x.*")))
    keep = records["n"] != 0
    # model_id on the target too: on one server it changes nothing; on Citus it prunes the
    # delete to the model's shard, where the ctids mean something (docs/scaling.md)
    cur.execute(f"DELETE FROM {table} WHERE model_id = %(m)s AND ctid = ANY(ARRAY(SELECT t.ctid FROM"
                f" {_lateral(table, 'x.ctid')}))", params)
    removed = cur.rowcount
    seg, bucket, values, suffixes = _encode({c: v[keep] for c, v in records.items()})
    _copy_in(cur, table, model_id, seg, bucket, values, suffixes, revision)
    return removed


def multi_row_keys(cur, table: str, model_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(segset_id, bucket_end) of every key of the model in ``table`` held in more than one row."""
    found = copy_out(cur.connection, f"SELECT segset_id::int8, bucket_end FROM {table} WHERE model_id = %(m)s"
                                     " GROUP BY segset_id, bucket_end HAVING count(*) > 1",
                     {"m": model_id}, {"s": "int8", "b": "int8"})
    return found["s"], found["b"]


def array_literal(values: np.ndarray) -> str:
    """Integers as a PostgreSQL array literal ('{1,2,3}'), for a ``%(x)s::int[]`` parameter:
    psycopg2 adapts a list element by element (0.6 s per 200K values)."""
    return "{" + ",".join(map(str, np.asarray(values, np.int64).tolist())) + "}"


def insert_new(cur, table: str, model_id: int, records: dict[str, np.ndarray]) -> int:
    """Write ``records`` (aggregated per key and bin) as new rows of ``table``, whose buckets
    hold no row of the model (a rebuild deleted them); returns the number of rows written."""
    total = aggregate(records)
    keep = total["n"] != 0
    seg, bucket, values, suffixes = _encode({c: v[keep] for c, v in total.items()})
    _copy_in(cur, table, model_id, seg, bucket, values, suffixes, 0)
    return len(values)
