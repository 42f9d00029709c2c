"""Ingest HTTP API: models, predictions, feedback and events under /api/v1.

Routes only parse the body and call ``datasource.ingest``; one request is one
transaction. When INGEST_TOKEN is set, every write needs ``Authorization:
Bearer <token>``; reads stay open because Grafana proxies them.
"""

from __future__ import annotations

import hmac
import json

from flask import Blueprint, current_app, jsonify, request

from datasource import ingest, store
from datasource.records import BatchError

bp = Blueprint("api", __name__, url_prefix="/api/v1")

NDJSON_TYPES = ("application/x-ndjson", "application/ndjson", "application/jsonl")


def _settings():
    return current_app.extensions["settings"]


def _pool():
    return current_app.extensions["pool"]


def _require_token() -> None:
    token = _settings().ingest_token
    if not token:
        return
    given = request.headers.get("Authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        raise BatchError("writes need 'Authorization: Bearer <INGEST_TOKEN>'", status=401)


def _json_body() -> object:
    mimetype = request.mimetype or ""
    if mimetype != "application/json":
        raise BatchError(f"unsupported content type {mimetype or 'none'!r}; send application/json",
                         status=415)
    return _parse_json(request.get_data(cache=False))


def _parse_json(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" at line {e.lineno}, column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        raise BatchError(f"malformed JSON{where}: {getattr(e, 'msg', str(e))}") from None


def _batch_body() -> tuple[object, object]:
    """(model, records) from a JSON object body or NDJSON lines with ?model=NAME."""
    mimetype = request.mimetype or ""
    if mimetype in NDJSON_TYPES:
        recs = []
        for n, line in enumerate(request.get_data(cache=False).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                recs.append(json.loads(line))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise BatchError(f"malformed JSON on NDJSON line {n}: {getattr(e, 'msg', str(e))}",
                                 [{"index": len(recs), "field": "", "message": "malformed JSON"}]) from None
        return request.args.get("model"), recs
    body = _json_body()
    if not isinstance(body, dict):
        raise BatchError("body must be a JSON object {\"model\": NAME, \"records\": [...]}")
    if "records" not in body:
        raise BatchError("body lacks 'records'", [{"index": None, "field": "records", "message": "is missing"}])
    return body.get("model"), body["records"]


@bp.post("/models")
def register_model():
    _require_token()
    body = _json_body()
    with _pool().connection() as conn:
        model, created = ingest.register_model(conn, body)
    return jsonify(_model_json(model)), 201 if created else 200


def _model_json(model: store.Model) -> dict:
    return {"name": model.name, "task": model.task, "threshold": model.threshold,
            "description": model.description, "created_at": model.created_at.isoformat()}


@bp.get("/models")
def list_models():
    with _pool().connection() as conn:
        return jsonify([_model_json(m) for m in store.list_models(conn)])


@bp.get("/models/<name>")
def get_model(name: str):
    with _pool().connection() as conn:
        model = ingest.require_model(conn, name)
        counts = store.table_counts(conn, model)
        latest = store.latest_prediction_ts(conn, model)
    return jsonify({**_model_json(model), **counts,
                    "latest_prediction_ts": latest.isoformat() if latest else None})


@bp.post("/predictions")
def write_predictions():
    _require_token()
    model, recs = _batch_body()
    with _pool().connection() as conn:
        n = ingest.write_predictions(conn, model, recs, _settings().max_batch_records)
    return jsonify({"written": n})


@bp.post("/feedback")
def write_feedback():
    _require_token()
    model, recs = _batch_body()
    with _pool().connection() as conn:
        n = ingest.write_feedback(conn, model, recs, _settings().max_batch_records)
    return jsonify({"written": n})


@bp.post("/events")
def add_event():
    _require_token()
    body = _json_body()
    if not isinstance(body, dict):
        raise BatchError("body must be a JSON object")
    with _pool().connection() as conn:
        event_id = ingest.add_event(conn, body.get("model"), body)
    return jsonify({"event_id": event_id}), 201


@bp.post("/references")
def set_reference():
    """``{"model", "name": "training", "columns": {col: [values]}}``: replaces that reference."""
    _require_token()
    body = _json_body()
    if not isinstance(body, dict):
        raise BatchError("body must be a JSON object")
    with _pool().connection() as conn:
        n = ingest.set_reference(conn, body.get("model"), body)
    return jsonify({"columns": n}), 201
