"""docker-compose.yml and the Dockerfile agree with the code and with config.ENV_VARS.

Static checks only: nothing here needs Docker.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from webapp.config import ENV_VARS, Settings

ROOT = Path(__file__).resolve().parents[1]
APP_SERVICES = ("web", "worker", "worker-gpu", "beat", "migrate")
LONG_RUNNING = ("web", "worker", "worker-gpu", "beat")
CELERY_SERVICES = ("worker", "worker-gpu", "beat")
# ${VAR}, ${VAR:-default}, ${VAR:?message} or $VAR; "$$" is Compose's escape for "$".
VAR_REF = re.compile(r"(?<!\$)\$(?:\{([A-Za-z_]\w*)|([A-Za-z_]\w*))")
INTERPOLATION = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")
# module:callable or module:callable() as gunicorn and `flask --app` take it.
APP_TARGET = re.compile(r"^([A-Za-z_][\w.]*):([A-Za-z_]\w*)(?:\(\))?$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


@pytest.fixture(scope="module")
def dockerfile() -> list[str]:
    """Dockerfile instructions, continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def with_defaults(value: str) -> str:
    """Resolve ${VAR:-default} to its default, as Compose does when VAR is unset."""

    def resolve(m: re.Match[str]) -> str:
        name, op, arg = m.groups()
        return arg if op in (":-", "-") else f"unset-{name}"

    return INTERPOLATION.sub(resolve, value)


def env_of(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a dict, whichever form the file uses."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def argv(command: str | list[str]) -> list[str]:
    """A command as argv, looking inside `sh -c "..."`."""
    args = shlex.split(command) if isinstance(command, str) else [str(a) for a in command]
    if len(args) >= 3 and args[0] in ("sh", "/bin/sh", "bash") and args[1] == "-c":
        args = shlex.split(args[2].removeprefix("exec "))
    return args


def app_target(args: list[str]) -> str:
    """The module:callable argument of a gunicorn or flask command."""
    targets = [a for a in args if APP_TARGET.match(a)]
    assert len(targets) == 1, f"expected one module:callable target in {args}"
    return targets[0]


def celery_app_module(args: list[str]) -> str:
    """The -A/--app module of a celery command."""
    for i, arg in enumerate(args):
        if arg in ("-A", "--app") and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--app="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"no -A/--app in celery command {args}")


def module_file(module: str) -> Path:
    """The source file of a dotted module in this repo; fails if absent."""
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    raise AssertionError(f"module {module!r} has no source file ({base}.py or {base}/__init__.py)")


def top_level_names(path: Path) -> set[str]:
    """Names a module defines or imports at top level."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(), filename=str(path)).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.ImportFrom | ast.Import):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def dockerfile_cmd(dockerfile: list[str]) -> list[str]:
    cmds = [line.split(None, 1)[1] for line in dockerfile if line.upper().startswith("CMD ")]
    assert cmds, "Dockerfile has no CMD"
    raw = cmds[-1]
    return argv(json.loads(raw) if raw.startswith("[") else raw)


def tf_pin() -> str:
    match = re.search(r"^tensorflow-cpu==\S+$", (ROOT / "requirements.txt").read_text(), re.M)
    assert match, "requirements.txt has no `tensorflow-cpu==X` pin"
    return match.group(0)


def test_all_services_are_defined(services: dict[str, Any]) -> None:
    expected = {"web", "worker", "beat", "migrate", "redis", "postgres", "worker-gpu"}
    assert expected <= services.keys(), f"missing services: {sorted(expected - services.keys())}"


@pytest.mark.parametrize("name", ["worker", "worker-gpu"])
def test_workers_can_be_scaled(services: dict[str, Any], name: str) -> None:
    fixed = {"container_name", "ports", "hostname"} & services[name].keys()
    assert not fixed, f"{name} sets {sorted(fixed)}; `--scale {name}=N` would collide"


def test_exactly_one_beat(services: dict[str, Any]) -> None:
    replicas = services["beat"].get("deploy", {}).get("replicas", 1)
    assert replicas == 1, f"beat must run exactly once (re-enqueues stale studies), got {replicas}"
    embedded = [
        n
        for n in APP_SERVICES
        if n != "beat" and {"beat", "-B", "--beat"} & set(argv(services[n]["command"]))
    ]
    assert not embedded, f"{embedded} also run beat; the sweeper would run more than once"


def test_gpu_worker(services: dict[str, Any]) -> None:
    gpu = services["worker-gpu"]
    assert "gpu" in gpu.get("profiles", []), "worker-gpu must be under profiles: [gpu]"
    devices = gpu.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    assert any(
        d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) and d.get("count") == 1
        for d in devices
    ), f"worker-gpu needs one nvidia GPU reserved, got {devices}"
    args = argv(gpu["command"])
    # One process per GPU: the threads pool keeps a single model (and CUDA context) per GPU.
    assert "--pool=threads" in args, f"one process per GPU (threads pool): {args}"
    assert env_of(gpu).get("INFERENCE_BACKEND") == "keras", "GPU workers serve the Keras model"
    pin_version = tf_pin().split("==")[1]
    tf_package = gpu.get("build", {}).get("args", {}).get("TF_PACKAGE", "")
    assert tf_package == f"tensorflow[and-cuda]=={pin_version}", (
        f"worker-gpu TF_PACKAGE {tf_package!r} must be tensorflow[and-cuda] at the CPU pin {pin_version}"
    )


def test_cpu_worker_batches_across_studies(services: dict[str, Any]) -> None:
    args = [with_defaults(a) for a in argv(services["worker"]["command"])]
    assert "--pool=threads" in args, f"CPU workers batch across studies with the threads pool: {args}"
    concurrency = [a for a in args if a.startswith("--concurrency=")]
    assert concurrency and int(concurrency[0].split("=")[1]) >= 2, args


def test_workers_consume_the_queue_the_app_sends_to(services: dict[str, Any]) -> None:
    queue = with_defaults(env_of(services["web"])["CELERY_QUEUE"])
    for name in ("worker", "worker-gpu"):
        args = [with_defaults(a) for a in argv(services[name]["command"])]
        assert f"--queues={queue}" in args, f"{name} does not consume queue {queue!r}: {args}"


def strings_in(node: Any) -> list[str]:
    """Every key and value in parsed YAML: what Compose interpolates (comments are not)."""
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in strings_in(k) + strings_in(v)]
    if isinstance(node, list):
        return [s for item in node for s in strings_in(item)]
    return [node] if isinstance(node, str) else []


def test_variable_references_are_known(compose: dict[str, Any]) -> None:
    referenced = {a or b for text in strings_in(compose) for a, b in VAR_REF.findall(text)}
    unknown = sorted(v for v in referenced if v not in ENV_VARS and not v.startswith("POSTGRES_"))
    assert not unknown, f"docker-compose.yml uses variables missing from config.ENV_VARS: {unknown}"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_environment_keys_are_known(services: dict[str, Any], name: str) -> None:
    unknown = sorted(k for k in env_of(services[name]) if k not in ENV_VARS)
    assert not unknown, f"{name} sets variables missing from config.ENV_VARS: {unknown}"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_secret_key_is_required_not_defaulted(services: dict[str, Any], name: str) -> None:
    value = env_of(services[name]).get("SECRET_KEY", "")
    assert re.fullmatch(r"\$\{SECRET_KEY:\?[^}]*\}", value), (
        f"{name} SECRET_KEY must be ${{SECRET_KEY:?...}} (required, no default), got {value!r}"
    )


@pytest.mark.parametrize("name", ["web", "migrate"])
def test_flask_app_target_exists(services: dict[str, Any], name: str) -> None:
    module, func = APP_TARGET.match(app_target(argv(services[name]["command"]))).groups()
    path = module_file(module)
    assert func in top_level_names(path), f"{path} does not define {func}() used by {name}"


@pytest.mark.parametrize("name", CELERY_SERVICES)
def test_celery_app_module_exists(services: dict[str, Any], name: str) -> None:
    args = argv(services[name]["command"])
    assert args[0] == "celery", f"{name} should run celery, got {args}"
    path = module_file(celery_app_module(args))
    assert top_level_names(path), f"{path} defines nothing for `celery -A` to find"


def test_migrations_are_alembic() -> None:
    assert (ROOT / "migrations" / "env.py").is_file(), (
        "migrations/env.py missing; `db upgrade` would fail"
    )


def test_migrate_runs_db_upgrade(services: dict[str, Any]) -> None:
    args = argv(services["migrate"]["command"])
    assert args[0] == "flask" and args[-2:] == ["db", "upgrade"], f"migrate command: {args}"
    assert services["migrate"].get("restart", "no") == "no", (
        "migrate is one-shot; it must not restart"
    )


def test_database_url_points_at_postgres_service(services: dict[str, Any]) -> None:
    pg_env = env_of(services["postgres"])
    for name in APP_SERVICES:
        raw = env_of(services[name])["DATABASE_URL"]
        url = urlsplit(with_defaults(raw))
        assert url.scheme == "postgresql+psycopg", f"{name} DATABASE_URL scheme {url.scheme!r}"
        assert (url.hostname, url.port) == ("postgres", 5432), (
            f"{name} DATABASE_URL host {url.netloc!r}"
        )
        assert url.username == pg_env["POSTGRES_USER"], f"{name} DATABASE_URL user != POSTGRES_USER"
        assert url.path.lstrip("/") == pg_env["POSTGRES_DB"], (
            f"{name} DATABASE_URL db != POSTGRES_DB"
        )
        raw_password = raw.split("://", 1)[1].rsplit("@", 1)[0].split(":", 1)[1]
        assert raw_password == pg_env["POSTGRES_PASSWORD"], (
            f"{name} DATABASE_URL password {raw_password!r} must be the postgres service's "
            f"{pg_env['POSTGRES_PASSWORD']!r}"
        )
    assert "psycopg" in (ROOT / "requirements.txt").read_text(), "postgresql+psycopg needs psycopg"


def test_redis_url_points_at_redis_service(services: dict[str, Any]) -> None:
    for name in APP_SERVICES:
        url = urlsplit(with_defaults(env_of(services[name])["REDIS_URL"]))
        assert url.scheme == "redis" and url.hostname == "redis", (
            f"{name} REDIS_URL {url.geturl()!r}"
        )
        assert url.port in (None, 6379), f"{name} REDIS_URL port {url.port}"
    command = argv(services["redis"]["command"])
    assert "--appendonly" in command and command[command.index("--appendonly") + 1] == "yes", (
        f"redis must persist the queue (--appendonly yes): {command}"
    )


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_app_services_wait_for_migrations_and_backing_services(
    services: dict[str, Any], name: str
) -> None:
    expected = {
        "migrate": "service_completed_successfully",
        "postgres": "service_healthy",
        "redis": "service_healthy",
    }
    depends = services[name].get("depends_on", {})
    got = (
        {dep: depends.get(dep, {}).get("condition") for dep in expected}
        if isinstance(depends, dict)
        else {}
    )
    assert got == expected, f"{name} depends_on {got}, expected {expected}"


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_long_running_services_come_back_after_a_crash(services: dict[str, Any], name: str) -> None:
    policy = services[name].get("restart", "no")
    assert policy in ("always", "unless-stopped"), (
        f"{name} restart: {policy!r}; a killed {name} would stay down"
    )


def test_workers_and_beat_agree_on_the_lease(services: dict[str, Any]) -> None:
    # The sweeper (beat) judges the heartbeats the workers write: one setting for all,
    # with the defaults config.py gives a local run.
    defaults = Settings.from_env({"SECRET_KEY": "x"})
    expected = {"LEASE_S": defaults.lease_s, "HEARTBEAT_S": defaults.heartbeat_s,
                "SWEEP_INTERVAL_S": defaults.sweep_interval_s}
    for name in CELERY_SERVICES:
        env = env_of(services[name])
        got = {key: int(with_defaults(env.get(key, "unset"))) if key in env else None
               for key in expected}
        assert got == expected, f"{name}: {got}, expected {expected}"


def test_migrate_waits_for_postgres(services: dict[str, Any]) -> None:
    condition = services["migrate"].get("depends_on", {}).get("postgres", {}).get("condition")
    assert condition == "service_healthy", (
        f"migrate must wait for a healthy postgres, got {condition}"
    )


def test_healthchecks(services: dict[str, Any]) -> None:
    def check(name: str) -> str:
        test = services[name].get("healthcheck", {}).get("test", [])
        return " ".join(test) if isinstance(test, list) else test

    assert "pg_isready" in check("postgres"), "postgres healthcheck must use pg_isready"
    assert "redis-cli ping" in check("redis"), "redis healthcheck must use redis-cli ping"
    assert "127.0.0.1:8000/healthz" in check("web"), "web healthcheck must hit /healthz on 8000"


def test_named_volumes_are_declared(compose: dict[str, Any], services: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    for name in ("postgres", "redis"):
        sources = [str(v).split(":", 1)[0] for v in services[name].get("volumes", [])]
        assert any(s in declared for s in sources), (
            f"{name} data must live in a named volume: {sources}"
        )
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else str(volume).split(":", 1)[0]
            if not source.startswith((".", "/", "~")):
                assert source in declared, (
                    f"{name} uses volume {source!r} not declared under volumes:"
                )


@pytest.mark.parametrize("name", ["web", "worker", "worker-gpu"])
def test_model_dir_is_mounted(services: dict[str, Any], name: str) -> None:
    model_dir = env_of(services[name])["MODEL_DIR"]
    targets = [str(v).split(":")[1] for v in services[name].get("volumes", [])]
    assert any(model_dir.startswith(t.rstrip("/") + "/") for t in targets), (
        f"{name} MODEL_DIR {model_dir} is not inside a mounted volume {targets}; the image has no model"
    )


def test_dockerfile_tf_package_matches_requirements(dockerfile: list[str]) -> None:
    args = [
        line.split(None, 1)[1] for line in dockerfile if line.upper().startswith("ARG TF_PACKAGE")
    ]
    assert args, "Dockerfile has no ARG TF_PACKAGE"
    default = args[0].split("=", 1)[1] if "=" in args[0] else ""
    assert default == tf_pin(), (
        f"ARG TF_PACKAGE default {default!r} != requirements pin {tf_pin()!r}"
    )


def test_dockerfile_cmd_is_the_web_command(dockerfile: list[str], services: dict[str, Any]) -> None:
    cmd = dockerfile_cmd(dockerfile)
    web = argv(services["web"]["command"])
    assert cmd[0] == web[0] == "gunicorn", f"Dockerfile CMD {cmd[0]!r} vs web {web[0]!r}"
    assert app_target(cmd) == app_target(web), (
        f"Dockerfile CMD serves {app_target(cmd)}, web {app_target(web)}"
    )
    assert "0.0.0.0:8000" in cmd, f"Dockerfile CMD must bind 0.0.0.0:8000: {cmd}"


def test_dockerfile_runs_as_non_root(dockerfile: list[str]) -> None:
    users = [line.split()[1] for line in dockerfile if line.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"Dockerfile final USER: {users}"
    assert any(line.startswith("FROM python:3.11-slim") for line in dockerfile), (
        "base must be python:3.11-slim"
    )


def test_dockerignore_keeps_secrets_and_local_state_out() -> None:
    patterns = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    missing = {".git", ".venv", ".env", "instance"} - patterns
    assert not missing, f".dockerignore must exclude {sorted(missing)}"
