"""The Flask application factory: settings, the connection pool, routes, JSON errors.

Every error leaves as JSON with a ``message``: a client mistake is a 4xx that
says what and where, a statement timeout is a 503, and nothing else is a 500
unless it is our bug.
"""

from __future__ import annotations

import logging

import psycopg2
import psycopg2.errors
from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from datasource import db, engine, exporter, http, maintenance, warmup
from datasource.config import Settings
from datasource.engine import ComputeTimeout
from datasource.errors import ClientError

log = logging.getLogger(__name__)


def create_app(config: dict | None = None) -> Flask:
    """Build the app. ``config`` overrides environment settings (tests pass DATABASE_URL here)."""
    settings = Settings.from_env(**(config or {}))
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False
    app.extensions["settings"] = settings

    http.init_app(app)  # NUL in a URL is a 400 on every endpoint
    engine.RAW_CACHE_STALE_S = float(settings.raw_cache_stale_s)  # the process's raw-path caches
    db.init_app(app, settings)  # pools and the readiness gate: starts with the database down

    from datasource import metrics
    from datasource.api import bp as api_bp
    from datasource.browser import bp as browser_bp
    from datasource.grafana import bp as grafana_bp
    from datasource.series import bp as series_bp

    metrics.load_user_modules(settings.metrics_modules)
    app.register_blueprint(api_bp)
    app.register_blueprint(grafana_bp)
    app.register_blueprint(series_bp)
    app.register_blueprint(browser_bp)
    exporter.init_app(app)  # GET /metrics for Prometheus, request counters
    maintenance.start(app.extensions["pool"], settings.retention)  # RETENTION; score-bin parts folded
    _register_errors(app)
    app.extensions["warm_up_ms"] = warmup.run(app)  # the first request's costs paid here
    return app


def _register_errors(app: Flask) -> None:
    @app.errorhandler(ClientError)
    def client_error(e: ClientError):
        return jsonify(e.to_json()), e.status

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        return jsonify({"message": e.description or e.name}), e.code

    @app.errorhandler(psycopg2.errors.QueryCanceled)
    def timeout(e):
        return jsonify({"message": "the query exceeded the statement timeout; "
                                   "narrow the time range or widen the step"}), 503

    @app.errorhandler(psycopg2.errors.SerializationFailure)  # 40001, e.g. a replica's
    @app.errorhandler(psycopg2.errors.DeadlockDetected)  # recovery conflict: retry later
    def transient(e):
        log.warning("transient database conflict: %s", str(e).splitlines()[0] if str(e) else e)
        return jsonify({"message": "the database cancelled the query (a conflict); retry"}), 503

    @app.errorhandler(ComputeTimeout)
    def compute_timeout(e):
        return jsonify({"message": f"{e}; narrow the time range, widen the step or "
                                   "use a mergeable metric"}), 503

    @app.errorhandler(psycopg2.OperationalError)
    def db_down(e):
        log.warning("database unavailable: %s", e)
        return jsonify({"message": "the database is unavailable"}), 503

    @app.errorhandler(Exception)
    def internal(e: Exception):
        log.exception("unhandled error")
        return jsonify({"message": f"internal error: {type(e).__name__}"}), 500
