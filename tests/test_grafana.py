"""The Grafana dashboards and their push.

The dashboards are checked as data: they load, carry the panels the plan asks for with
the plan's thresholds (``services.core.indicators``), and query only metrics that
docs/observability.md catalogs. The push is tested over real HTTP against
``GrafanaStandIn``, a small stand-in for Grafana's HTTP API served by the test itself,
because Grafana cannot run on this machine: it implements the calls grafana-client makes
(``GET``/``POST /api/folders``, ``POST /api/dashboards/db``) with Grafana's answers and
error shapes, checks the Authorization header, and records every request.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from services.core import indicators
from services.observability.grafana import (
    DASHBOARD_DIR,
    PASSWORD_ENV,
    TOKEN_ENV,
    URL_ENV,
    USER_ENV,
    GrafanaPushError,
    dashboard_expressions,
    load_dashboards,
    push_dashboards,
    substitute_variables,
)

ROOT = Path(__file__).resolve().parents[1]
METRICS_DOC = ROOT / "docs" / "observability.md"
PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
RUN_UID = "smart-tuner-run"
SERVICES_UID = "smart-tuner-services"
TOKEN = "glsa_test_token_not_a_real_one"
USER, PASSWORD = "pusher", "not-a-real-password"
FOLDER = "Smart Tuner"
RUN_ID = "demo-run_1"

# ------------------------------------------------------------------ the metric catalog

# Unit and type suffixes a catalog row keeps when it abbreviates a sibling metric
# (`smart_tuner_api_commands_accepted_total` / `_rejected_total`).
_NAME_SUFFIXES = ("_total", "_seconds", "_percent")
_HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")
# Prometheus's own per-target series: not in the catalog, but the services dashboard
# shows which scrape targets are up.
PROMETHEUS_SERIES = {"up"}


def _split_suffix(name: str) -> tuple[str, str]:
    for suffix in _NAME_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)], suffix
    return name, ""


def _expand(first: str, short: str) -> str:
    """``_rejected_total`` after ``x_accepted_total`` is ``x_rejected_total``."""
    base, _ = _split_suffix(first)
    short_base, short_suffix = _split_suffix(short.lstrip("_"))
    kept = base.split("_")[: -(short_base.count("_") + 1)]
    return "_".join([*kept, short_base]) + short_suffix


def catalog_metrics() -> set[str]:
    """Every series name docs/observability.md's metric table allows (histograms' too)."""
    names: set[str] = set()
    in_table = False
    for line in METRICS_DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("| metric |"):
            in_table = True
            continue
        if not in_table:
            continue
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        written = re.findall(r"`([a-z_]+)`", cells[0])
        if not written:  # the |---| line
            continue
        family = [written[0]] + [_expand(written[0], short) if short.startswith("_") else short
                                 for short in written[1:]]
        for name in family:
            names.add(name)
            if cells[1] == "histogram":
                names.update(name + series for series in _HISTOGRAM_SERIES)
    return names


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_LABEL_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
# An identifier not glued to a number (`2m`, `1e3`) and not a function call.
_IDENTIFIER = re.compile(r"(?<![\w.:])([A-Za-z_:][\w:]*)(?![\w:]|\s*\()")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
             "or", "unless", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects."""
    for pattern in (_STRING, _LABEL_MATCHERS, _RANGE, _GROUPING):
        expr = pattern.sub(" ", expr)
    return {name for name in _IDENTIFIER.findall(expr) if name.lower() not in _KEYWORDS}


def test_the_catalog_parser_expands_abbreviated_rows() -> None:
    names = catalog_metrics()
    assert {"smart_tuner_alignment_monotonicity", "smart_tuner_alignment_quality_percent",
            "smart_tuner_api_commands_rejected_total",
            "smart_tuner_notifier_bot_refusals_total",
            "smart_tuner_trainer_step_duration_seconds_bucket",
            "smart_tuner_diagnostics_score_seconds_count"} <= names
    assert "smart_tuner_trainer_grad_norm_bucket" not in names  # a gauge has no buckets
    assert len(names) > 30


def test_metric_names_skips_functions_labels_ranges_and_keywords() -> None:
    expr = ('histogram_quantile(0.9, sum by (le) (rate(a_bucket{job="x", le!="1"}[5m]))) '
            '/ on (job) group_left (run) b offset 2m > bool 1e3 or c:rule unless '
            'label_replace(d, "x", "$1", "y", "(.*)")')
    assert metric_names(expr) == {"a_bucket", "b", "c:rule", "d"}


# ------------------------------------------------------------------- the dashboards


@pytest.fixture(scope="module")
def dashboards() -> dict[str, dict[str, Any]]:
    return {board["uid"]: board for board in load_dashboards()}


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def panels_querying(board: dict[str, Any], metric: str, kind: str) -> list[dict[str, Any]]:
    return [panel for panel in all_panels(board["panels"]) if panel["type"] == kind
            and any(metric in metric_names(t["expr"]) for t in panel.get("targets", []))]


def threshold_steps(panel: dict[str, Any]) -> list[tuple[str, float | None]]:
    steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    return [(step["color"], step["value"]) for step in steps]


def test_both_dashboards_load_with_stable_uids(dashboards: dict[str, dict[str, Any]]) -> None:
    assert set(dashboards) == {RUN_UID, SERVICES_UID}
    for board in dashboards.values():
        assert board["id"] is None
        assert board["schemaVersion"] == 39
        ids = [panel["id"] for panel in all_panels(board["panels"])]
        assert len(ids) == len(set(ids)), f"{board['uid']}: panel ids repeat"
        for panel in all_panels(board["panels"]):
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24, panel["title"]
            assert panel["type"] in {"row", "timeseries", "stat"}


def test_dashboards_query_the_provisioned_prometheus(
        dashboards: dict[str, dict[str, Any]]) -> None:
    datasources = (PROVISIONING / "datasources" / "prometheus.yml").read_text()
    assert re.search(r"^\s+uid: prometheus$", datasources, re.MULTILINE)
    assert re.search(r"^\s+url: http://prometheus:9090$", datasources, re.MULTILINE)
    assert re.search(r"^\s+isDefault: true$", datasources, re.MULTILINE)
    provider = (PROVISIONING / "dashboards" / "smart-tuner.yml").read_text()
    assert re.search(r"^\s+path: /var/lib/grafana/dashboards$", provider, re.MULTILINE)
    for board in dashboards.values():
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["query"] == "prometheus"
        assert variables["datasource"]["current"]["value"] == "prometheus"
        for panel in all_panels(board["panels"]):
            for target in panel.get("targets", []):
                assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def test_run_overview_selects_a_run(dashboards: dict[str, dict[str, Any]]) -> None:
    board = dashboards[RUN_UID]
    run = next(v for v in board["templating"]["list"] if v["name"] == "run")
    assert run["type"] == "query"
    assert run["definition"] == "label_values(smart_tuner_trainer_step, run)"
    run_scoped = [e for e in dashboard_expressions(board) if "smart_tuner_" in e]
    assert run_scoped
    assert all('run="$run"' in expr for expr in run_scoped)


def test_grad_norm_panel_draws_the_indicator_and_red_flag_lines(
        dashboards: dict[str, dict[str, Any]]) -> None:
    (panel,) = panels_querying(dashboards[RUN_UID], "smart_tuner_trainer_grad_norm",
                               "timeseries")
    values = [value for _, value in threshold_steps(panel)]
    assert values == [None, indicators.GRAD_NORM_OK, indicators.GRAD_NORM_RED_FLAG]
    assert panel["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"] == "line"


def test_alignment_panel_draws_red_flag_warning_and_indicator_lines(
        dashboards: dict[str, dict[str, Any]]) -> None:
    (panel,) = panels_querying(dashboards[RUN_UID], "smart_tuner_alignment_diagonality",
                               "timeseries")
    assert threshold_steps(panel) == [
        ("red", None), ("orange", indicators.DIAGONALITY_RED_FLAG),
        ("yellow", indicators.DIAGONALITY_WEAK),
        ("green", indicators.DIAGONALITY_OK)]
    assert panel["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"] == "line"
    queried = set().union(*(metric_names(t["expr"]) for t in panel["targets"]))
    assert {"smart_tuner_alignment_monotonicity", "smart_tuner_alignment_focus",
            "smart_tuner_alignment_coverage"} <= queried


def indicator_panel(board: dict[str, Any], name: str) -> dict[str, Any]:
    """The stat panel showing the verdict's indicator ``name``."""
    (panel,) = [p for p in panels_querying(board, "smart_tuner_indicator_value", "stat")
                if f'indicator="{name}"' in p["targets"][0]["expr"]]
    return panel


@pytest.mark.parametrize(("name", "expected_steps", "top_row"), [
    # green below the threshold, red from it on
    (indicators.GRAD_NORM, [("green", None), ("red", indicators.GRAD_NORM_OK)], True),
    (indicators.RESTARTS, [("green", None), ("red", indicators.MAX_RESTARTS_OK + 1)], True),
    (indicators.LOSS, [("green", None), ("red", indicators.LOSS_OK)], True),
    # red below, green from the threshold on
    (indicators.DIAGONALITY, [("red", None), ("green", indicators.DIAGONALITY_OK)], True),
    (indicators.QUALITY, [("red", None), ("green", indicators.QUALITY_OK)], True),
    (indicators.PROBES_STOP, [("red", None), ("green", indicators.PROBES_STOP_OK)], False),
    (indicators.INFERENCE_DIAGONALITY,
     [("red", None), ("green", indicators.INFERENCE_DIAGONALITY_OK)], False),
])
def test_success_indicator_stat_shows_the_verdict_colored_by_the_plan_threshold(
        dashboards: dict[str, dict[str, Any]], name: str,
        expected_steps: list[tuple[str, float | None]], top_row: bool) -> None:
    """Each indicator panel reads the trainer's verdict (the same one the bot and the API
    show), never a raw gauge of its own, and is colored by the threshold constant."""
    panel = indicator_panel(dashboards[RUN_UID], name)
    assert threshold_steps(panel) == expected_steps
    assert panel["fieldConfig"]["defaults"]["color"]["mode"] == "thresholds"
    assert panel["options"]["colorMode"] == "background"
    assert (panel["gridPos"]["y"] == 1) == top_row  # the plan's five share the top row


def test_every_verdict_indicator_has_a_panel_and_the_count_is_shown(
        dashboards: dict[str, dict[str, Any]]) -> None:
    board = dashboards[RUN_UID]
    checks = indicators.evaluate_indicators(1, 1, 0, 1, 1) + indicators.evaluate_inference(1, 1)
    for check in checks:
        indicator_panel(board, check.name)
    (count,) = panels_querying(board, "smart_tuner_indicators_met", "stat")
    queried = set().union(*(metric_names(t["expr"]) for t in count["targets"]))
    assert {"smart_tuner_indicators_total", "smart_tuner_verdict_step"} <= queried


def test_run_overview_shows_the_rest_of_the_run(dashboards: dict[str, dict[str, Any]]) -> None:
    board = dashboards[RUN_UID]
    (losses,) = panels_querying(board, "smart_tuner_trainer_loss", "timeseries")
    assert losses["targets"][0]["legendFormat"] == "{{part}}"
    (schedule,) = panels_querying(board, "smart_tuner_trainer_learning_rate", "timeseries")
    assert panels_querying(board, "smart_tuner_trainer_guided_attention_weight",
                           "timeseries") == [schedule]
    right_axis = [o for o in schedule["fieldConfig"]["overrides"]
                  if {"id": "custom.axisPlacement", "value": "right"} in o["properties"]]
    assert [o["matcher"]["options"] for o in right_axis] == ["B"]  # the GA weight
    (step_time,) = panels_querying(
        board, "smart_tuner_trainer_step_duration_seconds_bucket", "timeseries")
    assert all(t["expr"].startswith("histogram_quantile(") for t in step_time["targets"])
    assert panels_querying(board, "smart_tuner_alignment_quality_percent", "timeseries")
    assert panels_querying(board, "smart_tuner_trainer_steps_since_loss_improved", "stat")
    assert panels_querying(board, "smart_tuner_trainer_nonfinite_steps_total", "stat")


def test_tuner_actions_are_annotations(dashboards: dict[str, dict[str, Any]]) -> None:
    (annotation,) = [a for a in dashboards[RUN_UID]["annotations"]["list"] if "expr" in a]
    assert "smart_tuner_tuner_decisions_total" in metric_names(annotation["expr"])
    assert annotation["enable"] is True
    assert "{{rule}}" in annotation["titleFormat"]
    assert "{{action}}" in annotation["textFormat"]
    assert set(annotation["tagKeys"].split(",")) == {"rule", "action"}


@pytest.mark.parametrize(("metric", "grouped_by"), [
    ("up", "job"),
    ("smart_tuner_api_requests_total", "route, status"),
    ("smart_tuner_notifier_deliveries_total", "outcome"),
    ("smart_tuner_notifier_delivery_retries_total", "cause"),
    ("smart_tuner_notifier_queue_depth", None),
    ("smart_tuner_bus_buffer_capacity_messages", None),
    ("smart_tuner_bus_dropped_messages_total", "run"),
    ("smart_tuner_bus_dead_letters_total", "consumer"),
    ("smart_tuner_diagnostics_reports_total", "status"),
    ("smart_tuner_diagnostics_score_seconds_bucket", "le"),
    ("smart_tuner_tuner_decisions_total", "rule"),
])
def test_services_dashboard_has_a_panel_for(dashboards: dict[str, dict[str, Any]],
                                            metric: str, grouped_by: str | None) -> None:
    exprs = [e for e in dashboard_expressions(dashboards[SERVICES_UID])
             if metric in metric_names(e)]
    assert exprs, f"no panel queries {metric}"
    if grouped_by:
        assert any(f"by ({grouped_by})" in e for e in exprs), exprs


def test_services_dashboard_shows_the_buffer_fill_as_a_ratio(
        dashboards: dict[str, dict[str, Any]]) -> None:
    exprs = dashboard_expressions(dashboards[SERVICES_UID])
    assert ("smart_tuner_bus_buffered_messages / smart_tuner_bus_buffer_capacity_messages"
            in exprs)


def test_every_expression_queries_only_cataloged_metrics(
        dashboards: dict[str, dict[str, Any]]) -> None:
    allowed = catalog_metrics() | PROMETHEUS_SERIES
    for board in dashboards.values():
        exprs = dashboard_expressions(board)
        assert len(exprs) > 10
        for expr in exprs:
            names = metric_names(substitute_variables(expr, RUN_ID))
            assert names, expr
            assert names <= allowed, f"{board['uid']}: {expr!r} uses {names - allowed}"


def test_every_expression_parses_as_promql(dashboards: dict[str, dict[str, Any]],
                                           tmp_path: Path) -> None:
    # Debian's prometheus package, installed by scripts/setup.sh: missing is a failure.
    assert shutil.which("promtool"), "promtool is not installed; run scripts/setup.sh"
    exprs = [substitute_variables(e, RUN_ID) for board in dashboards.values()
             for e in dashboard_expressions(board)]
    # One recording rule per expression: `promtool check rules` parses each with
    # Prometheus's own parser (JSON is YAML, so the file needs no YAML writer).
    rules = {"groups": [{"name": "dashboards", "rules": [
        {"record": f"dashboard:expr_{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(rules))
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True,
                            text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(exprs)} rules found" in result.stdout


# -------------------------------------------------------------- the pure helpers


def test_dashboard_expressions_finds_nested_rows_annotations_and_variables() -> None:
    loki = {"type": "loki", "uid": "logs"}
    board = {
        "uid": "x", "title": "x",
        "panels": [
            {"type": "timeseries", "targets": [{"expr": "top"}, {"expr": " "}]},
            {"type": "row", "collapsed": True, "panels": [
                {"type": "stat", "datasource": {"type": "prometheus", "uid": "p"},
                 "targets": [{"expr": "nested"}]},
                {"type": "timeseries", "datasource": loki, "targets": [{"expr": "{app=1}"}]},
            ]},
            {"type": "timeseries", "datasource": loki,
             "targets": [{"datasource": {"type": "prometheus"}, "expr": "mixed"}]},
        ],
        "annotations": {"list": [
            {"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}},
            {"datasource": {"type": "prometheus", "uid": "p"}, "expr": "annotation_expr"},
            {"datasource": {"uid": "${datasource}"}, "target": {"expr": "annotation_target"}},
            {"datasource": loki, "expr": "{app=2}"},
        ]},
        "templating": {"list": [
            {"type": "datasource", "query": "prometheus"},
            {"type": "query", "query": "label_values(m, run)"},
            {"type": "query", "query": {"query": "label_names()", "qryType": 0}},
            {"type": "query", "query": {"query": "query_result(max by (run) (m))"}},
            {"type": "query", "query": "series{job=\"j\"}"},
            {"type": "custom", "query": "a,b"},
        ]},
    }
    assert dashboard_expressions(board) == [
        "top", "nested", "mixed", "annotation_expr", "annotation_target",
        "max by (run) (m)", 'series{job="j"}']


def test_substitute_variables_gives_what_grafana_would_send() -> None:
    expr = ('rate(m{run="$run"}[$__rate_interval]) + rate(n{run="${run}"}[$__interval]) '
            '+ increase(o[$__range]) + p[$__interval_ms] + label_replace(q, "a", "$1", '
            '"b", "(.*)") + r{x="$runner"}')
    assert substitute_variables(expr, RUN_ID) == (
        f'rate(m{{run="{RUN_ID}"}}[1m]) + rate(n{{run="{RUN_ID}"}}[1m]) '
        '+ increase(o[5m]) + p[$__interval_ms] + label_replace(q, "a", "$1", '
        '"b", "(.*)") + r{x="$runner"}')
    assert substitute_variables('m{run="$run"}', 'a"b\\c') == 'm{run="a\\"b\\\\c"}'


def _write(directory: Path, name: str, content: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(content)


@pytest.mark.parametrize(("content", "complaint"), [
    ("{not json", "not readable as JSON"),
    ("[]", "JSON object"),
    ('{"title": "t", "panels": []}', "'uid'"),
    ('{"uid": "u", "title": " ", "panels": []}', "'title'"),
    ('{"uid": "u", "title": "t", "panels": {}}', "'panels'"),
])
def test_load_dashboards_names_the_bad_file(tmp_path: Path, content: str,
                                            complaint: str) -> None:
    _write(tmp_path, "a-good.json", '{"uid": "good", "title": "Good", "panels": []}')
    _write(tmp_path, "b-bad.json", content)
    with pytest.raises(ValueError, match=complaint) as caught:
        load_dashboards(tmp_path)
    assert "b-bad.json" in str(caught.value)


def test_load_dashboards_refuses_repeated_uids_and_empty_folders(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no dashboards"):
        load_dashboards(tmp_path)
    _write(tmp_path, "a.json", '{"uid": "same", "title": "A", "panels": []}')
    _write(tmp_path, "b.json", '{"uid": "same", "title": "B", "panels": []}')
    with pytest.raises(ValueError, match=r"b\.json: uid 'same' is already used by a\.json"):
        load_dashboards(tmp_path)


# ------------------------------------------------------------ the Grafana stand-in


@dataclass
class Recorded:
    method: str
    path: str
    authorization: str | None
    body: Any


@dataclass
class GrafanaStandIn:
    """Grafana's folder and dashboard API, in memory, over real HTTP on 127.0.0.1."""

    token: str | None = TOKEN
    basic: tuple[str, str] | None = None
    prefix: str = ""  # a Grafana served from a sub-path, e.g. "/grafana"
    folders: list[dict[str, Any]] = field(default_factory=list)
    dashboards: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    fail_dashboard: dict[str, int] = field(default_factory=dict)  # uid -> HTTP status
    url: str = ""

    def expected_authorization(self) -> str:
        if self.basic:
            pair = base64.b64encode(":".join(self.basic).encode()).decode()
            return f"Basic {pair}"
        return f"Bearer {self.token}"

    def handle(self, method: str, path: str, authorization: str | None,
               body: Any) -> tuple[int, Any]:
        self.requests.append(Recorded(method, path, authorization, body))
        if not path.startswith(f"{self.prefix}/api/"):
            return 404, {"message": "Not found"}
        route = path[len(self.prefix) + len("/api"):].split("?")[0]
        if authorization != self.expected_authorization():
            return 401, {"message": "Unauthorized"}
        if (method, route) == ("GET", "/folders"):
            return 200, [{"id": f["id"], "uid": f["uid"], "title": f["title"]}
                         for f in self.folders]
        if (method, route) == ("POST", "/folders"):
            if any(f["title"] == body["title"] for f in self.folders):
                return 409, {"message": "a folder with the same name already exists"}
            folder = {"id": len(self.folders) + 1, "uid": f"folder{len(self.folders) + 1}",
                      "title": body["title"]}
            self.folders.append(folder)
            return 200, {**folder, "url": f"{self.prefix}/dashboards/f/{folder['uid']}/"}
        if (method, route) == ("POST", "/dashboards/db"):
            return self.save_dashboard(body)
        return 404, {"message": "Not found"}

    def save_dashboard(self, body: dict[str, Any]) -> tuple[int, Any]:
        board = body["dashboard"]
        uid = board["uid"]
        if uid in self.fail_dashboard:
            status = self.fail_dashboard[uid]
            return status, {"message": "Unauthorized" if status == 401 else "database locked"}
        if body.get("folderUid") not in {f["uid"] for f in self.folders}:
            return 400, {"message": "folder not found"}
        old = self.dashboards.get(uid)
        if old and not body.get("overwrite"):
            return 412, {"status": "name-exists",
                         "message": "A dashboard with the same name in the folder already "
                                    "exists"}
        version = old["version"] + 1 if old else 1
        dashboard_id = old["id"] if old else len(self.dashboards) + 1
        self.dashboards[uid] = {"id": dashboard_id, "version": version,
                                "folderUid": body["folderUid"], "dashboard": board}
        slug = re.sub(r"[^a-z0-9]+", "-", board["title"].lower()).strip("-")
        return 200, {"id": dashboard_id, "uid": uid, "url": f"{self.prefix}/d/{uid}/{slug}",
                     "status": "success", "version": version, "slug": slug}

    def dashboard_posts(self) -> list[Recorded]:
        return [r for r in self.requests if r.path.endswith("/api/dashboards/db")]

    def folder_creations(self) -> list[Recorded]:
        return [r for r in self.requests
                if r.method == "POST" and r.path.endswith("/api/folders")]


def _handler_for(stand_in: GrafanaStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            status, answer = stand_in.handle(self.command, self.path,
                                             self.headers.get("Authorization"), body)
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = _serve  # noqa: N815

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep pytest's output clean

    return Handler


@pytest.fixture
def serve_grafana() -> Iterator[Any]:
    """Start stand-ins on free ports; all stopped after the test."""
    servers: list[ThreadingHTTPServer] = []

    def start(**options: Any) -> GrafanaStandIn:
        stand_in = GrafanaStandIn(**options)
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(stand_in))
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        servers.append(server)
        stand_in.url = f"http://127.0.0.1:{server.server_address[1]}{stand_in.prefix}"
        return stand_in

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def grafana(serve_grafana: Any) -> GrafanaStandIn:
    return serve_grafana()


# ------------------------------------------------------------------------ the push


def test_push_creates_the_folder_once_and_overwrites_on_a_second_push(
        grafana: GrafanaStandIn) -> None:
    files = {board["uid"]: board for board in load_dashboards()}
    first = push_dashboards(grafana.url, token=TOKEN, folder=FOLDER)

    assert first == [f"{grafana.url}/d/{RUN_UID}/smart-tuner-run-overview",
                     f"{grafana.url}/d/{SERVICES_UID}/smart-tuner-services"]
    assert [f["title"] for f in grafana.folders] == [FOLDER]
    folder_uid = grafana.folders[0]["uid"]
    posts = grafana.dashboard_posts()
    assert [p.body["dashboard"]["uid"] for p in posts] == [RUN_UID, SERVICES_UID]
    for post in posts:
        assert post.body["overwrite"] is True
        assert post.body["folderUid"] == folder_uid
        assert post.body["dashboard"]["id"] is None
        assert post.body["dashboard"] == files[post.body["dashboard"]["uid"]]

    second = push_dashboards(grafana.url, token=TOKEN, folder=FOLDER)

    assert second == first
    assert len(grafana.folder_creations()) == 1
    assert len(grafana.folders) == 1
    assert {uid: d["version"] for uid, d in grafana.dashboards.items()} == {
        RUN_UID: 2, SERVICES_UID: 2}
    assert all(d["folderUid"] == folder_uid for d in grafana.dashboards.values())


def test_push_sends_the_token_as_a_bearer_header(grafana: GrafanaStandIn) -> None:
    push_dashboards(grafana.url, token=TOKEN)
    assert len(grafana.requests) == 4  # list folders, create one, two dashboards
    assert {r.authorization for r in grafana.requests} == {f"Bearer {TOKEN}"}


def test_push_with_a_user_and_password_uses_basic_auth(serve_grafana: Any) -> None:
    grafana = serve_grafana(basic=(USER, PASSWORD))
    push_dashboards(grafana.url, user=USER, password=PASSWORD)
    assert set(grafana.dashboards) == {RUN_UID, SERVICES_UID}
    assert {r.authorization for r in grafana.requests} == {grafana.expected_authorization()}


def test_push_to_a_grafana_under_a_sub_path(serve_grafana: Any) -> None:
    grafana = serve_grafana(prefix="/grafana")
    urls = push_dashboards(grafana.url + "/", token=TOKEN)
    assert {r.path for r in grafana.requests} == {"/grafana/api/folders",
                                                 "/grafana/api/dashboards/db"}
    assert urls[0] == f"{grafana.url}/d/{RUN_UID}/smart-tuner-run-overview"


@pytest.mark.parametrize("status", [401, 500])
def test_a_refused_dashboard_raises_an_error_naming_it(grafana: GrafanaStandIn,
                                                       status: int) -> None:
    grafana.fail_dashboard[SERVICES_UID] = status
    with pytest.raises(GrafanaPushError) as caught:
        push_dashboards(grafana.url, token=TOKEN)
    message = str(caught.value)
    assert f"dashboard '{SERVICES_UID}' (Smart Tuner: services)" in message
    assert f"HTTP {status}" in message
    assert ("Unauthorized" if status == 401 else "database locked") in message
    assert set(grafana.dashboards) == {RUN_UID}  # the one before it went through


def test_a_wrong_token_fails_at_the_folder_and_pushes_nothing(grafana: GrafanaStandIn) -> None:
    with pytest.raises(GrafanaPushError, match=r"folder 'Smart Tuner': .*HTTP 401"):
        push_dashboards(grafana.url, token="wrong")
    assert grafana.folders == []
    assert grafana.dashboards == {}


def test_an_unreachable_grafana_raises_a_push_error() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(GrafanaPushError, match=f"no answer from Grafana at http://127.0.0.1:{port}"):
        push_dashboards(f"http://127.0.0.1:{port}", token=TOKEN, timeout_s=2.0)


@pytest.mark.parametrize(("arguments", "complaint"), [
    ({}, "no Grafana credentials"),
    ({"user": USER}, "no Grafana credentials"),
    ({"token": TOKEN, "user": USER, "password": PASSWORD}, "not both"),
    ({"token": TOKEN, "folder": " "}, "folder needs a title"),
])
def test_push_refuses_bad_arguments_before_sending(grafana: GrafanaStandIn,
                                                   arguments: dict[str, str],
                                                   complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        push_dashboards(grafana.url, **arguments)
    assert grafana.requests == []


def test_push_refuses_credentials_in_the_url_without_echoing_them(
        grafana: GrafanaStandIn) -> None:
    url = grafana.url.replace("http://", f"http://{USER}:{PASSWORD}@")
    with pytest.raises(ValueError, match="do not belong in the Grafana URL") as caught:
        push_dashboards(url, token=TOKEN)
    assert PASSWORD not in str(caught.value)
    assert grafana.requests == []


# ------------------------------------------------------------------------- the CLI


def _cli() -> typer.Typer:
    """The real top-level CLI, with every command registered."""
    from services.cli import app

    return app


def _env(url: str, **values: str | None) -> dict[str, str | None]:
    """Only these Grafana variables set: None unsets one that the shell may have."""
    env: dict[str, str | None] = dict.fromkeys((URL_ENV, TOKEN_ENV, USER_ENV, PASSWORD_ENV))
    env[URL_ENV] = url
    env.update(values)
    return env


def test_cli_push_reads_url_and_token_from_the_environment(grafana: GrafanaStandIn) -> None:
    result = CliRunner().invoke(_cli(), ["grafana", "push", "--folder", "Runs"],
                                env=_env(grafana.url, **{TOKEN_ENV: TOKEN}))
    assert result.exit_code == 0, result.output
    assert result.stdout.split() == [f"{grafana.url}/d/{RUN_UID}/smart-tuner-run-overview",
                                     f"{grafana.url}/d/{SERVICES_UID}/smart-tuner-services"]
    assert [f["title"] for f in grafana.folders] == ["Runs"]
    assert {r.authorization for r in grafana.requests} == {f"Bearer {TOKEN}"}


def test_cli_push_with_user_and_password_from_the_environment(serve_grafana: Any) -> None:
    grafana = serve_grafana(basic=(USER, PASSWORD))
    result = CliRunner().invoke(_cli(), ["grafana", "push"],
                                env=_env(grafana.url, **{USER_ENV: USER,
                                                         PASSWORD_ENV: PASSWORD}))
    assert result.exit_code == 0, result.output
    assert set(grafana.dashboards) == {RUN_UID, SERVICES_UID}


def test_cli_push_reports_failures_by_exit_code(grafana: GrafanaStandIn) -> None:
    runner = CliRunner()
    grafana.fail_dashboard[RUN_UID] = 500
    refused = runner.invoke(_cli(), ["grafana", "push"],
                            env=_env(grafana.url, **{TOKEN_ENV: TOKEN}))
    assert refused.exit_code == 1
    assert f"dashboard '{RUN_UID}'" in refused.stderr
    assert "HTTP 500" in refused.stderr

    missing = runner.invoke(_cli(), ["grafana", "push"], env=_env(grafana.url))
    assert missing.exit_code == 2
    assert TOKEN_ENV in missing.stderr


def test_cli_push_takes_no_token_on_the_command_line() -> None:
    result = CliRunner().invoke(_cli(), ["grafana", "push", "--help"])
    assert result.exit_code == 0
    assert "--url" in result.stdout
    assert "--token" not in result.stdout
    assert "--password" not in result.stdout


def test_the_default_dashboard_dir_is_the_repositorys() -> None:
    assert DASHBOARD_DIR == ROOT / "deploy" / "grafana" / "dashboards"
    assert sorted(p.name for p in DASHBOARD_DIR.glob("*.json")) == [
        "run-overview.json", "services.json"]
