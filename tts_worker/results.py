"""Results that keep no request fields.

Celery's `result_extended` stores, with each result, the task's name, worker, retries and queue (what
`AsyncResult.retries` and friends read) and also its args and kwargs: the whole text of every job
would stay in Redis, and in its AOF, for as long as the result (a week). The worker's result
backends here store the extended fields without args and kwargs. Flower shows jobs from task events,
which carry the shortened `kwargsrepr`; tts-backfill tells whose request a result answers by the
digest the task records beside it.

They are the result backends of the schemes the worker accepts, through Celery's loader overrides,
so CELERY_RESULT_BACKEND keeps its plain `redis://`, `rediss://` or `sentinel://` URL.
"""

from __future__ import annotations

from typing import Any

from celery.backends.redis import RedisBackend, SentinelBackend

__all__ = ["BACKEND_OVERRIDES", "RedisResults", "SentinelResults"]


class _WithoutRequestFields:
    def _get_result_meta(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        meta: dict[str, Any] = super()._get_result_meta(*args, **kwargs)  # type: ignore[misc]
        meta.pop("args", None)
        meta.pop("kwargs", None)
        return meta


class RedisResults(_WithoutRequestFields, RedisBackend):
    """Celery's Redis result backend, without the request's args and kwargs in results."""


class SentinelResults(_WithoutRequestFields, SentinelBackend):
    """Celery's Redis Sentinel result backend, without the request's args and kwargs in results."""


BACKEND_OVERRIDES = {
    "redis": f"{__name__}:RedisResults",
    "rediss": f"{__name__}:RedisResults",
    "sentinel": f"{__name__}:SentinelResults",
}
"""Celery's backend aliases, by URL scheme, that the worker's loader takes instead of its own."""
