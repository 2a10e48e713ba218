"""Inference robustness probes: unseen sentences spoken free-running, judged on stopping.

Teacher-forced scores say how the model follows the right answer; a user hears it speak
text it has never seen, where nothing stops it from wandering past the end or never
firing the gate. A fixed probe set per language (a long sentence of 30+ words, repeated
words, numbers and dates, a question, a list, a short phrase) is synthesised at every
checkpoint; per probe: whether the gate stopped by itself, the output length against the
length the corpus's own speaking rate predicts, and the inference alignment scores.

``ProbeRunner`` does it in a background thread on a copy of the model, so the training
step never waits for it; the trainer collects finished summaries between steps.
"""

from __future__ import annotations

import copy
import logging
import math
import queue
import statistics
import threading
import time
from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, Field

from services.core import indicators
from services.core.schemas import ProbeFailure, ProbeReport
from services.trainer.config import TrainConfig
from services.trainer.model import Tacotron2
from services.trainer.synthesis import Synthesizer
from services.trainer.text import Language, detect_language, text_to_sequence

log = logging.getLogger(__name__)

# A probe "stops" when the gate fires by itself with the output within this range of the
# expected length: a model that says a 2-second phrase in 14 seconds has not stopped.
STOP_RATIO_MIN = 0.5
STOP_RATIO_MAX = 2.0
# The free run is cut a little past the longest acceptable length: going on costs CPU
# and cannot change the verdict.
RUN_MARGIN = 1.1
PROBE_SEED = 0


class Probe(BaseModel):
    """One fixed sentence of the probe set."""

    id: str
    language: Language
    kind: str
    text: str


PROBES: tuple[Probe, ...] = (
    Probe(id="en-long", language="en", kind="long sentence", text=(
        "When the morning train finally left the station, the old conductor walked slowly "
        "along the platform, checking every door twice, because he remembered the winter "
        "when a child had been left behind in the cold and nobody noticed until noon.")),
    Probe(id="en-repeat", language="en", kind="repeated words",
          text="Very very very good, then good again, and good once more."),
    Probe(id="en-numbers", language="en", kind="numbers and dates",
          text="On March 3rd, 2021, she paid $45.50 for 12 books at 7:30 in the evening."),
    Probe(id="en-question", language="en", kind="question",
          text="Have you ever wondered why the sky turns red before the storm?"),
    Probe(id="en-list", language="en", kind="list",
          text="Bring apples, pears, bread, cheese, milk, two candles and a map."),
    Probe(id="en-short", language="en", kind="short phrase", text="Hello there."),
    Probe(id="ru-long", language="ru", kind="long sentence", text=(
        "Когда утренний поезд наконец отошёл от станции, старый проводник медленно прошёл "
        "вдоль платформы, дважды проверяя каждую дверь, потому что помнил ту зиму, когда "
        "ребёнка забыли на холоде и никто не заметил этого до самого полудня.")),
    Probe(id="ru-repeat", language="ru", kind="repeated words",
          text="Очень очень очень хорошо, потом снова хорошо, и ещё раз хорошо."),
    Probe(id="ru-numbers", language="ru", kind="numbers and dates",
          text="Третьего марта 2021 года она заплатила 450 рублей за 12 книг."),
    Probe(id="ru-question", language="ru", kind="question",
          text="Вы когда-нибудь думали, почему небо краснеет перед грозой?"),
    Probe(id="ru-list", language="ru", kind="list",
          text="Возьмите яблоки, груши, хлеб, сыр, молоко, две свечи и карту."),
    Probe(id="ru-short", language="ru", kind="short phrase", text="Привет, как дела?"),
)


class ProbeResult(BaseModel):
    """What the model did with one probe."""

    probe_id: str
    language: Language
    kind: str
    stopped: bool  # the gate fired before the cut
    frames: int
    expected_frames: float
    length_ratio: float
    ok: bool  # stopped with the length in [STOP_RATIO_MIN, STOP_RATIO_MAX]
    diagonality: float
    quality: float
    wer: float | None = None  # English, when a recogniser is installed
    reference_wer: float | None = None  # the same recogniser on espeak-ng's rendering


class ProbeSummary(BaseModel):
    """The probe set at one checkpoint: the inference indicator's inputs."""

    step: int
    n: int
    stop_share: float = Field(ge=0, le=1)  # share of probes that are ``ok``
    median_diagonality: float
    median_quality: float
    relative_wer: float | None = None  # mean (wer - reference_wer) over English probes
    seconds: float
    results: list[ProbeResult]

    @property
    def score(self) -> float:
        """One number to rank checkpoints by: stopping first, then alignment (0..2)."""
        diagonality = self.median_diagonality if math.isfinite(self.median_diagonality) else 0
        return self.stop_share + diagonality

    def indicators(self) -> list[indicators.Indicator]:
        """The inference indicator's two measures, held to the plan's style of targets."""
        return indicators.evaluate_inference(100 * self.stop_share, self.median_diagonality)

    def report(self) -> ProbeReport:
        """What goes on the bus: the numbers and the probes that failed, no audio."""
        return ProbeReport(
            checkpoint_step=self.step, n=self.n, stop_percent=100 * self.stop_share,
            median_diagonality=self.median_diagonality, median_quality=self.median_quality,
            relative_wer=self.relative_wer, seconds=self.seconds,
            failures=[ProbeFailure(probe_id=r.probe_id, kind=r.kind, stopped=r.stopped,
                                   length_ratio=r.length_ratio, diagonality=r.diagonality)
                      for r in self.results if not r.ok])


def probes_for(languages: Sequence[str]) -> list[Probe]:
    """The probes in the given languages, in the set's order."""
    wanted = set(languages)
    return [probe for probe in PROBES if probe.language in wanted]


def corpus_languages(texts: Sequence[str]) -> list[Language]:
    """Languages present in a corpus's transcripts, English first."""
    present = {detect_language(text) for text in texts}
    return [language for language in ("en", "ru") if language in present]


def frames_per_symbol(mel_lengths: Sequence[int], text_lengths: Sequence[int]) -> float:
    """The corpus's speaking rate: median mel frames per encoded symbol."""
    ratios = [m / t for m, t in zip(mel_lengths, text_lengths, strict=True) if t > 0]
    if not ratios:
        raise ValueError("no utterances to measure the speaking rate on")
    return float(statistics.median(ratios))


def run_probes(synthesizer: Synthesizer, probes: Sequence[Probe], rate: float, step: int,
               recognizer=None, wer_cache: dict | None = None) -> ProbeSummary:
    """Speak every probe free-running and judge it; ``rate`` is ``frames_per_symbol``.

    ``recognizer`` (services.diagnostics.asr.Recognizer), when given, adds a word error
    rate to English probes that stopped at a sane length, relative to its error on
    espeak-ng's rendering of the same words.
    """
    started = time.perf_counter()
    r = synthesizer.cfg.model.n_frames_per_step
    results: list[ProbeResult] = []
    for probe in probes:
        n_symbols = len(text_to_sequence(probe.text, probe.language).ids)
        expected = rate * n_symbols
        # The cut follows the probe, not the model's max_decoder_steps: a safety limit
        # set for the training data must not fail a long probe that would have stopped.
        cut = math.ceil(STOP_RATIO_MAX * RUN_MARGIN * expected / r)
        spoken = synthesizer.synthesize(probe.text, probe.language, seed=PROBE_SEED,
                                        max_decoder_steps=cut, vocode=False)
        result = judge(probe, spoken.stopped, spoken.mel.shape[1], expected, spoken.scores)
        # Only a probe that stopped at a sane length is worth hearing: the vocoder and the
        # recogniser are most of a pass's cost, and a run-on's words say nothing new.
        if recognizer is not None and probe.language == "en" and result.ok:
            result = _with_wer(result, spoken.normalized_text,
                               synthesizer.vocode(spoken.mel), synthesizer.cfg.audio.sample_rate,
                               recognizer, wer_cache)
        results.append(result)
    return summarize(results, step, time.perf_counter() - started)


def judge(probe: Probe, stopped: bool, frames: int, expected_frames: float,
          scores: dict[str, float]) -> ProbeResult:
    """One probe's verdict: ``ok`` when the gate fired by itself and the output length is
    within [STOP_RATIO_MIN, STOP_RATIO_MAX] of the expected one."""
    ratio = frames / expected_frames
    return ProbeResult(
        probe_id=probe.id, language=probe.language, kind=probe.kind, stopped=stopped,
        frames=frames, expected_frames=round(expected_frames, 1),
        length_ratio=round(ratio, 3),
        ok=stopped and STOP_RATIO_MIN <= ratio <= STOP_RATIO_MAX,
        diagonality=scores["diagonality"], quality=scores["quality"])


def _with_wer(result: ProbeResult, spoken_text: str, wav: np.ndarray, sample_rate: int,
              recognizer, cache: dict | None) -> ProbeResult:
    """Add the word error rate against the words the model was asked to say (numbers
    spelt out), relative to espeak-ng saying the same words."""
    from services.diagnostics.asr import AsrError, relative_wer

    try:
        measured = relative_wer(spoken_text, wav, sample_rate, recognizer, cache)
    except AsrError as error:  # a recogniser failure must not cost the probe's other numbers
        log.warning("probe %s: no word error rate: %s", result.probe_id, error)
        return result
    return result.model_copy(update={"wer": measured.wer,
                                     "reference_wer": measured.reference_wer})


def summarize(results: Sequence[ProbeResult], step: int, seconds: float) -> ProbeSummary:
    """Aggregate per-probe results into the checkpoint's summary."""
    if not results:
        raise ValueError("no probe results")
    relative = [r.wer - r.reference_wer for r in results
                if r.wer is not None and r.reference_wer is not None]
    return ProbeSummary(
        step=step, n=len(results), stop_share=sum(r.ok for r in results) / len(results),
        median_diagonality=float(statistics.median(r.diagonality for r in results)),
        median_quality=float(statistics.median(r.quality for r in results)),
        relative_wer=float(np.mean(relative)) if relative else None,
        seconds=round(seconds, 2), results=list(results))


class ProbeRunner:
    """Runs the probe set on model snapshots in one background thread.

    ``submit`` copies the model (so training goes on changing its own) and returns at
    once; a snapshot submitted while one is still being probed replaces any waiting one,
    so a slow probe pass never builds a backlog. ``collect`` returns finished summaries.
    """

    def __init__(self, cfg: TrainConfig, mel_mean: np.ndarray, mel_std: np.ndarray,
                 probes: Sequence[Probe], rate: float, recognizer=None,
                 background: bool = True):
        self.cfg = cfg
        self.mean = np.asarray(mel_mean)
        self.std = np.asarray(mel_std)
        self.probes = list(probes)
        self.rate = rate
        self.recognizer = recognizer
        self.background = background
        self._wer_cache: dict = {}
        self._pending: queue.Queue[tuple[int, Tacotron2] | None] = queue.Queue(maxsize=1)
        self._done: queue.Queue[ProbeSummary] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, model: Tacotron2, step: int) -> None:
        """Probe a copy of ``model`` as it is at ``step`` (in the background, or now)."""
        snapshot = copy.deepcopy(model).to("cpu").eval()
        if not self.background:
            self._done.put(self._probe(step, snapshot))
            return
        self._start()
        with self._lock:
            self._drop_waiting()  # replace a waiting snapshot rather than queue behind it
            self._pending.put_nowait((step, snapshot))

    def collect(self) -> list[ProbeSummary]:
        """Summaries finished since the last call, oldest first."""
        finished: list[ProbeSummary] = []
        while True:
            try:
                finished.append(self._done.get_nowait())
            except queue.Empty:
                return finished

    def wait(self, timeout: float | None = None) -> list[ProbeSummary]:
        """Wait until no snapshot is waiting or being probed, then ``collect``."""
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        while self._pending.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.collect()

    def close(self) -> None:
        """Stop the thread after the snapshot in hand (a waiting one is dropped)."""
        if self._thread is None:
            return
        with self._lock:
            self._drop_waiting()
            self._pending.put(None)
        self._thread.join()
        self._thread = None

    def _drop_waiting(self) -> None:
        try:
            self._pending.get_nowait()
        except queue.Empty:
            return
        self._pending.task_done()

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="probes", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._pending.get()
            try:
                if item is None:
                    return
                step, snapshot = item
                try:
                    self._done.put(self._probe(step, snapshot))
                except Exception:  # a probe failure must never end training
                    log.exception("probe pass at step %d failed", step)
            finally:
                self._pending.task_done()

    def _probe(self, step: int, snapshot: Tacotron2) -> ProbeSummary:
        synthesizer = Synthesizer.from_model(snapshot, self.cfg, self.mean, self.std, step)
        summary = run_probes(synthesizer, self.probes, self.rate, step, self.recognizer,
                             self._wer_cache)
        log.info("probes at step %d: %.0f%% stop, median inference diagonality %.2f (%.1f s)",
                 step, 100 * summary.stop_share, summary.median_diagonality, summary.seconds)
        return summary

