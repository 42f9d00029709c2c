"""Every ``curl`` command of README.md's fenced code blocks, run with curl against gunicorn.

The server holds what ``make demo`` writes (the taxi replay's backfill, January-April 2020:
model ``taxi-high-tip`` with its segments, features and ``training`` reference) and runs with
the documented demo token, as compose does. Each command is taken as written: ``$S``,
``localhost:8080`` and ``127.0.0.1:8080`` become the live server, writes get the header the
README says to add under a token (and are first shown to need it: 401 without). Then each
must answer a 2xx with a body of its content type: JSON, CSV with a header line, or
Prometheus's text (``/metrics``, whose ``| grep`` must find its lines), and a read about the
demo's data must not come back empty.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import empty_database
from tests.live_gunicorn import Gunicorn

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TOKEN = "demo-ingest-token"  # INGEST_TOKEN's default in docker-compose.yml and .env.example
LOADER_DIR = ROOT / ".data" / "test-loader-readme"  # generated trips, kept between runs
SCALE = "0.001"
DOCUMENTED = ("http://127.0.0.1:8080", "http://localhost:8080", "127.0.0.1:8080", "localhost:8080")
WRITES = re.compile(r"/api/v1/(models|predictions|feedback|events|references)\b")
FENCE = re.compile(r"^```[\w-]*\n(.*?)^```", re.M | re.S)

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.skipif(shutil.which("curl") is None, reason="needs the curl command")]


def readme_commands(text: str) -> list[list[str]]:
    """Each ``curl`` command line of the fenced blocks, as the shell would split it, with the
    block's variables (``S=...``) substituted. A pipe stays a ``|`` token."""
    out = []
    for block in FENCE.findall(text):
        variables: dict[str, str] = {}
        buf = ""
        for line in block.splitlines():
            buf = f"{buf}\n{line}" if buf else line
            if buf.endswith("\\"):
                buf = buf[:-1]
                continue
            try:
                lexer = shlex.shlex(buf, posix=True, punctuation_chars="|")
                lexer.whitespace_split = True
                tokens = list(lexer)
            except ValueError:  # a quote still open: the command goes on
                continue
            buf = ""
            if len(tokens) == 1 and re.fullmatch(r"\w+=\S*", tokens[0]):
                name, value = tokens[0].split("=", 1)
                variables[name] = value
            elif tokens and tokens[0] == "curl":
                out.append([_expand(t, variables) for t in tokens])
        assert not buf, f"unterminated command in README: {buf[:80]}"
    return out


def _expand(token: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m.group(1), m.group(0)), token)


def _to_live(token: str, base: str) -> str:
    host = base.removeprefix("http://")
    for documented in DOCUMENTED:
        if documented in token:
            return token.replace(documented, base if documented.startswith("http") else host)
    return token


def _url_of(args: list[str]) -> str:
    urls = [a for a in args if "://" in a or re.match(r"(localhost|127\.0\.0\.1):\d+", a)]
    assert len(urls) == 1, args
    return urls[0]


def _is_write(args: list[str]) -> bool:
    posts = any(a in ("-d", "--data", "--data-raw", "--data-binary") for a in args) or \
        (("-X" in args) and args[args.index("-X") + 1] == "POST")
    return posts and bool(WRITES.search(_url_of(args)))


def _curl(args: list[str], tmp_path: Path, n: int, extra: list[str] = ()) -> tuple[int, str, bytes]:
    """Run the command's curl; (status, content type, body)."""
    headers, body = tmp_path / f"headers-{n}", tmp_path / f"body-{n}"
    cmd = [args[0], *extra, *args[1:], "--max-time", "120", "-D", str(headers), "-o", str(body),
           "-w", "%{http_code}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"{shlex.join(cmd)}: {done.stderr}"
    content_type = ""
    for line in headers.read_text(errors="replace").splitlines():
        if line.lower().startswith("content-type:"):
            content_type = line.split(":", 1)[1].strip()
    return int(done.stdout.strip()), content_type, body.read_bytes()


@pytest.fixture(scope="module")
def demo_server(database_url, tmp_path_factory):
    """The demo's backfill (January-April) in the store, gunicorn with the demo token on it."""
    empty_database(database_url)
    env = {**os.environ, "DATABASE_URL": database_url, "DATA_DIR": str(LOADER_DIR)}
    env.pop("DATASOURCE_URL", None)
    cmd = [sys.executable, "-m", "loader", "backfill", "--until", "2020-05-01", "--retrain",
           "--no-progress", "--data-dir", str(LOADER_DIR), "--scale", SCALE,
           "--database-url", database_url]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    server = Gunicorn(database_url, tmp_path_factory.mktemp("readme") / "gunicorn.log",
                      env={"INGEST_TOKEN": TOKEN}, workers=2, threads=4)
    try:
        server.wait_healthy()
        yield server
    finally:
        server.close()
        empty_database(database_url)


def test_readme_has_curl_examples_for_every_endpoint_a_user_calls_by_hand():
    urls = [_url_of(c[:c.index("|")] if "|" in c else c) for c in readme_commands(README.read_text())]
    paths = {re.sub(r"^(https?://)?[^/]+", "", u).split("?")[0] for u in urls}
    for path in ("/", "/api/v1/models/taxi-high-tip", "/api/v1/series", "/api/v1/variables/metrics",
                 "/metrics", "/api/v1/openapi.json", "/query", "/variable", "/api/v1/models",
                 "/api/v1/predictions", "/api/v1/feedback"):
        assert path in paths, f"README has no curl example for {path}"


def test_every_readme_curl_command_answers(demo_server, tmp_path):
    commands = readme_commands(README.read_text())
    assert len(commands) >= 15, commands
    failures = []
    for n, command in enumerate(commands):
        pipe = command.index("|") if "|" in command else len(command)
        args = [_to_live(t, demo_server.url) for t in command[:pipe]]
        shown = shlex.join(command)[:160]
        url = _url_of(args)
        assert url.startswith(demo_server.url) or url.startswith(demo_server.url[7:]), shown
        extra = []
        if _is_write(args):
            status, _, body = _curl(args, tmp_path, n)
            if status != 401:
                failures.append(f"{shown}\n  without the token: {status} {body[:200]!r}")
            extra = ["-H", f"Authorization: Bearer {TOKEN}"]
        status, content_type, body = _curl(args, tmp_path, n, extra)
        problem = _check(status, content_type, body, url, command[pipe + 1:])
        if problem:
            failures.append(f"{shown}\n  {problem}")
    assert not failures, "README examples that do not work:\n" + "\n".join(failures)


def _check(status: int, content_type: str, body: bytes, url: str, pipe: list[str]) -> str | None:
    """Why an answer is not what the README promises (None when it is)."""
    if not 200 <= status < 300:
        return f"HTTP {status}: {body[:300]!r}"
    path = re.sub(r"^(https?://)?[^/]+", "", url).split("?")[0]
    text = body.decode("utf-8", errors="replace")
    if path == "/metrics":
        if not content_type.startswith("text/plain"):
            return f"content type {content_type}"
        if "mlsli_sli_export_ok 1.0" not in text:
            return f"no successful SLI export in {text[-300:]!r}"
    elif "format=csv" in url:
        if not content_type.startswith("text/csv"):
            return f"content type {content_type}"
        lines = text.splitlines()
        if not lines or not lines[0].startswith("time,"):
            return f"no CSV header: {text[:200]!r}"
        if len(lines) < 2:
            return "only the CSV header: the example selects no data"
    else:
        if not content_type.startswith("application/json"):
            return f"content type {content_type}: {text[:200]!r}"
        try:
            data = json.loads(text)
        except ValueError as e:
            return f"not JSON ({e}): {text[:200]!r}"
        if data in ([], {}, None):
            return f"an empty answer ({text[:40]}): the example selects no data"
        if path == "/api/v1/series" and all("value" in r for r in data) \
                and not any(r["value"] is not None for r in data):  # (tables have no "value")
            return f"only null values: {text[:300]!r}"
        if path == "/query" and not any(v is not None for s in data for v, _ in s["datapoints"]):
            return f"only null datapoints: {text[:300]!r}"
    if pipe:  # the rest of the pipeline (| grep ...), fed this answer
        done = subprocess.run(pipe, input=body, capture_output=True, timeout=30)
        if done.returncode != 0 or not done.stdout:
            return f"| {shlex.join(pipe)} found nothing"
    return None
