"""The work tree's app under a real gunicorn on a free loopback port, as ``mlsli serve`` runs it.

Shared by the tests that talk to a server the way a user's program or curl does: from another
process, over HTTP (the packaging test's light client, the README's curl examples).
"""

from __future__ import annotations

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Gunicorn:
    """``gunicorn "datasource:create_app()"`` on DATABASE_URL; ``close()`` stops it.

    ``env`` adds settings (``INGEST_TOKEN``…); the caller's INGEST_TOKEN and
    PROMETHEUS_MULTIPROC_DIR are not inherited.
    """

    def __init__(self, database_url: str, log: Path, env: dict | None = None,
                 workers: int = 1, threads: int = 4):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        base = {k: v for k, v in os.environ.items()
                if k not in ("INGEST_TOKEN", "PROMETHEUS_MULTIPROC_DIR", "PYTHONPATH")}
        full = {**base, "DATABASE_URL": database_url, **(env or {})}
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "--workers", str(workers), "--threads",
                 str(threads), "--timeout", "60", "--bind", f"127.0.0.1:{self.port}",
                 "--no-control-socket", "datasource:create_app()"],
                cwd=ROOT, env=full, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT)

    def wait_healthy(self, timeout: float = 60) -> None:
        """Until GET / answers 200 (the database answers and its schema is the code's)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"gunicorn exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/", timeout=10) as r:
                    if r.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.2)
        raise AssertionError(f"gunicorn did not answer within {timeout} s:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
