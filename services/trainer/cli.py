"""``smart-tuner corpus | train | synthesize``: the trainer's command line."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from services.core.settings import get_settings

console = Console()

DATA_CHECK_JSON = "data-check.json"  # written into the run folder at the start of a run
DATA_CHECK_PNG = "data-check.png"
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
    config: Annotated[Path | None, typer.Option(
        exists=True, dir_okay=False,
        help="TOML or YAML run config: a preset plus sections (audio, model, optim, run...) "
             "that override it (e.g. config/recipes/ru-real.toml); flags override the file")]
    = None,
    preset: Annotated[str | None, typer.Option(
        help="model/optimisation preset: tiny or base (default: the config file's, else "
             "tiny)")] = None,
    max_steps: Annotated[int | None, typer.Option(help="stop after this many steps")] = None,
    max_minutes: Annotated[float | None, typer.Option(help="stop after this wall time")]
    = None,
    until_indicators: Annotated[bool, typer.Option(
        help="stop as soon as all success indicators are met: the plan's five and, with "
             "probes on, the inference one")] = False,
    resume: Annotated[bool, typer.Option(help="continue from the newest valid checkpoint")]
    = False,
    data_check: Annotated[bool, typer.Option(
        help="check the corpus first (as check-data) when the run folder has no checkpoint "
             "yet; errors (missing or unreadable audio) stop the run")] = True,
    eval_every: Annotated[int | None, typer.Option(help="validate every N steps")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="checkpoint every N steps")]
    = None,
    batch_size: Annotated[int | None, typer.Option(help="override the preset's batch size")]
    = None,
    val_size: Annotated[int | None, typer.Option(
        help="utterances held out as the fixed validation batch")] = None,
    lr: Annotated[float | None, typer.Option(help="override the preset's learning rate")]
    = None,
    warmup_steps: Annotated[int | None, typer.Option(help="LR warm-up steps")] = None,
    ga_weight: Annotated[float | None, typer.Option(
        help="guided attention loss weight (optim.guided_attention_weight)")] = None,
    ga_sigma: Annotated[float | None, typer.Option(
        help="guided attention width (optim.guided_attention_sigma)")] = None,
    gate_pos_weight: Annotated[float | None, typer.Option(
        help="weight of the stop-token positives (optim.gate_positive_weight)")] = None,
    seed: Annotated[int | None, typer.Option(help="seed of init, shuffling and the split")]
    = None,
    amp: Annotated[bool | None, typer.Option(
        help="fp16 autocast + GradScaler (CUDA only); default: the config's")] = None,
    warm_start: Annotated[Path | None, typer.Option(
        exists=True,
        help="start from the weights of this checkpoint file or run folder (fresh optimizer, "
             "step 0); ignored when resuming from this run's own checkpoint")] = None,
    ignore_layers: Annotated[str | None, typer.Option(
        help="with --warm-start: comma-separated layer names kept at their fresh init, "
             "e.g. embedding,decoder.projection")] = None,
    run_id: Annotated[str | None, typer.Option(help="name of the run on the bus")] = None,
    resume_from: Annotated[str, typer.Option(
        help="latest, last_good, or best (the checkpoint that spoke the probes best)")]
    = "latest",
    inject_fault: Annotated[str | None, typer.Option(
        help="e.g. grad_spike:start=20,steps=30,factor=1000 (also nan_grad, nan_loss, crash)")]
    = None,
    telemetry: Annotated[bool, typer.Option(
        help="publish to SMART_TUNER_REDIS_URL and obey commands (when it is set)")] = True,
) -> None:
    """Train Tacotron2; prints the verdict on every success indicator at the end.

    The config is the preset, then --config's sections, then the flags (lowest first).
    Under torchrun (``torchrun --nproc_per_node=N -m services.cli train ...``) every worker
    runs this with the same options: DDP, one shard of the batches per rank; rank 0 alone
    writes --out, publishes telemetry, reads commands and serves the metrics port.
    """
    import torch

    from services.trainer import distributed
    from services.trainer.checkpoints import UnsafeCheckpointError
    from services.trainer.config import flag_overrides, load_train_config, record_config_file
    from services.trainer.faults import FaultPlan, GuidedAttentionRemoval
    from services.trainer.training import Trainer
    from services.trainer.warm_start import WarmStartError, parse_ignore_layers

    settings = get_settings()
    if settings.num_threads:
        torch.set_num_threads(settings.num_threads)
    flags = {"lr": lr, "warmup_steps": warmup_steps, "ga_weight": ga_weight,
             "ga_sigma": ga_sigma, "gate_pos_weight": gate_pos_weight, "amp": amp,
             "batch_size": batch_size, "val_size": val_size, "eval_every": eval_every,
             "checkpoint_every": checkpoint_every, "seed": seed}
    try:
        cfg = load_train_config(config, preset, flag_overrides(flags))
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    try:
        fault = FaultPlan.parse(inject_fault) if inject_fault else None
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--inject-fault") from None
    # A no-op without torchrun's environment; under it, joins the process group.
    placement = distributed.init_from_env(settings.device)
    if data_check and placement.is_main and not _has_checkpoints(out):
        _check_data_before_training(data, out, cfg.text.language)
    link = None
    finished = False
    try:
        try:
            trainer = Trainer(cfg, data, out, resume=resume, device=settings.device,
                              run_id=run_id, resume_from=resume_from, fault=fault,
                              warm_start=warm_start,
                              ignore_layers=parse_ignore_layers(ignore_layers))
        except WarmStartError as error:
            raise typer.BadParameter(str(error), param_hint="--warm-start") from None
        except UnsafeCheckpointError as error:  # resuming a run with old checkpoints
            console.print(f"[red]{error}[/red]")
            raise typer.Exit(code=2) from None
        if fault is not None and fault.kind == "ga_off":
            trainer.controllers.append(GuidedAttentionRemoval(fault))
        if config is not None and placement.is_main:
            record_config_file(config, out)  # as written; config.json is the resolved one
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


def _has_checkpoints(out: Path) -> bool:
    from services.trainer.checkpoints import MANIFEST_NAME, RUN_CHECKPOINT_SUBDIR

    return (out / RUN_CHECKPOINT_SUBDIR / MANIFEST_NAME).exists()


def _check_data_before_training(data: Path, out: Path, language: str) -> None:
    """The data check of a fresh run: printed, saved in the run folder, fatal on errors."""
    from services.trainer.datacheck import check_dataset, plot_report, print_report
    from services.trainer.dataset import MetadataError

    try:
        report = check_dataset(data, language=language)
    except (FileNotFoundError, MetadataError) as error:
        console.print(f"[red]{escape(str(error))}[/red]")
        raise typer.Exit(code=1) from None
    print_report(report, console, max_rows=5)
    out.mkdir(parents=True, exist_ok=True)
    (out / DATA_CHECK_JSON).write_text(report.model_dump_json(indent=1))
    plot_report(report, out / DATA_CHECK_PNG)
    if report.has_errors:
        console.print(f"[red]{data}: fix the errors above (or train with --no-data-check)"
                      "[/red]")
        raise typer.Exit(code=1)


def _serve_metrics(trainer, link) -> None:
    """Prometheus metrics on $SMART_TUNER_TRAINER_METRICS_PORT (rank 0 only; unset: off)."""
    from services.core.settings import ConfigError
    from services.trainer.exporter import METRICS_PORT_ENV, metrics_port_from_env, serve_metrics
    from services.trainer.link import process_rank

    try:
        port = metrics_port_from_env()
    except ConfigError as error:
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
    """Rich table of the final verdict: each indicator, its target and how it was measured."""
    from services.core.indicators import Indicator, Verdict

    # Summaries written before the verdict existed have only the indicators list.
    verdict = (Verdict.model_validate(summary["verdict"]) if summary.get("verdict")
               else None)
    checks = (verdict.indicators if verdict is not None else
              [Indicator.model_validate(item) for item in summary["indicators"]])
    judged = f", judged at step {verdict.step}" if verdict is not None else ""
    table = Table(title=f"run {summary['run_id']}: step {summary['step']} "
                        f"({summary['stop_reason']}, {summary['seconds'] / 60:.1f} min"
                        f"{judged})")
    for column in ("indicator", "value", "target", "met", "measured as"):
        table.add_column(column)
    for check in checks:
        table.add_row(check.name, f"{check.value:.4g}",
                      f"{check.comparison} {check.threshold:g}",
                      "[green]yes[/green]" if check.met else "[red]no[/red]",
                      escape(check.measured))
    console.print(table)
    first = summary["indicators_first_met"]
    if first:
        console.print(f"all indicators first met at step {first['step']} "
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
    best: Annotated[bool, typer.Option(
        help="the run's checkpoint that spoke the inference probes best, not the newest")]
    = False,
) -> None:
    """Synthesise speech (Griffin-Lim) and plot the inference alignment next to the wav."""
    from services.trainer.checkpoints import CheckpointError
    from services.trainer.synthesis import Synthesizer

    try:
        synthesizer = Synthesizer(checkpoint, best=best)
    except (FileNotFoundError, ValueError, CheckpointError) as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(code=1) from None
    console.print(f"checkpoint at step {synthesizer.step}")
    result, plot = synthesizer.to_files(text, out, language, seed)
    seconds = len(result.wav) / result.sample_rate
    console.print(f"wrote {out} ({seconds:.2f} s) and {plot}; "
                  f"gate {'stopped' if result.stopped else 'did NOT stop (step limit)'}; "
                  f"diagonality {result.scores['diagonality']:.2f}, "
                  f"quality {result.scores['quality']:.0f}%")


def upgrade_checkpoint(
    paths: Annotated[list[Path], typer.Argument(help="checkpoint files or run folders")],
    trusted: Annotated[bool, typer.Option(
        "--trusted", help="confirm you trust these files: converting unpickles them in "
                          "full, which runs any code they hold")] = False,
) -> None:
    """Rewrite old checkpoints (pickled numpy arrays) so that they load with
    ``torch.load(weights_only=True)``, which every reader now insists on."""
    from services.trainer.checkpoints import RUN_CHECKPOINT_SUBDIR, CheckpointError
    from services.trainer.checkpoints import upgrade_checkpoint as upgrade

    if not trusted:
        console.print("[red]upgrade-checkpoint unpickles each file in full, which runs any "
                      "code it holds: add --trusted if you trust where they came from[/red]")
        raise typer.Exit(code=2)
    files: list[Path] = []
    for path in paths:
        folder = path / RUN_CHECKPOINT_SUBDIR if (path / RUN_CHECKPOINT_SUBDIR).is_dir() else path
        files += sorted(folder.glob("ckpt-*.pt")) if folder.is_dir() else [path]
    if not files:
        console.print(f"[red]no checkpoint in {', '.join(map(str, paths))}[/red]")
        raise typer.Exit(code=1)
    for file in files:
        try:
            console.print(f"{file}: {'upgraded' if upgrade(file) else 'already loads safely'}")
        except (OSError, CheckpointError) as error:
            console.print(f"[red]{file}: {error}[/red]")
            raise typer.Exit(code=1) from None


def check_data(
    data: Annotated[Path, typer.Option(help="LJSpeech-layout folder (metadata.csv, wavs/)")],
    plot: Annotated[Path | None, typer.Option(
        help="histogram PNG to write (default: <data>/data-check.png)")] = None,
    json_path: Annotated[Path | None, typer.Option(
        "--json", help="also write the whole report as JSON here")] = None,
    max_rows: Annotated[int, typer.Option(min=1, help="problems listed per kind")] = 10,
    checkpoint: Annotated[Path | None, typer.Option(
        help="run folder or checkpoint file: also list utterances whose teacher-forced "
             "alignment stays poor")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="batch size of the scoring pass")]
    = 16,
) -> None:
    """Check a corpus before training: missing or broken audio, clipping, long silences,
    unknown characters, transcripts that do not fit their audio. Exits 1 on errors."""
    from services.trainer.datacheck import (
        PLOT_FILE,
        alignment_section,
        check_dataset,
        plot_report,
        print_report,
        score_utterances,
        usable_ids,
    )
    from services.trainer.dataset import MetadataError

    try:
        report = check_dataset(data)
    except (FileNotFoundError, MetadataError) as error:
        console.print(f"[red]{escape(str(error))}[/red]")
        raise typer.Exit(code=1) from None
    if checkpoint is not None:
        import torch

        from services.trainer.training import resolve_device

        settings = get_settings()
        if settings.num_threads:
            torch.set_num_threads(settings.num_threads)
        scores = score_utterances(checkpoint, data, usable_ids(report), batch_size,
                                  device=str(resolve_device(settings.device)))
        if scores:
            report = report.model_copy(
                update={"alignment": alignment_section(scores, str(checkpoint))})
    print_report(report, console, max_rows=max_rows)
    written = plot_report(report, plot or data / PLOT_FILE)
    console.print(f"histograms: {written}")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(report.model_dump_json(indent=1))
        console.print(f"report: {json_path}")
    if report.has_errors:
        raise typer.Exit(code=1)


def register(app: typer.Typer) -> None:
    """Attach the trainer's commands to the top-level CLI."""
    app.command()(corpus)
    app.command()(train)
    app.command()(synthesize)
    app.command("check-data")(check_data)
    app.command("upgrade-checkpoint")(upgrade_checkpoint)
