"""The local launcher's Prometheus and Alertmanager configs: the deployment's rules and
routing on loopback ports, accepted by the real promtool and amtool."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from services.launcher.observability import (
    LocalPorts,
    alertmanager_argv,
    prometheus_argv,
    write_configs,
)


def _check(argv: list[str]) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def test_local_configs_are_valid_and_point_at_loopback(tmp_path: Path) -> None:
    ports = LocalPorts(api=8123)
    prometheus, alertmanager = write_configs(tmp_path, ports, notifier=True, interval="5s")
    out = _check(["promtool", "check", "config", str(prometheus)])
    assert "SUCCESS" in out and "rules found" in out  # the project's rule files loaded
    _check(["amtool", "check-config", str(alertmanager)])
    config = yaml.safe_load(prometheus.read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"][0]
               for job in config["scrape_configs"]}
    assert targets == {"trainer": "127.0.0.1:9101", "tuner": "127.0.0.1:9102",
                       "diagnostics": "127.0.0.1:9103", "api": "127.0.0.1:8123",
                       "notifier": "127.0.0.1:8001"}
    hooks = [hook["url"] for receiver in yaml.safe_load(alertmanager.read_text())["receivers"]
             for hook in receiver["webhook_configs"]]
    assert hooks == ["http://127.0.0.1:8001/alertmanager"]
    # the deployment's inhibition survives the rewrite
    assert yaml.safe_load(alertmanager.read_text())["inhibit_rules"][0]["equal"] == [
        "family", "run"]


def test_without_the_notifier_it_is_not_scraped(tmp_path: Path) -> None:
    prometheus, _ = write_configs(tmp_path, LocalPorts(), notifier=False)
    jobs = {job["job_name"] for job in yaml.safe_load(prometheus.read_text())["scrape_configs"]}
    assert "notifier" not in jobs and "trainer" in jobs


def test_commands_bind_loopback_only(tmp_path: Path) -> None:
    assert "--web.listen-address=127.0.0.1:9090" in prometheus_argv(tmp_path / "p.yml",
                                                                    tmp_path, 9090)
    argv = alertmanager_argv(tmp_path / "a.yml", tmp_path, 9093)
    assert "--web.listen-address=127.0.0.1:9093" in argv and "--cluster.listen-address=" in argv
    assert LocalPorts().metrics_env()["SMART_TUNER_TRAINER_METRICS_PORT"] == "9101"
