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

def _resolve(project: Path, *files: Path) -> dict[str, Any]:
    """``docker-compose config`` of ``files`` with ``project`` as the project directory."""
    exe = shutil.which("docker-compose")
    assert exe, "docker-compose is not installed (scripts/setup.sh installs it)"
    argv = [exe, "--project-directory", str(project)]
    for file in files:
        argv += ["-f", str(file)]
    env = {name: os.environ[name] for name in ("PATH", "HOME", "LANG") if name in os.environ}
    result = subprocess.run([*argv, "config"], capture_output=True, text=True, env=env,
                            cwd=project, timeout=120, check=False)
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
    exe = shutil.which("docker-compose")
    assert exe
    env = {name: os.environ[name] for name in ("PATH", "HOME", "LANG") if name in os.environ}
    result = subprocess.run([exe, "--project-directory", str(tmp_path), "-f", str(COMPOSE),
                             "config"], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=120, check=False)
    assert result.returncode != 0 and "REDIS_PASSWORD" in result.stderr, result.stderr


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
    assert interpolated <= set(example), interpolated - set(example)


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
