"""The recorded-speech corpus from Debian's festvox-ru package, in the LJSpeech layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from services.trainer.dataset import read_metadata
from services.trainer.festvox import (
    FESTVOX_RU_VOICE_DIR,
    PROMPTS_FILE,
    build_festvox_corpus,
    parse_prompts,
)
from services.trainer.text import STRESS_ID, text_to_sequence

PROMPTS = '''( ru_0001 "Она завела, прядь волнистых вол+ос за ухо." )
( ru_0002 "+Окна многоэтажных домов казались нежилыми." )

( ru_0003 "Со спокойным мужеством, Скайлс, ожидал всего." )
'''


def _voice(root: Path, prompts: str = PROMPTS, rate: int = 16000) -> Path:
    """A voice folder in the package's layout, with short real wav files."""
    (root / "etc").mkdir(parents=True)
    (root / PROMPTS_FILE).write_text(prompts, encoding="utf-8")
    (root / "wav").mkdir()
    rng = np.random.default_rng(0)
    for utt_id, _ in parse_prompts(prompts):
        sf.write(root / "wav" / f"{utt_id}.wav", 0.1 * rng.standard_normal(rate), rate,
                 subtype="PCM_16")
    return root


def test_parse_prompts_keeps_stress_and_rejects_bad_lines() -> None:
    assert parse_prompts(PROMPTS)[1] == ("ru_0002", "+Окна многоэтажных домов казались нежилыми.")
    with pytest.raises(ValueError, match="line 2: not a"):
        parse_prompts('( a "x" )\nnot a prompt\n')
    with pytest.raises(ValueError, match="duplicate id 'a'"):
        parse_prompts('( a "x" )\n( a "y" )\n')
    with pytest.raises(ValueError, match="contains '\\|'"):
        parse_prompts('( a "x|y" )\n')


def test_build_writes_an_ljspeech_corpus_the_loader_reads(tmp_path: Path) -> None:
    voice = _voice(tmp_path / "voice")
    out = tmp_path / "ru-real"
    summary = build_festvox_corpus(out, voice_dir=voice, progress=False)
    assert (summary.n_utterances, summary.n_with_stress, summary.n_copied) == (3, 2, 3)
    assert summary.sample_rates == {16000: 3}
    assert summary.total_seconds == pytest.approx(3.0)
    utterances = read_metadata(out)
    assert [u.id for u in utterances] == ["ru_0001", "ru_0002", "ru_0003"]
    assert utterances[0].text == "Она завела, прядь волнистых вол+ос за ухо."
    # The stress mark reaches the model as the stress symbol, not as "плюс".
    assert STRESS_ID in text_to_sequence(utterances[0].text).ids
    assert sf.info(out / "wavs" / "ru_0002.wav").frames == 16000
    # Idempotent: nothing is written again.
    assert build_festvox_corpus(out, voice_dir=voice, progress=False).n_copied == 0


def test_a_missing_recording_fails_naming_it(tmp_path: Path) -> None:
    voice = _voice(tmp_path / "voice")
    (voice / "wav" / "ru_0002.wav").unlink()
    with pytest.raises(FileNotFoundError, match="ru_0002"):
        build_festvox_corpus(tmp_path / "out", voice_dir=voice, progress=False)
    assert not (tmp_path / "out" / "metadata.csv").exists()


def test_no_voice_says_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install festvox-ru"):
        build_festvox_corpus(tmp_path / "out", voice_dir=tmp_path / "nothing", progress=False)


def test_the_real_package_through_the_cli(tmp_path: Path) -> None:
    """The installed package (scripts/setup.sh installs it): 620 prompts, 132 stressed."""
    from services.cli import app

    assert (FESTVOX_RU_VOICE_DIR / PROMPTS_FILE).is_file(), \
        "festvox-ru is not installed: run scripts/setup.sh (apt-get install festvox-ru)"
    prompts = parse_prompts((FESTVOX_RU_VOICE_DIR / PROMPTS_FILE).read_text(encoding="utf-8"))
    assert len(prompts) == 620
    assert sum("+" in text for _, text in prompts) == 132
    out = tmp_path / "ru-real"
    result = CliRunner().invoke(app, ["corpus", "--source", "festvox-ru", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "620 recorded utterances" in result.output
    assert len(read_metadata(out)) == 620
    assert (out / "LICENSE.festvox-ru").read_text().count("Shmyrev") >= 1
