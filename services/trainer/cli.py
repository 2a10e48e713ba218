"""``smart-tuner corpus | train | synthesize``: the trainer's command line."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from services.core.settings import get_settings

console = Console()

SIGNAL_ECHO_S = 2.0  # torchrun passes a Ctrl-C on to workers that already got it


class CorpusSource(StrEnum):
    """Where ``smart-tuner corpus`` takes its speech from."""

    demo = "demo"
    festvox_ru = "festvox-ru"


def corpus(
    out: Annotated[Path, typer.Option(help="folder to write the LJSpeech-layout corpus to")]
    = Path("data/demo"),
    source: Annotated[CorpusSource, typer.Option(
        help="demo: sentences spoken by espeak-ng; festvox-ru: 620 recorded Russian "
             "utterances from Debian's festvox-ru package (installed if missing)")]
    = CorpusSource.demo,
    english: Annotated[int, typer.Option(help="demo: English sentences")] = 400,
    russian: Annotated[int, typer.Option(help="demo: Russian sentences")] = 200,
    seed: Annotated[int, typer.Option(help="demo: the same seed gives the same corpus")] = 0,
    jobs: Annotated[int, typer.Option(help="demo: parallel espeak-ng processes")] = 2,
    voice_dir: Annotated[Path | None, typer.Option(
        help="festvox-ru: a voice folder (etc/txt.done.data, wav/) instead of the package's")]
    = None,
) -> None:
    """Build a corpus in the LJSpeech layout: the espeak-ng demo, or recorded Russian speech."""
    if source is CorpusSource.festvox_ru:
        from services.trainer.festvox import build_festvox_corpus

        try:
            real = build_festvox_corpus(out, voice_dir=voice_dir)
        except (FileNotFoundError, ValueError) as error:
            console.print(f"[red]{error}[/red]")
            raise typer.Exit(code=1) from None
        rates = ", ".join(f"{n} at {rate} Hz" for rate, n in sorted(real.sample_rates.items()))
        console.print(f"corpus: {real.n_utterances} recorded utterances ({rates}), "
                      f"{real.total_seconds / 60:.1f} min of audio, {real.n_with_stress} "
                      f"transcripts with stress marks, in {out} ({real.seconds_taken:.1f} s)")
        return
    from services.trainer.corpus import build_demo_corpus

    summary = build_demo_corpus(out, n_english=english, n_russian=russian, seed=seed,
                                jobs=jobs)
    console.print(f"corpus: {summary.n_english} English + {summary.n_russian} Russian "
                  f"utterances, {summary.total_seconds / 60:.1f} min of audio in {out} "
                  f"({summary.seconds_taken:.1f} s)")


def train(
    data: Annotated[Path, typer.Option(help="LJSpeech-layout folder (metadata.csv, wavs/)")],
    out: Annotated[Path, typer.Option(help="run folder: checkpoints, plots, metrics")],
    preset: Annotated[str, typer.Option(help="model/optimisation preset: tiny or base")]
    = "tiny",
    max_steps: Annotated[int | None, typer.Option(help="stop after this many steps")] = None,
    max_minutes: Annotated[float | None, typer.Option(help="stop after this wall time")]
    = None,
    until_indicators: Annotated[bool, typer.Option(
        help="stop as soon as all five success indicators are met")] = False,
    resume: Annotated[bool, typer.Option(help="continue from the newest valid checkpoint")]
    = False,
    eval_every: Annotated[int | None, typer.Option(help="validate every N steps")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="checkpoint every N steps")]
    = None,
    batch_size: Annotated[int | None, typer.Option(help="override the preset's batch size")]
    = None,
    val_size: Annotated[int | None, typer.Option(
        help="utterances held out as the fixed validation batch")] = None,
    lr: Annotated[float | None, typer.Option(help="override the preset's learning rate")]
    = None,
    run_id: Annotated[str | None, typer.Option(help="name of the run on the bus")] = None,
    resume_from: Annotated[str, typer.Option(help="latest or last_good checkpoint")]
    = "latest",
    inject_fault: Annotated[str | None, typer.Option(
        help="e.g. grad_spike:start=20,steps=30,factor=1000 (also nan_grad, nan_loss, crash)")]
    = None,
    telemetry: Annotated[bool, typer.Option(
        help="publish to SMART_TUNER_REDIS_URL and obey commands (when it is set)")] = True,
) -> None:
    """Train Tacotron2; prints a verdict on the plan's five success indicators at the end.

    Under torchrun (``torchrun --nproc_per_node=N -m services.cli train ...``) every worker
    runs this with the same options: DDP, one shard of the batches per rank; rank 0 alone
    writes --out, publishes telemetry, reads commands and serves the metrics port.
    """
    import torch

    from services.trainer import distributed
    from services.trainer.config import preset as load_preset
    from services.trainer.faults import FaultPlan
    from services.trainer.training import Trainer

    settings = get_settings()
    if settings.num_threads:
        torch.set_num_threads(settings.num_threads)
    cfg = load_preset(preset)
    if eval_every:
        cfg.run.eval_every = eval_every
    if checkpoint_every:
        cfg.run.checkpoint_every = checkpoint_every
    if batch_size:
        cfg.run.batch_size = batch_size
    if val_size:
        cfg.run.val_size = val_size
    if lr:
        cfg.optim.learning_rate = lr
    cfg = type(cfg).model_validate(cfg.model_dump())  # re-validate the overridden fields
    try:
        fault = FaultPlan.parse(inject_fault) if inject_fault else None
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--inject-fault") from None
    # A no-op without torchrun's environment; under it, joins the process group.
    placement = distributed.init_from_env(settings.device)
    link = None
    finished = False
    try:
        trainer = Trainer(cfg, data, out, resume=resume, device=settings.device,
                          run_id=run_id, resume_from=resume_from, fault=fault)
        _stop_on_signals(trainer, SIGNAL_ECHO_S if placement.distributed else 0.0)
        if telemetry and settings.redis_url:
            from services.trainer.link import attach

            link = attach(trainer, settings.redis_url)  # None on ranks other than 0
        _serve_metrics(trainer, link)
        summary = trainer.train(max_steps=max_steps, until_indicators=until_indicators,
                                max_minutes=max_minutes)
        finished = True
    finally:
        if link is not None:
            link.close()
        if placement.distributed:
            # After a failure the other ranks may never reach a last barrier: leave at once.
            distributed.cleanup(wait=finished)
    if placement.is_main:  # every rank has the same summary; one prints it
        print_summary(summary)
    if not summary["all_indicators_met"]:
        raise typer.Exit(code=2 if until_indicators else 0)


def _serve_metrics(trainer, link) -> None:
    """Prometheus metrics on $SMART_TUNER_TRAINER_METRICS_PORT (rank 0 only; unset: off)."""
    from services.trainer.exporter import METRICS_PORT_ENV, metrics_port_from_env, serve_metrics
    from services.trainer.link import process_rank

    try:
        port = metrics_port_from_env()
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint=METRICS_PORT_ENV) from None
    if port is None or process_rank() != 0:
        return
    bus = None
    if link is not None:
        def bus():
            publisher = link.publisher
            return publisher.stats, publisher.buffer_size, link.commands.consumer.dead_lettered
    serve_metrics(trainer, port, bus=bus)


def _stop_on_signals(trainer, echo_window_s: float = 0.0) -> None:
    """SIGINT/SIGTERM: finish the step, checkpoint, exit cleanly; a second one aborts.

    Distributed, rank 0's request is the one that counts: every rank stops at the step it
    broadcasts. A Ctrl-C reaches each worker twice, from the terminal and passed on by
    torchrun; a signal within ``echo_window_s`` of the first is that echo, not a second one.
    """
    import signal
    import time

    first: list[float] = []

    def handler(signum: int, frame) -> None:
        now = time.monotonic()
        if first and now - first[0] < echo_window_s:
            return
        if trainer.stop_requested:
            raise KeyboardInterrupt
        first[:] = [now]
        console.print(f"signal {signum}: stopping after this step (again to abort)")
        trainer.request_stop()
        trainer.paused = False

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def print_summary(summary: dict) -> None:
    """Rich table of the final verdict."""
    table = Table(title=f"run {summary['run_id']}: step {summary['step']} "
                        f"({summary['stop_reason']}, {summary['seconds'] / 60:.1f} min)")
    for column in ("indicator", "value", "target", "met"):
        table.add_column(column)
    for item in summary["indicators"]:
        table.add_row(item["name"], f"{item['value']:.4g}",
                      f"{item['comparison']} {item['threshold']:g}",
                      "[green]yes[/green]" if item["met"] else "[red]no[/red]")
    console.print(table)
    first = summary["indicators_first_met"]
    if first:
        console.print(f"all five indicators first met at step {first['step']} "
                      f"after {first['minutes']:.1f} min")
    scores = {k: round(v, 3) for k, v in summary["alignment"].items()}
    console.print(f"skipped non-finite steps: {summary['skipped_steps']}; "
                  f"alignment: {json.dumps(scores)}")


def synthesize(
    checkpoint: Annotated[Path, typer.Option(help="checkpoint file or run folder")],
    text: Annotated[str, typer.Option(help="what to say")],
    out: Annotated[Path, typer.Option(help="wav file to write")] = Path("out.wav"),
    language: Annotated[str, typer.Option(help="auto, en or ru")] = "auto",
    seed: Annotated[int, typer.Option(help="seed for the prenet dropout")] = 0,
) -> None:
    """Synthesise speech (Griffin-Lim) and plot the inference alignment next to the wav."""
    from services.trainer.synthesis import Synthesizer

    result, plot = Synthesizer(checkpoint).to_files(text, out, language, seed)
    seconds = len(result.wav) / result.sample_rate
    console.print(f"wrote {out} ({seconds:.2f} s) and {plot}; "
                  f"gate {'stopped' if result.stopped else 'did NOT stop (step limit)'}; "
                  f"diagonality {result.scores['diagonality']:.2f}, "
                  f"quality {result.scores['quality']:.0f}%")


def register(app: typer.Typer) -> None:
    """Attach the trainer's commands to the top-level CLI."""
    app.command()(corpus)
    app.command()(train)
    app.command()(synthesize)
