"""The fault-injection suite: each test injects a fault into real parts and records what
it measured: how many faults it injected, how many of those the system survived as
required (recovered, or stopped and alerted where that is the requirement) and how many
events were lost, counted from Redis or the trainer. The table prints at the end of the run
(tests/fault_table.py assembles it from the tests' reports, which is what reaches the
summary when the tests run in parallel worker processes).

A test opens its row before it injects anything and fills in the counts as it measures
them, before it asserts on them: a failing run shows its shortfall and its loss in the table
(and the row says the test failed), instead of the row going missing.

Every test in this folder is marked ``slow`` (``pytest -m slow`` selects them, ``-m "not
slow"`` leaves them out). A ``pytestmark`` in a conftest.py has no effect, so the mark is
added at collection by the hook below.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fault_table import FaultRecord, attach

CHAOS_DIR = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before the mark plugin deselects by ``-m``
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test under tests/chaos/ ``slow``."""
    for item in items:
        if CHAOS_DIR in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def chaos(request: pytest.FixtureRequest) -> Iterator[Callable[[str], FaultRecord]]:
    """``row = chaos(fault)`` adds a row to the summary table and returns it; the test sets
    ``row.injected``, ``row.survived`` and ``row.lost`` from what it measured. The rows go
    out with the test's teardown report, however the test ended (tests/fault_table.py)."""
    records: list[FaultRecord] = []

    def open_row(fault: str) -> FaultRecord:
        record = FaultRecord(fault, request.node.nodeid)
        records.append(record)
        return record

    yield open_row
    attach(request.node, records)
