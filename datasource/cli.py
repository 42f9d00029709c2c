"""``mlsli``: one command for what the repository's scripts do (installed by ``pip install .``).

``mlsli serve`` (gunicorn, or ``--dev`` for Flask's server), ``mlsli demo`` (loader.demo),
``mlsli load`` (the taxi loader, ``python -m loader``), ``mlsli migrate`` and ``mlsli retention``. ``demo`` and
``load`` hand every argument after them to those programs, ``--help`` included, so their help
stays the one source of their options.

Every command needs the server's dependencies (``pip install "mlsli[server]"``); on the base
install (requests only, for ``Client.remote``) they say so instead of a traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

COMMANDS = {
    "serve": "serve the datasource: gunicorn, or Flask's development server with --dev",
    "demo": "the whole stack without Docker: embedded PostgreSQL, the datasource, the replay",
    "load": "the NYC-taxi loader: generate, train, backfill, live, run (python -m loader)",
    "migrate": "apply the schema migrations to DATABASE_URL (or the embedded PostgreSQL), "
               "as the schema's owner",
    "retention": "drop the weeks of raw rows older than --days (RETENTION; the server also "
                 "does it hourly when RETENTION is set); the rollups stay",
}


# What the commands import (the [server] extra); the base install has none of them.
SERVER_MODULES = ("flask", "gunicorn", "psycopg2", "numpy", "pandas", "sklearn")


def missing_server_modules() -> list[str]:
    return [m for m in SERVER_MODULES if importlib.util.find_spec(m) is None]


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlsli", description="ML SLIs for Grafana, computed from predictions and feedback.",
        epilog="`mlsli COMMAND --help` describes each command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, text in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    return p


def serve(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mlsli serve", description=COMMANDS["serve"] + ".")
    p.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"),
                   help="address to listen on (default $HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8080")),
                   help="port (default $PORT or 8080)")
    p.add_argument("--workers", type=int, default=2, help="gunicorn workers (default 2)")
    p.add_argument("--threads", type=int, default=4, help="threads per worker (default 4)")
    p.add_argument("--dev", action="store_true",
                   help="Flask's development server instead of gunicorn (one process)")
    args = p.parse_args(argv)
    if args.dev:
        from datasource import create_app

        create_app().run(host=args.host, port=args.port, threaded=True)
        return 0
    # exec: signals (Ctrl-C, a supervisor's SIGTERM) reach gunicorn's master directly.
    cmd = [sys.executable, "-m", "gunicorn", "--workers", str(args.workers),
           "--threads", str(args.threads), "--timeout", "60", "--bind",
           f"[{args.host}]:{args.port}" if ":" in args.host else f"{args.host}:{args.port}",
           "--access-logfile", "-", "datasource:create_app()"]
    os.execv(sys.executable, cmd)
    return 0  # pragma: no cover - execv does not return


def migrate(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mlsli migrate", description=COMMANDS["migrate"] + ".")
    p.add_argument("--database-url", default=None,
                   help="PostgreSQL URL (default $DATABASE_URL; unset: the embedded server "
                        "under $DATA_DIR)")
    p.add_argument("--data-dir", default=None, help="embedded PostgreSQL's directory "
                                                     "(default $DATA_DIR or .data)")
    p.add_argument("--rw-role", default=None,
                   help="then grant this role read/write on every table (the server's role)")
    p.add_argument("--read-role", default=None, help="and this one SELECT only")
    args = p.parse_args(argv)
    from datasource import db
    from datasource.config import Settings

    settings = Settings.from_env(database_url=args.database_url, data_dir=args.data_dir)
    try:  # as the schema's owner: db.migrate, then the grants (datasource/roles.sql)
        applied = db.migrate_as_owner(settings.database_url, data_dir=settings.data_dir,
                                      rw_role=args.rw_role, read_role=args.read_role)
    finally:
        db.stop_embedded()
    print(f"applied {', '.join(applied)}" if applied else "the schema is up to date")
    return 0


def retention(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mlsli retention", description=COMMANDS["retention"] + ".")
    p.add_argument("--days", type=int, default=int(os.environ.get("RETENTION") or 0),
                   help="days of raw rows to keep (default $RETENTION; 0 keeps all)")
    p.add_argument("--database-url", default=None, help="PostgreSQL URL (default $DATABASE_URL; "
                                                        "unset: the embedded server)")
    args = p.parse_args(argv)
    from datasource import db, store
    from datasource.config import Settings

    settings = Settings.from_env(database_url=args.database_url)
    conn = db.connect(db.resolve_url(settings.database_url, settings.data_dir), statement_timeout_ms=0)
    try:
        n = store.apply_retention(conn, args.days)
        print(f"dropped {n} weekly partition(s); raw rows kept from {store.raw_horizon(conn)}")
    finally:
        conn.close()
        db.stop_embedded()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        _top_parser().parse_args(argv)  # prints the usage or the help, and exits
        return 2
    command, rest = argv[0], argv[1:]
    missing = missing_server_modules()
    if missing:
        print(f"mlsli {command} needs the server's dependencies ({', '.join(missing)} not "
              'installed): pip install "mlsli[server]" (from a clone: pip install ".[server]"). '
              "This install is the HTTP client's (datasource.client.Client.remote).",
              file=sys.stderr)
        return 1
    if command == "serve":
        return serve(rest)
    if command == "migrate":
        return migrate(rest)
    if command == "retention":
        return retention(rest)
    if command == "demo":
        from loader import demo

        return demo.main(rest, prog="mlsli demo")
    from loader.__main__ import main as load

    load(rest, prog="mlsli load")
    return 0


if __name__ == "__main__":
    sys.exit(main())
