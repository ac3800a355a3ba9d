"""redis-py clients for the broker and result backend URLs, Redis Sentinel's included.

Celery and kombu reach Redis themselves; the parts that talk to Redis directly (the health check,
the worker's metrics, tts-backfill's claims) make their client here, so that a `sentinel://` URL
means the same to them: the current primary of REDIS_SENTINEL_MASTER, found through the sentinels.

A Sentinel URL lists the sentinels, kombu's way: `sentinel://[:password@]host:port/db` joined by `;`
(`sentinel://:pw@s1:26379/0;sentinel://:pw@s2:26379/0`). The password and database are the primary's.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.sentinel import Sentinel

__all__ = ["SENTINEL_SCHEME", "is_sentinel_url", "redis_client"]

SENTINEL_SCHEME = "sentinel"


def is_sentinel_url(url: str) -> bool:
    """Whether `url` names Redis through its sentinels."""
    return url.startswith(f"{SENTINEL_SCHEME}://")


def redis_client(url: str, *, sentinel_master: str | None = None, **options: Any) -> redis.Redis:
    """A client of the Redis that `url` names; `options` go to redis-py (timeouts, ...)."""
    if not is_sentinel_url(url):
        return redis.Redis.from_url(url, **options)
    if not sentinel_master:
        raise ValueError("a sentinel:// URL needs REDIS_SENTINEL_MASTER, the name the sentinels monitor")
    parts = [urlsplit(part) for part in url.split(";") if part]
    first = parts[0]
    db = int(first.path.strip("/") or 0)
    password = unquote(first.password) if first.password else None
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        [(part.hostname or "localhost", part.port or 26379) for part in parts],
        sentinel_kwargs={key: value for key, value in options.items() if key.startswith("socket_")},
        **options,
    )
    client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        sentinel_master, db=db, password=password
    )
    return client
