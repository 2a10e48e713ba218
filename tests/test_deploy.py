"""The container deployment: docker-compose.yml (and its CPU override) as docker-compose
resolves it with the example settings, checked against the services' own configuration,
docs/observability.md, the image's Dockerfile and its entry point.

docker-compose runs in a scratch project directory holding only a copy of .env.example as
.env, with a bare environment: relative paths resolve there, and neither a local .env nor
the caller's variables leak in. Mounts from ./deploy are checked by path, not existence.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
from fnmatch import fnmatch
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from services.core.settings import Settings
from services.notifier.config import NotifierSettings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
CPU_OVERRIDE = ROOT / "deploy" / "docker" / "docker-compose.cpu.yml"
CI_OVERRIDE = ROOT / "deploy" / "docker" / "docker-compose.ci.yml"
CI_IMAGES = ROOT / "deploy" / "docker" / "ci"
SMOKE = ROOT / "scripts" / "compose-smoke.sh"
SMOKE_CHECKS = ROOT / "scripts" / "compose_smoke_check.py"
BASE_IMAGE_SCRIPT = ROOT / "scripts" / "docker-base-image.sh"
CI_RUN = ROOT / ".ci" / "run"
STAND_IN = ROOT / "tests" / "telegram_stand_in.py"
LOCAL_BASE = "smart-tuner/debian-base:bookworm"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
ENTRYPOINT = ROOT / "deploy" / "docker" / "entrypoint.sh"
DOCKERIGNORE = ROOT / ".dockerignore"
OBSERVABILITY = ROOT / "docs" / "observability.md"
SETUP = ROOT / "scripts" / "setup.sh"

PYTHON_SERVICES = ("trainer", "diagnostics", "tuner", "api", "notifier")
SERVICES = ("redis", *PYTHON_SERVICES, "prometheus", "alertmanager", "grafana")
# The project's .env in these tests: .env.example with a Redis password filled in (compose
# refuses to start without one).
REDIS_PASSWORD = "test-password_0123456789abcdef"
REDIS_URL = f"redis://:{REDIS_PASSWORD}@redis:6379/0"
TRAINER_RESTART = "on-failure:5"  # restarted after a crash, at most 5 times in a row
GPU_DEVICES = [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
SECRET_NAME = re.compile(r"TOKEN|PASSWORD|SECRET")


# --------------------------------------------------------------------------- helpers

def _config(project: Path, *files: Path,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``docker-compose config`` of ``files`` with ``project`` as the project directory, in
    a bare environment plus ``env``."""
    exe = shutil.which("docker-compose")
    assert exe, "docker-compose is not installed (scripts/setup.sh installs it)"
    argv = [exe, "--project-directory", str(project)]
    for file in files:
        argv += ["-f", str(file)]
    bare = {name: os.environ[name] for name in ("PATH", "HOME", "LANG") if name in os.environ}
    return subprocess.run([*argv, "config"], capture_output=True, text=True,
                          env={**bare, **(env or {})}, cwd=project, timeout=120, check=False)


def _resolve(project: Path, *files: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The resolved configuration of ``files`` (see ``_config``)."""
    result = _config(project, *files, env=env)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def _env_example() -> dict[str, str]:
    """The variables of .env.example (comments and blank lines left out)."""
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)", line.strip())
        if match:
            values[match[1]] = match[2]
    return values


def _mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """Container path -> (source, read-only) of a resolved service's volumes."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            mounts[volume["target"]] = (volume["source"], bool(volume.get("read_only")))
        else:
            source, target, *mode = volume.split(":")
            mounts[target] = (source, "ro" in (mode[0].split(",") if mode else []))
    return mounts


def _published(service: dict[str, Any]) -> set[int]:
    """Container ports a resolved service publishes on the host."""
    ports = set()
    for port in service.get("ports", []):
        if isinstance(port, dict):
            ports.add(int(port["target"]))
        else:
            ports.add(int(str(port).split(":")[-1].split("/")[0]))
    return ports


def _probe_url(service: dict[str, Any]) -> str:
    """The URL a Python service's health check asks (``python -c <probe> <url>``)."""
    test = service["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"], test
    return test[4]


def _flag(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("compose-project")
    (directory / ".env").write_text(ENV_EXAMPLE.read_text().replace(
        "\nREDIS_PASSWORD=\n", f"\nREDIS_PASSWORD={REDIS_PASSWORD}\n"))
    return directory


@pytest.fixture(scope="module")
def base(project: Path) -> dict[str, Any]:
    return _resolve(project, COMPOSE)


@pytest.fixture(scope="module")
def cpu(project: Path) -> dict[str, Any]:
    return _resolve(project, COMPOSE, CPU_OVERRIDE)


# --------------------------------------------------------------------------- services

def test_every_service_is_there(base) -> None:
    assert sorted(base["services"]) == sorted(SERVICES)
    assert {"redis-data", "runs", "prometheus-data", "grafana-data"} <= set(base["volumes"])


@pytest.mark.parametrize("name", SERVICES)
def test_every_service_has_a_health_check_and_a_restart_policy(base, name) -> None:
    service = base["services"][name]
    check = service["healthcheck"]
    assert not check.get("disable")
    assert check["test"][0] in ("CMD", "CMD-SHELL") and len(check["test"]) > 1
    assert service["restart"] == (TRAINER_RESTART if name == "trainer" else "unless-stopped")


def test_trainer_restarts_are_limited(base, cpu) -> None:
    """A trainer that crashes at every start (a full disk) stops after 5 restarts instead
    of looping forever, in both variants."""
    assert base["services"]["trainer"]["restart"] == TRAINER_RESTART
    assert cpu["services"]["trainer"]["restart"] == TRAINER_RESTART


def test_redis_requires_the_password_from_env(base, tmp_path) -> None:
    """Redis runs with --requirepass REDIS_PASSWORD; its health check authenticates; and
    without a password in .env compose refuses to start, naming the variable."""
    redis = base["services"]["redis"]
    assert _flag(redis["command"], "--requirepass") == REDIS_PASSWORD
    assert redis["environment"]["REDISCLI_AUTH"] == REDIS_PASSWORD
    shutil.copy(ENV_EXAMPLE, tmp_path / ".env")  # REDIS_PASSWORD= left empty
    result = _config(tmp_path, COMPOSE)
    assert result.returncode != 0 and "REDIS_PASSWORD" in result.stderr, result.stderr


@pytest.mark.parametrize("files", [(COMPOSE,), (COMPOSE, CPU_OVERRIDE)], ids=["gpu", "cpu"])
def test_first_run_without_env_says_what_to_do(tmp_path, files) -> None:
    """No .env at all (a fresh checkout): compose stops before anything starts, and says
    to copy .env.example and fill in the password, not only that a file is missing."""
    result = _config(tmp_path, *files)
    assert result.returncode != 0
    assert "REDIS_PASSWORD is not set" in result.stderr, result.stderr
    assert "cp .env.example .env" in result.stderr, result.stderr
    # With the example settings and a password the stack resolves (the base fixture).


def test_stack_env_file_replaces_env(tmp_path) -> None:
    """STACK_ENV_FILE names the services' settings file instead of .env (the smoke run's
    scratch settings): its SMART_TUNER_* values reach every Python service."""
    settings = tmp_path / "elsewhere" / "smoke.env"
    settings.parent.mkdir()
    settings.write_text(f"REDIS_PASSWORD={REDIS_PASSWORD}\nSMART_TUNER_LOG_LEVEL=DEBUG\n")
    config = _resolve(tmp_path, COMPOSE, CPU_OVERRIDE,
                      env={"STACK_ENV_FILE": str(settings), "REDIS_PASSWORD": REDIS_PASSWORD})
    for name in ("trainer-cpu", "diagnostics", "tuner", "api", "notifier"):
        assert config["services"][name]["environment"]["SMART_TUNER_LOG_LEVEL"] == "DEBUG"


def test_python_services_share_the_image_and_reach_redis(base) -> None:
    services = base["services"]
    assert services["redis"]["image"].startswith("redis:7-alpine")
    assert "--appendonly" in services["redis"]["command"]
    assert _mounts(services["redis"])["/data"] == ("redis-data", False)
    assert "redis-cli ping" in " ".join(services["redis"]["healthcheck"]["test"])
    images = {services[name]["image"] for name in PYTHON_SERVICES}
    builds = [services[name]["build"] for name in PYTHON_SERVICES]
    assert len(images) == 1
    assert all(build == builds[0] for build in builds)
    assert builds[0]["dockerfile"] == "deploy/Dockerfile"
    for name in PYTHON_SERVICES:
        service = services[name]
        assert service["environment"]["SMART_TUNER_REDIS_URL"] == REDIS_URL, name
        assert service["depends_on"] == {"redis": {"condition": "service_healthy"}}, name
        assert service["init"] is True, name
    # The URL names the compose service, on Redis's own port.
    assert urlsplit(REDIS_URL).hostname in services


def test_commands_are_the_launchers(base) -> None:
    """The same processes ``smart-tuner up`` starts (services/launcher/up.py), in containers."""
    services = base["services"]
    example = _env_example()
    run = example["RUN_ID"]
    assert services["trainer"]["command"] == [
        "smart-tuner", "train", "--data", "/data", "--out", f"/runs/{run}", "--run-id", run,
        "--preset", example["PRESET"], "--resume", "--resume-from", "last_good"]
    assert services["diagnostics"]["command"] == [
        "celery", "-A", "services.diagnostics.celery_app", "worker", "--concurrency", "2",
        "--loglevel", "INFO"]
    assert services["tuner"]["command"] == ["python", "-m", "services.tuner.service"]
    assert services["api"]["command"] == [
        "uvicorn", "--factory", "services.tuner.api:create_app_from_settings",
        "--host", "0.0.0.0", "--port", "8000"]
    assert services["notifier"]["command"] == ["python", "-m", "services.notifier.service"]
    assert services["notifier"]["environment"]["SMART_TUNER_NOTIFIER_HOST"] == "0.0.0.0"
    # The targets exist in the code.
    from services.tuner import api

    assert callable(api.create_app_from_settings)
    for module in ("services.tuner.service", "services.notifier.service",
                   "services.diagnostics.celery_app"):
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), module


def test_diagnostics_worker_serves_the_sum_of_its_pool(base) -> None:
    from services.diagnostics import exporter

    env = base["services"]["diagnostics"]["environment"]
    assert env[exporter.MULTIPROC_DIR_ENV] == "/tmp/prometheus-multiproc"
    # Only the worker: in any other service the variable would change prometheus_client.
    others = [name for name, service in base["services"].items()
              if name != "diagnostics" and exporter.MULTIPROC_DIR_ENV in
              service.get("environment", {})]
    assert others == []


def _observability_endpoints() -> dict[str, tuple[int, str]]:
    """Prometheus job -> (port, how it is set) from the endpoints table of the docs."""
    text = OBSERVABILITY.read_text()
    table = text.split("## Endpoints", 1)[1].split("\n## ", 1)[0]
    endpoints = {}
    for row in table.splitlines():
        cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[1].startswith("`"):
            continue
        job = cells[1].strip("`")
        port = int(re.search(r":(\d+)", cells[2])[1])
        setting = re.search(r"`(SMART_TUNER_\w+|--port)`", cells[3])[1]
        endpoints[job] = (port, setting)
    return endpoints


def test_ports_match_the_observability_doc(base) -> None:
    endpoints = _observability_endpoints()
    assert sorted(endpoints) == sorted(PYTHON_SERVICES)
    assert endpoints["trainer"][0] == 9101 and endpoints["tuner"][0] == 9102
    assert endpoints["diagnostics"][0] == 9103
    assert endpoints["api"][0] == 8000 and endpoints["notifier"][0] == 8001
    for job, (port, setting) in endpoints.items():
        service = base["services"][job]  # the Prometheus job is the compose service
        if setting == "--port":
            assert _flag(service["command"], "--port") == str(port), job
        else:
            assert service["environment"][setting] == str(port), job
        assert re.fullmatch(rf"http://127\.0\.0\.1:{port}/(metrics|healthz)",
                            _probe_url(service)), job
    # The monitoring row: Prometheus / Alertmanager / Grafana on :9090 / :9093 / :3000.
    row = next(line for line in OBSERVABILITY.read_text().splitlines()
               if line.startswith("| Prometheus / Alertmanager / Grafana"))
    ports = [int(port) for port in re.findall(r"`:(\d+)`", row)]
    for name, port in zip(("prometheus", "alertmanager", "grafana"), ports, strict=True):
        assert _published(base["services"][name]) == {port}, name
        assert f"127.0.0.1:{port}/" in " ".join(base["services"][name]["healthcheck"]["test"])
    assert _published(base["services"]["api"]) == {8000}


def test_metric_port_variables_are_the_ones_the_code_reads(base) -> None:
    from services.diagnostics import exporter as diagnostics
    from services.trainer import exporter as trainer
    from services.tuner import exporter as tuner

    for name, module in (("trainer", trainer), ("tuner", tuner),
                         ("diagnostics", diagnostics)):
        assert module.METRICS_PORT_ENV in base["services"][name]["environment"], name
    assert NotifierSettings.model_config["env_prefix"] + "PORT" in \
        base["services"]["notifier"]["environment"]


# --------------------------------------------------------------------------- trainer, GPU, CPU

def test_trainer_reserves_one_nvidia_gpu(base) -> None:
    trainer = base["services"]["trainer"]
    assert trainer["deploy"]["resources"]["reservations"]["devices"] == GPU_DEVICES
    assert trainer["environment"]["SMART_TUNER_DEVICE"] == "cuda"
    assert "profiles" not in trainer  # started by a plain `docker-compose up`


def test_trainer_volumes_keep_the_corpus_read_only(base, project) -> None:
    trainer = base["services"]["trainer"]
    mounts = _mounts(trainer)
    data = os.path.normpath(project / _env_example()["DATA_DIR"])
    assert mounts["/data/metadata.csv"] == (os.path.join(data, "metadata.csv"), True)
    assert mounts["/data/wavs"] == (os.path.join(data, "wavs"), True)
    assert mounts["/data/.features"] == ("features", False)  # the cache beside the corpus
    assert mounts["/runs"] == ("runs", False)
    assert _flag(trainer["command"], "--data") == "/data"
    assert _flag(trainer["command"], "--out").startswith("/runs/")
    notifier = base["services"]["notifier"]
    assert _mounts(notifier)["/runs"] == ("runs", True)
    assert notifier["environment"]["SMART_TUNER_NOTIFIER_RUNS_DIR"] == "/runs"


def test_cpu_override_runs_the_same_trainer_without_the_gpu(base, cpu) -> None:
    gpu_trainer = base["services"]["trainer"]
    parked = cpu["services"]["trainer"]
    assert parked["profiles"] == ["gpu"]  # not started unless asked for
    runnable = [name for name, service in cpu["services"].items()
                if "profiles" not in service and "train" in service.get("command", [])]
    assert runnable == ["trainer-cpu"]
    trainer = cpu["services"]["trainer-cpu"]
    assert "deploy" not in trainer
    assert trainer["environment"]["SMART_TUNER_DEVICE"] == "cpu"
    assert _flag(trainer["command"], "--preset") == "tiny"
    assert trainer["networks"]["default"]["aliases"] == ["trainer"]  # Prometheus's target
    # Everything else as the GPU trainer.
    assert set(trainer) == set(gpu_trainer) - {"deploy"} | {"networks"}
    for key in set(gpu_trainer) - {"deploy", "environment", "command", "volumes"}:
        assert trainer[key] == gpu_trainer[key], key
    assert sorted(trainer["volumes"]) == sorted(gpu_trainer["volumes"])
    without_device = {key: value for key, value in trainer["environment"].items()
                      if key != "SMART_TUNER_DEVICE"}
    assert without_device == {key: value for key, value in gpu_trainer["environment"].items()
                              if key != "SMART_TUNER_DEVICE"}
    preset = trainer["command"].index("--preset") + 1
    assert trainer["command"][:preset] == gpu_trainer["command"][:preset]
    assert trainer["command"][preset + 1:] == gpu_trainer["command"][preset + 1:]
    # The other services are untouched.
    for name in set(SERVICES) - {"trainer"}:
        left, right = dict(base["services"][name]), dict(cpu["services"][name])
        left["volumes"] = sorted(left.get("volumes", []))
        right["volumes"] = sorted(right.get("volumes", []))
        assert left == right, name


# --------------------------------------------------------------------------- monitoring

def test_monitoring_mounts_the_deploy_files_by_path(base, project) -> None:
    services = base["services"]
    deploy = project / "deploy"
    expected = {
        "prometheus": {
            "/etc/prometheus/prometheus.yml": (deploy / "prometheus" / "prometheus.yml", True),
            "/etc/prometheus/rules": (deploy / "prometheus" / "rules", True)},
        "alertmanager": {
            "/etc/alertmanager/alertmanager.yml":
                (deploy / "alertmanager" / "alertmanager.yml", True)},
        "grafana": {
            "/etc/grafana/provisioning": (deploy / "grafana" / "provisioning", True),
            "/var/lib/grafana/dashboards": (deploy / "grafana" / "dashboards", True)},
    }
    # Every bind mount from ./deploy, in any service, is one of these.
    from_deploy = {(name, target): source for name, service in services.items()
                   for target, (source, _) in _mounts(service).items()
                   if source.startswith(str(deploy) + os.sep)}
    assert set(from_deploy) == {(name, target) for name, mounts in expected.items()
                                for target in mounts}
    for name, mounts in expected.items():
        got = _mounts(services[name])
        for target, (source, read_only) in mounts.items():
            assert got[target] == (str(source), read_only), (name, target)
    prometheus = services["prometheus"]
    assert _mounts(prometheus)["/prometheus"] == ("prometheus-data", False)
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert "--web.enable-lifecycle" in prometheus["command"]
    assert "--config.file=/etc/alertmanager/alertmanager.yml" in \
        services["alertmanager"]["command"]
    grafana = services["grafana"]
    assert _mounts(grafana)["/var/lib/grafana"] == ("grafana-data", False)
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == \
        _env_example()["GRAFANA_ADMIN_PASSWORD"]
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["alertmanager"]["image"].startswith("prom/alertmanager:")
    assert grafana["image"].startswith("grafana/grafana:")


# --------------------------------------------------------------------------- settings

def test_env_example_commits_no_secret() -> None:
    example = _env_example()
    secrets = {name: value for name, value in example.items() if SECRET_NAME.search(name)}
    assert {"SMART_TUNER_API_TOKEN", "SMART_TUNER_NOTIFIER_TELEGRAM_TOKEN",
            "SMART_TUNER_NOTIFIER_WEBHOOK_TOKEN", "GRAFANA_ADMIN_PASSWORD",
            "REDIS_PASSWORD"} <= set(secrets)
    assert all(value == "" for value in secrets.values()), secrets


def test_env_example_lists_every_variable_the_stack_reads() -> None:
    example = _env_example()
    assert {"RUN_ID", "PRESET", "DATA_DIR", "SMART_TUNER_LOG_LEVEL", "SMART_TUNER_API_TOKEN",
            "SMART_TUNER_NOTIFIER_TELEGRAM_TOKEN", "SMART_TUNER_NOTIFIER_CHAT_IDS",
            "SMART_TUNER_NOTIFIER_ADMIN_IDS", "SMART_TUNER_NOTIFIER_LANGUAGE",
            "SMART_TUNER_NOTIFIER_WEBHOOK_TOKEN", "GRAFANA_ADMIN_PASSWORD"} <= set(example)
    assert example["SMART_TUNER_NOTIFIER_LANGUAGE"] == "ru"
    interpolated = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)",
                                  COMPOSE.read_text() + CPU_OVERRIDE.read_text()))
    assert interpolated, "no ${VAR} found: the pattern is stale"
    # STACK_ENV_FILE names the settings file itself (instead of .env): it cannot live in it.
    assert interpolated - {"STACK_ENV_FILE"} <= set(example), interpolated - set(example)


def test_env_example_names_only_real_settings() -> None:
    """A SMART_TUNER_* line must be a field of the settings that read it (no typos)."""
    notifier_prefix = NotifierSettings.model_config["env_prefix"]
    shared_prefix = Settings.model_config["env_prefix"]
    names = [name for name in _env_example() if name.startswith(shared_prefix)]
    assert names
    for name in names:
        if name.startswith(notifier_prefix):
            assert name.removeprefix(notifier_prefix).lower() in NotifierSettings.model_fields
        else:
            assert name.removeprefix(shared_prefix).lower() in Settings.model_fields, name


def test_example_settings_load_behind_the_entry_point(tmp_path) -> None:
    """Empty SMART_TUNER_* lines (the secrets) mean unset once the entry point ran."""
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), **_env_example(),
           "SMART_TUNER_REDIS_URL": REDIS_URL}
    script = ("from services.core.settings import Settings; s = Settings(); "
              "print(s.api_token, s.num_threads, s.log_level, s.redis_url)")
    result = subprocess.run(["sh", str(ENTRYPOINT), sys.executable, "-c", script],
                            capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["None", "None", "INFO", REDIS_URL]


def test_entry_point_drops_only_empty_smart_tuner_variables() -> None:
    env = {"PATH": os.environ["PATH"], "SMART_TUNER_API_TOKEN": "",
           "SMART_TUNER_LOG_LEVEL": "INFO", "OTHER": "",
           "SMART_TUNER_NOTE": "line\nSMART_TUNER_LOG_LEVEL="}
    result = subprocess.run(["sh", str(ENTRYPOINT), "env", "-0"], capture_output=True,
                            text=True, env=env, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    got = dict(item.split("=", 1) for item in result.stdout.split("\0") if item)
    assert "SMART_TUNER_API_TOKEN" not in got
    assert got["SMART_TUNER_LOG_LEVEL"] == "INFO"
    assert got["OTHER"] == ""
    assert got["SMART_TUNER_NOTE"] == "line\nSMART_TUNER_LOG_LEVEL="


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/healthz" else 503)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_python_health_probe_fails_unless_the_service_answers(base) -> None:
    probe = base["services"]["api"]["healthcheck"]["test"][3]
    server = HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}"

    def run(target: str) -> int:
        return subprocess.run([sys.executable, "-c", probe, target], capture_output=True,
                              timeout=30, check=False).returncode
    try:
        healthy, failing = run(f"{url}/healthz"), run(f"{url}/metrics")
    finally:
        server.shutdown()
        server.server_close()
    assert healthy == 0
    assert failing != 0  # 503: Redis down behind the API
    assert run(url + "/healthz") != 0  # nothing listens any more


# --------------------------------------------------------------------------- image

def test_dockerfile_installs_pinned_torch_first(base) -> None:
    text = DOCKERFILE.read_text()
    lines = [line.strip() for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in lines
    assert all(line.split()[1].startswith("${PYTHON_IMAGE}")
               for line in lines if line.startswith("FROM "))
    index_arg = "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu"
    assert index_arg in lines
    version = next(line.split("=", 1)[1] for line in lines
                   if line.startswith("ARG TORCH_VERSION="))
    # The same torch as scripts/setup.sh, and docker-compose passes the same defaults.
    assert f"TORCH_VERSION:-{version}" in SETUP.read_text()
    args = base["services"]["trainer"]["build"]["args"]
    assert args == {"TORCH_INDEX_URL": index_arg.split("=", 1)[1], "TORCH_VERSION": version}
    torch_at = next(i for i, line in enumerate(lines)
                    if "--index-url" in line and "torch==${TORCH_VERSION}" in line)
    project_at = lines.index("RUN pip install .")
    assert torch_at < project_at
    assert re.search(r"apt-get install[^\n]*\bespeak-ng\b[^\n]*\blibsndfile1\b", text)
    assert not any(line.startswith("HEALTHCHECK") for line in lines)  # per compose service
    assert not re.search(r"^(ARG|ENV)\s+\S*(TOKEN|PASSWORD|SECRET)", text, re.M)


def test_image_runs_as_a_user_from_app_with_the_tuner_config() -> None:
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines()
             if not line.lstrip().startswith("#")]
    final = lines[max(i for i, line in enumerate(lines) if line.startswith("FROM ")):]
    users = [line.split()[1] for line in final if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert "WORKDIR /app" in final
    # The tuner reads its thresholds relative to the working directory.
    tuner_config = Path(Settings.model_fields["tuner_config"].default)
    assert f"COPY {tuner_config.parts[0]} /app/{tuner_config.parts[0]}" in final
    assert (ROOT / tuner_config).is_file()
    entry = next(line for line in final if line.startswith("ENTRYPOINT"))
    copied = next(line for line in final if line.startswith("COPY deploy/docker/entrypoint.sh"))
    assert copied.split()[-1].rsplit("/", 1)[-1] in entry


def test_dockerignore_keeps_out_local_and_secret_files_but_not_the_build_inputs() -> None:
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for needed in (".venv", "runs", "data", ".git", ".env"):
        assert needed in patterns, needed
    assert "!.env.example" in patterns
    excludes = [pattern for pattern in patterns if not pattern.startswith("!")]
    for path in ("pyproject.toml", "README.md", "services", "config", "deploy",
                 "deploy/docker/entrypoint.sh"):
        hits = [pattern for pattern in excludes if fnmatch(path, pattern.removeprefix("**/"))]
        assert hits == [], (path, hits)


# --------------------------------------------------------------------------- CI: the smoke run

@pytest.fixture(scope="module")
def ci(project: Path) -> dict[str, Any]:
    # compose wants the CI images' build context to exist (the app image's is `.`).
    context = project / CI_IMAGES.relative_to(ROOT)
    context.parent.mkdir(parents=True, exist_ok=True)
    if not context.exists():
        context.symlink_to(CI_IMAGES, target_is_directory=True)
    return _resolve(project, COMPOSE, CPU_OVERRIDE, CI_OVERRIDE)


CI_EQUIVALENTS = {  # service -> (Debian package, binary the image's entry point runs)
    "redis": ("redis-server", None),
    "prometheus": ("prometheus", "/usr/bin/prometheus"),
    "alertmanager": ("prometheus-alertmanager", "/usr/bin/prometheus-alertmanager"),
}


def test_ci_override_builds_every_image_from_the_local_debian_base(ci, cpu, project) -> None:
    """No registry in CI: the app image FROM the debootstrap base, and Redis, Prometheus and
    Alertmanager from Debian's packages, all built with the host's network."""
    services = ci["services"]
    for name in ("trainer-cpu", "diagnostics", "tuner", "api", "notifier"):
        build = services[name]["build"]
        assert build["network"] == "host", name
        assert build["args"]["PYTHON_IMAGE"] == LOCAL_BASE, name
        # The user's build, otherwise: same Dockerfile, same torch.
        assert {key: value for key, value in build.items() if key not in ("network", "args")} \
            == {key: value for key, value in cpu["services"][name]["build"].items()
                if key != "args"}, name
        assert build["args"]["TORCH_VERSION"] == cpu["services"][name]["build"]["args"][
            "TORCH_VERSION"]
    for name, (package, binary) in CI_EQUIVALENTS.items():
        service = services[name]
        assert service["image"].startswith(f"smart-tuner/ci-{name}:"), name
        assert service["build"]["network"] == "host"
        assert service["build"]["args"] == {"BASE_IMAGE": LOCAL_BASE}
        context = Path(service["build"]["context"])
        assert context == project / CI_IMAGES.relative_to(ROOT), name
        dockerfile = CI_IMAGES / service["build"]["dockerfile"]
        text = dockerfile.read_text()
        lines = [line.strip() for line in text.splitlines() if not line.startswith("#")]
        assert f"ARG BASE_IMAGE={LOCAL_BASE}" in lines and "FROM ${BASE_IMAGE}" in lines
        assert re.search(rf"apt-get install[^\n]*\s{re.escape(package)}(\s|$)", text), name
        users = [line.split()[1] for line in lines if line.startswith("USER ")]
        assert users and users[-1] not in ("root", "0"), name
        if binary:  # the official images' entry point is the binary: same command lines
            assert f'ENTRYPOINT ["{binary}"]' in lines, name
    assert (ROOT / "deploy" / "docker" / "ci").is_dir()
    assert LOCAL_BASE in BASE_IMAGE_SCRIPT.read_text()
    assert "debootstrap --variant=minbase" in BASE_IMAGE_SCRIPT.read_text()


def test_ci_override_keeps_the_real_configuration(ci, cpu) -> None:
    """The CI equivalents run docker-compose.yml's own command lines, volumes, health
    checks and dependencies; only the image, the build and the check interval differ."""
    changed = {"image", "build", "healthcheck", "profiles"}
    for name in ("redis", "prometheus", "alertmanager", "trainer-cpu", "diagnostics", "tuner",
                 "api", "notifier"):
        ours, theirs = ci["services"][name], cpu["services"][name]
        for key in set(ours) | set(theirs):
            if key in changed or (name == "trainer-cpu" and key == "command") or \
                    (name == "notifier" and key in ("environment", "depends_on")):
                continue
            assert ours.get(key) == theirs.get(key), (name, key)
        check = {key: value for key, value in ours["healthcheck"].items()
                 if key not in ("interval", "start_period")}
        assert check == {key: value for key, value in theirs["healthcheck"].items()
                         if key not in ("interval", "start_period")}, name
        assert ours["healthcheck"]["interval"] == "5s"
    notifier = ci["services"]["notifier"]
    assert notifier["depends_on"] == {**cpu["services"]["notifier"]["depends_on"],
                                      "telegram": {"condition": "service_healthy"}}


def test_ci_override_leaves_grafana_out_and_says_why(ci) -> None:
    """Grafana has no Debian package and no registry is reachable: the smoke run does not
    start it (profile `grafana`), and the override and the script say so."""
    assert ci["services"]["grafana"]["profiles"] == ["grafana"]
    started = [name for name, service in ci["services"].items() if "profiles" not in service]
    assert sorted(started) == sorted(["redis", "trainer-cpu", "diagnostics", "tuner", "api",
                                      "notifier", "prometheus", "alertmanager", "telegram"])
    assert "Grafana has no Debian package" in CI_OVERRIDE.read_text()
    assert "Grafana is not started" in SMOKE.read_text()
    # The smoke run counts the same containers.
    assert f'-eq {len(started)} ]' in SMOKE.read_text()


def test_ci_trainer_injects_a_lasting_grad_spike(ci, cpu) -> None:
    from services.core.indicators import GRAD_NORM_RED_FLAG
    from services.trainer.faults import FaultPlan

    command = ci["services"]["trainer-cpu"]["command"]
    base_command = cpu["services"]["trainer-cpu"]["command"]
    assert command[:len(base_command)] == base_command  # the CPU trainer, plus small steps
    plan = FaultPlan.parse(_flag(command, "--inject-fault"))
    assert plan.kind == "grad_spike" and plan.every is None
    assert plan.steps >= 100_000 and plan.factor >= 100  # lasts until the stack goes down
    assert GRAD_NORM_RED_FLAG <= 100
    rules = (ROOT / "deploy" / "prometheus" / "rules" / "smart-tuner.yml").read_text()
    assert "alert: GradNormRedFlag" in rules
    assert int(_flag(command, "--eval-every")) <= 10  # snapshots for the worker, soon


def test_ci_telegram_stand_in_is_the_notifiers_telegram(ci, project) -> None:
    telegram = ci["services"]["telegram"]
    assert telegram["image"] == ci["services"]["api"]["image"]  # the app image, no build
    assert "build" not in telegram
    mounts = _mounts(telegram)
    assert mounts["/app/telegram_stand_in.py"] == (str(project / STAND_IN.relative_to(ROOT)),
                                                   True)
    command = telegram["command"]
    assert command[:2] == ["python", "/app/telegram_stand_in.py"]
    assert _flag(command, "--host") == "0.0.0.0"
    port = _flag(command, "--port")
    env = ci["services"]["notifier"]["environment"]
    assert env["SMART_TUNER_NOTIFIER_TELEGRAM_API_URL"] == f"http://telegram:{port}"
    assert _probe_url(telegram) == f"http://127.0.0.1:{port}/_calls"
    # The smoke run's bot token is the stand-in's default one.
    from tests.telegram_stand_in import TEST_TOKEN

    assert f'BOT_TOKEN="{TEST_TOKEN}"' in SMOKE.read_text()


def test_stand_in_serves_as_a_program() -> None:
    """``python tests/telegram_stand_in.py`` (the stand-in container's command) serves the
    Bot API and lists what it received at /_calls, and stops on SIGTERM."""
    import json
    import socket
    import time
    import urllib.request

    from tests.telegram_stand_in import TEST_TOKEN

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, str(STAND_IN), "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{base}/bot{TEST_TOKEN}/getMe", timeout=5) as r:
                    assert json.load(r)["ok"] is True
                break
            except OSError:
                assert time.monotonic() < deadline and process.poll() is None
                time.sleep(0.2)
        with urllib.request.urlopen(f"{base}/_calls", timeout=5) as answer:
            calls = json.load(answer)
        assert [call["method"] for call in calls] == ["getMe"]
        assert calls[0]["status"] == 200
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output


def test_smoke_run_is_wired_into_ci_after_the_tests() -> None:
    lines = [line.strip() for line in CI_RUN.read_text().splitlines()
             if line.strip() and not line.strip().startswith("#")]
    tests_at = next(i for i, line in enumerate(lines) if line.startswith(".venv/bin/pytest"))
    smoke_at = next(i for i, line in enumerate(lines)
                    if line.startswith("bash scripts/compose-smoke.sh"))
    assert tests_at < smoke_at
    assert not lines[tests_at].startswith("exec")  # the smoke run must still come
    assert "|| tests_rc=$?" in lines[tests_at] and "|| smoke_rc=$?" in lines[smoke_at]
    assert any('exit "$smoke_rc"' in line for line in lines[smoke_at:])  # its failure counts
    assert any('exit "$tests_rc"' in line for line in lines[smoke_at:])


def test_smoke_script_runs_the_three_files_and_every_check() -> None:
    text = SMOKE.read_text()
    for file in (COMPOSE, CPU_OVERRIDE, CI_OVERRIDE):
        assert f"-f {file.relative_to(ROOT)}" in text, file
    assert "STACK_ENV_FILE" in text  # never the local .env
    assert "down -v" in text and "com.docker.compose.project" in text
    assert "--iptables=false" in text
    checks = SMOKE_CHECKS.read_text()
    for name in ("runs", "targets", "rules", "command", "alert", "telegram"):
        assert f"check {name} " in text, name
        assert f'"{name}": check_{name}' in checks, name
    for stream in ("metrics", "attention", "diagnostics"):
        assert f"wait_stream {stream} " in text, stream
    assert "check targets trainer tuner diagnostics api notifier prometheus" in text
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"] for job in prometheus["scrape_configs"]}
    assert jobs == {"trainer", "tuner", "diagnostics", "api", "notifier", "prometheus"}
    # The torch wheel: the one scripts/setup.sh finds, never an unpinned index build.
    assert 'torch-"$TORCH_VERSION"+cpu-' in text and 'torch-"$TORCH_VERSION"+cpu-' in \
        SETUP.read_text()


def test_build_inputs_go_into_the_context_but_not_into_git() -> None:
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    excludes = [pattern for pattern in patterns if not pattern.startswith("!")]
    for path in ("deploy/build-inputs", "deploy/build-inputs/torch-2.13.0+cpu-x.whl",
                 "deploy/build-inputs/ca-certificates.crt", "deploy/docker/ci"):
        assert [p for p in excludes if fnmatch(path, p.removeprefix("**/"))] == [], path
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert "/deploy/build-inputs/*.whl" in ignored and "/deploy/build-inputs/*.crt" in ignored
    text = DOCKERFILE.read_text()
    assert "COPY deploy/build-inputs/ /tmp/build-inputs/" in text
    assert '/tmp/build-inputs/torch-"${TORCH_VERSION}"+cpu-*.whl' in text
    assert (ROOT / "deploy" / "build-inputs" / "README.md").is_file()
