"""One way to state a run: preset < config file < flags, errors that name the field, and
`smart-tuner up` passing every training option through to the trainer it supervises."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from services.cli import app
from services.launcher import cli as launcher_cli
from services.launcher.up import trainer_command
from services.trainer.cli import train
from services.trainer.config import (
    FLAG_FIELDS,
    TrainConfigError,
    flag_overrides,
    load_train_config,
    preset,
    record_config_file,
)

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "config" / "recipes" / "ru-real.toml"


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------ load_train_config


def test_preset_then_file_then_flags(tmp_path: Path) -> None:
    config = _write(tmp_path / "run.toml", """
preset = "tiny"
[optim]
learning_rate = 5e-4
guided_attention_weight = 2.0
[run]
batch_size = 8
""")
    cfg = load_train_config(config, None, {"optim.learning_rate": 2e-4})
    tiny = preset("tiny")
    assert cfg.optim.learning_rate == 2e-4  # the flag wins over the file
    assert cfg.optim.guided_attention_weight == 2.0  # the file wins over the preset
    assert cfg.run.batch_size == 8
    # a section overrides only the fields it names; the rest is the preset's
    assert cfg.optim.warmup_steps == tiny.optim.warmup_steps
    assert cfg.model == tiny.model and cfg.audio == tiny.audio
    assert cfg.preset == "tiny"


def test_explicit_preset_flag_wins_over_the_files(tmp_path: Path) -> None:
    config = _write(tmp_path / "run.toml", 'preset = "base"\n')
    assert load_train_config(config).model == preset("base").model
    assert load_train_config(config, "tiny").model == preset("tiny").model
    assert load_train_config(None).preset == "tiny"  # neither: the default


def test_yaml_is_read_like_toml(tmp_path: Path) -> None:
    config = _write(tmp_path / "run.yaml",
                    "preset: tiny\noptim:\n  guided_attention_weight: 3.0\n  amp: true\n")
    cfg = load_train_config(config)
    assert cfg.optim.guided_attention_weight == 3.0 and cfg.optim.amp is True
    assert load_train_config(_write(tmp_path / "empty.yml", "")) == preset("tiny")


def test_an_unknown_key_is_named_with_its_file_and_path(tmp_path: Path) -> None:
    config = _write(tmp_path / "runs.toml", "[optim]\nlearning_rat = 1e-3\n")
    with pytest.raises(TrainConfigError) as caught:
        load_train_config(config)
    assert str(caught.value) == f"{config}: optim.learning_rat: extra inputs are not permitted"
    section = _write(tmp_path / "section.toml", "[optimizer]\nlearning_rate = 1e-3\n")
    with pytest.raises(TrainConfigError, match=r"section\.toml: optimizer: extra inputs"):
        load_train_config(section)


def test_a_wrong_type_or_value_is_named(tmp_path: Path) -> None:
    config = _write(tmp_path / "runs.toml", '[run]\nbatch_size = "many"\n')
    with pytest.raises(TrainConfigError, match=r"runs.toml: run\.batch_size: input should be"):
        load_train_config(config)
    # a cross-field check of the model names its section
    config = _write(tmp_path / "lr.toml", "[optim]\nmin_learning_rate = 1e-2\n")
    with pytest.raises(TrainConfigError,
                       match=r"lr\.toml: optim: min_learning_rate must not exceed"):
        load_train_config(config)
    # a bad flag is blamed on the command line, not the file
    with pytest.raises(TrainConfigError, match=r"command line: run\.eval_every: input should"):
        load_train_config(None, None, {"run.eval_every": 0})


def test_unreadable_files_and_unknown_presets_are_named(tmp_path: Path) -> None:
    with pytest.raises(TrainConfigError, match=r"bad\.toml: not valid TOML"):
        load_train_config(_write(tmp_path / "bad.toml", "[optim\n"))
    with pytest.raises(TrainConfigError, match=r"run\.json: unknown config format"):
        load_train_config(_write(tmp_path / "run.json", "{}"))
    with pytest.raises(TrainConfigError, match=r"missing\.toml: config file not found"):
        load_train_config(tmp_path / "missing.toml")
    with pytest.raises(TrainConfigError, match=r"p\.toml: preset: unknown preset 'huge'"):
        load_train_config(_write(tmp_path / "p.toml", 'preset = "huge"\n'))
    with pytest.raises(TrainConfigError, match="command line: preset: unknown preset"):
        load_train_config(None, "huge")


def test_the_recipe_validates_and_names_only_real_fields() -> None:
    cfg = load_train_config(RECIPE)
    assert cfg.preset == "tiny"


def test_flag_overrides_keep_only_given_flags() -> None:
    assert flag_overrides({"lr": 1e-3, "seed": None, "amp": False, "max_steps": 5}) == {
        "optim.learning_rate": 1e-3, "optim.amp": False}
    tiny = preset("tiny").model_dump()
    for path in FLAG_FIELDS.values():  # every flag names a real field
        section, field = path.split(".")
        assert field in tiny[section], path


def test_the_config_file_is_recorded_in_the_run_folder(tmp_path: Path) -> None:
    copy = record_config_file(RECIPE, tmp_path / "run")
    assert copy == tmp_path / "run" / "train-config.toml"
    assert copy.read_text() == RECIPE.read_text()


def test_train_refuses_a_bad_config_naming_the_field(tmp_path: Path) -> None:
    config = _write(tmp_path / "runs.toml", "[optim]\nlearning_rat = 1e-3\n")
    result = CliRunner().invoke(app, ["train", "--data", str(tmp_path), "--out",
                                      str(tmp_path / "run"), "--config", str(config)])
    assert result.exit_code == 2
    assert "optim.learning_rat" in " ".join(result.output.split())
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ smart-tuner up


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[dict[str, Any]]:
    """What `up` would start the services with; nothing is started."""
    calls: list[dict[str, Any]] = []

    def fake_up(data: Path, out: Path, run_id: str, **kwargs: Any) -> int:
        calls.append({"data": data, "out": out, "run_id": run_id, **kwargs})
        return 0

    monkeypatch.chdir(tmp_path)  # no .env of the project
    monkeypatch.delenv("SMART_TUNER_NOTIFIER_TELEGRAM_TOKEN", raising=False)
    monkeypatch.setattr("services.launcher.up.up", fake_up)
    return calls


def test_up_passes_every_training_option_to_the_trainer(
        started: list[dict[str, Any]], tmp_path: Path) -> None:
    checkpoint = _write(tmp_path / "old.pt", "")
    result = CliRunner().invoke(app, [
        "up", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--config",
        str(RECIPE), "--preset", "tiny", "--lr", "0.0005", "--batch-size", "8",
        "--eval-every", "10", "--checkpoint-every", "50", "--ga-weight", "2.5",
        "--ga-sigma", "0.3", "--gate-pos-weight", "4", "--warmup-steps", "100",
        "--max-minutes", "30", "--seed", "7", "--no-amp", "--warm-start", str(checkpoint),
        "--ignore-layers", "embedding,decoder.projection", "--until-indicators",
        "--max-steps", "900", "--val-size", "6", "--inject-fault", "nan_loss:start=5"])
    assert result.exit_code == 0, result.output
    [call] = started
    command = trainer_command("python", call["data"], call["out"], call["run_id"],
                              call["train_args"])
    assert command[:13] == ["python", "-m", "services.cli", "train", "--data", str(tmp_path),
                            "--out", str(tmp_path / "run"), "--run-id", "run", "--resume",
                            "--resume-from", "last_good"]
    passed = " ".join(command[13:])
    for expected in (f"--config {RECIPE}", "--preset tiny", "--lr 0.0005", "--batch-size 8",
                     "--eval-every 10", "--checkpoint-every 50", "--ga-weight 2.5",
                     "--ga-sigma 0.3", "--gate-pos-weight 4.0", "--warmup-steps 100",
                     "--max-minutes 30.0", "--seed 7", "--no-amp",
                     f"--warm-start {checkpoint}",
                     "--ignore-layers embedding,decoder.projection", "--until-indicators",
                     "--max-steps 900", "--val-size 6", "--inject-fault nan_loss:start=5"):
        assert expected in passed, expected
    # nothing given, nothing passed: the trainer resolves its own defaults
    assert launcher_cli.train_args({}) == []


def test_up_fails_on_an_unknown_or_bad_option_before_anything_starts(
        started: list[dict[str, Any]], tmp_path: Path) -> None:
    runner = CliRunner()
    unknown = runner.invoke(app, ["up", "--out", str(tmp_path / "run"), "--lr-rate", "1"])
    assert unknown.exit_code == 2 and "No such option" in unknown.output
    ill_typed = runner.invoke(app, ["up", "--out", str(tmp_path / "run"), "--lr", "fast"])
    assert ill_typed.exit_code == 2
    config = _write(tmp_path / "runs.toml", "[optim]\nlearning_rat = 1e-3\n")
    bad_config = runner.invoke(app, ["up", "--out", str(tmp_path / "run"), "--config",
                                     str(config)])
    assert bad_config.exit_code == 2
    assert "optim.learning_rat" in " ".join(bad_config.output.split())
    bad_value = runner.invoke(app, ["up", "--out", str(tmp_path / "run"), "--ga-sigma", "0"])
    assert bad_value.exit_code == 2
    assert "optim.guided_attention_sigma" in " ".join(bad_value.output.split())
    assert started == []


def test_every_train_option_is_passed_through_or_owned_by_up() -> None:
    options = set(inspect.signature(train).parameters)
    passed, owned = set(launcher_cli.TRAIN_OPTIONS), set(launcher_cli.UP_OWNED_TRAIN_OPTIONS)
    assert passed | owned == options and not passed & owned


def test_the_passed_arguments_parse_back_to_the_same_values(tmp_path: Path) -> None:
    values = {"config": RECIPE, "preset": "base", "lr": 5e-4, "amp": True, "seed": 3,
              "until_indicators": True, "ignore_layers": "embedding", "max_minutes": 1.5,
              "data_check": False}
    command = typer.main.get_command(app).commands["train"]  # type: ignore[attr-defined]
    ctx = command.make_context("train", ["--data", "d", "--out", "o",
                                         *launcher_cli.train_args(values)])
    assert {name: ctx.params[name] for name in values} == values


def test_up_runs_the_tuner_unless_told_not_to(started: list[dict[str, Any]],
                                              tmp_path: Path) -> None:
    """`--no-tuner` (the rescue benchmark's control arm) reaches the launcher; the tuner is
    on by default."""
    runner = CliRunner()
    for flags, expected in (([], True), (["--no-tuner"], False), (["--tuner"], True)):
        result = runner.invoke(app, ["up", "--out", str(tmp_path / "run"), *flags])
        assert result.exit_code == 0, result.output
        assert started[-1]["tuner"] is expected
