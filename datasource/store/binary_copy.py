"""Columns of numbers in and out of PostgreSQL by binary COPY, laid out with numpy.

Why: a write batch sends thousands of delta rows and reads back the rows it replaced, and a
panel reads hundreds of thousands of raw rows. In binary COPY every non-null int8/float8
field has the same width, so a whole result is one numpy structured array: no text is
formatted or parsed, no Python object per value (several times faster than tuples or CSV).
Only fixed-width, non-null columns: callers ``coalesce`` a NULL to NaN in SQL.
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


def copy_in(cur, table: str, columns: dict[str, tuple[str, np.ndarray]]) -> None:
    """One binary COPY of equal-length arrays into ``table``: ``columns`` maps each column
    name (a constant of the caller's, never request text) to (SQL type, values)."""
    kinds = [(name, _KINDS[kind]) for name, (kind, _) in columns.items()]
    n = len(next(iter(columns.values()))[1]) if columns else 0
    fields = [("count", ">i2")]
    for k, (name, kind) in enumerate(kinds):
        fields += [(f"len{k}", ">i4"), (name, kind)]
    rows = np.empty(n, dtype=np.dtype(fields))
    rows["count"] = len(kinds)
    for k, (name, kind) in enumerate(kinds):
        rows[f"len{k}"] = np.dtype(kind).itemsize
        rows[name] = columns[name][1]
    buf = io.BytesIO()
    buf.write(_SIGNATURE + (0).to_bytes(4, "big") + (0).to_bytes(4, "big"))
    buf.write(rows.tobytes())
    buf.write((-1).to_bytes(2, "big", signed=True))
    buf.seek(0)
    cur.copy_expert(f"COPY {table} ({', '.join(columns)}) FROM STDIN WITH (FORMAT binary)", buf)


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
