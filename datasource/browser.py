"""The SLI browser: one HTML page at ``GET /ui`` for looking at a model without Grafana.

Like Prometheus' graph page beside Grafana: pick model, metric, window, mode,
threshold and group-by, see the series, the headline SLIs over the window and
the confusion matrix of the range. The page is static (``static/browser/``:
plain HTML, CSS and JS, no build step, no CDN) and reads only the flat
endpoints (``/api/v1/series``, ``/api/v1/variables/<name>``,
``/api/v1/models/<name>``), so it shows exactly the numbers Grafana would.

``GET /`` stays the JSON health check the Grafana plugins call; ``wants_html``
lets it answer this page instead when a browser asks for HTML.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Request, Response, send_from_directory

STATIC = Path(__file__).resolve().parent / "static" / "browser"

bp = Blueprint("browser", __name__, static_folder=str(STATIC), static_url_path="/ui/static")


def wants_html(request: Request) -> bool:
    """True when the client's Accept ranks text/html above application/json.

    A browser sends ``text/html,...,*/*;q=0.8``; the plugins, curl and health
    probes send ``application/json``, ``*/*`` or nothing, and keep the JSON.
    """
    accept = request.accept_mimetypes
    return accept.quality("text/html") > accept.quality("application/json")


def page_response() -> Response:
    """The page itself. Its asset and API URLs are relative, so it works at ``/`` and ``/ui``
    and behind a proxy's path prefix; ``Vary: Accept`` because ``/`` also answers JSON."""
    response = send_from_directory(STATIC, "index.html", mimetype="text/html", max_age=0)
    response.headers["Cache-Control"] = "no-cache"
    response.vary.add("Accept")
    return response


@bp.get("/ui")
def page():
    return page_response()
