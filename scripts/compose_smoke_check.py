"""The checks of the compose smoke run (scripts/compose-smoke.sh) that speak HTTP.

Run inside a container of the stack, where the service names resolve (the standard library
only, so any Python service's image will do):

    docker-compose exec -T api python - CHECK [ARGS...] < scripts/compose_smoke_check.py

Each check polls until it holds or its deadline passes (SMOKE_CHECK_TIMEOUT_S, default
300 s); it prints one line on success and exits 1 with the last thing it saw otherwise.

    runs RUN                      the API's GET /runs lists RUN
    targets JOB...                Prometheus has exactly these scrape jobs, every target up
    rules N                       Prometheus loaded N alerting rules, all healthy
    command RUN TOKEN             POST /runs/RUN/commands: refused without the token; with
                                  it, the trainer acks checkpoint_now as applied
    alert NAME                    Prometheus fires NAME and Alertmanager holds it
    telegram NAME CHAT            the Telegram stand-in got a message for CHAT naming NAME
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

API = "http://127.0.0.1:8000"
PROMETHEUS = "http://prometheus:9090"
ALERTMANAGER = "http://alertmanager:9093"
TELEGRAM = "http://telegram:8081"
TIMEOUT_S = float(os.environ.get("SMOKE_CHECK_TIMEOUT_S", "300"))


def fetch(url: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
    """(status, decoded JSON body) of a GET, or of a POST when ``body`` is given."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def until(what: str, probe: Callable[[], tuple[bool, Any]]) -> Any:
    """Call ``probe`` until it returns (True, seen); exits 1 with what it saw last."""
    deadline = time.monotonic() + TIMEOUT_S
    seen: Any = None
    while True:
        try:
            done, seen = probe()
        except (OSError, ValueError) as error:  # not up yet, or not JSON yet
            done, seen = False, repr(error)
        if done:
            return seen
        if time.monotonic() > deadline:
            print(f"FAILED: {what} (after {TIMEOUT_S:.0f} s); last seen: {seen}"[:4000])
            sys.exit(1)
        time.sleep(2)


def check_runs(run: str) -> str:
    def probe() -> tuple[bool, Any]:
        status, runs = fetch(f"{API}/runs")
        return status == 200 and any(item.get("run_id") == run for item in runs), runs
    runs = until(f"GET /runs lists {run}", probe)
    return f"GET /runs: {[item.get('run_id') for item in runs]}"


def check_targets(*jobs: str) -> str:
    def probe() -> tuple[bool, Any]:
        _, answer = fetch(f"{PROMETHEUS}/api/v1/targets")
        active = answer["data"]["activeTargets"]
        health = {target["labels"]["job"]: target["health"] for target in active}
        return sorted(health) == sorted(jobs) and set(health.values()) == {"up"}, health
    health = until(f"every Prometheus target up ({', '.join(jobs)})", probe)
    return f"Prometheus targets: {health}"


def check_rules(expected: str) -> str:
    def probe() -> tuple[bool, Any]:
        _, answer = fetch(f"{PROMETHEUS}/api/v1/rules?type=alert")
        rules = [rule for group in answer["data"]["groups"] for rule in group["rules"]]
        healthy = [rule["name"] for rule in rules if rule.get("health") == "ok"]
        return len(rules) == int(expected) and len(healthy) == len(rules), \
            {"loaded": len(rules), "healthy": len(healthy)}
    seen = until(f"Prometheus loaded {expected} healthy alerting rules", probe)
    return f"Prometheus rules: {seen['loaded']} alerting rules loaded, all healthy"


def check_command(run: str, token: str) -> str:
    url = f"{API}/runs/{run}/commands?wait_s=20"
    body = {"action": "checkpoint_now", "reason_text": "compose smoke run"}
    status, _ = fetch(url, body)
    if status != 401:
        print(f"FAILED: a command without the API token was answered {status}, not 401")
        sys.exit(1)

    def probe() -> tuple[bool, Any]:
        status, answer = fetch(url, body, token)
        ack = (answer or {}).get("ack") or {}
        return status == 200 and ack.get("status") == "applied", (status, answer)
    _, answer = until("the trainer acks a command sent through the API", probe)
    ack = answer["ack"]
    return (f"command {answer['command_id']} (checkpoint_now) acked by the trainer: "
            f"{ack['status']} {ack.get('detail', '')}".strip())


def _firing(url: str, name: str) -> bool:
    _, answer = fetch(url)
    alerts = answer["data"]["alerts"] if isinstance(answer, dict) else answer
    return any(alert["labels"].get("alertname") == name
               and (alert.get("state") == "firing"
                    or (alert.get("status") or {}).get("state") == "active")
               for alert in alerts)


def check_alert(name: str) -> str:
    until(f"Prometheus fires {name}",
          lambda: (_firing(f"{PROMETHEUS}/api/v1/alerts", name), None))
    until(f"Alertmanager holds {name}",
          lambda: (_firing(f"{ALERTMANAGER}/api/v2/alerts", name), None))
    return f"{name}: firing in Prometheus, active in Alertmanager"


def check_telegram(name: str, chat: str) -> str:
    def probe() -> tuple[bool, Any]:
        _, calls = fetch(f"{TELEGRAM}/_calls")
        sent = [call for call in calls if call["method"].lower() == "sendmessage"
                and call["status"] == 200 and str(call["params"].get("chat_id")) == chat]
        hits = [call for call in sent if name in call["params"].get("text", "")]
        return bool(hits), hits or [call["method"] for call in calls]
    hits = until(f"the Telegram stand-in receives {name} for chat {chat}", probe)
    text = hits[0]["params"]["text"].replace("\n", " / ")
    return f"Telegram stand-in got for chat {chat}: {text[:160]}"


CHECKS: dict[str, Callable[..., str]] = {
    "runs": check_runs, "targets": check_targets, "rules": check_rules,
    "command": check_command, "alert": check_alert, "telegram": check_telegram,
}

if __name__ == "__main__":
    print(CHECKS[sys.argv[1]](*sys.argv[2:]))
