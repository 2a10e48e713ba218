"""``smart-tuner up``: the command line of the local launcher.

``up`` takes every training option of ``smart-tuner train`` and passes it through. The
options are declared once, on ``train``: ``TRAIN_OPTIONS`` names them and
``with_train_options`` gives them to ``up`` with train's own types, defaults and help, so
an unknown or ill-typed option fails as the command line is parsed, before anything starts.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from services.core.settings import ConfigError, get_settings
from services.trainer.cli import train

# The options of `smart-tuner train` that `up` passes through as given.
TRAIN_OPTIONS: tuple[str, ...] = (
    "config", "preset", "max_steps", "max_minutes", "until_indicators", "eval_every",
    "checkpoint_every", "batch_size", "val_size", "lr", "warmup_steps", "ga_weight",
    "ga_sigma", "gate_pos_weight", "seed", "amp", "warm_start", "ignore_layers",
    "data_check", "inject_fault",
)
# The rest of train's options: up's own (--data, --out, --run-id) or set by up itself
# (--resume --resume-from last_good on every start, so that a restart resumes; telemetry on).
UP_OWNED_TRAIN_OPTIONS: tuple[str, ...] = (
    "data", "out", "run_id", "resume", "resume_from", "telemetry")

F = TypeVar("F", bound=Callable[..., Any])


def with_train_options(names: Sequence[str]) -> Callable[[F], F]:
    """Give a command ``train``'s options ``names``, received in its ``**kwargs``.

    Typer reads a command's options from its signature: the signature is the command's own
    parameters plus train's named ones (resolved annotations, so typer sees their
    ``typer.Option``), keyword-only.
    """
    def decorate(func: F) -> F:
        own = inspect.signature(func, eval_str=True)
        theirs = inspect.signature(train, eval_str=True).parameters
        params = [p for p in own.parameters.values() if p.kind is not p.VAR_KEYWORD]
        params += [theirs[name].replace(kind=inspect.Parameter.KEYWORD_ONLY)
                   for name in names]
        func.__signature__ = own.replace(parameters=params)  # type: ignore[attr-defined]
        return func
    return decorate


def _train_defaults() -> dict[str, Any]:
    return {name: param.default for name, param in inspect.signature(train).parameters.items()}


def train_args(options: Mapping[str, Any]) -> list[str]:
    """The ``train`` arguments for the ``TRAIN_OPTIONS`` whose value is not train's default.

    Flags are spelt as typer spells them: ``--ga-weight 2.0``; a bool ``--amp`` or
    ``--no-amp``.
    """
    defaults = _train_defaults()
    args: list[str] = []
    for name in TRAIN_OPTIONS:
        value = options.get(name, defaults[name])
        if value is None or value == defaults[name]:
            continue
        flag = name.replace("_", "-")
        if isinstance(value, bool):
            args.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            args += [f"--{flag}", str(value)]
    return args


def check_train_options(options: Mapping[str, Any]) -> None:
    """What ``train`` would refuse, refused now, before any service starts.

    Raises typer.BadParameter: a config file, preset or override that does not validate
    (the field named), or a fault spec that does not parse.
    """
    from services.trainer.config import flag_overrides, load_train_config

    try:
        load_train_config(options.get("config"), options.get("preset"),
                          flag_overrides(options))
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    if options.get("inject_fault"):
        from services.trainer.faults import FaultPlan  # imports torch: only when needed

        try:
            FaultPlan.parse(options["inject_fault"])
        except ValueError as error:
            raise typer.BadParameter(str(error), param_hint="--inject-fault") from None


@with_train_options(TRAIN_OPTIONS)
def up(
    data: Annotated[Path, typer.Option(help="LJSpeech-layout folder")] = Path("data/demo"),
    out: Annotated[Path, typer.Option(help="run folder")] = Path("runs/up"),
    run_id: Annotated[str | None, typer.Option(help="run id on the bus; default: from --out")]
    = None,
    api_port: Annotated[int, typer.Option(help="control API port (127.0.0.1)")] = 8000,
    workers: Annotated[int, typer.Option(help="diagnostics worker processes")] = 1,
    observability: Annotated[bool, typer.Option(
        help="also run Prometheus (alert rules) and Alertmanager; services serve metrics "
             "on the ports of docs/observability.md")] = False,
    tuner: Annotated[bool, typer.Option(
        help="run the tuner's policy loop (--no-tuner: the run goes uncorrected, e.g. to "
             "compare)")] = True,
    **train_options: Any,
) -> None:
    """Start Redis (if needed), diagnostics, tuner, control API and a supervised trainer.

    The training options are ``smart-tuner train``'s, passed to the trainer as given; it
    always resumes from the run's last good checkpoint, so a restart continues the run
    (and --warm-start applies only while the run has no checkpoint of its own).
    """
    from services.launcher.up import notifier_configured
    from services.launcher.up import up as run_up

    check_train_options(train_options)
    try:
        notifier = notifier_configured(os.environ)
    except ConfigError as error:
        typer.echo(f"smart-tuner up: {error}", err=True)
        raise typer.Exit(code=2) from None

    run = run_id or re.sub(r"[^A-Za-z0-9_.-]", "-", out.resolve().name).strip("-.") or "run"
    code = run_up(data, out, run, api_port=api_port, worker_concurrency=workers,
                  train_args=train_args(train_options), redis_url=get_settings().redis_url,
                  notifier=notifier, observability=observability, tuner=tuner)
    raise typer.Exit(code=code)


def register(app: typer.Typer) -> None:
    """Attach ``up`` to the top-level CLI."""
    app.command()(up)
