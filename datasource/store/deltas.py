"""A write batch's deltas: what its rows add to every rollup level and score-bin level.

A batch replaces rows: the rows it removed count with sign -1, the rows it wrote with +1,
each with its label (NaN: none yet). The deltas are the declared per-row values
(``PARTIAL_ROWS``, ``BIN_ROWS``) summed per bucket and segment set, plus segment set 0 (all
segments), in numpy: the writer already holds the rows it wrote, and PostgreSQL returns the
rows it replaced. Every bucket a row touched gets a delta row, zeros included, so that its
write revision moves (cached results of that range are recomputed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from datasource.store.partials import (
    BIN_BASE_S,
    BIN_LEVELS,
    BIN_PARTIALS,
    BIN_ROWS,
    EPS,
    LEVELS,
    PARTIAL_ROWS,
    PARTIALS,
    Rows,
    bin_index,
)

_US = 1_000_000


@dataclass
class BatchRows:
    """Rows a batch removed (sign -1) and wrote (+1): time (µs since the epoch), score,
    segment set and label (NaN where none)."""

    sign: np.ndarray
    ts_us: np.ndarray
    score: np.ndarray
    segset_id: np.ndarray
    label: np.ndarray

    @classmethod
    def of(cls, sign: float, ts_us, score, segset_id, label) -> BatchRows:
        n = len(ts_us)
        return cls(np.full(n, float(sign)), np.asarray(ts_us, np.int64), np.asarray(score, np.float64),
                   np.asarray(segset_id, np.int64), np.asarray(label, np.float64))

    @classmethod
    def concat(cls, parts: list[BatchRows]) -> BatchRows:
        return cls(*(np.concatenate([getattr(p, f) for p in parts])
                     for f in ("sign", "ts_us", "score", "segset_id", "label")))

    def __len__(self) -> int:
        return len(self.ts_us)


def bucket_end(ts_us: np.ndarray, width: int) -> np.ndarray:
    """The end (epoch s) of the width-second bucket holding each time: ceil(t / width) * width,
    as the SQL's ``raw_bucket`` (exact, in integers)."""
    return -(-ts_us // (width * _US)) * width


def group_sum(records: dict[str, np.ndarray], keys: list[str], names: list[str]) -> dict[str, np.ndarray]:
    """Sums of ``names`` per distinct ``keys`` (sorted by them): one sort, or none when the
    records already come in key order (a read's order, whose bucket ends were rounded up)."""
    cols = [records[k] for k in keys]
    if len(cols[0]) == 0:
        return {**{k: c for k, c in zip(keys, cols, strict=True)}, **{n: records[n] for n in names}}
    in_order = True
    earlier_equal = np.ones(len(cols[0]) - 1, dtype=bool)
    for c in cols:  # lexicographic order: each key ascending where the keys before it tie
        step = np.diff(c)
        if np.any(earlier_equal & (step < 0)):
            in_order = False
            break
        earlier_equal &= step == 0
    if not in_order:
        order = np.lexsort(cols[::-1])
        cols = [c[order] for c in cols]
        values = {n: records[n][order] for n in names}
    else:
        values = {n: records[n] for n in names}
    change = np.zeros(len(cols[0]), dtype=bool)
    change[0] = True
    for c in cols:
        change[1:] |= c[1:] != c[:-1]
    starts = np.flatnonzero(change)
    out = {k: c[starts] for k, c in zip(keys, cols, strict=True)}
    out.update({n: np.add.reduceat(v, starts) for n, v in values.items()})
    return out


def _with_all_segments(per_segset: dict[str, np.ndarray], keys: list[str], names: list[str]) -> dict[str, np.ndarray]:
    """Per-segment-set sums plus their totals as segment set 0 (the all-segments rows)."""
    total = group_sum(per_segset, keys[1:], names)
    total["segset_id"] = np.zeros(len(total[names[0]]), np.int64)
    return {c: np.concatenate([per_segset[c], total[c]]) for c in keys + names}


def _values(rows: BatchRows, forms: dict, names: list[str], thr: float | None) -> dict[str, np.ndarray]:
    r = Rows(rows.score, rows.label, thr, EPS)
    return {n: rows.sign * forms[n](r) for n in names}


def partial_names() -> list[str]:
    """The declared partials, each with its per-row form (a partial declared in SQL alone
    could be rebuilt but not kept up to date: refused)."""
    missing = sorted(set(PARTIALS) - set(PARTIAL_ROWS))
    if missing:
        raise RuntimeError(f"partials {missing} have no per-row form in PARTIAL_ROWS")
    return list(PARTIALS)


def rollup_levels(rows: BatchRows, thr: float | None) -> dict[int, dict[str, np.ndarray]]:
    """Per rollup level (``LEVELS``): segset_id, bucket_end and the partials' deltas, one row
    per (segment set, bucket) the rows touched, segment set 0 included."""
    names = partial_names()
    keys = ["segset_id", "bucket_end"]
    minute = group_sum({"segset_id": rows.segset_id, "bucket_end": bucket_end(rows.ts_us, LEVELS[0]),
                        **_values(rows, PARTIAL_ROWS, names, thr)}, keys, names)
    out = {LEVELS[0]: _with_all_segments(minute, keys, names)}
    for width in LEVELS[1:]:
        coarse = {**minute, "bucket_end": -(-minute["bucket_end"] // width) * width}
        out[width] = _with_all_segments(group_sum(coarse, keys, names), keys, names)
    return out


def bin_levels(rows: BatchRows) -> dict[int, dict[str, np.ndarray]]:
    """Per score-bin level (``BIN_LEVELS``): segset_id, bucket_end, bin and the bin partials'
    deltas (records as ``bins.merge`` takes them), segment set 0 included."""
    names = list(BIN_PARTIALS)
    keys = ["segset_id", "bucket_end", "bin"]
    base = group_sum({"segset_id": rows.segset_id, "bucket_end": bucket_end(rows.ts_us, BIN_BASE_S),
                      "bin": bin_index(rows.score), **_values(rows, BIN_ROWS, names, None)}, keys, names)
    out = {}
    for width in BIN_LEVELS:
        level = base if width == BIN_BASE_S else group_sum(
            {**base, "bucket_end": -(-base["bucket_end"] // width) * width}, keys, names)
        out[width] = _with_all_segments(level, keys, names)
    return out
