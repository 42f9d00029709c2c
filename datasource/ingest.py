"""The write service shared by the HTTP API and the bulk client.

Both paths call these functions with an open connection, so validation,
upsert semantics and rollup upkeep are identical whichever way data arrives.
The caller owns the transaction: one batch, one commit, nothing half-written.
"""

from __future__ import annotations

from datetime import datetime

from datasource import records, store


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


def write_predictions(conn, model_name: object, recs: object, max_records: int) -> int:
    model = require_model(conn, model_name)
    rows = records.parse_predictions(recs, model.task, max_records)
    return store.write_predictions(conn, model, rows)


def write_feedback(conn, model_name: object, recs: object, max_records: int) -> int:
    model = require_model(conn, model_name)
    rows = records.parse_feedback(recs, model.task, max_records)
    return store.write_feedback(conn, model, rows)


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
