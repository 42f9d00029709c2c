"""``make demo``: the whole stack on this machine, without Docker.

1. an embedded PostgreSQL under ``DATA_DIR/pg`` (kept between runs);
2. the datasource under gunicorn on ``http://HOST:PORT`` (2 workers x 4 threads);
3. the taxi replay: train on January 2020, backfill January-February as fast as the bulk
   path goes, then replay March onwards live at ``--speed`` data-seconds per second,
   through the datasource's ingest API (as a production writer would).

It prints the URL to add to an existing Grafana as a JSON datasource and how to import the
dashboards. Ctrl-C, SIGTERM or a hang-up (SIGHUP: the terminal closed) stops the replay,
then the datasource, then PostgreSQL.

The children run in their own process groups, so a Ctrl-C in the terminal reaches only this
process, which stops them in order; on Linux they also get SIGTERM if this process dies
without cleaning up (``PR_SET_PDEATHSIG``). PostgreSQL is not a child (pg_ctl daemonizes it),
so only this process's shutdown stops it: hence SIGHUP is handled too, and printing to a
terminal that is gone cannot cut the shutdown short.

The port is bound here, before PostgreSQL starts, and handed to gunicorn as a file
descriptor: a busy port is reported at once, and whatever answers on it afterwards is ours
(another server holding the port would otherwise answer the health check).

Settings: flags, else environment variables (so ``PORT=9090 make demo`` works): ``HOST``,
``PORT``, ``DATA_DIR``, ``DEMO_SCALE``, ``DEMO_SPEED``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import json
import os
import signal
import socket
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


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Stop(Exception):
    """SIGINT, SIGTERM or SIGHUP asked the demo to stop."""


class PortBusy(Exception):
    """The datasource's port is taken by another process."""


def say(*args, file=None) -> None:
    """print, but a terminal that hung up (EIO) or a closed pipe must not stop the shutdown."""
    with contextlib.suppress(OSError, ValueError):
        print(*args, file=file or sys.stdout, flush=True)


def parse_args(argv: list[str] | None = None, prog: str = "python -m loader.demo"
               ) -> argparse.Namespace:
    env = os.environ
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
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

def server_command(args, fd: int | None = None) -> list[str]:
    """gunicorn on the socket ``fd`` the demo bound (``bind_port``), else on HOST:PORT."""
    bind = f"fd://{fd}" if fd is not None else f"{args.host}:{args.port}"
    return [sys.executable, "-m", "gunicorn", "--workers", str(args.workers),
            "--threads", str(args.threads), "--timeout", "60", "--graceful-timeout", "10",
            "--bind", bind, "datasource:create_app()"]


def bind_port(host: str, port: int) -> socket.socket:
    """A listening socket on host:port for gunicorn (``fd://``); PortBusy when it is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # SO_REUSEADDR only skips TIME_WAIT leftovers of our last run; a live listener still
        # makes bind fail with EADDRINUSE on Linux
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortBusy(f"port {port} on {host} is busy: another process listens on it "
                           f"(see `ss -ltnp 'sport = :{port}'`); stop it or choose another "
                           "port with --port or PORT=...") from None
        raise
    return sock


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


def spawn(cmd: list[str], env: dict, log=None, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
    """A child in its own process group (a terminal's Ctrl-C reaches only the demo)."""
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                            stdout=log, stderr=subprocess.STDOUT if log else None,
                            process_group=0, preexec_fn=_child_setup, pass_fds=pass_fds)


def stop(proc: subprocess.Popen | None, name: str, timeout: float) -> None:
    """SIGTERM the child's process group, wait, then SIGKILL it."""
    if proc is None or proc.poll() is not None:
        return
    say(f"stopping {name} ...")
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def is_ours(status: int, headers, body: bytes) -> bool:
    """Whether GET / answered like this project's datasource: 200, gunicorn, its health JSON."""
    if status != 200 or not str(headers.get("Server", "")).startswith("gunicorn"):
        return False
    try:
        health = json.loads(body)
    except ValueError:
        return False
    return isinstance(health, dict) and health.get("status") == "ok"


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with contextlib.suppress(OSError, urllib.error.URLError):
            with urllib.request.urlopen(url + "/", timeout=2) as r:
                if is_ours(r.status, r.headers, r.read()):
                    return True
        time.sleep(0.3)
    return False


def _tail(path: Path, lines: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def instructions(args, url: str) -> str:
    where = "dashboards" if Path.cwd() == ROOT else ROOT / "dashboards"
    if not (ROOT / "dashboards").is_dir():  # installed with pip: the repository has them
        where = "dashboards (in the mlsli repository)"
    boards = " and ".join(f"{where}/{d}" for d in DASHBOARDS)
    reach = url if args.host not in ("0.0.0.0", "::") else f"http://<this machine>:{args.port}"
    infinity = " and ".join(f"{where}/infinity/{d}" for d in DASHBOARDS)
    return f"""
  SLI browser {reach}/   (open it in a browser)
  datasource  {url}   (log: {args.data_dir / "datasource.log"})
  replay      taxi-high-tip: train on January 2020, backfill January-February, then live
              from {LIVE_FROM} at {args.speed:g} seconds of 2020 per second

To watch it in an existing Grafana 12 (or 11.6+) with the Infinity datasource 3.11.1
(grafana cli plugins install yesoreyeram-infinity-datasource 3.11.1):
  1. Connections > Data sources > Add new data source > Infinity
       Base URL: {reach}   Allowed hosts: {reach}   > Save & test
     (Grafana in Docker: run the demo with --host 0.0.0.0 and use
      http://host.docker.internal:{args.port})
  2. Dashboards > New > Import > upload {infinity};
     their "Datasource" dropdown picks that datasource.
  3. Open "Model quality": time range January to May 2020; the SLIs move as March replays.
In Grafana 10-11, the same with the JSON datasource (simpod-json-datasource 0.6.5, URL {reach},
Access: Server) and {boards}.

Ctrl-C (or closing the terminal) stops the replay, the datasource and PostgreSQL.
"""


# ----------------------------------------------------------------------- main

def _raise_stop(signum, frame):
    raise Stop(signal.Signals(signum).name)


def main(argv: list[str] | None = None, prog: str = "python -m loader.demo") -> int:
    args = parse_args(argv, prog)
    args.data_dir = args.data_dir.resolve()
    args.data_dir.mkdir(parents=True, exist_ok=True)
    # Handle them even when started with them ignored (a background job of a script).
    for sig in STOP_SIGNALS:
        signal.signal(sig, _raise_stop)

    server = None
    replay = None
    log = None
    listener = None
    started = False  # PostgreSQL (or its start) under way: stop it whatever happens next
    try:
        try:  # first of all, before the slow imports: a busy port fails at once
            listener = bind_port(args.host, args.port)
        except (PortBusy, OSError) as exc:
            say(f"error: {exc}", file=sys.stderr)
            return 1
        from datasource import client

        say(f"starting PostgreSQL in {args.data_dir / 'pg'} ...")
        started = True
        database_url = client.start_embedded(args.data_dir)  # migrated

        env = {**os.environ, "DATABASE_URL": database_url, "DATA_DIR": str(args.data_dir),
               "PYTHONUNBUFFERED": "1"}
        env.pop("DATASOURCE_URL", None)
        url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
        log_path = args.data_dir / "datasource.log"
        log = open(log_path, "ab")  # noqa: SIM115 - closed in finally
        say(f"starting the datasource on {url} ...")
        fd = listener.fileno()
        server = spawn(server_command(args, fd), env, log, pass_fds=(fd,))
        listener.close()  # gunicorn holds the port now
        listener = None
        if not wait_healthy(url, server, timeout=60):
            say(f"the datasource did not start; the end of {log_path}:\n{_tail(log_path)}",
                file=sys.stderr)
            return 1
        say(instructions(args, url))

        steps = [] if args.no_replay else loader_commands(args, database_url, url)
        while True:
            if replay is None or replay.poll() is not None:
                if replay is not None and replay.returncode != 0:
                    say(f"the replay stopped with exit code {replay.returncode}; the "
                        "datasource keeps serving (Ctrl-C to stop)")
                    steps = []
                if steps:
                    replay = spawn(steps.pop(0), env)
                elif replay is not None:
                    if replay.returncode == 0:
                        say("the replay is done; the datasource keeps serving "
                            "(Ctrl-C to stop)")
                    replay = None
            if server.poll() is not None:
                say(f"the datasource exited ({server.returncode}); the end of "
                    f"{log_path}:\n{_tail(log_path)}", file=sys.stderr)
                return 1
            time.sleep(0.5)
    except (KeyboardInterrupt, Stop) as exc:
        say(f"\nstopping ({exc or 'SIGINT'}) ...")
        return 0
    finally:
        # A second Ctrl-C must not cut the shutdown short: it is bounded by the timeouts.
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        if listener is not None:
            listener.close()
        stop(replay, "the replay", timeout=15)
        stop(server, "the datasource", timeout=20)
        if log is not None:
            log.close()
        if started:
            say("stopping PostgreSQL ...")
            client.stop_embedded()
            say("stopped.")


if __name__ == "__main__":
    sys.exit(main())
