"""Logging set-up shared by every service: one format, level from settings."""

from __future__ import annotations

import logging

from rich.logging import RichHandler

_CONFIGURED = False


def setup_logging(level: str = "INFO") -> None:
    """Route the root logger through rich once per process; later calls only change the level."""
    global _CONFIGURED
    root = logging.getLogger()
    if not _CONFIGURED:
        handler = RichHandler(rich_tracebacks=True, show_path=False, markup=False)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        root.addHandler(handler)
        _CONFIGURED = True
    root.setLevel(level)
