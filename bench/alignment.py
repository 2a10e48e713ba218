"""Benchmark: how fast does Tacotron2 learn to align (and to speak) on this machine?

Arms, each trained in this one run:
  (a) the ``tiny`` preset on the demo corpus (guided attention, warm-up to 1e-3 with decay,
      clipping at 1.0), until all its indicators are met;
  (b) the same model with the NVIDIA/tacotron2 recipe: no guided attention, lr 1e-3
      constant, clipping at 1.0 and nothing else of ours, until it aligns;
  (r) recorded speech (``--real-data``, e.g. the festvox-ru corpus) with ``--real-config``,
      from scratch, until all six indicators are met: the plan's five, teacher-forced, and
      the inference probes (>= 90 % stop at a sane length, median inference diagonality
      > 0.7), probed in the background at every checkpoint as in a user's run;
  (w) the same as (r), warm-started from arm (a)'s final checkpoint (the English demo
      model, ``--ignore-layers`` none: the embedding keeps its Cyrillic rows), until all six
      indicators are met: the warm start's gain is (r)'s steps and minutes to alignment
      over (w)'s (and, where (r) gets there in its cap, to all six).
For each it prints seconds per step, the steps and minutes until validation diagonality
> 0.7 with the loss, grad norm and quality there, and when all indicators were first met.
An arm that does not get there within its cap says so, and a ratio is then a bound.

    python bench/alignment.py --data data/demo --cap-minutes 25
    python bench/alignment.py --arms a,r,w --real-data data/ru-real \
        --real-config config/recipes/ru-real.toml --real-cap-minutes 30
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from services.core import indicators
from services.core.logging import setup_logging
from services.trainer.config import TrainConfig, load_train_config, preset
from services.trainer.probes import ProbeSummary
from services.trainer.training import EvalResult, StepMetrics, Trainer, TrainingObserver


@dataclass
class ArmRecord(TrainingObserver):
    """What one arm measured."""

    name: str
    goal: str
    cap_minutes: float
    started: float = field(default_factory=time.perf_counter)
    step_seconds: list[float] = field(default_factory=list)
    aligned: dict | None = None
    all_met: dict | None = None
    final: dict | None = None
    probes: list[dict] = field(default_factory=list)

    def on_step(self, trainer: Trainer, metrics: StepMetrics) -> None:
        self.step_seconds.append(metrics.step_seconds)

    def on_probes(self, trainer: Trainer, summary: ProbeSummary) -> None:
        minutes = (time.perf_counter() - self.started) / 60
        self.probes.append({"checkpoint_step": summary.step, "at_step": trainer.step,
                            "minutes": round(minutes, 2),
                            "stop_percent": round(100 * summary.stop_share, 1),
                            "inference_diagonality": round(summary.median_diagonality, 3),
                            "relative_wer": summary.relative_wer})
        self._check_all_met(trainer)

    def on_eval(self, trainer: Trainer, result: EvalResult) -> None:
        if result.step == 0:
            return
        minutes = (time.perf_counter() - self.started) / 60
        norm = max(trainer.recent_norms) if trainer.recent_norms else math.nan
        point = {"step": result.step, "minutes": round(minutes, 2),
                 "loss": round(result.losses["objective"], 4), "grad_norm": round(norm, 3),
                 "diagonality": round(result.scores["diagonality"], 3),
                 "quality": round(result.scores["quality"], 1)}
        if self.aligned is None and result.scores["diagonality"] > indicators.DIAGONALITY_OK:
            self.aligned = point
        self.final = point
        self._check_all_met(trainer)

    def _check_all_met(self, trainer: Trainer) -> None:
        if self.all_met is None and self.final is not None \
                and trainer.verdict().all_met:
            self.all_met = {**self.final, "step": trainer.step,
                            "minutes": round((time.perf_counter() - self.started) / 60, 2),
                            "probes": self.probes[-1] if self.probes else None}
        done = self.aligned is not None if self.goal == "aligned" else self.all_met is not None
        if done:
            trainer.request_stop()


def nvidia_recipe(cfg: TrainConfig) -> TrainConfig:
    """NVIDIA/tacotron2's optimisation on our model: no guided attention, lr 1e-3 flat."""
    cfg.preset = "tiny-nvidia-recipe"
    cfg.optim.guided_attention_weight = 0.0
    cfg.optim.learning_rate = 1e-3
    cfg.optim.warmup_steps = 0
    cfg.optim.decay_start = 10**9
    cfg.optim.grad_clip = 1.0
    cfg.optim.clip_mode = "fixed"
    return cfg


def run_arm(name: str, cfg: TrainConfig, goal: str, data: Path, out: Path,
            cap_minutes: float, eval_every: int, warm_start: Path | None = None
            ) -> ArmRecord:
    """Train one arm from scratch (or warm-started) until its goal or the cap."""
    cfg.run.eval_every = eval_every
    if not cfg.probes.enabled:
        cfg.run.checkpoint_every = 10**9  # checkpoints are not what is measured here
    cfg.run.max_steps = 100_000
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)
    record = ArmRecord(name=name, goal=goal, cap_minutes=cap_minutes)
    trainer = Trainer(cfg, data, run_dir, observers=[record], warm_start=warm_start)
    record.started = time.perf_counter()
    trainer.train(max_minutes=cap_minutes)
    return record


def describe(record: ArmRecord) -> list[str]:
    """Human lines for one arm."""
    steps = len(record.step_seconds)
    # The first steps include allocator warm-up; the median is the honest per-step cost.
    per_step = sorted(record.step_seconds)[steps // 2] if steps else math.nan
    lines = [f"[{record.name}] {steps} steps, median {per_step:.2f} s/step"]
    if record.aligned:
        a = record.aligned
        lines.append(f"  diagonality > 0.7 at step {a['step']} ({a['minutes']} min): loss "
                     f"{a['loss']}, max pre-clip grad norm {a['grad_norm']}, quality "
                     f"{a['quality']}%")
    else:
        lines.append(f"  diagonality > 0.7 not reached in {steps} steps "
                     f"({record.cap_minutes} min cap); last: {record.final}")
    if record.goal == "all_met":
        if record.all_met:
            m = record.all_met
            lines.append(f"  all indicators met at step {m['step']} ({m['minutes']} min): "
                         f"{json.dumps(m)}")
        else:
            lines.append(f"  all indicators not met in {steps} steps; last: {record.final}")
    for probe in record.probes:
        lines.append(f"  probes of step {probe['checkpoint_step']}: {probe['stop_percent']}% "
                     f"stop, inference diagonality {probe['inference_diagonality']} "
                     f"({probe['minutes']} min)")
    return lines


def main() -> None:
    """Parse arguments, run the arms, print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data/demo"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench-alignment"))
    parser.add_argument("--cap-minutes", type=float, default=25.0)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--arms", default="a,b", help="comma-separated: a, b, r, w")
    parser.add_argument("--real-data", type=Path, default=Path("data/ru-real"),
                        help="recorded speech for arms r and w")
    parser.add_argument("--real-config", type=Path, default=None,
                        help="training config (TOML/YAML) of arms r and w")
    parser.add_argument("--real-cap-minutes", type=float, default=30.0)
    parser.add_argument("--real-eval-every", type=int, default=25)
    args = parser.parse_args()
    arms = set(args.arms.split(","))
    setup_logging("WARNING")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"cap {args.cap_minutes} min per arm, validation every {args.eval_every} steps")
    records = {}
    if "a" in arms:
        records["a"] = run_arm("a-tiny", preset("tiny"), "all_met", args.data, args.out,
                               args.cap_minutes, args.eval_every)
    if "b" in arms:
        nvidia = nvidia_recipe(preset("tiny"))
        nvidia.probes.enabled = False  # its goal is alignment alone
        records["b"] = run_arm("b-nvidia-recipe", nvidia, "aligned", args.data, args.out,
                               args.cap_minutes, args.eval_every)
    if "r" in arms:
        records["r"] = run_arm("r-real-speech", load_train_config(args.real_config),
                               "all_met", args.real_data, args.out, args.real_cap_minutes,
                               args.real_eval_every)
    if "w" in arms:
        source = args.out / "a-tiny"
        if not (source / "checkpoints").is_dir():
            parser.error(f"arm w warm-starts from arm a's run {source}: run arm a first")
        records["w"] = run_arm("w-real-warm-start", load_train_config(args.real_config),
                               "all_met", args.real_data, args.out, args.real_cap_minutes,
                               args.real_eval_every, warm_start=source)
    print()
    for record in records.values():
        print("\n".join(describe(record)))
    if "a" in records and "b" in records and records["a"].aligned:
        a_steps = records["a"].aligned["step"]
        if records["b"].aligned:
            print(f"ratio of steps to diagonality > 0.7, (b)/(a): "
                  f"{records['b'].aligned['step'] / a_steps:.2f}")
        else:
            b_steps = len(records["b"].step_seconds)
            print(f"ratio of steps to diagonality > 0.7, (b)/(a): > {b_steps / a_steps:.2f} "
                  f"(lower bound: (b) did not align within its cap)")
    if "r" in records and "w" in records:
        r, w = records["r"].aligned, records["w"].aligned
        if r and w:
            print(f"warm start: diagonality > 0.7 at step {w['step']} ({w['minutes']} min) "
                  f"vs {r['step']} ({r['minutes']} min) from scratch: "
                  f"{r['step'] / w['step']:.2f}x fewer steps")
        else:
            print(f"warm start: aligned {w}, from scratch {r} (one did not align in its cap)")
        r_all, w_all = records["r"].all_met, records["w"].all_met
        if w_all and r_all:
            print(f"warm start: all six indicators at step {w_all['step']} "
                  f"({w_all['minutes']} min) vs {r_all['step']} ({r_all['minutes']} min) "
                  f"from scratch: {r_all['step'] / w_all['step']:.2f}x fewer steps")
        elif w_all:
            print(f"warm start: all six indicators at step {w_all['step']} "
                  f"({w_all['minutes']} min); from scratch not within "
                  f"{records['r'].cap_minutes} min ({len(records['r'].step_seconds)} steps)")
    results = {name: {"aligned": r.aligned, "all_met": r.all_met, "final": r.final,
                      "probes": r.probes,
                      "median_step_seconds": sorted(r.step_seconds)[len(r.step_seconds) // 2]
                      if r.step_seconds else None, "steps": len(r.step_seconds)}
               for name, r in records.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
