"""Process-wide settings, read from the environment (prefix ``SMART_TUNER_``) or ``.env``.

Secrets and deployment facts live here and nowhere else; a bad value fails at start-up
with the offending field named, instead of surfacing as a confusing error mid-run.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.core.redis_url import redact

ENV_PREFIX = "SMART_TUNER_"
# Defaults of the diagnostics queue contract (services.core.tasks re-exports them).
DIAGNOSTICS_QUEUE = "diagnostics"
# How long an unacked task waits before the broker hands it to another worker: it must
# exceed the task's hard time limit (services.core.tasks), or healthy tasks run twice.
VISIBILITY_TIMEOUT_S = 600.0
DEFAULT_GRAFANA_URL = "http://127.0.0.1:3000"


class ConfigError(RuntimeError):
    """A setting is missing or invalid; the message names every offending field."""


class Settings(BaseSettings):
    """Settings shared by all services."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=".env", env_file_encoding="utf-8", extra="ignore",
        env_ignore_empty=True,  # `KEY=` (as in .env.example) means unset, not ""
    )

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    device: str = Field(
        default="auto", description="torch device for training: auto, cpu, cuda, cuda:N"
    )
    num_threads: int | None = Field(
        default=None, ge=1, description="torch intra-op threads; default: torch's own choice"
    )
    redis_url: str | None = Field(
        default=None, pattern=r"^(redis|rediss|unix)://",
        description="event bus; unset: the trainer runs without telemetry",
    )
    api_token: SecretStr | None = Field(
        default=None, min_length=16,
        description="bearer token for mutating control-API calls; unset: they are refused",
    )
    tuner_config: str = Field(
        default="config/tuner.toml", description="policy thresholds, one file"
    )
    # Prometheus endpoints of the services (unset: not served).
    trainer_metrics_port: int | None = Field(default=None, ge=1, le=65_535)
    tuner_metrics_port: int | None = Field(default=None, ge=1, le=65_535)
    diagnostics_metrics_port: int | None = Field(default=None, ge=1, le=65_535)
    # The diagnostics task queue: both the sender and the worker read these.
    diagnostics_queue: str = Field(
        default=DIAGNOSTICS_QUEUE, pattern=r"^[A-Za-z0-9_.:-]{1,128}$",
        description="queue of the diagnostics tasks (a test worker gets its own)")
    diagnostics_visibility_timeout_s: float = Field(
        default=VISIBILITY_TIMEOUT_S, gt=0,
        description="seconds before a killed worker's unacked tasks go to another worker")
    # `smart-tuner grafana push`.
    grafana_url: str = Field(default=DEFAULT_GRAFANA_URL, pattern=r"^https?://")
    grafana_user: str | None = Field(default=None, description="basic-auth user")
    grafana_password: SecretStr | None = None
    grafana_token: SecretStr | None = Field(default=None, description="service account token")
    # Control API limits (services/tuner/limits.py): what one client can make it spend.
    api_max_body_bytes: int = Field(
        default=64 * 1024, ge=1024, description="largest request body; 413 beyond it")
    api_renders_per_client: int = Field(
        default=6, ge=1, description="alignment pictures one client may have drawn per window")
    api_renders_total: int = Field(
        default=30, ge=1, description="alignment pictures drawn per window, all clients")
    api_render_window_s: float = Field(default=60.0, gt=0, description="the rate window")
    api_png_cache_entries: int = Field(
        default=64, ge=1, description="drawn pictures kept, one per (run, snapshot)")
    # Retention (services/core/retention.py): a run ended this long ago leaves Redis.
    retention_days: float = Field(
        default=14.0, gt=0, description="days after a run's last entry, once it finished or "
                                        "stopped, before its streams and keys are deleted")


# A field whose name has one of these is a secret: its value is never echoed, however
# wrong (a too-short token is still most of a token).
SECRET_FIELD_WORDS = ("token", "password", "secret", "key")
HIDDEN = "<hidden>"
SCALARS = (str, int, float, bool, type(None))


def shown_input(field: str, value: Any) -> str:
    """What a config error may say a bad value was: nothing of a secret field (the
    variable's name says which), a URL with its password masked, a harmless value as is.
    A dict or list (a whole-model error) is not echoed: it holds every setting."""
    if any(word in field.lower() for word in SECRET_FIELD_WORDS) or \
            not isinstance(value, SCALARS):
        return HIDDEN
    return redact(repr(value))


def format_validation_error(error: ValidationError, prefix: str = ENV_PREFIX) -> str:
    """Render a pydantic error as one line per field, named as the user would set it; the
    bad value is echoed only where that cannot leak a secret (``shown_input``)."""
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "<root>"
        got = shown_input(field, item.get("input"))
        lines.append(f"{prefix}{field.upper()}: {redact(item['msg'])} (got {got})")
    return "invalid settings:\n  " + "\n  ".join(lines)


def load_settings() -> Settings:
    """Read the settings now (environment and ``.env``); raise ConfigError naming each bad
    field. For values read once at a service's start, where a test may set them first."""
    try:
        return Settings()
    except ValidationError as error:
        raise ConfigError(format_validation_error(error)) from error


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The settings, loaded once per process; raise ConfigError naming each bad field."""
    return load_settings()
