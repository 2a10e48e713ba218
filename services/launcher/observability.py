"""Prometheus and Alertmanager as plain processes on loopback, for the local launcher.

The configs are the deployment's own (the rule files of ``deploy/prometheus/rules`` and the
routing and inhibition of ``deploy/alertmanager/alertmanager.yml``), pointed at the local
ports instead of the compose network's service names. Debian's packages ``prometheus`` and
``prometheus-alertmanager`` provide the binaries.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from services.notifier.config import DEFAULT_PORT as NOTIFIER_PORT
from services.notifier.config import WEBHOOK_PATH

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES_DIR = DEPLOY / "prometheus" / "rules"
ALERTMANAGER_CONFIG = DEPLOY / "alertmanager" / "alertmanager.yml"
PROMETHEUS_BINARY = "prometheus"
ALERTMANAGER_BINARY = "prometheus-alertmanager"  # Debian's name; upstream calls it alertmanager


@dataclass(frozen=True)
class LocalPorts:
    """Where each service listens on 127.0.0.1 (the defaults of docs/observability.md)."""

    trainer: int = 9101
    tuner: int = 9102
    diagnostics: int = 9103
    api: int = 8000
    notifier: int = NOTIFIER_PORT
    prometheus: int = 9090
    alertmanager: int = 9093

    def metrics_env(self) -> dict[str, str]:
        """The variables that make each service serve its metrics on its port."""
        return {"SMART_TUNER_TRAINER_METRICS_PORT": str(self.trainer),
                "SMART_TUNER_TUNER_METRICS_PORT": str(self.tuner),
                "SMART_TUNER_DIAGNOSTICS_METRICS_PORT": str(self.diagnostics)}


def prometheus_config(targets: dict[str, int], alertmanager_port: int,
                      interval: str = "15s", rules_dir: Path = RULES_DIR) -> dict[str, Any]:
    """A Prometheus config scraping ``targets`` (job -> loopback port) with the project's
    rules, alerting to the Alertmanager on ``alertmanager_port``."""
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(rules_dir / "*.yml")],
        "alerting": {"alertmanagers": [{"static_configs": [
            {"targets": [f"127.0.0.1:{alertmanager_port}"]}]}]},
        "scrape_configs": [{"job_name": job, "static_configs": [
            {"targets": [f"127.0.0.1:{port}"]}]} for job, port in targets.items()],
    }


def alertmanager_config(notifier_url: str, template: Path = ALERTMANAGER_CONFIG
                        ) -> dict[str, Any]:
    """The deployment's Alertmanager config with every webhook sent to ``notifier_url``."""
    config = yaml.safe_load(template.read_text())
    for receiver in config["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = notifier_url.rstrip("/") + WEBHOOK_PATH
    return config


def binary(name: str) -> str | None:
    """The path of ``name`` on PATH, if installed."""
    return shutil.which(name)


def prometheus_argv(config: Path, data: Path, port: int) -> list[str]:
    """Command line of a Prometheus on ``127.0.0.1:port`` (raises if not installed)."""
    path = binary(PROMETHEUS_BINARY)
    if path is None:
        raise FileNotFoundError("prometheus is not installed (Debian package prometheus)")
    return [path, f"--config.file={config}", f"--storage.tsdb.path={data}",
            f"--web.listen-address=127.0.0.1:{port}"]


def alertmanager_argv(config: Path, data: Path, port: int) -> list[str]:
    """Command line of a single Alertmanager (no cluster) on ``127.0.0.1:port``."""
    path = binary(ALERTMANAGER_BINARY) or binary("alertmanager")
    if path is None:
        raise FileNotFoundError("alertmanager is not installed (Debian package "
                                "prometheus-alertmanager)")
    return [path, f"--config.file={config}", f"--storage.path={data}",
            f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="]


def write_configs(workdir: Path, ports: LocalPorts, notifier: bool,
                  interval: str = "15s") -> tuple[Path, Path]:
    """Write both configs under ``workdir``; the notifier job only when it runs."""
    targets = {"trainer": ports.trainer, "tuner": ports.tuner,
               "diagnostics": ports.diagnostics, "api": ports.api}
    if notifier:
        targets["notifier"] = ports.notifier
    prometheus = workdir / "prometheus.yml"
    prometheus.write_text(yaml.safe_dump(prometheus_config(targets, ports.alertmanager,
                                                           interval)))
    alertmanager = workdir / "alertmanager.yml"
    alertmanager.write_text(yaml.safe_dump(alertmanager_config(
        f"http://127.0.0.1:{ports.notifier}")))
    return prometheus, alertmanager
