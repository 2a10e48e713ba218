"""The notifier's settings, from the environment (prefix ``SMART_TUNER_NOTIFIER_``) or ``.env``.

The bot token and every chat id come from here and nowhere else: the old monitor kept its
token in a committed config file. A missing or malformed token stops the notifier at
start-up with the variable named, before it talks to Telegram.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from services.core.settings import ConfigError, format_validation_error

ENV_PREFIX = "SMART_TUNER_NOTIFIER_"
# What BotFather issues: the bot's numeric id, a colon, a 35-character secret. The length of
# the secret is not documented as fixed, so accept any plausible one.
TOKEN_PATTERN = re.compile(r"^\d{5,20}:[A-Za-z0-9_-]{30,64}$")
TELEGRAM_API_URL = "https://api.telegram.org"
WEBHOOK_PATH = "/alertmanager"  # where the notifier receives Alertmanager's notifications
DEFAULT_PORT = 8001
MAX_SAMPLE_CHARS = 300  # default cap on /sample text: synthesis is CPU work on a shared box
WEBHOOK_MAX_BODY_BYTES = 1024 * 1024  # Alertmanager groups of hundreds of alerts fit in it
MIN_WEBHOOK_BODY_BYTES = 1024

ChatIds = Annotated[tuple[int, ...], NoDecode]


def _id_list(value: Any) -> Any:
    """``"123, -100456"`` -> ``(123, -100456)``; sequences pass through for pydantic to check."""
    if isinstance(value, str):
        parts = [part.strip() for part in value.replace(";", ",").split(",")]
        return tuple(part for part in parts if part)
    return value


class NotifierSettings(BaseSettings):
    """Who the bot talks to, what it reports and how often."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=".env", env_file_encoding="utf-8", extra="ignore",
        # `KEY=` (as in .env.example) means unset, not an empty value
        env_ignore_empty=True)

    telegram_token: SecretStr = Field(description="the bot token from @BotFather")
    chat_ids: ChatIds = Field(
        min_length=1, description="allow-list: the only chats the bot reports to and obeys "
                                  "(comma-separated ids; groups are negative)")
    admin_ids: ChatIds = Field(
        default=(), description="user ids that may send mutating commands (/pause, /lr, "
                                "...); empty: every member of an allowed chat may")
    language: Literal["ru", "en"] = "ru"
    telegram_api_url: str = Field(
        default=TELEGRAM_API_URL, pattern=r"^https?://",
        description="Bot API server; a local one (telegram-bot-api) or a test stand-in")
    report_every_steps: int = Field(default=500, ge=1,
                                    description="progress report every N training steps")
    report_every_s: float = Field(default=1800.0, gt=0,
                                  description="... or after this many seconds, if sooner")
    ack_wait_s: float = Field(default=20.0, gt=0, le=30.0,
                              description="how long a bot command waits for the trainer's ack")
    confirm_ttl_s: float = Field(default=60.0, gt=0,
                                 description="how long a /stop confirmation button stays valid")
    runs_dir: Path = Field(default=Path("runs"),
                           description="where runs keep checkpoints (<runs_dir>/<run id>)")
    sample_text_en: str = Field(default="The quick brown fox jumps over the lazy dog.",
                                min_length=1, max_length=500)
    sample_text_ru: str = Field(default="Съешь же ещё этих мягких французских булок.",
                                min_length=1, max_length=500)
    sample_max_chars: int = Field(
        default=MAX_SAMPLE_CHARS, ge=1, le=4096,
        description="longest /sample text accepted (longer is refused with a reply)")
    refusal_interval_s: float = Field(
        default=60.0, gt=0,
        description="at most one refusal reply per chat in this many seconds (the rest are "
                    "logged and counted, not answered)")
    refusals_per_minute: int = Field(
        default=3, ge=0, le=1000,
        description="at most this many refusal replies a minute, all chats together")
    host: str = Field(default="127.0.0.1", description="Alertmanager webhook and /metrics")
    port: int = Field(default=DEFAULT_PORT, ge=0, le=65535)
    webhook_token: SecretStr | None = Field(
        default=None, min_length=16,
        description="bearer token Alertmanager must send; unset: the webhook is open "
                    "(bind it to a private network)")
    webhook_max_body_bytes: int = Field(
        default=WEBHOOK_MAX_BODY_BYTES, ge=MIN_WEBHOOK_BODY_BYTES, le=64 * 1024 * 1024,
        description="largest Alertmanager body read; a larger one is answered 413 unread")

    @field_validator("telegram_token")
    @classmethod
    def _token_shape(cls, value: SecretStr) -> SecretStr:
        # The value is never echoed: the error names the variable and the expected shape.
        if not TOKEN_PATTERN.fullmatch(value.get_secret_value()):
            raise ValueError("not a Telegram bot token (expected <bot id>:<secret>, as "
                             "@BotFather issues it)")
        return value

    @field_validator("chat_ids", "admin_ids", mode="before")
    @classmethod
    def _split_ids(cls, value: Any) -> Any:
        return _id_list(value)


def _is_secret(annotation: Any) -> bool:
    return annotation is SecretStr or SecretStr in get_args(annotation)


# Every field typed SecretStr (the bot token, the webhook token): never echoed.
SECRET_FIELDS: tuple[str, ...] = tuple(
    name for name, info in NotifierSettings.model_fields.items() if _is_secret(info.annotation))


def load_notifier_settings(**overrides: Any) -> NotifierSettings:
    """Settings from the environment (``overrides`` win); ConfigError names each bad field.

    No secret's value (a ``SecretStr`` field: the bot token, the webhook token) appears in
    the error, only its variable's name.
    """
    try:
        return NotifierSettings(**overrides)
    except ValidationError as error:
        message = format_validation_error(error, ENV_PREFIX)
        for item in error.errors():
            if item["loc"] and item["loc"][0] in SECRET_FIELDS:
                message = message.replace(repr(item.get("input")), "<hidden>")
        for name in SECRET_FIELDS:
            secret = overrides.get(name)
            if isinstance(secret, str) and secret:
                message = message.replace(secret, "<hidden>")
        raise ConfigError(message) from error
