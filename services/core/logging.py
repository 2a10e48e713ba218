"""Logging set-up shared by every service: one format, level from settings, and no
password of a URL in any record (``RedactingFilter``), whoever logs it (Celery included)."""

from __future__ import annotations

import logging

from rich.logging import RichHandler

from services.core.redis_url import redact

_CONFIGURED = False


class RedactingFilter(logging.Filter):
    """Masks the password of every URL in a record's message (``redis://:***@host``).

    On the handler, so it covers every logger that reaches it, including libraries that
    log a broker URL; the message is rendered once here and the record keeps the result.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record's message without secrets; never drops a record."""
        message = record.getMessage()
        masked = redact(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


def setup_logging(level: str = "INFO") -> None:
    """Route the root logger through rich once per process; later calls only change the level."""
    global _CONFIGURED
    root = logging.getLogger()
    if not _CONFIGURED:
        handler = RichHandler(rich_tracebacks=True, show_path=False, markup=False)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        handler.addFilter(RedactingFilter())
        root.addHandler(handler)
        _CONFIGURED = True
    root.setLevel(level)
