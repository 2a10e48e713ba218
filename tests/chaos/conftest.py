"""The fault-injection suite: each test injects a fault into real parts and records what
it measured: how many faults it injected, how many of those the system survived as
required (recovered, or stopped and alerted where that is the requirement) and how many
events were lost, counted from Redis or the trainer. The table prints at the end of the run.

A test opens its row before it injects anything and fills in the counts as it measures
them, before it asserts on them: a failing run shows its shortfall and its loss in the table
(and the row says the test failed), instead of the row going missing.

Every test in this folder is marked ``slow`` (``pytest -m slow`` selects them, ``-m "not
slow"`` leaves them out). A ``pytestmark`` in a conftest.py has no effect, so the mark is
added at collection by the hook below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

CHAOS_DIR = Path(__file__).resolve().parent


@dataclass
class FaultRecord:
    """One row of the summary table, filled in by its test as it measures."""

    fault: str
    nodeid: str
    injected: int = 0
    survived: int = 0
    # None until the test has counted: a test that stops before counting shows "?".
    lost: int | None = None
    outcome: str = "running"


RECORDS: list[FaultRecord] = []


@pytest.hookimpl(tryfirst=True)  # before the mark plugin deselects by ``-m``
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test under tests/chaos/ ``slow``."""
    for item in items:
        if CHAOS_DIR in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def chaos(request: pytest.FixtureRequest) -> Callable[[str], FaultRecord]:
    """``row = chaos(fault)`` adds a row to the summary table and returns it; the test sets
    ``row.injected``, ``row.survived`` and ``row.lost`` from what it measured."""
    def open_row(fault: str) -> FaultRecord:
        record = FaultRecord(fault, request.node.nodeid)
        RECORDS.append(record)
        return record
    return open_row


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Mark each row with its test's outcome (a failure in any phase wins)."""
    for record in RECORDS:
        if record.nodeid != report.nodeid or record.outcome == "failed":
            continue
        if report.failed:
            record.outcome = "failed"
        elif report.when == "call":
            record.outcome = "passed"


def _lost(value: int | None) -> str:
    return "?" if value is None else str(value)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The table of faults injected, survived and events lost, as measured."""
    if not RECORDS:
        return
    width = max(len(r.fault) for r in RECORDS)
    terminalreporter.section("fault injection (measured)")
    terminalreporter.write_line(
        f"{'fault':<{width}}  injected  survived  events lost  test")
    for r in RECORDS:
        terminalreporter.write_line(f"{r.fault:<{width}}  {r.injected:>8}  {r.survived:>8}  "
                                    f"{_lost(r.lost):>11}  {r.outcome}")
    known = sum(r.lost for r in RECORDS if r.lost is not None)
    # a row that never counted makes the total a lower bound
    lost = f"≥{known}" if any(r.lost is None for r in RECORDS) else str(known)
    failed = sum(r.outcome == "failed" for r in RECORDS)
    terminalreporter.write_line(
        f"{'total':<{width}}  {sum(r.injected for r in RECORDS):>8}  "
        f"{sum(r.survived for r in RECORDS):>8}  {lost:>11}  {failed} failed")
