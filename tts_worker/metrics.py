"""What a worker tells its operators beyond Flower: Prometheus metrics, and a log line for each job
that fails or is retried (`job <id> failed: <ErrorClass>: <message>`, from Celery's signals, so that
the task module stays a thin caller; the message never carries the text or a credential).

The metrics are off unless METRICS_PORT is set. Then the worker's parent process serves
`http://METRICS_ADDRESS:METRICS_PORT/metrics`:

    tts_jobs_started_total                 counter    runs that began: each retry or redelivery is one more
    tts_jobs_succeeded_total{engine}       counter
    tts_job_failures_total{error}          counter    by error class name (UnknownVoice, StorageError, ...)
    tts_job_retries_total{error}           counter    transient errors that were retried, by class name
    tts_job_audio_seconds{engine}          histogram  seconds of audio per job
    tts_job_synthesis_seconds{engine}      histogram  seconds spent synthesising per job
    tts_job_rtf{engine}                    histogram  real-time factor: synthesis seconds / audio seconds
    tts_queue_depth{queue}                 gauge      jobs waiting in Redis, per queue (tts, tts.backfill)
    tts_broker_up                          gauge      1 when this scrape could read the queues, else 0

Jobs run in the prefork child while the parent serves HTTP, so the metrics use prometheus_client's
multiprocess mode: every process writes its values to files in a directory made at start (exported
as PROMETHEUS_MULTIPROC_DIR before prometheus_client is first imported, as it requires), and a scrape
adds them up. The queue depth is read from Redis at each scrape. A reused result (a redelivered job)
counts as a success but adds no audio or synthesis time.
"""

from __future__ import annotations

import ast
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import redis
from celery import signals
from kombu.utils.url import maybe_sanitize_url

from producer.redis_client import redis_client
from tts_contract import keys
from tts_contract.errors import PermanentError
from tts_contract.names import QUEUES, TASK_NAME
from tts_worker import runtime

if TYPE_CHECKING:
    from prometheus_client import Metric

__all__ = ["QueueDepthCollector", "connect_signals", "loggable_message", "queue_depths"]

log = logging.getLogger(__name__)

AUDIO_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800)
SYNTHESIS_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200)
RTF_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 5)


def queue_depths(client: redis.Redis, queues: Iterable[str] = QUEUES) -> dict[str, int]:
    """Jobs waiting in each queue. kombu keeps a Redis queue's priorities in separate lists, named
    `<queue>`, then `<queue>\\x06\\x16<step>` for the other steps (3, 6, 9): all of them count."""
    lists = {queue: keys.priority_lists(queue) for queue in queues}
    with client.pipeline(transaction=False) as pipe:
        for names in lists.values():
            for name in names:
                pipe.llen(name)
        lengths = iter(pipe.execute())
    return {queue: sum(next(lengths) for _ in names) for queue, names in lists.items()}


class QueueDepthCollector:
    """A Prometheus collector that reads the queue depths from Redis at each scrape."""

    def __init__(
        self, broker_url: str, queues: Iterable[str] = QUEUES, *, sentinel_master: str | None = None
    ) -> None:
        self.queues = tuple(queues)
        self._client = redis_client(
            broker_url, sentinel_master=sentinel_master, socket_connect_timeout=3, socket_timeout=3
        )

    def collect(self) -> Iterable[Metric]:
        """`tts_queue_depth{queue}` and `tts_broker_up`."""
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily("tts_broker_up", "1 when the queues could be read from Redis at this scrape")
        try:
            depths = queue_depths(self._client, self.queues)
        except redis.RedisError as exc:
            log.warning("metrics: cannot read the queue depths: %s", exc)
            up.add_metric([], 0)
            return [up]
        up.add_metric([], 1)
        depth = GaugeMetricFamily("tts_queue_depth", "Jobs waiting in Redis, per queue", labels=["queue"])
        for queue, count in depths.items():
            depth.add_metric([queue], count)
        return [up, depth]


class _Recorder:
    """The job metrics, made once the multiprocess directory is known."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        self.started = Counter("tts_jobs_started", "Jobs that began running")
        self.succeeded = Counter("tts_jobs_succeeded", "Jobs that succeeded", ["engine"])
        self.failures = Counter("tts_job_failures", "Jobs that failed, by error class", ["error"])
        self.retries = Counter("tts_job_retries", "Transient errors retried, by error class", ["error"])
        self.audio = Histogram("tts_job_audio_seconds", "Audio per job", ["engine"], buckets=AUDIO_BUCKETS)
        self.synthesis = Histogram(
            "tts_job_synthesis_seconds", "Synthesis time per job", ["engine"], buckets=SYNTHESIS_BUCKETS
        )
        self.rtf = Histogram("tts_job_rtf", "Synthesis time over audio time", ["engine"], buckets=RTF_BUCKETS)

    def succeeded_with(self, result: Mapping[str, Any]) -> None:
        meta = result.get("metadata") or {}
        engine = str(meta.get("engine", "unknown"))
        self.succeeded.labels(engine).inc()
        synthesis = (meta.get("timings") or {}).get("synthesis_s")
        if meta.get("reused") or synthesis is None:
            return
        self.audio.labels(engine).observe(float(meta.get("duration", 0)))
        self.synthesis.labels(engine).observe(float(synthesis))
        if meta.get("rtf") is not None:
            self.rtf.labels(engine).observe(float(meta["rtf"]))


class _State:
    """What this worker process set up; nothing until `worker_init` finds METRICS_PORT set."""

    directory: str | None = None
    recorder: _Recorder | None = None


def _prepare(**_: Any) -> None:
    """In the parent, before the pool forks: make the directory and the metrics the children inherit."""
    if not runtime.settings().metrics_port:
        return
    if importlib.util.find_spec("prometheus_client") is None:
        raise SystemExit("tts_worker: METRICS_PORT needs prometheus-client: pip install '.[monitoring]'")
    _State.directory = tempfile.mkdtemp(prefix="tts-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _State.directory
    from prometheus_client import values

    # prometheus_client picks its value store when first imported, and Celery's command line has
    # imported it already when Flower is installed (Flower registers a `celery flower` command):
    # choose again, now that the directory is set, before any metric exists.
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    _State.recorder = _Recorder()


def _serve(**_: Any) -> None:
    """Serve /metrics from the parent, once the pool has forked (so no child inherits the thread)."""
    if _State.directory is None:
        return
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=_State.directory)  # type: ignore[no-untyped-call]
    settings = runtime.settings()
    registry.register(
        QueueDepthCollector(settings.celery_broker_url, sentinel_master=settings.redis_sentinel_master)
    )
    address, port = runtime.settings().metrics_address, runtime.settings().metrics_port
    try:
        start_http_server(port, addr=address, registry=registry)
    except OSError as exc:  # metrics are worth a log line, not a GPU worker
        log.error("metrics: cannot serve on %s:%d: %s", address, port, exc)
        return
    log.info("metrics: serving http://%s:%d/metrics", address, port)


def _clean_up(**_: Any) -> None:
    if _State.directory is not None:
        shutil.rmtree(_State.directory, ignore_errors=True)


def _is_ours(sender: Any) -> bool:
    return getattr(sender, "name", None) == TASK_NAME


def _ours(sender: Any) -> _Recorder | None:
    return _State.recorder if _is_ours(sender) else None


def _started(sender: Any = None, **_: Any) -> None:
    if recorder := _ours(sender):
        recorder.started.inc()  # in every run: a retry is a new message, and so is a redelivery


def _succeeded(sender: Any = None, result: Any = None, **_: Any) -> None:
    if (recorder := _ours(sender)) and isinstance(result, Mapping):
        recorder.succeeded_with(result)


def _failed(
    sender: Any = None,
    task_id: str | None = None,
    exception: BaseException | None = None,
    kwargs: Mapping[str, Any] | None = None,
    **_: Any,
) -> None:
    if not _is_ours(sender) or exception is None:
        return
    level = logging.WARNING if isinstance(exception, PermanentError) else logging.ERROR
    # No traceback: Celery's own line for the failure has it.
    log.log(level, "job %s failed: %s", task_id, loggable_message(exception, kwargs or {}))
    if recorder := _ours(sender):
        recorder.failures.labels(type(exception).__name__).inc()


def _retried(sender: Any = None, request: Any = None, reason: Any = None, **_: Any) -> None:
    if not _is_ours(sender):
        return
    cause = getattr(reason, "exc", None) or reason  # celery's Retry wraps the error that caused it
    when = getattr(reason, "when", None)
    delay = f"in {when:.1f} s" if isinstance(when, (int, float)) else f"at {when}"
    attempt = getattr(request, "retries", 0) + 1  # the runs so far, less the first
    fields = getattr(request, "kwargs", None) or {}
    log.warning(
        "job %s retry %d of %s %s: %s",
        getattr(request, "id", None), attempt, sender.max_retries, delay, loggable_message(cause, fields),
    )  # fmt: skip
    if recorder := _ours(sender):
        recorder.retries.labels(type(cause).__name__).inc()


_QUOTED = re.compile(r"'(?:[^'\\\n]|\\.)*'|\"(?:[^\"\\\n]|\\.)*\"")
_URL = re.compile(r"\b([a-z][a-z0-9+.-]*://[^\s'\"?)]+)(\?[^\s'\")]*)?", re.IGNORECASE)
MAX_MESSAGE_CHARS = 300


def connect_signals() -> None:
    """Connect the handlers above to Celery's signals: called where the worker's app is made (connecting
    twice is harmless, Celery keeps one connection per handler)."""
    signals.worker_init.connect(_prepare)
    signals.worker_ready.connect(_serve)
    signals.worker_shutdown.connect(_clean_up)
    signals.task_prerun.connect(_started)
    signals.task_success.connect(_succeeded)
    signals.task_failure.connect(_failed)
    signals.task_retry.connect(_retried)


def loggable_message(exc: BaseException, fields: Mapping[str, Any]) -> str:
    """`<ErrorClass>: <message>` on one line, fit for a log: a quoted piece of the job's text or
    emo_text becomes '<text>', the worker's S3 keys and Hugging Face token become '***', a URL loses
    its password and query string (a presigned URL's signature), and it stops at 300 characters."""
    message = " ".join(str(exc).split())
    texts = [
        " ".join(value.split()) for name in ("text", "emo_text") if isinstance(value := fields.get(name), str)
    ]

    def hide_text(quoted: re.Match[str]) -> str:
        try:
            value = ast.literal_eval(quoted.group())
        except (ValueError, SyntaxError):
            return quoted.group()
        piece = " ".join(str(value).split())
        return "'<text>'" if len(piece) >= 3 and any(piece in text for text in texts) else quoted.group()

    message = _QUOTED.sub(hide_text, message)
    for secret in _secrets():
        message = message.replace(secret, "***")
    message = _URL.sub(lambda url: maybe_sanitize_url(url.group(1)), message)
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 1] + "…"
    return f"{type(exc).__name__}: {message}"


def _secrets() -> list[str]:
    try:
        settings = runtime.settings()
    except Exception:  # a log line must never fail; a worker with bad settings does not run jobs
        return []
    values = (settings.s3_secret_access_key, settings.s3_access_key_id, settings.hf_token)
    return [value for value in values if value and len(value) >= 4]
