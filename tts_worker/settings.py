"""Worker settings: read from the environment once at process start, validated, then passed down.

This is the only module of the worker that reads the environment. A bad value raises `SettingsError`
naming the variable, and the worker stops at start rather than failing on its first job.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from producer.config import (
    DEFAULT_BROKER_URL,
    REDIS_SCHEMES,
    ConfigError,
    check_sentinel_master,
    is_redis_url,
)
from tts_contract.schema import MAX_TEXT_CHARS

__all__ = [
    "ATTN_BACKENDS",
    "ENGINES",
    "EXAMPLE_PASSWORD",
    "MAX_RETRY_WAIT_S",
    "MAX_TEXT_TOKENS",
    "OUTPUT_STORAGES",
    "Settings",
    "SettingsError",
]

ENGINES = ("indextts2", "indextts25", "piper", "tone")
OUTPUT_STORAGES = ("s3", "local")
ATTN_BACKENDS = ("", "sage", "flash")
EXAMPLE_PASSWORD = "change-me"
"""What every password in .env.example starts with: a value still holding it was never set, and is
refused (`./bootstrap env` writes a .env with random ones)."""
MAX_RETRY_WAIT_S = 300
"""The longest wait between two retries of a transient error (the task's `retry_backoff_max`)."""
MAX_TEXT_TOKENS = 600
"""IndexTTS-2's `gpt.max_text_tokens` (its config.yaml): the GPT's text positions hold no longer segment."""
_TOKENS_RULE = f"IndexTTS-2's gpt.max_text_tokens is {MAX_TEXT_TOKENS}"
_T = TypeVar("_T")


class SettingsError(ValueError):
    """An environment variable is missing or has a value the worker cannot use."""


@dataclass(frozen=True)
class Settings:
    """Everything the worker is configured with. Build it with `Settings.from_env()`."""

    output_storage: str = "s3"
    s3_bucket_name: str | None = None
    """Required to store audio in S3 (the worker checks it at start); not to fetch models."""
    celery_broker_url: str = DEFAULT_BROKER_URL
    celery_result_backend: str = DEFAULT_BROKER_URL
    redis_sentinel_master: str | None = None
    """The name Redis Sentinel monitors, for `sentinel://` broker and result backend URLs."""
    s3_endpoint_url: str | None = None
    s3_public_endpoint_url: str | None = None
    """Where clients reach the S3 server, for presigned URLs only (SigV4 signs the host); defaults to
    `s3_endpoint_url`."""
    s3_access_key_id: str | None = field(default=None, repr=False)
    s3_secret_access_key: str | None = field(default=None, repr=False)
    s3_region: str = "us-east-1"
    s3_key_prefix: str = ""
    presign_expires_s: int = 3600
    audio_voices_dir: Path = Path("voices")
    output_audio_dir: Path = Path("output_audio")
    output_base_url: str | None = None
    checkpoints_dir: Path = Path("checkpoints")
    hf_token: str | None = field(default=None, repr=False)
    tts_engine: str = "piper"
    use_fp16: bool = False
    use_deepspeed: bool = False
    use_cuda_kernel: bool = False
    use_accel: bool = False
    use_torch_compile: bool = False
    attn_backend: str = ""
    tts_device: str | None = None
    default_voice: str | None = None
    voice_cache_size: int = 8
    max_tokens_per_segment: int = 120
    cleanup_days: int = 2
    max_text_chars: int = MAX_TEXT_CHARS
    max_voice_seconds: float = 60.0
    task_soft_time_limit_s: int = 1500
    task_time_limit_s: int = 1800
    recovery_s: int = 60
    """How soon a job whose worker vanished is delivered to another one (see tts_worker.lease)."""
    max_retries: int = 5
    retry_backoff_s: int = 5
    storage_retry_s: int = 120
    result_retry_s: int = 300
    model_load_timeout_s: int = 900
    ffmpeg_binary: str = "ffmpeg"
    tone_rtf: float = 0.0
    metrics_port: int = 0
    metrics_address: str = "127.0.0.1"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        """Read and validate every variable; raises `SettingsError` naming the first bad one."""
        env = _Reader(environ)
        broker = env.redis_url("CELERY_BROKER_URL", DEFAULT_BROKER_URL)
        endpoint = env.http_url("S3_ENDPOINT_URL")
        settings = cls(
            celery_broker_url=broker,
            celery_result_backend=env.redis_url("CELERY_RESULT_BACKEND", broker),
            redis_sentinel_master=env.optional("REDIS_SENTINEL_MASTER"),
            s3_endpoint_url=endpoint,
            s3_public_endpoint_url=env.http_url("S3_PUBLIC_ENDPOINT_URL") or endpoint,
            s3_access_key_id=env.optional("S3_ACCESS_KEY_ID"),
            s3_secret_access_key=env.optional("S3_SECRET_ACCESS_KEY"),
            s3_bucket_name=env.optional("S3_BUCKET_NAME"),
            s3_region=env.text("S3_REGION", "us-east-1"),
            s3_key_prefix=env.text("S3_KEY_PREFIX", ""),
            presign_expires_s=env.integer("PRESIGN_EXPIRES_S", 3600, low=60, high=604_800),
            audio_voices_dir=Path(env.text("AUDIO_VOICES_DIR", "voices")),
            output_storage=env.choice("OUTPUT_STORAGE", "s3", OUTPUT_STORAGES),
            output_audio_dir=Path(env.text("OUTPUT_AUDIO_DIR", "output_audio")),
            output_base_url=env.http_url("OUTPUT_BASE_URL"),
            checkpoints_dir=Path(env.text("CHECKPOINTS_DIR", "checkpoints")),
            hf_token=env.optional("HF_TOKEN"),
            tts_engine=env.choice("TTS_ENGINE", "piper", ENGINES),
            use_fp16=env.boolean("USE_FP16", False),
            use_deepspeed=env.boolean("USE_DEEPSPEED", False),
            use_cuda_kernel=env.boolean("USE_CUDA_KERNEL", False),
            use_accel=env.boolean("USE_ACCEL", False),
            use_torch_compile=env.boolean("USE_TORCH_COMPILE", False),
            attn_backend=env.choice("ATTN_BACKEND", "", ATTN_BACKENDS),
            tts_device=env.optional("TTS_DEVICE"),
            default_voice=env.optional("DEFAULT_VOICE"),
            voice_cache_size=env.integer("VOICE_CACHE_SIZE", 8, low=0, high=1000),
            max_tokens_per_segment=env.integer(
                "MAX_TOKENS_PER_SEGMENT", 120, low=20, high=MAX_TEXT_TOKENS, why=_TOKENS_RULE
            ),
            cleanup_days=env.integer("CLEANUP_DAYS", 2, low=0, high=3650),
            max_text_chars=env.integer("MAX_TEXT_CHARS", MAX_TEXT_CHARS, low=1, high=1_000_000),
            max_voice_seconds=env.number("MAX_VOICE_SECONDS", 60.0, low=1.0, high=600.0),
            task_soft_time_limit_s=env.integer("TASK_SOFT_TIME_LIMIT", 1500, low=1, high=86_400),
            task_time_limit_s=env.integer("TASK_TIME_LIMIT", 1800, low=1, high=86_400),
            recovery_s=env.integer("RECOVERY_S", 60, low=6, high=3600),
            max_retries=env.integer("TASK_MAX_RETRIES", 5, low=0, high=100),
            retry_backoff_s=env.integer(
                "RETRY_BACKOFF_S", 5, low=1, high=MAX_RETRY_WAIT_S, why="the longest wait between retries"
            ),
            storage_retry_s=env.integer("STORAGE_RETRY_S", 120, low=0, high=3600),
            result_retry_s=env.integer("RESULT_RETRY_S", 300, low=0, high=3600),
            model_load_timeout_s=env.integer("MODEL_LOAD_TIMEOUT", 900, low=10, high=7200),
            ffmpeg_binary=env.text("FFMPEG_BINARY", "ffmpeg"),
            tone_rtf=env.number("TONE_RTF", 0.0, low=0.0, high=100.0),
            metrics_port=env.integer("METRICS_PORT", 0, low=0, high=65535),
            metrics_address=env.text("METRICS_ADDRESS", "127.0.0.1"),
        )
        if env.optional("VISIBILITY_TIMEOUT"):
            raise SettingsError(
                "VISIBILITY_TIMEOUT is no longer read: a running job holds a lease that its worker renews, "
                "so no job length needs covering; set RECOVERY_S, how soon a lost worker's job runs elsewhere"
            )
        settings.check_time_limits()
        settings.check_sentinel()
        settings.check_passwords()
        return settings

    def check_passwords(self) -> None:
        """Refuse the example's passwords: a deployment that still has them is open to anyone who read it."""
        secrets = {
            "S3_SECRET_ACCESS_KEY": self.s3_secret_access_key or "",
            "CELERY_BROKER_URL": urlsplit(self.celery_broker_url).password or "",
            "CELERY_RESULT_BACKEND": urlsplit(self.celery_result_backend).password or "",
        }
        for name, secret in secrets.items():
            if EXAMPLE_PASSWORD in secret:
                raise SettingsError(
                    f"{name} still holds the example's {EXAMPLE_PASSWORD} password: set your own "
                    "(./bootstrap env writes a .env with random ones)"
                )

    def check_sentinel(self) -> None:
        """A `sentinel://` URL names sentinels, not Redis: the primary's name must be given too."""
        try:
            check_sentinel_master(
                self.celery_broker_url, self.celery_result_backend, self.redis_sentinel_master
            )
        except ConfigError as exc:
            raise SettingsError(str(exc)) from None

    def check_time_limits(self) -> None:
        """The soft limit (the job fails cleanly) must come before the hard one (the process is killed)."""
        if self.task_soft_time_limit_s >= self.task_time_limit_s:
            raise SettingsError(
                f"TASK_SOFT_TIME_LIMIT ({self.task_soft_time_limit_s}) must be below "
                f"TASK_TIME_LIMIT ({self.task_time_limit_s})"
            )


class _Reader:
    """Typed access to environment variables, each error naming the variable and the rule."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ

    def optional(self, name: str) -> str | None:
        return self.environ.get(name) or None

    def http_url(self, name: str) -> str | None:
        value = self.optional(name)
        if value is None:
            return None
        if not value.startswith(("http://", "https://")) or not urlsplit(value).netloc:
            raise SettingsError(f"{name} must be a URL starting with http:// or https:// (got {value!r})")
        return value

    def redis_url(self, name: str, default: str) -> str:
        value = self.text(name, default)
        if not is_redis_url(value):
            # Only the scheme is shown: the rest may hold a password.
            scheme = value.split("://", 1)[0] if "://" in value else ""
            raise SettingsError(
                f"{name} must be a Redis URL starting with "
                f"{', '.join(s + '://' for s in REDIS_SCHEMES)} (got scheme {scheme or 'none'!r})"
            )
        return value

    def text(self, name: str, default: str) -> str:
        return self.environ.get(name) or default

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.text(name, default)
        if value not in choices:
            raise SettingsError(f"{name} must be one of {', '.join(map(repr, choices))} (got {value!r})")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.text(name, str(default)).strip().lower()
        if value in ("1", "true", "yes", "on"):
            return True
        if value in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{name} must be true or false (got {value!r})")

    def integer(self, name: str, default: int, *, low: int, high: int, why: str = "") -> int:
        return self._bounded(name, default, int, "an integer", low, high, why)

    def number(self, name: str, default: float, *, low: float, high: float) -> float:
        return self._bounded(name, default, float, "a number", low, high)

    def _bounded(
        self, name: str, default: _T, parse: Callable[[str], _T], kind: str, low: _T, high: _T, why: str = ""
    ) -> _T:
        raw = self.environ.get(name)
        if not raw:
            return default
        try:
            value = parse(raw)
        except ValueError:
            raise SettingsError(f"{name} must be {kind} (got {raw!r})") from None
        if not low <= value <= high:  # type: ignore[operator]
            because = f": {why}" if why else ""
            raise SettingsError(f"{name} must be between {low} and {high}{because} (got {raw!r})")
        return value
