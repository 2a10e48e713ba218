"""Benchmark: does the tuner rescue a run that fails by itself?

Each recipe is a failure seen in the Tacotron2 issue trackers (or the healthy control). It
is trained twice from the same seed with the same step budget, with the whole loop of
``smart-tuner up`` (its own Redis, the diagnostics worker, the control API): once with the
tuner and once with ``--no-tuner``. Both arms stop as soon as every indicator is met
(``--until-indicators``: the plan's five and the inference probes), or at the budget.

The budget is ``--budget-factor`` (3) times the steps the healthy recipe needed without
the tuner, measured first in the same run (``--budget`` fixes it instead). Per recipe and
arm the table says whether all indicators were met, the steps and minutes to them, the
commands the tuner issued (by action), and the final diagonality and quality. The table is
also written as JSON beside the run folders.

    python bench/rescue.py                     # every recipe, demo corpus, tiny preset
    python bench/rescue.py --quick             # the CI-sized subset
    python bench/rescue.py --recipes ga_off,lr_high --budget 600 --parallel 2

On recorded speech (``smart-tuner corpus --source festvox-ru --out data/ru-real``), every
run takes the recipe's options after the real-speech recipe's, warm-started from a demo
model as the README recommends:

    python bench/rescue.py --data data/ru-real --recipes healthy,gate_never \
        --options "--config config/recipes/ru-real.toml --warm-start runs/demo"
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import redis
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the services package is the repository's

from services.core.schemas import ActionRecord, Event, decode  # noqa: E402
from services.core.streams import Stream, stream_key  # noqa: E402
from services.launcher.redis_server import RedisProcess, free_port  # noqa: E402
from services.trainer.run_folder import METRICS_FILE, SUMMARY_FILE  # noqa: E402

ARMS = ("tuner", "no-tuner")
POLL_S = 2.0  # progress refresh
STOP_GRACE_S = 60.0  # after the budget's time cap, before the run is killed


@dataclass(frozen=True)
class Recipe:
    """A starting recipe: its failure in one line and the ``up`` options that make it."""

    name: str
    failure: str
    options: tuple[str, ...] = ()


RECIPES: tuple[Recipe, ...] = (
    Recipe("healthy", "the control: the tiny preset as shipped"),
    Recipe("ga_off", "NVIDIA/tacotron2's recipe: no guided attention, alignment forms late "
           "or never", ("--ga-weight", "0")),
    Recipe("lr_high", "learning rate 1e-2: diverges or never aligns", ("--lr", "1e-2")),
    Recipe("lr_low", "learning rate 1e-5: crawls, the loss plateaus", ("--lr", "1e-5")),
    Recipe("grad_spikes", "periodic gradient spikes, as fp16 overflow bursts look",
           ("--inject-fault", "grad_spike:start=40,steps=1,every=25,factor=1000")),
    Recipe("nan_burst", "a burst of non-finite gradients after alignment formed, from three "
           "batches whose utterances fault again whenever they come back (as corrupt "
           "recordings do)", ("--inject-fault", "nan_grad:start=130,steps=3,replay=1")),
    Recipe("collapse", "alignment forms, then guided attention is removed and it collapses",
           ("--inject-fault", "ga_off:start=80")),
    Recipe("gate_never", "the gate never fires at inference: positive weight far too low",
           ("--gate-pos-weight", "1")),
)
QUICK = ("healthy", "ga_off")


@dataclass
class Outcome:
    """One recipe under one arm."""

    recipe: str
    arm: str
    budget: int
    exit_code: int | None = None
    met: bool = False
    steps_to_met: int | None = None
    minutes_to_met: float | None = None
    steps: int = 0
    minutes: float = 0.0
    commands: dict[str, int] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)
    diagonality: float | None = None
    quality: float | None = None
    error: str = ""


def _last_step(run_dir: Path) -> int:
    """The newest step in the run's metrics file (0 before the first)."""
    path = run_dir / METRICS_FILE
    if not path.exists():
        return 0
    step = 0
    with path.open() as f:
        for line in f:
            try:
                step = max(step, int(json.loads(line).get("step", 0)))
            except (ValueError, AttributeError):
                continue
    return step


def _decisions(url: str, run_id: str) -> tuple[dict[str, int], dict[str, int]]:
    """The tuner's commands (by action) and events (by kind) of the run, from its audit
    trail: each decision once, at its ``issued`` stage."""
    client = redis.Redis.from_url(url)
    commands: Counter[str] = Counter()
    events: Counter[str] = Counter()
    try:
        for _, fields in client.xrange(stream_key(run_id, Stream.ACTIONS)):
            record = decode(fields, ActionRecord)
            assert isinstance(record, ActionRecord)
            if record.stage == "issued":
                commands[record.command.action] += 1
        for _, fields in client.xrange(stream_key(run_id, Stream.EVENTS)):
            event = decode(fields, Event)
            assert isinstance(event, Event)
            if event.event in ("red_flag", "recovered", "indicators_met"):
                events[event.event] += 1
    finally:
        client.close()
    return dict(commands), dict(events)


def _read_summary(run_dir: Path, outcome: Outcome) -> None:
    """Fill ``outcome`` from the trainer's summary (its verdict is the one verdict)."""
    path = run_dir / SUMMARY_FILE
    if not path.exists():
        outcome.error = outcome.error or "no summary (the trainer did not finish)"
        return
    summary = json.loads(path.read_text())
    outcome.steps = int(summary.get("step", 0))
    first = summary.get("indicators_first_met") or {}
    outcome.met = first.get("step") is not None
    outcome.steps_to_met = first.get("step")
    outcome.minutes_to_met = first.get("minutes")
    verdict = summary.get("verdict") or {}
    for check in verdict.get("indicators", []):
        if check["name"] == "diagonality":
            outcome.diagonality = round(check["value"], 3)
        elif check["name"] == "quality %":
            outcome.quality = round(check["value"], 1)


def run_arm(recipe: Recipe, arm: str, budget: int, args: argparse.Namespace,
            progress: Progress) -> Outcome:
    """Train ``recipe`` under ``arm`` with ``smart-tuner up`` on a private Redis."""
    outcome = Outcome(recipe.name, arm, budget)
    run_id = f"rescue-{recipe.name}-{arm}"
    run_dir = args.out / run_id
    shutil.rmtree(run_dir, ignore_errors=True)
    workdir = args.out / ".redis" / run_id
    workdir.mkdir(parents=True, exist_ok=True)
    store = RedisProcess(workdir).start()
    task = progress.add_task(f"{recipe.name} ({arm})", total=budget)
    command = [sys.executable, "-m", "services.cli", "up", "--data", str(args.data),
               "--out", str(run_dir), "--run-id", run_id, "--api-port", str(free_port()),
               "--preset", args.preset, "--seed", str(args.seed), "--max-steps", str(budget),
               "--until-indicators", "--no-data-check", *args.base_options, *recipe.options]
    if arm == "no-tuner":
        command.append("--no-tuner")
    env = {**os.environ, "SMART_TUNER_REDIS_URL": store.url,
           "SMART_TUNER_NUM_THREADS": str(args.threads), "SMART_TUNER_LOG_LEVEL": "WARNING"}
    started = time.monotonic()
    log = (args.out / f"{run_id}.log").open("w")
    try:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
        deadline = started + args.cap_minutes * 60
        while process.poll() is None:
            progress.update(task, completed=_last_step(run_dir))
            if time.monotonic() > deadline:
                process.terminate()  # up stops every child and lets the trainer finish
                try:
                    process.wait(STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    process.kill()
                outcome.error = f"stopped at the {args.cap_minutes:g}-minute cap"
                break
            time.sleep(POLL_S)
        outcome.exit_code = process.wait()
        outcome.minutes = round((time.monotonic() - started) / 60, 2)
        _read_summary(run_dir, outcome)
        outcome.commands, outcome.events = _decisions(store.url, run_id)
    finally:
        log.close()
        store.stop()
        progress.update(task, completed=budget)
    return outcome


def _table(outcomes: list[Outcome], recipes: dict[str, Recipe]) -> Table:
    table = Table(title="Rescue benchmark: with and without the tuner")
    for column in ("recipe", "arm", "all met", "steps", "minutes", "commands",
                   "final diag", "final quality"):
        table.add_column(column)
    for o in outcomes:
        commands = ", ".join(f"{a} {n}" for a, n in sorted(o.commands.items())) or "0"
        table.add_row(o.recipe, o.arm, "yes" if o.met else "no",
                      str(o.steps_to_met) if o.met else f"> {o.steps}",
                      f"{o.minutes_to_met:.1f}" if o.minutes_to_met is not None
                      else f"({o.minutes:.1f})",
                      commands, str(o.diagonality), str(o.quality))
    return table


def verdict(outcomes: list[Outcome], healthy_steps: int | None) -> dict[str, object]:
    """The issue's targets, read from the table."""
    failing = sorted({o.recipe for o in outcomes if o.recipe != "healthy"})
    cap = None if healthy_steps is None else 3 * healthy_steps

    def rescued(arm: str) -> list[str]:
        return [o.recipe for o in outcomes if o.arm == arm and o.recipe != "healthy"
                and o.met and (cap is None or (o.steps_to_met or 0) <= cap)]

    healthy = {o.arm: o for o in outcomes if o.recipe == "healthy"}
    control = None
    if set(healthy) == set(ARMS) and healthy["tuner"].met and healthy["no-tuner"].met:
        base = healthy["no-tuner"].steps_to_met or 1
        control = {"commands": sum(healthy["tuner"].commands.values()),
                   "steps_change": round((healthy["tuner"].steps_to_met or 0) / base - 1, 3)}
    return {"failing_recipes": failing, "rescued_with_tuner": rescued("tuner"),
            "met_without_tuner": rescued("no-tuner"), "healthy_control": control,
            "steps_cap": cap}


def main() -> None:
    """Run the matrix; print the table and write it as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data/demo"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench-rescue"))
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--recipes", default=",".join(r.name for r in RECIPES))
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--budget", type=int, default=None,
                        help="steps per run (default: budget-factor x the healthy steps)")
    parser.add_argument("--budget-factor", type=float, default=3.0)
    parser.add_argument("--healthy-cap", type=int, default=600,
                        help="step budget of the healthy recipe when measuring the budget")
    parser.add_argument("--cap-minutes", type=float, default=45.0, help="per run")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--options", default="",
                        help="up options every run takes before its recipe's (quoted)")
    parser.add_argument("--arms", default=",".join(ARMS),
                        help="tuner, no-tuner or both (e.g. only the tuner arm of new rules)")
    args = parser.parse_args()
    args.data = args.data.resolve()
    args.out = args.out.resolve()
    args.base_options = shlex.split(args.options)
    if not (args.data / "metadata.csv").exists():
        parser.error(f"{args.data}: no metadata.csv (smart-tuner corpus --out {args.data})")
    chosen = QUICK if args.quick else tuple(args.recipes.split(","))
    recipes = {r.name: r for r in RECIPES}
    unknown = [name for name in chosen if name not in recipes]
    if unknown:
        parser.error(f"unknown recipes {unknown}; known: {', '.join(recipes)}")
    args.out.mkdir(parents=True, exist_ok=True)
    console = Console()
    outcomes: list[Outcome] = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as progress:
        budget = args.budget
        healthy_steps = None
        if budget is None or "healthy" in chosen:
            with ThreadPoolExecutor(args.parallel) as pool:
                firsts = list(pool.map(
                    lambda arm: run_arm(recipes["healthy"], arm, budget or args.healthy_cap,
                                        args, progress), ARMS))
            outcomes += firsts
            baseline = next(o for o in firsts if o.arm == "no-tuner")
            healthy_steps = baseline.steps_to_met
            if budget is None:
                if healthy_steps is None:
                    console.print("[red]the healthy recipe did not meet the indicators "
                                  f"within {args.healthy_cap} steps: no budget to measure "
                                  "against[/red]")
                    budget = args.healthy_cap
                else:
                    budget = int(args.budget_factor * healthy_steps)
        arms = [arm for arm in ARMS if arm in args.arms.split(",")]
        jobs = [(recipes[name], arm) for name in chosen if name != "healthy" for arm in arms]
        with ThreadPoolExecutor(args.parallel) as pool:
            outcomes += list(pool.map(lambda job: run_arm(job[0], job[1], budget, args,
                                                          progress), jobs))
    console.print(_table(outcomes, recipes))
    result = {"data": str(args.data), "options": args.base_options, "preset": args.preset,
              "budget": budget, "healthy_steps": healthy_steps,
              "recipes": {r.name: r.failure for r in RECIPES if r.name in chosen},
              "outcomes": [asdict(o) for o in outcomes],
              "targets": verdict(outcomes, healthy_steps)}
    path = args.out / "rescue.json"
    path.write_text(json.dumps(result, indent=2))
    console.print(json.dumps(result["targets"], indent=2))
    console.print(f"written to {path}")


if __name__ == "__main__":
    main()
