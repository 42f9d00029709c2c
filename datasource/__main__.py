"""``python -m datasource``: the development server (production: gunicorn)."""

from __future__ import annotations

import argparse
import os

from datasource import create_app


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve ML SLIs to Grafana (JSON datasource protocol).")
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8080")))
    args = parser.parse_args()
    app = create_app()
    app.run(host=args.host, port=args.port, threaded=True)


if __name__ == "__main__":
    main()
