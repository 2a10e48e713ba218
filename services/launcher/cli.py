"""``smart-tuner up``: the command line of the local launcher."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated

import typer

from services.core.settings import ConfigError, get_settings


def up(
    data: Annotated[Path, typer.Option(help="LJSpeech-layout folder")] = Path("data/demo"),
    out: Annotated[Path, typer.Option(help="run folder")] = Path("runs/up"),
    run_id: Annotated[str | None, typer.Option(help="run id on the bus; default: from --out")]
    = None,
    preset: Annotated[str, typer.Option(help="tiny or base")] = "tiny",
    api_port: Annotated[int, typer.Option(help="control API port (127.0.0.1)")] = 8000,
    workers: Annotated[int, typer.Option(help="diagnostics worker processes")] = 1,
    max_steps: Annotated[int | None, typer.Option(help="passed to the trainer")] = None,
    until_indicators: Annotated[bool, typer.Option(help="passed to the trainer")] = False,
    inject_fault: Annotated[str | None, typer.Option(help="passed to the trainer")] = None,
    observability: Annotated[bool, typer.Option(
        help="also run Prometheus (alert rules) and Alertmanager; services serve metrics "
             "on the ports of docs/observability.md")] = False,
) -> None:
    """Start Redis (if needed), diagnostics, tuner, control API and a supervised trainer."""
    from services.launcher.up import notifier_configured
    from services.launcher.up import up as run_up

    try:
        notifier = notifier_configured(os.environ)
    except ConfigError as error:
        typer.echo(f"smart-tuner up: {error}", err=True)
        raise typer.Exit(code=2) from None

    args: list[str] = []
    if max_steps:
        args += ["--max-steps", str(max_steps)]
    if until_indicators:
        args.append("--until-indicators")
    if inject_fault:
        args += ["--inject-fault", inject_fault]
    run = run_id or re.sub(r"[^A-Za-z0-9_.-]", "-", out.resolve().name).strip("-.") or "run"
    code = run_up(data, out, run, preset=preset, api_port=api_port,
                  worker_concurrency=workers, train_args=args,
                  redis_url=get_settings().redis_url, notifier=notifier,
                  observability=observability)
    raise typer.Exit(code=code)


def register(app: typer.Typer) -> None:
    """Attach ``up`` to the top-level CLI."""
    app.command()(up)
