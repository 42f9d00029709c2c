"""ML SLIs for Grafana: predictions joined with delayed feedback, over any window.

``create_app()`` builds the Flask server (``gunicorn "datasource:create_app()"``).
"""

from datasource.app import create_app

__all__ = ["create_app"]
