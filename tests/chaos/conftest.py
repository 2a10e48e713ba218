"""The fault-injection suite: each test injects a fault into real parts and records what
it injected, how many of those the system survived as required (recovered, or stopped and
alerted where that is the requirement) and how many events were lost; the table prints at
the end of the run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class FaultRecord:
    """One row of the summary table."""

    fault: str
    injected: int
    survived: int
    lost: int


RECORDS: list[FaultRecord] = []


@pytest.fixture
def chaos() -> Callable[..., None]:
    """``chaos(fault, injected=, survived=, lost=)`` adds a row to the summary table."""
    def record(fault: str, injected: int, survived: int, lost: int = 0) -> None:
        RECORDS.append(FaultRecord(fault, injected, survived, lost))
    return record


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The table of faults injected, survived and events lost."""
    if not RECORDS:
        return
    width = max(len(r.fault) for r in RECORDS)
    terminalreporter.section("fault injection")
    terminalreporter.write_line(f"{'fault':<{width}}  injected  survived  events lost")
    for r in RECORDS:
        terminalreporter.write_line(f"{r.fault:<{width}}  {r.injected:>8}  {r.survived:>8}  "
                                    f"{r.lost:>11}")
    terminalreporter.write_line(
        f"{'total':<{width}}  {sum(r.injected for r in RECORDS):>8}  "
        f"{sum(r.survived for r in RECORDS):>8}  {sum(r.lost for r in RECORDS):>11}")
