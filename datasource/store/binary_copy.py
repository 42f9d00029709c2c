"""Columns of numbers in and out of PostgreSQL by binary COPY, laid out with numpy.

Why: a write batch sends thousands of delta rows and reads back the rows it replaced, and a
panel reads hundreds of thousands of raw rows. In binary COPY every non-null int8/float8
field has the same width, so a whole result is one numpy structured array: no text is
formatted or parsed, no Python object per value (several times faster than tuples or CSV).
Non-null columns only (callers ``coalesce`` a NULL to NaN in SQL); out, fixed-width ones; in,
also text and jsonb (a write batch's ids and features), laid out by offsets.
"""

from __future__ import annotations

import io

import numpy as np

_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
# timestamptz travels as int8 microseconds since 2000-01-01 UTC, PostgreSQL's own form
_KINDS = {"int4": ">i4", "int8": ">i8", "float8": ">f8", "timestamptz": ">i8"}
_PG_EPOCH_US = 946_684_800 * 1_000_000  # 2000-01-01 in Unix microseconds


def copy_out(conn, sql: str, params: dict, columns: dict[str, str]) -> dict[str, np.ndarray]:
    """The rows of a parameterised query (a SELECT, or an INSERT/UPDATE/DELETE … RETURNING)
    as arrays, one per column: ``columns`` maps each output column, in order, to its SQL type
    (int4, int8, float8 or timestamptz; no NULLs), or ``bytesN`` for a bytea of exactly N bytes
    in every row. Integers come back as int64, floats as float64, times as int64 microseconds
    since the Unix epoch (exact: no date_part per row in the query), bytes as an N-byte void
    array."""
    with conn.cursor() as cur:
        query = cur.mogrify(sql, params).decode()
        buf = io.BytesIO()
        cur.copy_expert(f"COPY ({query}) TO STDOUT WITH (FORMAT binary)", buf)
    data = buf.getvalue()
    header = len(_SIGNATURE) + 8 + int.from_bytes(data[15:19], "big")  # flags, extension
    fields = [("count", ">i2")]
    for k, (name, kind) in enumerate(columns.items()):
        fields += [(f"len{k}", ">i4"), (name, _field(kind))]
    row = np.dtype(fields)
    n = (len(data) - header - 2) // row.itemsize  # the data ends with a -1 trailer
    rows = np.frombuffer(data, dtype=row, count=n, offset=header)
    return {name: rows[name].copy() if kind.startswith("bytes") else
            rows[name].astype(np.int64) + _PG_EPOCH_US if kind == "timestamptz" else
            rows[name].astype(np.float64 if kind == "float8" else np.int64)
            for name, kind in columns.items()}


def _field(kind: str) -> str:
    return f"V{int(kind[5:])}" if kind.startswith("bytes") else _KINDS[kind]


def copy_in(cur, table: str, columns: dict[str, tuple[str, object]]) -> None:
    """One binary COPY of equal-length columns into ``table``: ``columns`` maps each column
    name (a constant of the caller's, never request text) to (SQL type, values): int4, int8,
    float8 (arrays), timestamptz (int64 microseconds since the Unix epoch), or text and jsonb
    (lists of str; no NULLs anywhere)."""
    n = len(next(iter(columns.values()))[1]) if columns else 0
    if not any(kind in _TEXT_KINDS for kind, _ in columns.values()):
        data = _fixed_rows(columns, n)
    else:
        data = _rows(columns, n)
    buf = io.BytesIO()
    buf.write(_SIGNATURE + (0).to_bytes(4, "big") + (0).to_bytes(4, "big"))
    buf.write(data)
    buf.write((-1).to_bytes(2, "big", signed=True))
    buf.seek(0)
    cur.copy_expert(f"COPY {table} ({', '.join(columns)}) FROM STDIN WITH (FORMAT binary)", buf)


_TEXT_KINDS = {"text": b"", "jsonb": b"\x01"}  # jsonb's binary form: a version byte, then the text


def _values(kind: str, values) -> np.ndarray:
    a = np.asarray(values)
    return a.astype(np.int64) - _PG_EPOCH_US if kind == "timestamptz" else a


def _fixed_rows(columns: dict[str, tuple[str, object]], n: int) -> bytes:
    """Rows of fixed-width fields only: one numpy structured array."""
    fields = [("count", ">i2")]
    for k, (name, (kind, _)) in enumerate(columns.items()):
        fields += [(f"len{k}", ">i4"), (name, _KINDS[kind])]
    rows = np.empty(n, dtype=np.dtype(fields))
    rows["count"] = len(columns)
    for k, (name, (kind, values)) in enumerate(columns.items()):
        rows[f"len{k}"] = np.dtype(_KINDS[kind]).itemsize
        rows[name] = _values(kind, values)
    return rows.tobytes()


def _rows(columns: dict[str, tuple[str, object]], n: int) -> bytes:
    """Rows with text fields: every field's bytes scattered into one buffer at its rows' offsets
    (each row's length known from its texts' lengths), no Python object per field. Why: the
    CSV writer and PostgreSQL's CSV parser cost a 50,000-prediction batch ~120 ms together."""
    parts = []  # per column: (length of each row's field, (n, width) bytes or a text blob)
    for kind, values in columns.values():
        if kind in _TEXT_KINDS:
            prefix = _TEXT_KINDS[kind]
            blob = "".join(values).encode("utf-8")
            lengths = np.fromiter(map(len, values), np.int64, n)
            if len(blob) != int(lengths.sum()):  # not ASCII: lengths in bytes, one by one
                lengths = np.fromiter((len(v.encode("utf-8")) for v in values), np.int64, n)
            parts.append((lengths + len(prefix), prefix, np.frombuffer(blob, np.uint8), lengths))
        else:
            width = np.dtype(_KINDS[kind]).itemsize
            raw = np.ascontiguousarray(_values(kind, values), dtype=_KINDS[kind]).view(np.uint8)
            parts.append((np.full(n, width, np.int64), None, raw.reshape(n, width), None))
    row_length = 2 + sum(4 + field for field, *_ in parts)
    starts = np.zeros(n, np.int64)
    np.cumsum(row_length[:-1], out=starts[1:])
    out = np.empty(int(starts[-1] + row_length[-1]) if n else 0, np.uint8)
    at = starts.copy()
    _scatter(out, at, np.full(n, len(columns), ">i2").view(np.uint8).reshape(n, 2))
    for field, prefix, data, text_lengths in parts:
        _scatter(out, at, field.astype(">i4").view(np.uint8).reshape(n, 4))
        if text_lengths is None:
            _scatter(out, at, data)
            continue
        if prefix:
            out[at] = prefix[0]
            at += 1
        first = np.zeros(n, np.int64)  # each row's first byte in the blob
        np.cumsum(text_lengths[:-1], out=first[1:])
        out[np.repeat(at - first, text_lengths) + np.arange(len(data))] = data
        at += text_lengths
    return out.tobytes()


def _scatter(out: np.ndarray, at: np.ndarray, data: np.ndarray) -> None:
    """Write row i's bytes ``data[i]`` (n x width) at ``out[at[i]:]`` and move ``at`` past them."""
    width = data.shape[1]
    out[at[:, None] + np.arange(width)] = data
    at += width


def staging_table(cur, name: str, columns: str, options: str = "") -> None:
    """A temporary table the session keeps (emptied at every commit) for a write batch's rows:
    made once per connection, not per batch (creating and dropping five temp tables cost a
    1,000-record batch ~10 ms of catalog writes, measured). ``name`` and ``columns`` are the
    caller's constants; a table whose columns follow a declaration has that declaration's
    digest in its name, so that a changed declaration gets a new table. Empty on return (an
    earlier batch of the same transaction may have left rows). ``options``: storage
    parameters (a WITH clause's contents)."""
    with_ = f" WITH ({options})" if options else ""
    cur.execute(f"CREATE TEMP TABLE IF NOT EXISTS {name} ({columns}){with_} ON COMMIT DELETE ROWS;"
                f" DELETE FROM {name}")
