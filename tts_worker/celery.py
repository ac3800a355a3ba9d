"""The worker's Celery app: `celery -A tts_worker worker` needs no other flags.

Why these defaults (measured on celery 5.7 / kombu 5.7 / Redis 7; docs/configuration.md, "Why the
worker is configured as it is"):
- prefork with one child, not solo: the parent keeps answering `inspect ping` and sending heartbeats
  while a long job runs, enforces time limits, and requeues the job (`task_reject_on_worker_lost`
  with late acks) when the child running it dies. The model is loaded in the child
  (`worker_process_init`), never in the parent, so CUDA is never initialised in a process that forks.
- prefetch 1: a job waits in Redis, where another worker can take it, not in a busy worker's buffer.
- a job is leased, not timed out: the visibility timeout is short and the worker running the job
  renews it (tts_worker.lease), so a lost worker's job is back within RECOVERY_S and a live worker's
  job is never delivered twice, however long it runs.
- a finished job's result waits for Redis (RESULT_RETRY_S) instead of failing the job.
- queues are read in the order given (`queue_order_strategy=priority`): interactive before backfill.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
from typing import Any

from celery import Celery, signals
from celery.app import trace
from kombu import Exchange, Queue

from producer.app import celery_contract
from producer.config import ProducerConfig
from tts_contract.names import QUEUES, TASK_NAME
from tts_worker import metrics, runtime
from tts_worker.engines import check_engine
from tts_worker.lease import LeaseRenewal, lease_for
from tts_worker.results import BACKEND_OVERRIDES
from tts_worker.settings import Settings, SettingsError
from tts_worker.storage import make_storage
from tts_worker.tasks import RESULT_EXPIRES_S

__all__ = ["app", "worker_config"]

log = logging.getLogger(__name__)


def worker_config(settings: Settings) -> dict[str, Any]:
    """The Celery settings of a worker, from our settings."""
    contract = celery_contract(
        ProducerConfig(
            broker_url=settings.celery_broker_url,
            result_backend=settings.celery_result_backend,
            max_text_chars=settings.max_text_chars,
            sentinel_master=settings.redis_sentinel_master,
        )
    )
    lease = lease_for(settings.recovery_s)
    return {
        **contract,
        "broker_transport_options": {**contract["broker_transport_options"], **lease.transport_options()},
        # A finished job's result is stored even if Redis is away for minutes: Celery tries again with
        # backoff (full jitter, at most 10 s apart, so about 5 s on average) as many times as fill
        # RESULT_RETRY_S. Progress reports are tried once (see tts_worker.tasks).
        "result_backend_always_retry": True,
        "result_backend_max_sleep_between_retries_ms": _RESULT_RETRY_MAX_SLEEP_MS,
        "result_backend_max_retries": _result_retries(settings.result_retry_s),
        # Each queue with an exchange and routing key of its own: left to Celery's defaults, both
        # would be bound to exchange "tts" with key "tts", so that a message published to that
        # exchange (rather than straight to a queue, as Celery does) would land in both.
        "task_queues": [Queue(name, Exchange(name), routing_key=name) for name in QUEUES],
        "worker_pool": "prefork",
        "worker_concurrency": 1,
        "worker_prefetch_multiplier": 1,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_track_started": True,
        "worker_send_task_events": True,
        "task_soft_time_limit": settings.task_soft_time_limit_s,
        "task_time_limit": settings.task_time_limit_s,
        # The child loads the model before it reports alive; give it time to.
        "worker_proc_alive_timeout": settings.model_load_timeout_s,
        # A broker blip must not throw away minutes of synthesis: the job finishes and acks, and is
        # idempotent should Redis redeliver it meanwhile.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "task_annotations": {
            TASK_NAME: {"max_retries": settings.max_retries, "retry_backoff": settings.retry_backoff_s}
        },
        "result_expires": RESULT_EXPIRES_S,
    }


_RESULT_RETRY_MAX_SLEEP_MS = 10_000


def _result_retries(budget_s: int) -> int:
    """How many tries of storing a result take about `budget_s`: Celery sleeps a random time up to
    10 ms * 2**n, at most 10 s, before try n; the first ten sleeps add up to about 5 s, each later
    one to 5 s on average."""
    return 0 if budget_s == 0 else 10 + max(0, budget_s - 5) // (_RESULT_RETRY_MAX_SLEEP_MS // 2000)


app = Celery("tts_worker", include=["tts_worker.tasks"])
metrics.connect_signals()  # Prometheus metrics, and a log line per failed or retried job
app.steps["consumer"].add(LeaseRenewal)
# Results without the request's text: the worker's backend for each Redis scheme (a plain URL still).
app.loader.override_backends = {**app.loader.override_backends, **BACKEND_OVERRIDES}

# Celery's success line prints the task's return value, and ours holds a presigned URL (a bearer
# credential for the audio). Our own "job ... done" line says what an operator needs instead.
trace.LOG_SUCCESS = "Task %(name)s[%(id)s] succeeded in %(runtime)ss"


@app.on_configure.connect
def _configure(sender: Celery, **_: Any) -> None:
    try:
        settings = runtime.settings()
    except SettingsError as exc:
        raise SystemExit(f"tts_worker: bad setting: {exc}") from None
    sender.conf.update(worker_config(settings))


class OneLinePerRecord(logging.Filter):
    """Escapes line breaks and other control characters in every log message, so that a value that
    came with a job (a task id, a field Celery repeats) can never start a forged line of the log."""

    _CONTROL = {code: f"\\x{code:02x}" for code in [*range(32), 127] if chr(code) != "\t"} | {
        10: "\\n",
        13: "\\r",
    }

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        escaped = message.translate(self._CONTROL)
        if escaped != message:
            record.msg, record.args = escaped, None
        return True


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _one_line_per_record(logger: logging.Logger, **_: Any) -> None:
    for handler in logger.handlers:
        handler.addFilter(OneLinePerRecord())


@signals.worker_init.connect
def _check_before_start(**_: Any) -> None:
    """Refuse to start, with a clear message, when ffmpeg, the engine or the storage cannot be used.

    Celery logs and swallows exceptions from signal handlers, so anything that goes wrong here
    becomes a SystemExit: a worker that cannot do its job must not start consuming."""
    settings = runtime.settings()
    try:
        if shutil.which(settings.ffmpeg_binary) is None:
            raise RuntimeError(f"ffmpeg not found (FFMPEG_BINARY={settings.ffmpeg_binary!r})")
        check_engine(settings)
        make_storage(settings).check()
    except Exception as exc:
        raise SystemExit(f"tts_worker: cannot start: {exc}") from None


@signals.worker_process_init.connect
def _load_model(**_: Any) -> None:
    """Load and warm the engine in the child that serves jobs, before it takes one.

    Celery logs and swallows errors from this signal, and a child without its model would then fail
    every job it takes. So a child that cannot load it exits, and asks its parent for the warm
    shutdown that Ctrl-C starts (exit status 1; a cold one, while the parent is still starting, breaks
    inside Celery): the jobs the worker had reserved go back to the queue for a worker that can."""
    try:
        runtime.services()
    except Exception as exc:
        log.critical(
            "cannot load the engine (%s); stopping this worker, its jobs stay queued", exc, exc_info=True
        )
        os.kill(os.getppid(), signal.SIGINT)
        logging.shutdown()
        os._exit(1)
