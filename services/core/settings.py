"""Process-wide settings, read from the environment (prefix ``SMART_TUNER_``) or ``.env``.

Secrets and deployment facts live here and nowhere else; a bad value fails at start-up
with the offending field named, instead of surfacing as a confusing error mid-run.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "SMART_TUNER_"


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


def format_validation_error(error: ValidationError, prefix: str = ENV_PREFIX) -> str:
    """Render a pydantic error as one line per field, named as the user would set it."""
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "<root>"
        lines.append(f"{prefix}{field.upper()}: {item['msg']} (got {item.get('input')!r})")
    return "invalid settings:\n  " + "\n  ".join(lines)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Load settings once per process; raise ConfigError naming each bad field."""
    try:
        return Settings()
    except ValidationError as error:
        raise ConfigError(format_validation_error(error)) from error
