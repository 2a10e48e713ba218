"""A recorded-speech corpus from Debian's ``festvox-ru`` package, in the LJSpeech layout.

The package ships the recordings its unit-selection voice was built from: 620 utterances
of one male Russian speaker (about 100 minutes, 16 kHz mono, BSD-style licence), with
transcripts that mark stress as ``+`` before the vowel ("вол+ос") and pauses as commas.
That makes it the project's real-speech corpus next to the espeak-ng demo: long sentences,
real prosody and pauses, the data users bring. Users' own data goes through the general
LJSpeech loader (services/trainer/dataset.py); this module only converts one source.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import soundfile as sf
from pydantic import BaseModel
from tqdm import tqdm

from services.trainer.dataset import FIELD_SEPARATOR, METADATA_FILE, WAVS_DIR

log = logging.getLogger(__name__)

FESTVOX_RU_PACKAGE = "festvox-ru"
FESTVOX_RU_VOICE_DIR = Path("/usr/share/festival/voices/russian/msu_ru_nsh_clunits")
FESTVOX_RU_COPYRIGHT = Path("/usr/share/doc/festvox-ru/copyright")
PROMPTS_FILE = Path("etc") / "txt.done.data"
LICENSE_NAME = "LICENSE.festvox-ru"
APT_TIMEOUT_S = 900

# Festival's prompt list: one ( id "text" ) per line.
_PROMPT_LINE = re.compile(r'^\(\s*(?P<id>[\w-]+)\s+"(?P<text>.*)"\s*\)\s*$')


class FestvoxCorpusSummary(BaseModel):
    """What ``build_festvox_corpus`` wrote."""

    out_dir: Path
    voice_dir: Path
    n_utterances: int
    n_with_stress: int  # transcripts carrying at least one stress mark
    total_seconds: float
    sample_rates: dict[int, int]  # rate -> utterances
    n_copied: int  # wavs written this time (the others were up to date)
    seconds_taken: float


def parse_prompts(text: str) -> list[tuple[str, str]]:
    """``(id, transcript)`` pairs of a Festival ``txt.done.data``; raises ValueError naming
    every line that is not a prompt, a duplicate id, or a transcript with a ``|``."""
    prompts: list[tuple[str, str]] = []
    seen: set[str] = set()
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        match = _PROMPT_LINE.match(line.strip())
        if match is None:
            problems.append(f"line {number}: not a ( id \"text\" ) prompt: {line[:60]!r}")
            continue
        utt_id, transcript = match.group("id"), match.group("text").strip()
        if utt_id in seen:
            problems.append(f"line {number}: duplicate id {utt_id!r}")
        elif FIELD_SEPARATOR in transcript:
            problems.append(f"line {number}: transcript contains {FIELD_SEPARATOR!r}")
        elif not transcript:
            problems.append(f"line {number}: empty transcript for {utt_id!r}")
        else:
            seen.add(utt_id)
            prompts.append((utt_id, transcript))
    if problems:
        raise ValueError("bad prompt lines:\n  " + "\n  ".join(problems))
    return prompts


def find_voice(voice_dir: Path | None = None, install: bool = True) -> Path:
    """The voice folder (prompts and ``wav/``); installs ``festvox-ru`` with apt when it is
    missing and ``install`` is true and we may (root, or sudo without a password).

    Raises FileNotFoundError saying what to install when the voice cannot be had.
    """
    folder = Path(voice_dir) if voice_dir is not None else FESTVOX_RU_VOICE_DIR
    if _is_voice(folder):
        return folder
    if voice_dir is None and install:
        _apt_install(FESTVOX_RU_PACKAGE)
        if _is_voice(folder):
            return folder
    raise FileNotFoundError(
        f"no festvox voice at {folder} ({PROMPTS_FILE} and wav/ expected); install the "
        f"Debian package: sudo apt-get install {FESTVOX_RU_PACKAGE}")


def _is_voice(folder: Path) -> bool:
    return (folder / PROMPTS_FILE).is_file() and (folder / "wav").is_dir()


def _apt_install(package: str) -> None:
    prefix: list[str] = []
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            return
        prefix = ["sudo", "-n"]  # never prompt: a build script must not hang on a password
    log.info("installing %s with apt-get (about 180 MB)", package)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for args in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", package]):
        result = subprocess.run([*prefix, *args], capture_output=True, text=True, env=env,
                                timeout=APT_TIMEOUT_S, check=False)
        if result.returncode != 0:
            log.warning("%s failed (exit %d): %s", " ".join(args), result.returncode,
                        result.stderr.strip()[-500:])
            return


def _place(source: Path, target: Path) -> bool:
    """Hard-link (same file system) or copy ``source`` to ``target`` unless an identical-size
    file is there; returns whether it wrote."""
    if target.is_file() and target.stat().st_size == source.stat().st_size:
        return False
    staged = target.with_name(f".{target.name}.tmp")
    staged.unlink(missing_ok=True)
    try:
        os.link(source, staged)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(source, staged)
    os.replace(staged, target)
    return True


def build_festvox_corpus(out_dir: Path, voice_dir: Path | None = None, install: bool = True,
                         limit: int | None = None, progress: bool = True
                         ) -> FestvoxCorpusSummary:
    """Write ``out_dir/metadata.csv`` and ``out_dir/wavs/`` from the festvox-ru recordings.

    Transcripts are kept exactly as recorded, stress marks included (the text front-end
    reads them); the audio is kept at its own 16 kHz (features resample it). Idempotent:
    an up-to-date wav is not written again, and ``metadata.csv`` is written last. A prompt
    whose wav is missing or unreadable fails the build, naming it. ``limit`` keeps only the
    first N prompts (tests, quick looks).
    """
    started = time.perf_counter()
    voice = find_voice(voice_dir, install)
    prompts = parse_prompts((voice / PROMPTS_FILE).read_text(encoding="utf-8"))
    if limit is not None:
        prompts = prompts[:limit]
    out_dir = Path(out_dir)
    wavs = out_dir / WAVS_DIR
    wavs.mkdir(parents=True, exist_ok=True)

    seconds = 0.0
    rates: dict[int, int] = {}
    copied = 0
    problems: list[str] = []
    for utt_id, _ in tqdm(prompts, desc="festvox-ru", unit="clip", disable=not progress):
        source = voice / "wav" / f"{utt_id}.wav"
        try:
            info = sf.info(source)
        except (OSError, RuntimeError) as error:
            problems.append(f"{utt_id}: {source}: {error}")
            continue
        copied += _place(source, wavs / f"{utt_id}.wav")
        seconds += info.frames / info.samplerate
        rates[info.samplerate] = rates.get(info.samplerate, 0) + 1
    if problems:
        raise FileNotFoundError("festvox-ru recordings missing or unreadable:\n  "
                                + "\n  ".join(problems))

    copyright_file = (FESTVOX_RU_COPYRIGHT if voice_dir is None
                      else Path(voice_dir) / "COPYING")
    if copyright_file.is_file():  # the licence asks that its notice travel with the data
        shutil.copyfile(copyright_file, out_dir / LICENSE_NAME)
    metadata = out_dir / METADATA_FILE
    staged = metadata.with_name(f".{METADATA_FILE}.tmp")
    staged.write_text("".join(f"{utt_id}{FIELD_SEPARATOR}{text}{FIELD_SEPARATOR}\n"
                              for utt_id, text in prompts), encoding="utf-8", newline="\n")
    os.replace(staged, metadata)
    return FestvoxCorpusSummary(
        out_dir=out_dir, voice_dir=voice, n_utterances=len(prompts),
        n_with_stress=sum("+" in text or "\u0301" in text for _, text in prompts),
        total_seconds=round(seconds, 1), sample_rates=rates, n_copied=copied,
        seconds_taken=round(time.perf_counter() - started, 2))
