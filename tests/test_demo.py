"""``make demo`` end to end: it starts, the loader writes, /query answers, Ctrl-C stops it all.

The demo runs in its own session, like a terminal's foreground job, and gets SIGINT the way a
Ctrl-C delivers it: to the whole foreground process group (make and the demo). Everything it
started (gunicorn, the loader, the embedded PostgreSQL) must be gone afterwards. Whatever
happens, the finally block kills what is left of it.

A second start on the same data directory writes no backfill again, and runs on a real
pseudo-terminal whose closing (a hang-up: SIGHUP, then EIO on every write) must stop it all
the same. A busy port is reported before anything starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.server
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import termios
import threading
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


def _demo_env(data_dir: Path, port: int) -> dict:
    env = {**os.environ, "PORT": str(port), "DATA_DIR": str(data_dir), "DEMO_SCALE": "0.001",
           "DEMO_SPEED": "604800", "PYTHONUNBUFFERED": "1"}
    for key in ("DATABASE_URL", "DATASOURCE_URL", "INGEST_TOKEN", "HOST",
                "MAKEFLAGS", "MFLAGS", "MAKELEVEL"):  # `make test` -> pytest -> `make demo`
        env.pop(key, None)
    return env


def _kill_leftovers(proc: subprocess.Popen, data_dir: Path) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)
    for pid in _processes_using(data_dir):  # children in their own process groups
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _assert_all_stopped(base: str, data_dir: Path, text: str) -> None:
    assert _get_status(base + "/") is None, f"the datasource still answers:\n{text}"
    assert not (data_dir / "pg" / "postmaster.pid").exists(), f"PostgreSQL runs:\n{text}"
    left = {pid: _cmdline(pid) for pid in _processes_using(data_dir)}
    assert left == {}, f"processes left behind: {left}\n{text}"


@pytest.fixture(scope="module")
def demo_dir():
    """One data directory for the first start (Ctrl-C) and the second (hang-up).

    Not under pytest's tmp dirs: each pytest session resets /tmp/pytest-of-USER to mode 0700,
    and the embedded PostgreSQL runs as another user (``postgres`` when we are root), which
    then loses its way to the data if another session starts meanwhile.
    """
    base = Path(tempfile.mkdtemp(prefix="mlsli-demo-"))
    yield base / "demo-data"
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.skipif(not Path("/proc").exists(), reason="needs /proc to check for leftovers")
def test_make_demo_starts_replays_and_stops_on_ctrl_c(demo_dir, tmp_path):
    _first_start(demo_dir, tmp_path)


def _first_start(data_dir: Path, tmp_path: Path) -> None:
    """Start, backfill, go live, Ctrl-C: the first run, whose store the second run reuses."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "demo.log"
    cmd, via_make = _command()
    env = _demo_env(data_dir, port)
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
        # the SLI browser's address comes first, and it answers a browser with the page
        assert text.index(f"SLI browser http://127.0.0.1:{port}/") < text.index("datasource  http")
        req = urllib.request.Request(base + "/", headers={"Accept": "text/html"})
        with urllib.request.urlopen(req, timeout=10) as page:
            assert page.status == 200 and "text/html" in page.headers["Content-Type"]
        # backfill and live both load the model: its training event is recorded (and told) once
        assert text.count("recorded the training event") == 1, text

        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does to a foreground job
        try:
            proc.wait(40)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the demo did not stop within 40 s of Ctrl-C:\n{_tail(log)}")
        text = log.read_text(errors="replace")
        assert "stopped." in text, _tail(log)
        # make dies of the SIGINT it forwarded once the demo is done; the demo exits 0
        assert proc.returncode in ((0, -signal.SIGINT, 2, 130) if via_make else (0,)), text
        _assert_all_stopped(base, data_dir, text)
    finally:
        _kill_leftovers(proc, data_dir)


class _Terminal:
    """A pseudo-terminal the demo has as its controlling terminal, read into a file.

    ``hang_up`` closes the master side, as a terminal window or an ssh session going away
    does: the kernel sends SIGHUP to the session leader and every later write fails (EIO).
    """

    def __init__(self, log: Path):
        self.master, self.slave = os.openpty()
        self.log = log
        self._hang_up = threading.Event()
        self._thread = threading.Thread(target=self._pump, daemon=True)

    def preexec(self) -> None:  # pragma: no cover - runs in the child
        os.setsid()
        fcntl.ioctl(1, termios.TIOCSCTTY, 0)

    def start(self) -> None:
        os.close(self.slave)
        self._thread.start()

    def _pump(self) -> None:
        with open(self.log, "ab") as out:
            while not self._hang_up.is_set():
                ready, _, _ = select.select([self.master], [], [], 0.2)
                if ready:
                    try:
                        data = os.read(self.master, 65536)
                    except OSError:  # EIO: every process let go of the terminal
                        break
                    if not data:
                        break
                    out.write(data)
                    out.flush()
        os.close(self.master)

    def hang_up(self) -> None:
        self._hang_up.set()
        self._thread.join(5)


@pytest.mark.skipif(not Path("/proc").exists(), reason="needs /proc to check for leftovers")
def test_second_start_skips_the_backfill_and_a_hang_up_stops_it_all(demo_dir, tmp_path):
    if not (demo_dir / "pg").exists():  # run alone (-k): make the first start here
        _first_start(demo_dir, tmp_path)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "second.log"
    term = _Terminal(log)
    proc = subprocess.Popen([str(VENV_PYTHON if VENV_PYTHON.exists() else sys.executable),
                             "-m", "loader.demo"], cwd=ROOT, env=_demo_env(demo_dir, port),
                            stdin=term.slave, stdout=term.slave, stderr=term.slave,
                            preexec_fn=term.preexec)
    term.start()
    try:
        _wait("the backfill's summary", lambda: "backfill: wrote" in _text(log), 90, proc, log)
        _wait("the live replay", lambda: "live:" in _text(log), 60, proc, log)
        text = _text(log)
        assert re.search(r"backfill: skipped 2020-01, 2020-02, already in the store", text), text
        assert "backfill: wrote 0 predictions and 0 feedback rows" in text, text
        assert text.count("recorded the training event") == 1, text

        term.hang_up()
        try:
            proc.wait(40)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the demo did not stop within 40 s of the hang-up:\n{_text(log)}")
        assert proc.returncode == 0, _text(log)
        _assert_all_stopped(base, demo_dir, _text(log))
    finally:
        term.hang_up()
        _kill_leftovers(proc, demo_dir)


def _text(path: Path) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")
    return ""


class _Impostor(http.server.BaseHTTPRequestHandler):
    """Another program's server: 200 and a health-like JSON on GET /."""

    def do_GET(self):  # noqa: N802 - http.server's name
        body = b'{"status": "ok"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_busy_port_is_reported_before_anything_starts(tmp_path):
    server = http.server.HTTPServer(("127.0.0.1", 0), _Impostor)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    data_dir = tmp_path / "data"
    try:
        t0 = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "loader.demo"], cwd=ROOT,
                              env=_demo_env(data_dir, port), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        server.shutdown()
        server.server_close()
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert f"port {port} on 127.0.0.1 is busy" in out, out
    assert "datasource  http://" not in out and "starting PostgreSQL" not in out, out
    assert not (data_dir / "pg").exists()  # nothing was started
    assert elapsed < 20, elapsed  # before the slow imports, let alone PostgreSQL


def test_only_our_datasource_counts_as_healthy():
    from loader import demo

    ok = json.dumps({"status": "ok", "message": "database answers"}).encode()
    assert demo.is_ours(200, {"Server": "gunicorn"}, ok)
    assert not demo.is_ours(200, {"Server": "SimpleHTTP/0.6 Python/3.11"}, ok)
    assert not demo.is_ours(200, {"Server": "gunicorn"}, b"<html>hello</html>")
    assert not demo.is_ours(503, {"Server": "gunicorn"}, ok)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(demo.PortBusy, match="is busy"):
            demo.bind_port("127.0.0.1", busy.getsockname()[1])


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
    assert "fd://7" in demo.server_command(args, 7)  # the socket the demo bound
    assert server[server.index("--workers") + 1] == "2"
    assert server[server.index("--threads") + 1] == "4"
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:.*\n\t\$\(PY\) -m loader\.demo$", makefile, re.M)
