"""ML SLIs for Grafana: predictions joined with delayed feedback, over any window.

``create_app()`` builds the Flask server (``gunicorn "datasource:create_app()"``). It is
imported on first use, so ``import datasource.client`` for ``Client.remote`` needs only
``requests`` (the base install); the server needs ``pip install "mlsli[server]"``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from datasource.app import create_app

__all__ = ["create_app"]


def __getattr__(name: str):
    if name == "create_app":  # `from datasource import create_app`, gunicorn's datasource:create_app()
        from datasource.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
