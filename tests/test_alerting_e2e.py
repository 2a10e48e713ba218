"""The paging path end to end, with the real binaries: a training run's exported gradient
norm crosses 100, the real Prometheus (Debian's ``prometheus``, loading the project's own
rule file) fires GradNormRedFlag, the real Alertmanager (``prometheus-alertmanager``, the
project's routing and inhibition) posts to the notifier's webhook, and the Telegram
stand-in receives the critical message. Each stage's latency is printed.

The same Prometheus then evaluates every PromQL expression of the Grafana dashboards.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from services.core.indicators import GRAD_NORM_RED_FLAG
from services.launcher.observability import (
    alertmanager_argv,
    alertmanager_config,
    prometheus_argv,
    prometheus_config,
)
from services.observability.grafana import (
    dashboard_expressions,
    load_dashboards,
    substitute_variables,
)
from services.trainer.exporter import serve_metrics
from services.trainer.faults import FaultPlan
from services.trainer.training import Trainer
from tests.conftest import make_small_config
from tests.notifier_harness import RunningNotifier, free_port, notifier_settings
from tests.telegram_stand_in import TEST_TOKEN, TelegramStandIn

pytestmark = pytest.mark.slow

CHAT = 1001
SPIKE_START, SPIKE_STEPS = 4, 100_000  # the norm stays above 100 until the run is stopped
READY_TIMEOUT_S = 60.0


def _wait_ready(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{url} exited early:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} not ready:\n{log.read_text()[-2000:]}")


def _start(argv: list[str], log: Path) -> subprocess.Popen:
    handle = log.open("w")
    return subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT)


@dataclass
class Stack:
    prometheus: str
    alertmanager: str
    telegram: TelegramStandIn
    trainer: Trainer
    run_id: str
    spike_exported_at: list[float]


@pytest.fixture(scope="module")
def stack(small_corpus: Path, redis_url: str, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Stack]:
    """Telegram stand-in, notifier, Alertmanager, Prometheus, and a spiking training run."""
    tmp = tmp_path_factory.mktemp("alerting")
    telegram = TelegramStandIn(TEST_TOKEN).start()
    notifier = RunningNotifier(notifier_settings(telegram, tmp, chat_ids=(CHAT,),
                                                 language="en"), redis_url, telegram).start()
    processes: list[subprocess.Popen] = []
    run_id = f"alert-{int(time.time())}"
    trainer = Trainer(make_small_config(), small_corpus, tmp / run_id, progress=False,
                      cache_dir=small_corpus / ".features", run_id=run_id,
                      fault=FaultPlan(kind="grad_spike", start=SPIKE_START, steps=SPIKE_STEPS,
                                      factor=1e4))
    observer, server, _ = serve_metrics(trainer, 0, addr="127.0.0.1")
    exported: list[float] = []
    original = observer.on_step

    def on_step(trainer_: Trainer, metrics) -> None:
        original(trainer_, metrics)
        if metrics.grad_norm > GRAD_NORM_RED_FLAG and not exported:
            exported.append(time.monotonic())  # the value is on /metrics from now on

    observer.on_step = on_step  # type: ignore[method-assign]
    try:
        # Alertmanager: the project's config, pointed at this notifier.
        am_config = tmp / "alertmanager.yml"
        am_config.write_text(yaml.safe_dump(alertmanager_config(notifier.url)))
        am_port = free_port()
        am_log = tmp / "alertmanager.log"
        processes.append(_start(alertmanager_argv(am_config, tmp / "am-data", am_port),
                                am_log))
        alertmanager = f"http://127.0.0.1:{am_port}"
        _wait_ready(f"{alertmanager}/-/ready", processes[-1], am_log)
        # Prometheus: 1 s scrapes and evaluations, the project's rule files.
        prom_port = free_port()
        prom_config = tmp / "prometheus.yml"
        prom_config.write_text(yaml.safe_dump(prometheus_config(
            {"trainer": server.server_port}, am_port, interval="1s")))
        prom_log = tmp / "prometheus.log"
        processes.append(_start(prometheus_argv(prom_config, tmp / "prom-data", prom_port),
                                prom_log))
        prometheus = f"http://127.0.0.1:{prom_port}"
        _wait_ready(f"{prometheus}/-/ready", processes[-1], prom_log)
        training = threading.Thread(target=trainer.train, kwargs={"max_steps": 100_000},
                                    daemon=True)
        training.start()
        yield Stack(prometheus, alertmanager, telegram, trainer, run_id, exported)
    finally:
        trainer.request_stop()
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
        server.shutdown()
        notifier.close()
        telegram.stop()


def _firing(url: str, path: str, alertname: str) -> bool:
    try:
        data = httpx.get(url + path, timeout=2).json()
    except httpx.HTTPError:
        return False
    alerts = data["data"]["alerts"] if isinstance(data, dict) else data
    return any(a["labels"].get("alertname") == alertname and
               (a.get("state") == "firing" or a.get("status", {}).get("state") == "active")
               for a in alerts)


def _until(predicate, timeout_s: float = 120.0) -> float:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "stage did not complete in time"
        time.sleep(0.1)
    return time.monotonic()


def test_grad_norm_red_flag_pages_telegram(stack: Stack) -> None:
    exported = _until(lambda: bool(stack.spike_exported_at))
    exported = stack.spike_exported_at[0]
    fired = _until(lambda: _firing(stack.prometheus, "/api/v1/alerts", "GradNormRedFlag"))
    routed = _until(lambda: _firing(stack.alertmanager, "/api/v2/alerts", "GradNormRedFlag"))

    def delivered() -> bool:
        return any("GradNormRedFlag" in str(c.params.get("text", ""))
                   for c in stack.telegram.calls("sendMessage", CHAT) if c.status == 200)

    received = _until(delivered)
    print(f"\ngrad norm > {GRAD_NORM_RED_FLAG:g} exported -> Prometheus firing: "
          f"{fired - exported:.1f} s (rule `for: 10s`, 1 s scrape and evaluation)\n"
          f"Prometheus firing -> Alertmanager active: {routed - fired:.1f} s\n"
          f"Alertmanager -> Telegram message: {received - routed:.1f} s\n"
          f"total: {received - exported:.1f} s")
    [message] = [c for c in stack.telegram.calls("sendMessage", CHAT)
                 if "GradNormRedFlag" in str(c.params.get("text", ""))]
    text = message.params["text"]
    assert "🚨" in text and stack.run_id in text and "Gradient norm above 100" in text
    assert fired - exported >= 10.0  # the rule's `for` really held it back


def test_every_dashboard_expression_evaluates(stack: Stack) -> None:
    _until(lambda: bool(stack.spike_exported_at))
    dashboards = load_dashboards()
    checked = 0
    for dashboard in dashboards:
        for expr in dashboard_expressions(dashboard):
            query = substitute_variables(expr, stack.run_id)
            answer = httpx.get(f"{stack.prometheus}/api/v1/query", params={"query": query},
                               timeout=10)
            body = answer.json()
            assert answer.status_code == 200 and body["status"] == "success", \
                f"{dashboard['uid']}: {query}: {body.get('error')}"
            checked += 1
    assert checked >= 20
    # and the trainer's series are really there for the run
    answer = httpx.get(f"{stack.prometheus}/api/v1/query",
                       params={"query": f'smart_tuner_trainer_grad_norm{{run="{stack.run_id}"}}'},
                       timeout=10).json()
    assert answer["data"]["result"], "the trainer's grad norm is not in Prometheus"
