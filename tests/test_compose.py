"""docker-compose.yml, the Dockerfile and .env.example: valid, pinned, healthy-ordered, no secrets.

The default stack runs Grafana 12 with the Infinity datasource, its dashboards and the alert
rules; the ``grafana11`` profile adds Grafana 11.6 with simpod-json-datasource and the original
dashboards. Each Grafana gets only its own flavour's files.

This machine has no Docker engine, so nothing is started. The compose file is checked twice:
by ``docker-compose config`` (Debian's docker-compose, which validates against the compose
specification; skipped when the tool is absent) and by the same structural checks on the
YAML with ``${VAR:-default}`` expanded here, which always run.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
PLUGIN_VERSION = "0.6.5"
INFINITY_VERSION = "3.11.1"
SERVERS = {"postgres", "datasource", "grafana", "grafana11"}  # the services that serve a port
_VAR = re.compile(r"\$\$|\$\{(\w+)(?::?-([^}]*))?\}|\$(\w+)")


def expand(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation: ``${VAR:-default}``, ``${VAR-default}``, ``${VAR}``, ``$$``."""
    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$$"  # kept escaped, as `docker-compose config` prints it
        name = m.group(1) or m.group(3)
        if name in env and (env[name] != "" or ":-" not in m.group(0)):
            return env[name]
        if m.group(2) is not None:
            return m.group(2)
        raise AssertionError(f"${name} has no default: compose would need a .env")
    return _VAR.sub(one, text)


def env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def variables_used(text: str) -> set[str]:
    return {m.group(1) or m.group(3) for m in _VAR.finditer(text) if m.group(0) != "$$"}


def check_stack(config: dict, expect_env: dict[str, str]) -> None:
    """What the issue asks of the stack, on a resolved compose configuration."""
    services = config["services"]
    assert set(services) == {"postgres", "migrate", "datasource", "loader", "grafana", "grafana11"}
    for name, service in services.items():
        if name not in SERVERS:  # the image's HEALTHCHECK probes a port only servers open
            assert healthcheck_disabled(service), f"{name} keeps the image's healthcheck"
        else:
            assert not healthcheck_disabled(service) and service["healthcheck"]["test"], name

    pg = services["postgres"]
    assert re.fullmatch(r"postgres:16\.\d+", pg["image"]), pg["image"]  # a full version
    volume = pg["volumes"][0]
    source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
    assert source in config["volumes"], "PostgreSQL data must live in a named volume"
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert pg["environment"]["POSTGRES_PASSWORD"] == expect_env["POSTGRES_PASSWORD"]

    # least privilege: the roles are created at first init, the owner migrates, the server
    # runs as the read-write role and reads as the SELECT-only one, without migrating
    init = " ".join(str(v if isinstance(v, str) else v.get("target")) for v in pg["volumes"])
    assert "/docker-entrypoint-initdb.d/" in init and "roles.sql" in init
    owner = (f"postgresql://{expect_env['POSTGRES_USER']}:{expect_env['POSTGRES_PASSWORD']}"
             f"@postgres:5432/{expect_env['POSTGRES_DB']}")
    migrate = services["migrate"]
    assert migrate["environment"]["DATABASE_URL"] == owner
    assert "migrate_as_owner" in " ".join(migrate["command"])
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"

    ds = services["datasource"]
    assert ds["build"] in (".", {"context": "."}) or Path(ds["build"]["context"]) == ROOT
    assert ds["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    health = " ".join(ds["healthcheck"]["test"])
    assert "http://127.0.0.1:8080/'" in health
    assert ds["environment"]["DATABASE_URL"] == (
        f"postgresql://mlsli_rw:{expect_env['MLSLI_RW_PASSWORD']}@postgres:5432/{expect_env['POSTGRES_DB']}")
    assert ds["environment"]["DATABASE_READ_URL"].startswith("postgresql://mlsli_read:")
    assert ds["environment"]["AUTO_MIGRATE"] == "0"
    assert ds["environment"]["INGEST_TOKEN"] == expect_env["INGEST_TOKEN"]

    loader = services["loader"]
    assert loader["build"] == ds["build"], "the loader runs the datasource's image"
    assert loader["image"] == ds["image"] == services["migrate"]["image"], "one image, built once"
    assert loader["depends_on"]["datasource"]["condition"] == "service_healthy"
    assert loader["environment"]["DATASOURCE_URL"] == "http://datasource:8080"
    assert loader["environment"]["INGEST_TOKEN"] == expect_env["INGEST_TOKEN"]
    assert loader.get("restart") == "on-failure"  # a crash resumes the replay; done, it stays down

    gf = services["grafana"]
    assert re.fullmatch(r"grafana/grafana:1[2-9]\.\d+\.\d+", gf["image"]), gf["image"]
    check_grafana(gf, expect_env, f"yesoreyeram-infinity-datasource {INFINITY_VERSION}")
    mounts = mounts_of(gf)
    prov = "/etc/grafana/provisioning"
    assert {dst: Path(src).relative_to(ROOT).as_posix() for dst, src in mounts.items()} == {
        f"{prov}/datasources/mlsli-infinity.yaml": "provisioning/datasources/mlsli-infinity.yaml",
        f"{prov}/dashboards/mlsli.yaml": "provisioning/dashboards/mlsli.yaml",
        f"{prov}/alerting": "provisioning/alerting",
        "/var/lib/grafana/dashboards": "dashboards/infinity"}
    ports = gf["ports"][0]
    published = ports["published"] if isinstance(ports, dict) else ports.split(":")[0]
    assert str(published) == expect_env["GRAFANA_PORT"]

    g11 = services["grafana11"]
    assert re.fullmatch(r"grafana/grafana:11\.6\.\d+", g11["image"]), g11["image"]
    assert g11["profiles"] == ["grafana11"]
    check_grafana(g11, expect_env, f"simpod-json-datasource {PLUGIN_VERSION}")
    boards = sorted(p.name for p in (ROOT / "dashboards").glob("*.json"))
    assert {dst: Path(src).relative_to(ROOT).as_posix() for dst, src in mounts_of(g11).items()} == {
        f"{prov}/datasources/mlsli.yaml": "provisioning/datasources/mlsli.yaml",
        f"{prov}/dashboards/mlsli.yaml": "provisioning/dashboards/mlsli.yaml",
        **{f"/var/lib/grafana/dashboards/{b}": f"dashboards/{b}" for b in boards}}
    ports = g11["ports"][0]
    published = ports["published"] if isinstance(ports, dict) else ports.split(":")[0]
    assert str(published) != expect_env["GRAFANA_PORT"]


def healthcheck_disabled(service: dict) -> bool:
    """``healthcheck: {disable: true}`` as written, or as ``docker-compose config`` prints it."""
    check = service.get("healthcheck") or {}
    return check.get("disable") is True or check.get("test") in (["NONE"], "NONE")


def mounts_of(service: dict) -> dict[str, str]:
    """Container path -> host path (absolute), read-only binds only."""
    out = {}
    for v in service["volumes"]:
        if isinstance(v, dict):
            assert v.get("read_only") is True, v
            out[v["target"]] = v["source"]
        else:
            src, dst, mode = v.split(":")
            assert mode == "ro", v
            out[dst] = src
    return {dst: str((ROOT / src).resolve()) for dst, src in out.items()}


def check_grafana(gf: dict, expect_env: dict[str, str], plugin: str) -> None:
    env = gf["environment"]
    assert env["GF_INSTALL_PLUGINS"] == plugin  # pinned: "<id> <version>"
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert env["GF_SECURITY_ADMIN_PASSWORD"] == expect_env["GRAFANA_ADMIN_PASSWORD"]
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == "/var/lib/grafana/dashboards/model-quality.json"
    assert gf["depends_on"]["datasource"]["condition"] == "service_healthy"
    for source in mounts_of(gf).values():
        assert Path(source).exists(), source


def _raw_config(env: dict[str, str]) -> dict:
    return yaml.safe_load(expand(COMPOSE.read_text(), env))


def test_compose_structure_without_env_file():
    defaults = env_file(ENV_EXAMPLE)  # the documented defaults are the built-in ones
    check_stack(_raw_config({}), defaults)


def test_compose_structure_with_env_values():
    env = {k: f"x{k.lower()}" for k in env_file(ENV_EXAMPLE)}
    env["GRAFANA_PORT"] = "3999"
    check_stack(_raw_config(env), env)


def test_env_example_documents_every_variable_and_no_secret_is_committed():
    text = COMPOSE.read_text()
    used = variables_used(text)
    documented = env_file(ENV_EXAMPLE)
    assert used == set(documented), "compose variables and .env.example differ"
    for key in documented:  # every setting has a comment above it in .env.example
        lines = ENV_EXAMPLE.read_text().splitlines()
        i = next(n for n, line in enumerate(lines) if line.startswith(key + "="))
        assert any(line.startswith("#") for line in lines[max(0, i - 4):i]), key
    # passwords and tokens only ever come from variables, never as literals
    keys = list(re.finditer(r"^\s*(\w*(?:PASSWORD|TOKEN)\w*): (.+)$", text, re.M))
    assert len(keys) >= 4
    for m in keys:
        assert re.fullmatch(r"\$\{\w+:-[^}]*\}", m.group(2)), m.group(0)
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    tracked = subprocess.run(["git", "ls-files", ".env"], cwd=ROOT, capture_output=True,
                             text=True)
    assert tracked.stdout.strip() == "", ".env is committed"


def test_loader_command_matches_the_loader_cli():
    from loader.__main__ import build_parser

    loader = yaml.safe_load(COMPOSE.read_text())["services"]["loader"]
    assert loader["command"][:2] == ["sh", "-c"]
    env = {k: expand(str(v), {}) for k, v in loader["environment"].items()
           if not str(k).startswith("<<")}
    env["DATABASE_URL"] = "postgresql://u:p@postgres:5432/db"
    steps = [shlex.split(part.replace("$$", "$")) for part in loader["command"][2].split("&&")]
    commands = []
    for words in steps:
        words = [w for w in words if w != "exec"]
        words = [env[w[1:]] if w.startswith("$") else w for w in words]
        assert words[:3] == ["python", "-m", "loader"], words
        commands.append(build_parser().parse_args(words[3:]))
    backfill, live = commands
    assert backfill.command == "backfill" and backfill.until == "2020-03-01"
    assert backfill.database_url == env["DATABASE_URL"]  # bulk path for the backfill
    assert live.command == "live" and live.start == "2020-03-01" and live.speed == 3600
    assert live.database_url is None  # live goes through DATASOURCE_URL, the ingest API


def test_dockerfile():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11\.\d+-slim-bookworm$", text, re.M)  # pinned, not floating
    assert "pip install --require-hashes -r requirements.lock" in text
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK ", text, re.M)
    cmd = re.search(r"^CMD (.+)$", text, re.M).group(1)
    for flag in ("gunicorn", "--workers 2", "--threads 4", "--timeout 60",
                 "datasource:create_app()"):
        assert flag in cmd
    for src in re.findall(r"^COPY (\S+) ", text, re.M):
        assert (ROOT / src).exists(), src
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            assert re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[\w.]+", line), f"unpinned: {line}"
    ignored = (ROOT / ".dockerignore").read_text().split()
    for needed in ("requirements.lock", "datasource", "loader"):
        assert needed not in ignored


@pytest.fixture(scope="module")
def docker_compose():
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    return tool


@pytest.mark.parametrize("with_env", [False, True], ids=["no .env", ".env.example"])
def test_docker_compose_config_validates(docker_compose, tmp_path, with_env):
    env_path = tmp_path / "env"
    env_path.write_text(ENV_EXAMPLE.read_text() if with_env else "")
    done = subprocess.run([docker_compose, "--env-file", str(env_path), "-f", str(COMPOSE),
                           "--profile", "grafana11", "config"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert "WARNING" not in done.stderr, done.stderr
    check_stack(yaml.safe_load(done.stdout), env_file(ENV_EXAMPLE))
