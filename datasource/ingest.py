"""The write service shared by the HTTP API and the bulk client.

Both paths call these functions with an open connection, so validation,
upsert semantics and rollup upkeep are identical whichever way data arrives.
The caller owns the transaction: one batch, one commit, nothing half-written.
"""

from __future__ import annotations

from datetime import datetime

from datasource import fastparse, records, store


def require_model(conn, name: object) -> store.Model:
    if not isinstance(name, str) or not name:
        raise records.BatchError("'model' must name a registered model", [
            {"index": None, "field": "model", "message": "is missing"}])
    model = store.get_model(conn, name)
    if model is None:
        raise records.BatchError(f"unknown model {name!r}; register it with POST /api/v1/models", [
            {"index": None, "field": "model", "message": f"unknown model {name!r}"}], status=404)
    return model


def register_model(conn, body: object) -> tuple[store.Model, bool]:
    spec = records.parse_model(body)
    try:
        return store.upsert_model(conn, spec)
    except ValueError as e:
        raise records.BatchError(str(e), [{"index": None, "field": "task", "message": str(e)}],
                                 status=409) from None


KINDS = ("predictions", "feedback")


def parse_batch(kind: str, model: store.Model, recs: object, max_records: int,
                python_records: bool = False):
    """Validate one batch of ``kind`` records for ``model`` (no database work: the bulk client
    runs it in a thread while PostgreSQL writes the previous batch).

    ``recs`` is a list of records, or a ``fastparse.FastBatch`` decoded from an HTTP body:
    its rows when they are valid for the model's task, else records.py on its records.
    ``python_records``: a list the caller built (the bulk client's) goes through the fast
    path too (``fastparse.from_objects``); an HTTP body's list is one the fast path refused."""
    fast = None
    if isinstance(recs, fastparse.FastBatch):
        fast, recs = recs, None
    elif python_records:
        fast = fastparse.from_objects(kind, recs, max_records)
    rows = None if fast is None else fast.rows_for(model.task)
    if rows is not None:
        return rows
    if recs is None:
        recs = fast.records()
    parse = records.parse_predictions if kind == "predictions" else records.parse_feedback
    return parse(recs, model.task, max_records)


def write_rows(conn, kind: str, model: store.Model, rows, shared: bool = False) -> int:
    """Upsert validated rows with rollup upkeep, in the caller's transaction (``shared``: the
    bulk client's concurrent batches, ``store.locks``)."""
    write = store.write_predictions if kind == "predictions" else store.write_feedback
    return write(conn, model, rows, shared)


def write_batch(conn, kind: str, model_name: object, recs: object, max_records: int) -> int:
    model = require_model(conn, model_name)
    return write_rows(conn, kind, model, parse_batch(kind, model, recs, max_records))


def write_predictions(conn, model_name: object, recs: object, max_records: int) -> int:
    return write_batch(conn, "predictions", model_name, recs, max_records)


def write_feedback(conn, model_name: object, recs: object, max_records: int) -> int:
    return write_batch(conn, "feedback", model_name, recs, max_records)


def add_event(conn, model_name: object, body: dict) -> int:
    model = require_model(conn, model_name)
    errors = []
    try:
        ts = records.parse_ts(body.get("ts"))
    except ValueError as e:
        errors.append({"index": None, "field": "ts", "message": str(e)})
    time_end = None
    if body.get("time_end") is not None:
        try:
            time_end = records.parse_ts(body["time_end"])
        except ValueError as e:
            errors.append({"index": None, "field": "time_end", "message": str(e)})
    title = body.get("title")
    if not isinstance(title, str) or not title or len(title) > 200:
        errors.append({"index": None, "field": "title", "message": "must be 1 to 200 characters"})
    text = body.get("text", "")
    tags = body.get("tags", [])
    kind = body.get("kind", "event")
    if not isinstance(text, str) or len(text) > 10_000:
        errors.append({"index": None, "field": "text", "message": "must be a string of at most 10000 characters"})
    if not isinstance(tags, list) or not all(isinstance(t, str) and len(t) <= 64 for t in tags):
        errors.append({"index": None, "field": "tags", "message": "must be a list of short strings"})
    if not isinstance(kind, str) or not kind or len(kind) > 32:
        errors.append({"index": None, "field": "kind", "message": "must be 1 to 32 characters"})
    if errors:
        raise records.BatchError("invalid event", errors)
    return store.add_event(conn, model.model_id, ts, title, text, time_end=time_end,
                           kind=kind, tags=tags)


def set_reference(conn, model_name: object, body: object) -> int:
    """Store a named reference distribution (the loader stores the training data's)."""
    model = require_model(conn, model_name)
    name, columns = records.parse_reference(body)
    return store.set_reference(conn, model, name, columns)


def latest_prediction_ts(conn, model_name: str) -> datetime | None:
    return store.latest_prediction_ts(conn, require_model(conn, model_name))


def model_json(model: store.Model) -> dict:
    """A model as the API shows it."""
    return {"name": model.name, "task": model.task, "threshold": model.threshold,
            "description": model.description, "created_at": model.created_at.isoformat()}


def list_models(conn) -> list[store.Model]:
    return store.list_models(conn)


def model_summary(conn, name: object) -> dict:
    """One model with its row counts and latest prediction time (404 when unknown)."""
    model = require_model(conn, name)
    latest = store.latest_prediction_ts(conn, model)
    return {**model_json(model), **store.table_counts(conn, model),
            "latest_prediction_ts": latest.isoformat() if latest else None,
            "retention": store.retention_status(conn, model.model_id)}
