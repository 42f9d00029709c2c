"""Models, segment sets, model events and reference distributions: what the data is about."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import msgspec
import numpy as np

from datasource.records import ModelSpec


@dataclass(frozen=True)
class Model:
    model_id: int
    name: str
    task: str
    threshold: float | None
    description: str
    created_at: datetime

    @property
    def is_classifier(self) -> bool:
        return self.task == "binary_classification"


# --------------------------------------------------------------------------- models

_MODEL_COLS = "model_id, name, task, threshold, description, created_at"


def get_model(conn, name: str) -> Model | None:
    with conn.cursor() as cur:
        cur.execute(f"SELECT {_MODEL_COLS} FROM models WHERE name = %(n)s", {"n": name})
        row = cur.fetchone()
    return Model(*row) if row else None


def list_models(conn) -> list[Model]:
    with conn.cursor() as cur:
        cur.execute(f"SELECT {_MODEL_COLS} FROM models ORDER BY name")
        return [Model(*r) for r in cur.fetchall()]


def upsert_model(conn, spec: ModelSpec) -> tuple[Model, bool]:
    """Register or update a model; returns (model, created).

    Changing the task of a model that has predictions is refused (ValueError);
    changing the threshold rebuilds its rollup, whose confusion counts depend on it.
    """
    old = get_model(conn, spec.name)
    with conn.cursor() as cur:
        if old is None:
            cur.execute(
                "INSERT INTO models (name, task, threshold, description)"
                " VALUES (%(name)s, %(task)s, %(thr)s, %(d)s) RETURNING model_id",
                {"name": spec.name, "task": spec.task, "thr": spec.threshold, "d": spec.description},
            )
            model = get_model(conn, spec.name)
            add_event(conn, model.model_id, model.created_at, "Model registered",
                      f"task={spec.task} threshold={spec.threshold}", kind="registration",
                      tags=["registration"])
            return model, True
        if old.task != spec.task:
            cur.execute("SELECT 1 FROM predictions WHERE model_id = %(m)s LIMIT 1", {"m": old.model_id})
            if cur.fetchone():
                raise ValueError(f"model {spec.name!r} has predictions as {old.task}; its task cannot change")
        cur.execute(
            "UPDATE models SET task = %(task)s, threshold = %(thr)s, description = %(d)s,"
            " updated_at = now() WHERE model_id = %(m)s",
            {"task": spec.task, "thr": spec.threshold, "d": spec.description, "m": old.model_id},
        )
    model = get_model(conn, spec.name)
    if model.threshold != old.threshold:  # the threshold-dependent partials change
        from datasource.store.writes import rebuild_rollup  # writes builds on the catalog

        rebuild_rollup(conn, model)
    return model, False


# --------------------------------------------------------------------------- events


def add_event(conn, model_id: int, ts: datetime, title: str, text: str = "", *,
              time_end: datetime | None = None, kind: str = "event",
              tags: Sequence[str] = ()) -> int:
    """Record an event; the same (kind, ts, title) again updates it instead of adding a twin,
    so that replays may record their events on every run."""
    params = {"m": model_id, "ts": ts, "te": time_end, "k": kind, "ti": title, "tx": text,
              "tags": list(tags)}
    with conn.cursor() as cur:
        cur.execute(
            "UPDATE model_events SET time_end = %(te)s, text = %(tx)s, tags = %(tags)s"
            " WHERE model_id = %(m)s AND kind = %(k)s AND ts = %(ts)s AND title = %(ti)s"
            " RETURNING event_id", params)
        row = cur.fetchone()
        if row is None:
            cur.execute(
                "INSERT INTO model_events (model_id, ts, time_end, kind, title, text, tags)"
                " VALUES (%(m)s, %(ts)s, %(te)s, %(k)s, %(ti)s, %(tx)s, %(tags)s) RETURNING event_id",
                params)
            row = cur.fetchone()
        return row[0]


def list_events(conn, model_ids: Sequence[int], start: datetime, end: datetime) -> list[tuple]:
    """Events overlapping [start, end]: (ts, time_end, title, text, tags, model name)."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT e.ts, e.time_end, e.title, e.text, e.tags, m.name FROM model_events e"
            " JOIN models m USING (model_id)"
            " WHERE e.model_id = ANY(%(ids)s) AND e.ts <= %(end)s"
            " AND coalesce(e.time_end, e.ts) >= %(start)s ORDER BY e.ts",
            {"ids": list(model_ids), "start": start, "end": end},
        )
        return cur.fetchall()


# --------------------------------------------------------------------------- segments


def segment_sets(conn, model_id: int) -> dict[int, dict]:
    """segset_id -> segments dict for a model (a small table: one row per combination)."""
    with conn.cursor() as cur:
        cur.execute("SELECT segset_id, segments FROM segment_sets WHERE model_id = %(m)s",
                    {"m": model_id})
        return dict(cur.fetchall())


_ENCODE = msgspec.json.Encoder(enc_hook=str).encode  # a str subclass (numpy.str_) as its text


def _segset_ids(conn, model_id: int, segments: list[dict]) -> list[int]:
    """Ids for each segments dict, creating the combinations not seen before."""

    # each dict as msgspec writes it, in its own key order (0.1 µs a record; a sorted tuple of
    # its pairs took 0.8): the canonical text is made once per distinct key, and two orders of
    # the same pairs get one text, so one segment set
    keys = list(map(_ENCODE, segments))
    distinct = {k: json.dumps(json.loads(k), sort_keys=True, separators=(",", ":")) for k in set(keys)}
    texts = sorted(set(distinct.values()))
    with conn.cursor() as cur:
        cur.execute(
            "INSERT INTO segment_sets (model_id, segments)"
            " SELECT %(m)s, s::jsonb FROM unnest(%(s)s::text[]) AS s"
            " ON CONFLICT (model_id, segments) DO NOTHING",
            {"m": model_id, "s": texts},
        )
        cur.execute(
            "SELECT s, ss.segset_id FROM unnest(%(s)s::text[]) AS s"
            " JOIN segment_sets ss ON ss.model_id = %(m)s AND ss.segments = s::jsonb",
            {"m": model_id, "s": texts},
        )
        ids = dict(cur.fetchall())
    by_key = {k: ids[text] for k, text in distinct.items()}
    return list(map(by_key.__getitem__, keys))


def feature_names(conn, model: Model) -> list[str]:
    with conn.cursor() as cur:
        cur.execute("SELECT name FROM model_features WHERE model_id = %(m)s ORDER BY name",
                    {"m": model.model_id})
        return [r[0] for r in cur.fetchall()]


def set_reference(conn, model: Model, reference: str, columns: dict[str, list]) -> int:
    """Store (replace) a named reference distribution, one array per column."""
    with conn.cursor() as cur:
        cur.execute("DELETE FROM reference_columns WHERE model_id = %(m)s AND reference = %(r)s",
                    {"m": model.model_id, "r": reference})
        for name, values in columns.items():
            numeric = all(isinstance(v, float) for v in values)
            cur.execute(
                "INSERT INTO reference_columns (model_id, reference, column_name, num_values, cat_values)"
                " VALUES (%(m)s, %(r)s, %(c)s, %(num)s, %(cat)s)",
                {"m": model.model_id, "r": reference, "c": name,
                 "num": values if numeric else None, "cat": None if numeric else values})
    return len(columns)


def reference_names(conn, model: Model) -> list[str]:
    with conn.cursor() as cur:
        cur.execute("SELECT DISTINCT reference FROM reference_columns WHERE model_id = %(m)s"
                    " ORDER BY 1", {"m": model.model_id})
        return [r[0] for r in cur.fetchall()]


def reference_column(conn, model: Model, reference: str, column: str):
    """A stored reference column: float ndarray, list of str, or None when absent."""
    with conn.cursor() as cur:
        cur.execute("SELECT num_values, cat_values FROM reference_columns"
                    " WHERE model_id = %(m)s AND reference = %(r)s AND column_name = %(c)s",
                    {"m": model.model_id, "r": reference, "c": column})
        row = cur.fetchone()
    if row is None:
        return None
    num, cat = row
    return np.asarray(num, dtype=np.float64) if num is not None else cat
