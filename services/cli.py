"""The ``smart-tuner`` command: one entry point for every service."""

from __future__ import annotations

import sys

import typer

from services.core.logging import setup_logging
from services.core.settings import ConfigError, get_settings
from services.launcher import cli as launcher_cli
from services.observability import grafana as grafana_cli
from services.observability import mlflow_sink
from services.trainer import cli as trainer_cli

app = typer.Typer(help="Smart Tuner: a self-correcting Tacotron2 training system.",
                  no_args_is_help=True, add_completion=False)
trainer_cli.register(app)
launcher_cli.register(app)
grafana_cli.register(app)
mlflow_sink.register(app)


@app.command("notifier")
def notifier() -> None:
    """Run the Telegram notifier (bot, reports, Alertmanager webhook) until Ctrl-C.

    Configured by the environment: SMART_TUNER_REDIS_URL, SMART_TUNER_NOTIFIER_TELEGRAM_TOKEN,
    SMART_TUNER_NOTIFIER_CHAT_IDS and the rest of services/notifier/config.py.
    """
    from services.notifier.service import main as notifier_main

    notifier_main()


def main() -> None:
    """Console-script entry point: settings are validated before any command runs."""
    try:
        settings = get_settings()
    except ConfigError as error:
        print(f"smart-tuner: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    setup_logging(settings.log_level)
    app()


if __name__ == "__main__":
    main()
