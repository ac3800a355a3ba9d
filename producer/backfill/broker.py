"""Publishing task messages in batches, and finding a message already in the broker by task id.

Publishing: one producer connection, kombu's `Producer.batch()` (kombu >= 5.7), so that the Redis
commands of a whole batch (each message's LPUSH and its `task-sent` event) travel in one round trip.
Messages are made by Celery's own `create_task_message` and `send_task_message`, so they are the
normal protocol-2 messages that `tts.apply_async` sends, with `queue`, `priority` and the shortened
`kwargsrepr` that Flower and the worker's log show (`producer.app.shown_fields`). Skipped on
purpose: `send_task`'s per-task subscription to the result channel (two round trips per message,
for an `AsyncResult.get()` we never call) and per-message queue declaration (declared once here).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from typing import Any

import redis
from celery import Celery

from producer.app import shown_fields
from tts_contract import keys
from tts_contract.names import TASK_NAME

__all__ = ["Publisher", "find_queued"]

log = logging.getLogger(__name__)


class Publisher:
    """Sends `tts.synthesize` messages with fixed task ids to one queue at one priority."""

    def __init__(self, app: Celery, *, queue: str, priority: int) -> None:
        self.app = app
        self.queue_name = queue
        self.priority = priority
        self._queue = app.amqp.queues[queue]
        self._sent_event = bool(app.conf.task_send_sent_event)
        self._declared = False
        self.batched: bool | None = None
        """Whether the last `publish` could defer its messages into one pipeline (None before one)."""

    def publish(self, jobs: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """Send every (task id, kwargs) in one batch; raises (sending none of the unflushed) on error."""
        if not jobs:
            return
        amqp = self.app.amqp
        with self.app.producer_or_acquire() as producer:
            if not self._declared:
                producer.maybe_declare(self._queue)
                self._declared = True
            # Options that let redis-py retry a command (retry_on_timeout, ...) make kombu publish
            # one message at a time, as a replayed pipeline could push messages twice.
            if self.batched is None and not producer.supports_batch_publish:
                log.warning("the broker's retry options rule out batched publishing: one by one")
            self.batched = bool(producer.supports_batch_publish)
            # Two transport operations per message: the LPUSH and the task-sent event.
            with producer.batch(max_size=2 * len(jobs) + 2):
                for task_id, kwargs in jobs:
                    message = amqp.create_task_message(
                        task_id, TASK_NAME, (), kwargs, create_sent_event=self._sent_event,
                        kwargsrepr=shown_fields(kwargs),
                    )  # fmt: skip
                    amqp.send_task_message(
                        producer, TASK_NAME, message, queue=self._queue, priority=self.priority,
                        retry=False, declare=[],
                    )  # fmt: skip


_TASK_ID = re.compile(rb'"id": "([^"\\]+)"')
"""The task id in a stored message: `"id"` is a key only in the headers (the body is base64, and
quotes inside other strings are escaped), so this finds exactly the message's own id."""


def find_queued(client: redis.Redis, queues: Iterable[str], task_ids: Iterable[str]) -> set[str]:
    """Which of `task_ids` have a message waiting in one of `queues` (any priority) or delivered to
    a worker and not yet acknowledged. Reads every message: meant for a handful of ids, rarely."""
    wanted = {task_id.encode() for task_id in task_ids}
    found: set[bytes] = set()
    for queue in set(queues):
        for key in keys.priority_lists(queue):
            found |= _scan_list(client, key, wanted)
    # A message moves from its list to the unacked hash when a worker takes it: look there after.
    for raw in client.hvals(keys.UNACKED):
        found |= wanted.intersection(_TASK_ID.findall(_bytes(raw)))
    return {task_id.decode() for task_id in found}


def _scan_list(client: redis.Redis, key: str, wanted: set[bytes], chunk: int = 1000) -> set[bytes]:
    found: set[bytes] = set()
    start = 0
    # Until a read comes back empty (not up to a length read first): LPUSHes meanwhile shift
    # messages further along, and a message may be read twice but is never skipped.
    while batch := client.lrange(key, start, start + chunk - 1):
        for raw in batch:
            found |= wanted.intersection(_TASK_ID.findall(_bytes(raw)))
        start += chunk
    return found


def _bytes(raw: bytes | str) -> bytes:
    return raw if isinstance(raw, bytes) else raw.encode()
