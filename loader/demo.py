"""``make demo``: the whole stack on this machine, without Docker.

1. an embedded PostgreSQL under ``DATA_DIR/pg`` (kept between runs);
2. the datasource under gunicorn on ``http://HOST:PORT`` (2 workers x 4 threads);
3. the taxi replay: train on January 2020, backfill January-February as fast as the bulk
   path goes, then replay March onwards live at ``--speed`` data-seconds per second,
   through the datasource's ingest API (as a production writer would).

It prints the URL to add to an existing Grafana as a JSON datasource and how to import the
dashboards. Ctrl-C (or SIGTERM) stops the replay, then the datasource, then PostgreSQL.

The children run in their own process groups, so a Ctrl-C in the terminal reaches only this
process, which stops them in order; on Linux they also get SIGTERM if this process dies
without cleaning up (``PR_SET_PDEATHSIG``).

Settings: flags, else environment variables (so ``PORT=9090 make demo`` works): ``HOST``,
``PORT``, ``DATA_DIR``, ``DEMO_SCALE``, ``DEMO_SPEED``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = ("model-quality.json", "prometheus-replaced.json")
LIVE_FROM = "2020-03-01"  # backfill before this, replay live from it
UNTIL = "2020-06-01"


class Stop(Exception):
    """SIGTERM (or SIGINT) asked the demo to stop."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ
    p = argparse.ArgumentParser(prog="python -m loader.demo", description=__doc__.split("\n")[0])
    p.add_argument("--host", default=env.get("HOST", "127.0.0.1"),
                   help="address the datasource listens on (default $HOST or 127.0.0.1; "
                        "0.0.0.0 to reach it from a Grafana in Docker)")
    p.add_argument("--port", type=int, default=int(env.get("PORT", "8080")),
                   help="datasource port (default $PORT or 8080)")
    p.add_argument("--data-dir", type=Path, default=Path(env.get("DATA_DIR", ".data")),
                   help="embedded PostgreSQL, generated trips and the model (default $DATA_DIR "
                        "or .data)")
    p.add_argument("--scale", type=float, default=float(env.get("DEMO_SCALE", "0.005")),
                   help="synthetic taxi data, as a share of the real 2020 volume "
                        "(default $DEMO_SCALE or 0.005)")
    p.add_argument("--speed", type=float, default=float(env.get("DEMO_SPEED", "3600")),
                   help="live replay: seconds of 2020 per second (default $DEMO_SPEED or 3600, "
                        "an hour a second: March takes 12 minutes)")
    p.add_argument("--workers", type=int, default=2, help="gunicorn workers (default 2)")
    p.add_argument("--threads", type=int, default=4, help="threads per worker (default 4)")
    p.add_argument("--no-replay", action="store_true",
                   help="serve what the database holds; do not run the loader")
    return p.parse_args(argv)


# ----------------------------------------------------------------------- commands

def server_command(args) -> list[str]:
    return [sys.executable, "-m", "gunicorn", "--workers", str(args.workers),
            "--threads", str(args.threads), "--timeout", "60", "--graceful-timeout", "10",
            "--bind", f"{args.host}:{args.port}", "datasource:create_app()"]


def loader_commands(args, database_url: str, server_url: str) -> list[list[str]]:
    """The replay, as ``python -m loader`` steps run one after the other.

    ``backfill`` trains on January when no model is saved (recording a training event) and
    writes January-February through the bulk path; ``live`` resumes at the latest stored
    prediction (March 1st on a fresh store) and goes through the HTTP ingest API.
    """
    common = ["--data-dir", str(args.data_dir), "--scale", f"{args.scale:g}"]
    loader = [sys.executable, "-m", "loader"]
    return [
        [*loader, "backfill", *common, "--until", LIVE_FROM, "--no-progress",
         "--database-url", database_url],
        [*loader, "live", *common, "--start", LIVE_FROM, "--until", UNTIL,
         "--speed", f"{args.speed:g}", "--url", server_url],
    ]


# ----------------------------------------------------------------------- processes

def _child_setup() -> None:  # pragma: no cover - runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def spawn(cmd: list[str], env: dict, log=None) -> subprocess.Popen:
    """A child in its own process group (a terminal's Ctrl-C reaches only the demo)."""
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                            stdout=log, stderr=subprocess.STDOUT if log else None,
                            process_group=0, preexec_fn=_child_setup)


def stop(proc: subprocess.Popen | None, name: str, timeout: float) -> None:
    """SIGTERM the child's process group, wait, then SIGKILL it."""
    if proc is None or proc.poll() is not None:
        return
    print(f"stopping {name} ...", flush=True)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with contextlib.suppress(OSError, urllib.error.URLError):
            with urllib.request.urlopen(url + "/", timeout=2) as r:
                if r.status == 200:
                    return True
        time.sleep(0.3)
    return False


def _tail(path: Path, lines: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def instructions(args, url: str) -> str:
    boards = " and ".join(f"dashboards/{d}" for d in DASHBOARDS)
    reach = url if args.host not in ("0.0.0.0", "::") else f"http://<this machine>:{args.port}"
    return f"""
  datasource  {url}   (log: {args.data_dir / "datasource.log"})
  replay      taxi-high-tip: train on January 2020, backfill January-February, then live
              from {LIVE_FROM} at {args.speed:g} seconds of 2020 per second

To watch it in an existing Grafana (10 or newer) with the simpod-json-datasource plugin 0.6.5
(grafana cli plugins install simpod-json-datasource 0.6.5):
  1. Connections > Data sources > Add new data source > JSON (simpod-json-datasource)
       URL: {reach}   Access: Server (default)   > Save & test
     (Grafana in Docker: run the demo with --host 0.0.0.0 and use
      http://host.docker.internal:{args.port})
  2. Dashboards > New > Import > upload {boards};
     their "Datasource" dropdown picks that datasource.
  3. Open "Model quality": time range January to May 2020; the SLIs move as March replays.

Ctrl-C stops the replay, the datasource and PostgreSQL.
"""


# ----------------------------------------------------------------------- main

def _raise_stop(signum, frame):
    raise Stop(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.data_dir = args.data_dir.resolve()
    args.data_dir.mkdir(parents=True, exist_ok=True)
    # Handle both even when started with them ignored (a background job of a script).
    signal.signal(signal.SIGINT, _raise_stop)
    signal.signal(signal.SIGTERM, _raise_stop)

    from datasource import db

    server = None
    replay = None
    log = None
    try:
        print(f"starting PostgreSQL in {args.data_dir / 'pg'} ...", flush=True)
        database_url = db.embedded_url(args.data_dir)
        conn = db.connect(database_url, statement_timeout_ms=0)
        try:
            db.migrate(conn)
        finally:
            conn.close()

        env = {**os.environ, "DATABASE_URL": database_url, "DATA_DIR": str(args.data_dir),
               "PYTHONUNBUFFERED": "1"}
        env.pop("DATASOURCE_URL", None)
        url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
        log_path = args.data_dir / "datasource.log"
        log = open(log_path, "ab")  # noqa: SIM115 - closed in finally
        print(f"starting the datasource on {url} ...", flush=True)
        server = spawn(server_command(args), env, log)
        if not wait_healthy(url, server, timeout=60):
            print(f"the datasource did not start; the end of {log_path}:\n{_tail(log_path)}",
                  file=sys.stderr)
            return 1
        print(instructions(args, url), flush=True)

        steps = [] if args.no_replay else loader_commands(args, database_url, url)
        while True:
            if replay is None or replay.poll() is not None:
                if replay is not None and replay.returncode != 0:
                    print(f"the replay stopped with exit code {replay.returncode}; the "
                          "datasource keeps serving (Ctrl-C to stop)", flush=True)
                    steps = []
                if steps:
                    replay = spawn(steps.pop(0), env)
                elif replay is not None:
                    if replay.returncode == 0:
                        print("the replay is done; the datasource keeps serving "
                              "(Ctrl-C to stop)", flush=True)
                    replay = None
            if server.poll() is not None:
                print(f"the datasource exited ({server.returncode}); the end of "
                      f"{log_path}:\n{_tail(log_path)}", file=sys.stderr)
                return 1
            time.sleep(0.5)
    except (KeyboardInterrupt, Stop):
        print("\nstopping ...", flush=True)
        return 0
    finally:
        # A second Ctrl-C must not cut the shutdown short: it is bounded by the timeouts.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop(replay, "the replay", timeout=15)
        stop(server, "the datasource", timeout=20)
        if log is not None:
            log.close()
        print("stopping PostgreSQL ...", flush=True)
        db.stop_embedded()
        print("stopped.", flush=True)


if __name__ == "__main__":
    sys.exit(main())
