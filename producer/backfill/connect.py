"""What a run talks to: the Celery app that publishes, the reader of results, and a Redis client of
the broker's database (claims and leases); each one reached once before anything is sent, so that
an unreachable broker is one clear message and exit status 2, not a run that stops at its first step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery
from kombu.utils.url import maybe_sanitize_url

from producer.app import create_app
from producer.backfill.results import ResultReader
from producer.config import ProducerConfig, is_redis_url
from producer.redis_client import redis_client

__all__ = ["CONNECT_TIMEOUT_S", "Connections", "Unreachable"]

CONNECT_TIMEOUT_S = 10.0
"""How long the first connection to Redis may take (a host that drops packets, not refuses them)."""


class Unreachable(ValueError):
    """The broker or the result backend cannot be used; the message says which, and where."""


@dataclass
class Connections:
    """The app, the result reader and the broker client of one run; `close` them when done."""

    app: Celery
    results: ResultReader
    broker: redis.Redis

    @classmethod
    def open(cls, config: ProducerConfig) -> Connections:
        """Connect and check; raises `Unreachable` (a `ValueError`) with nothing sent."""
        if not is_redis_url(config.broker_url):
            raise Unreachable(f"tts-backfill needs a Redis broker (CELERY_BROKER_URL={config.broker_url!r})")
        app = create_app(config, name="tts-backfill")
        broker = redis_client(
            config.broker_url,
            sentinel_master=config.sentinel_master,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
        )
        try:
            links = cls(app, ResultReader(app), broker)
            _reach("broker", config.broker_url, broker.ping)
            _reach("result backend", config.result_backend, links.results.ping)
        except BaseException:
            app.close()
            broker.close()
            raise
        return links

    def close(self) -> None:
        """Close the app's connection pools and the broker client."""
        self.app.close()
        self.broker.close()


def _reach(what: str, url: str, probe: Callable[[], Any]) -> None:
    try:
        probe()
    except (redis.RedisError, OSError) as exc:
        shown = maybe_sanitize_url(url)
        raise Unreachable(f"cannot reach the {what} at {shown} ({exc}); nothing sent") from None
