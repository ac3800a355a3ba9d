"""The producer's Celery app and the `tts` task handle that validates before it enqueues.

The producer sends `tts.synthesize` by name: it never imports the worker, so a web app that enqueues
jobs does not pull in numpy, boto3 or torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import redis.exceptions
from celery import Celery
from celery.result import AsyncResult
from kombu.exceptions import OperationalError
from kombu.utils.url import maybe_sanitize_url

from producer.config import ProducerConfig
from tts_contract.errors import QueueUnavailable
from tts_contract.names import INTERACTIVE_QUEUE, TASK_NAME
from tts_contract.schema import TTSRequest, object_name, parse_request

__all__ = [
    "JobResult",
    "TTSTask",
    "app",
    "celery_contract",
    "create_app",
    "shown_fields",
    "synthesize",
    "tts",
]


def celery_contract(config: ProducerConfig) -> dict[str, Any]:
    """Celery settings that producer and worker must agree on.

    The connection timeouts bound how long enqueueing waits for a Redis that is down: publishing
    tries four times (Celery's default retry policy), subscribing to the result retries until
    `connect_timeout_s` has passed, so a refused connection fails at once and a host that drops
    packets within about `connect_timeout_s`, instead of Celery's 19 s and a RuntimeError."""
    connect_s = max(0.5, config.connect_timeout_s / 4)
    # Through Redis Sentinel, kombu and Celery ask the sentinels for this primary (again after a failover).
    master = {"master_name": config.sentinel_master} if config.sentinel_master else {}
    return {
        "broker_url": config.broker_url,
        "result_backend": config.result_backend,
        "broker_connection_timeout": connect_s,
        "redis_socket_connect_timeout": connect_s,
        "result_backend_transport_options": {
            # Tries stop once `timeout` has passed, after a last pause and try: keep a margin for them.
            "retry_policy": {
                "timeout": 0.75 * config.connect_timeout_s,
                "interval_start": 0,
                "interval_step": 0.5,
                "interval_max": 1,
            },
            **master,
        },
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_default_queue": INTERACTIVE_QUEUE,
        "task_routes": {TASK_NAME: {"queue": INTERACTIVE_QUEUE}},
        # Within a queue, Redis priorities only hold with this strategy; 0 (also "no priority") is the top.
        "broker_transport_options": {
            "queue_order_strategy": "priority",
            "socket_connect_timeout": connect_s,
            **master,
        },
        # Name, worker, retries and queue with each result; the worker's backends leave out the request
        # fields, which Celery would store too (see tts_worker.results).
        "result_extended": True,
        "task_send_sent_event": True,
        "broker_connection_retry_on_startup": True,
    }


def create_app(config: ProducerConfig, *, name: str = "producer") -> Celery:
    """A producer app for an explicit configuration (several brokers in one process, tests, scripts)."""
    celery_app = Celery(name, set_as_current=False)
    celery_app.conf.update(celery_contract(config))
    return celery_app


app = Celery("producer", set_as_current=False)
"""The producer's Celery app, configured from the environment when first used."""


@app.on_configure.connect
def _configure(sender: Celery, **_: Any) -> None:
    sender.conf.update(celery_contract(ProducerConfig.from_env()))


class TTSTask:
    """`tts.delay(text=...)` and `tts.apply_async(kwargs=...)`, with validation before sending."""

    name = TASK_NAME

    def __init__(self, celery_app: Celery) -> None:
        self.app = celery_app
        self._max_text_chars: int | None = None
        self._result_cls = celery_app.subclass_with_self(JobResult)

    def validate(self, fields: dict[str, Any]) -> TTSRequest:
        """Check the fields against the request schema; raises `InvalidRequest`."""
        if self._max_text_chars is None:
            self._max_text_chars = ProducerConfig.from_env().max_text_chars
        return parse_request(fields, max_text_chars=self._max_text_chars)

    def delay(self, **fields: Any) -> AsyncResult[Any]:
        """Validate the request fields, then enqueue the job. Returns its `AsyncResult`."""
        return self.apply_async(kwargs=fields)

    def apply_async(
        self, args: tuple[Any, ...] | None = None, kwargs: dict[str, Any] | None = None, **options: Any
    ) -> AsyncResult[Any]:
        """Like Celery's `apply_async` (`priority=`, `task_id=`, `queue=`, ...), validating `kwargs` first."""
        if args:
            raise TypeError("tts takes keyword fields only, e.g. tts.delay(text='Hello')")
        request = self.validate(kwargs or {})
        if options.get("task_id") is not None:
            object_name(
                request, options["task_id"]
            )  # any task id is checked, and one that names the audio more
        message = request.to_message()
        with unavailable_as_error(self.app):
            result: AsyncResult[Any] = self.app.send_task(
                TASK_NAME,
                kwargs=message,
                kwargsrepr=shown_fields(message),
                result_cls=self._result_cls,
                **options,
            )
        return result


class JobResult(AsyncResult):  # type: ignore[type-arg]
    """The `AsyncResult` of an enqueued job: `get` raises `QueueUnavailable`, naming the result
    backend, while Redis cannot be reached (Celery raises a bare `ConnectionError` or a RuntimeError
    asking for a restart); the same result can be waited on again once Redis is back."""

    def get(self, *args: Any, **kwargs: Any) -> Any:
        with unavailable_as_error(self.app):
            return super().get(*args, **kwargs)

    def __del__(self) -> None:
        # Celery unsubscribes from the result here, reconnecting if need be: during an outage that
        # would print an ignored RuntimeError for every result let go. The next connection starts afresh.
        with suppress(QueueUnavailable), unavailable_as_error(self.app):
            super().__del__()


_UNREACHABLE = (OperationalError, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


@contextmanager
def unavailable_as_error(app: Celery) -> Iterator[None]:
    """Turn "Redis cannot be reached" while sending or waiting into `QueueUnavailable`, naming the
    broker and result backend with their passwords hidden."""
    try:
        yield
    except Exception as exc:
        # Celery's result consumer gives up reconnecting with a RuntimeError caused by the connection error.
        if not isinstance(exc, _UNREACHABLE) and not isinstance(exc.__cause__, _UNREACHABLE):
            raise
        where = f"broker {maybe_sanitize_url(app.conf.broker_url)}"
        if app.conf.result_backend != app.conf.broker_url:
            where += f" / result backend {maybe_sanitize_url(app.conf.result_backend)}"
        cause = exc.__cause__ if isinstance(exc, RuntimeError) else exc
        raise QueueUnavailable(f"the queue cannot be reached ({where}): {cause}") from exc


def shown_fields(fields: dict[str, Any]) -> str:
    """How Flower and the worker's log show a job's fields (`kwargsrepr`): `text` and `emo_text` cut to
    80 characters, so that a monitoring page never carries whole documents. No request field is a
    credential (voices are file names, the storage's keys are the worker's settings)."""
    cut = {
        name: value[:79] + "…"
        for name in ("text", "emo_text")  # the free-text fields
        if isinstance(value := fields.get(name), str) and len(value) > 80
    }
    return repr({**fields, **cut})


tts = TTSTask(app)
"""The synthesis task: `tts.delay(text="Hello")` returns an `AsyncResult` whose result is a dict."""


def synthesize(*, timeout: float = 600, **fields: Any) -> dict[str, Any]:
    """Enqueue one job and wait for its result dict (`status`, `url`, `filename`, `s3_key`, `metadata`)."""
    result: dict[str, Any] = tts.delay(**fields).get(timeout=timeout)
    return result
