"""The fault-injection table (tests/chaos/): each row travels in its test's report.

A chaos test fills in a ``FaultRecord`` as it measures (tests/chaos/conftest.py); when the
test is torn down the row is attached to the test's report as a user property. The table is
assembled from the reports, not from the test process's memory, because under pytest-xdist
the tests run in worker processes and only their reports reach the process that prints the
summary. A plugin of tests/conftest.py, so that it is loaded in that process too (the
controller never imports tests/chaos/conftest.py: it collects nothing).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pytest

PROPERTY = "fault-record"


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


def attach(item: pytest.Item, records: list[FaultRecord]) -> None:
    """Put ``records`` on ``item``'s reports (called as the test is torn down)."""
    for record in records:
        item.user_properties.append((PROPERTY, asdict(record)))


class FaultTable:
    """The rows in the order their tests finished, with each test's outcome."""

    def __init__(self) -> None:
        self.rows: list[FaultRecord] = []
        self.outcomes: dict[str, str] = {}

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Track each test's outcome (a failure in any phase wins); take its rows from the
        teardown report, which is the last one."""
        if report.failed:
            self.outcomes[report.nodeid] = "failed"
        elif report.when == "call" and self.outcomes.get(report.nodeid) != "failed":
            self.outcomes[report.nodeid] = "passed"
        if report.when != "teardown":
            return
        for name, value in report.user_properties:
            if name == PROPERTY:
                row = FaultRecord(**value)
                row.outcome = self.outcomes.get(report.nodeid, "running")
                self.rows.append(row)

    @pytest.hookimpl
    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        """The table of faults injected, survived and events lost, as measured."""
        rows = self.rows
        if not rows:
            return
        width = max(len(r.fault) for r in rows)
        terminalreporter.section("fault injection (measured)")
        terminalreporter.write_line(
            f"{'fault':<{width}}  injected  survived  events lost  test")
        for r in rows:
            terminalreporter.write_line(f"{r.fault:<{width}}  {r.injected:>8}  {r.survived:>8}"
                                        f"  {_lost(r.lost):>11}  {r.outcome}")
        known = sum(r.lost for r in rows if r.lost is not None)
        # a row that never counted makes the total a lower bound
        lost = f"≥{known}" if any(r.lost is None for r in rows) else str(known)
        failed = sum(r.outcome == "failed" for r in rows)
        terminalreporter.write_line(
            f"{'total':<{width}}  {sum(r.injected for r in rows):>8}  "
            f"{sum(r.survived for r in rows):>8}  {lost:>11}  {failed} failed")


def _lost(value: int | None) -> str:
    return "?" if value is None else str(value)


def pytest_configure(config: pytest.Config) -> None:
    """Register the table (an object: its rows are per session, not per import)."""
    config.pluginmanager.register(FaultTable(), "fault-table")
