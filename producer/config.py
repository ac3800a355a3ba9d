"""The producer's settings, read from the environment (the only place the producer reads it)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from producer.redis_client import is_sentinel_url
from tts_contract.schema import MAX_TEXT_CHARS

__all__ = ["REDIS_SCHEMES", "ConfigError", "ProducerConfig", "check_sentinel_master", "is_redis_url"]

DEFAULT_BROKER_URL = "redis://localhost:6379/0"
DEFAULT_CONNECT_TIMEOUT_S = 10.0
REDIS_SCHEMES = ("redis", "rediss", "sentinel")
"""The broker and result backend URLs every part accepts: Redis over TCP or TLS, or through Redis
Sentinel (with REDIS_SENTINEL_MASTER; see producer.redis_client). Celery takes others,
but the worker's configuration (visibility timeouts, priorities) is Redis's, and the metrics, the
health check and tts-backfill talk to Redis themselves through redis-py."""


def is_redis_url(url: str) -> bool:
    """Whether `url` is a broker or result backend URL of a scheme in REDIS_SCHEMES."""
    scheme, separator, _ = url.partition("://")
    return bool(separator) and scheme in REDIS_SCHEMES


class ConfigError(ValueError):
    """An environment variable has a value the producer cannot use; the message names it."""


def check_sentinel_master(broker_url: str, result_backend: str, sentinel_master: str | None) -> None:
    """A `sentinel://` URL names sentinels, not Redis: raise `ConfigError` unless the primary's name
    is given too (the producer's check and the worker's)."""
    if not sentinel_master and any(is_sentinel_url(url) for url in (broker_url, result_backend)):
        raise ConfigError(
            "REDIS_SENTINEL_MASTER must name the Redis primary the sentinels monitor "
            "when CELERY_BROKER_URL or CELERY_RESULT_BACKEND is a sentinel:// URL"
        )


@dataclass(frozen=True)
class ProducerConfig:
    """Where the producer sends jobs and reads results, and the text limit it enforces."""

    broker_url: str = DEFAULT_BROKER_URL
    result_backend: str = DEFAULT_BROKER_URL
    max_text_chars: int = MAX_TEXT_CHARS
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    """How long enqueueing may try to reach Redis before it raises `QueueUnavailable`."""
    sentinel_master: str | None = None
    """The name Redis Sentinel monitors, for `sentinel://` URLs."""

    def __post_init__(self) -> None:
        check_sentinel_master(self.broker_url, self.result_backend, self.sentinel_master)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> ProducerConfig:
        """Build from CELERY_BROKER_URL, CELERY_RESULT_BACKEND (defaults to the broker), MAX_TEXT_CHARS
        PRODUCER_CONNECT_TIMEOUT_S and REDIS_SENTINEL_MASTER."""
        broker = environ.get("CELERY_BROKER_URL") or DEFAULT_BROKER_URL
        raw_limit = environ.get("MAX_TEXT_CHARS") or str(MAX_TEXT_CHARS)
        if not raw_limit.isdigit() or int(raw_limit) < 1:
            raise ConfigError(f"MAX_TEXT_CHARS must be a positive integer (got {raw_limit!r})")
        raw_timeout = environ.get("PRODUCER_CONNECT_TIMEOUT_S") or str(DEFAULT_CONNECT_TIMEOUT_S)
        try:
            timeout = float(raw_timeout)
        except ValueError:
            timeout = -1.0
        if not 1 <= timeout <= 300:
            raise ConfigError(
                f"PRODUCER_CONNECT_TIMEOUT_S must be a number of seconds from 1 to 300 (got {raw_timeout!r})"
            )
        return cls(
            broker_url=broker,
            result_backend=environ.get("CELERY_RESULT_BACKEND") or broker,
            max_text_chars=int(raw_limit),
            connect_timeout_s=timeout,
            sentinel_master=environ.get("REDIS_SENTINEL_MASTER") or None,
        )
