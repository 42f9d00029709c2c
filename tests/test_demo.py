"""``make demo`` end to end: it starts, the loader writes, /query answers, Ctrl-C stops it all.

The demo runs in its own session, like a terminal's foreground job, and gets SIGINT the way a
Ctrl-C delivers it: to the whole foreground process group (make and the demo). Everything it
started (gunicorn, the loader, the embedded PostgreSQL) must be gone afterwards. Whatever
happens, the finally block kills what is left of it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
RANGE = {"from": "2020-01-01T00:00:00.000Z", "to": "2020-06-01T00:00:00.000Z"}

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command() -> tuple[list[str], bool]:
    """``make demo`` when make would run the demo straight away, else what it runs."""
    make = shutil.which("make")
    if make and Path(sys.executable).resolve() == VENV_PYTHON.resolve():
        up_to_date = subprocess.run([make, "-q", ".venv/.installed"], cwd=ROOT,
                                    capture_output=True).returncode == 0
        if up_to_date:
            return [make, "--no-print-directory", "demo"], True
    return [sys.executable, "-m", "loader.demo"], False


def _post(url: str, body: dict, timeout: float = 10):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _get_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def _points(base: str, metric: str, window: str) -> list:
    body = {"range": RANGE, "intervalMs": 86_400_000, "maxDataPoints": 200,
            "targets": [{"refId": "A", "target": metric,
                         "payload": {"model": "taxi-high-tip", "window": window}}]}
    try:
        out = _post(base + "/query", body)
    except (OSError, ValueError):
        return []
    return [(t, v) for s in out for v, t in s.get("datapoints", []) if v is not None]


def _wait(what: str, check, timeout: float, proc: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        if proc.poll() is not None:
            pytest.fail(f"the demo exited ({proc.returncode}) before {what}:\n{_tail(log)}")
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}:\n{_tail(log)}")


def _tail(path: Path, n: int = 60) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    return ""


def _cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    return "?"


def _processes_using(data_dir: Path) -> list[int]:
    """Pids started for this test: their command line or environment names its data directory."""
    marker = str(data_dir).encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes().split(b"\0")
            if marker in cmdline or b"DATA_DIR=" + marker in environ:
                pids.append(int(entry.name))
    return pids


@pytest.mark.skipif(not Path("/proc").exists(), reason="needs /proc to check for leftovers")
def test_make_demo_starts_replays_and_stops_on_ctrl_c(tmp_path):
    data_dir = tmp_path / "demo-data"
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "demo.log"
    cmd, via_make = _command()
    env = {**os.environ, "PORT": str(port), "DATA_DIR": str(data_dir), "DEMO_SCALE": "0.001",
           "DEMO_SPEED": "604800", "PYTHONUNBUFFERED": "1"}
    for key in ("DATABASE_URL", "DATASOURCE_URL", "INGEST_TOKEN", "HOST",
                "MAKEFLAGS", "MFLAGS", "MAKELEVEL"):  # `make test` -> pytest -> `make demo`
        env.pop(key, None)
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait("the datasource to answer GET /", lambda: _get_status(base + "/") == 200, 60,
              proc, log)
        # the backfill (January-February) makes accuracy points ...
        jan_feb = _wait("accuracy points from the backfill",
                        lambda: _points(base, "accuracy", "7d"), 90, proc, log)
        assert all(0 <= v <= 1 for _, v in jan_feb)
        # ... and the live replay keeps writing March onwards
        march = 1_583_020_800_000  # 2020-03-01T00:00Z
        _wait("live predictions after March 1st",
              lambda: any(t > march + 86_400_000 for t, _ in
                          _points(base, "prediction_count", "1d")), 60, proc, log)
        text = log.read_text(errors="replace")
        assert f"http://127.0.0.1:{port}" in text and "dashboards/model-quality.json" in text

        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does to a foreground job
        try:
            proc.wait(40)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the demo did not stop within 40 s of Ctrl-C:\n{_tail(log)}")
        text = log.read_text(errors="replace")
        assert "stopped." in text, _tail(log)
        # make dies of the SIGINT it forwarded once the demo is done; the demo exits 0
        assert proc.returncode in ((0, -signal.SIGINT, 2, 130) if via_make else (0,)), text
        assert _get_status(base + "/") is None, f"the datasource still answers:\n{text}"
        assert not (data_dir / "pg" / "postmaster.pid").exists(), f"PostgreSQL runs:\n{text}"
        left = {pid: _cmdline(pid) for pid in _processes_using(data_dir)}
        assert left == {}, f"processes left behind: {left}\n{text}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        for pid in _processes_using(data_dir):  # children in their own process groups
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_demo_steps_match_the_loader_cli_and_the_makefile(tmp_path):
    from loader import demo
    from loader.__main__ import build_parser

    args = demo.parse_args(["--data-dir", str(tmp_path), "--scale", "0.001", "--speed", "7200",
                            "--port", "9999"])
    backfill, live = (build_parser().parse_args(cmd[3:]) for cmd in
                      demo.loader_commands(args, "postgresql://db", "http://127.0.0.1:9999"))
    assert (backfill.command, backfill.until, backfill.database_url) == \
        ("backfill", demo.LIVE_FROM, "postgresql://db")
    assert (live.command, live.start, live.speed, live.url) == \
        ("live", demo.LIVE_FROM, 7200, "http://127.0.0.1:9999")
    assert backfill.data_dir == live.data_dir == tmp_path and live.scale == 0.001
    server = demo.server_command(args)
    assert server[1:3] == ["-m", "gunicorn"] and "127.0.0.1:9999" in server
    assert server[server.index("--workers") + 1] == "2"
    assert server[server.index("--threads") + 1] == "4"
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:.*\n\t\$\(PY\) -m loader\.demo$", makefile, re.M)
