"""Ingest HTTP API: models, predictions, feedback and events under /api/v1.

Routes only parse the body and call ``datasource.ingest``; one request is one
transaction. When INGEST_TOKEN is set, every write needs ``Authorization:
Bearer <token>``; reads stay open because Grafana proxies them.
"""

from __future__ import annotations

import hmac

from flask import Blueprint, current_app, jsonify, request

from datasource import fastparse, http, ingest
from datasource.records import BatchError

bp = Blueprint("api", __name__, url_prefix="/api/v1")

NDJSON_TYPES = http.NDJSON_TYPES


def _settings():
    return current_app.extensions["settings"]


def _pool():
    return current_app.extensions["pool"]


def _read_pool():
    """DATABASE_READ_URL's pool (a SELECT-only role) when set, else the read-write one."""
    return current_app.extensions.get("read_pool") or _pool()


def _require_token() -> None:
    """``Authorization: Bearer <token>``; the scheme is case-insensitive (RFC 7235), the token
    compared in constant time."""
    token = _settings().ingest_token
    if not token:
        return
    scheme, _, given = request.headers.get("Authorization", "").strip().partition(" ")
    ok = hmac.compare_digest(given.strip().encode(), token.encode())
    if scheme.lower() != "bearer" or not ok:
        raise BatchError("writes need 'Authorization: Bearer <INGEST_TOKEN>'", status=401)


def _json_body() -> object:
    return http.json_body(request)


def _batch_body(kind: str) -> tuple[object, object]:
    """(model, records) from a JSON object body or NDJSON lines with ?model=NAME.

    A JSON body goes through the fast path first (``datasource.fastparse``, unless
    FAST_PARSE=0): then the records are a ``FastBatch`` that ``ingest`` takes as they are."""
    if (request.mimetype or "") in http.NDJSON_TYPES:
        return request.args.get("model"), http.ndjson_lines(request)
    raw = http.body_bytes(request)
    if _settings().fast_parse:
        fast = fastparse.decode(kind, raw, _settings().max_batch_records)
        if fast is not None:
            return fast.model, fast
    body = http.loads(raw)
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
    return jsonify(ingest.model_json(model)), 201 if created else 200


@bp.get("/models")
def list_models():
    with _read_pool().connection() as conn:
        return jsonify([ingest.model_json(m) for m in ingest.list_models(conn)])


@bp.get("/models/<name>")
def get_model(name: str):
    with _read_pool().connection() as conn:
        return jsonify(ingest.model_summary(conn, name))


@bp.post("/predictions")
def write_predictions():
    _require_token()
    model, recs = _batch_body("predictions")
    with _pool().connection() as conn:
        n = ingest.write_predictions(conn, model, recs, _settings().max_batch_records)
    return jsonify({"written": n})


@bp.post("/feedback")
def write_feedback():
    _require_token()
    model, recs = _batch_body("feedback")
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
