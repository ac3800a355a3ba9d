"""The Celery task `tts.synthesize`: a thin caller of the pipeline.

Retries follow the error tree: `TransientError` is retried with exponential backoff and full jitter,
up to TASK_MAX_RETRIES times (waiting up to RETRY_BACKOFF_S, then up to twice that, and so on);
everything else fails at once. The worker process survives both.
"""

from __future__ import annotations

import logging
import os
from typing import Any, NoReturn

from celery import Task, shared_task
from celery.exceptions import SoftTimeLimitExceeded
from redis.exceptions import RedisError

from producer.app import TASK_NAME
from producer.errors import EngineUnusable, InvalidRequest, JobTimeLimitExceeded, TransientError
from producer.schema import parse_request
from tts_worker import runtime
from tts_worker.pipeline import log_done, run_job, text_chunks

__all__ = ["synthesize"]

log = logging.getLogger(__name__)


@shared_task(
    name=TASK_NAME,
    bind=True,
    autoretry_for=(TransientError,),
    retry_backoff_max=300,
    retry_jitter=True,
)  # max_retries and retry_backoff come from the settings, as task annotations (see tts_worker.celery)
def synthesize(self: Task[Any, dict[str, Any]], *args: Any, **fields: Any) -> dict[str, Any]:
    """Validate the fields, synthesise, store, and return the result dict with the presigned URL."""
    job_id = str(self.request.id)
    if args:
        raise InvalidRequest("request: tts.synthesize takes keyword fields only", field="request")
    services = runtime.services()
    request = parse_request(fields, max_text_chars=services.settings.max_text_chars)
    log.info(
        "job %s start: engine=%s chars=%d chunks=%d",
        job_id, services.engine.name, len(request.text), len(text_chunks(request)),
    )  # fmt: skip

    def report(done: int, total: int) -> None:
        try:
            self.update_state(state="PROGRESS", meta={"chunk": done, "chunks": total})
        except RedisError as exc:  # progress is best effort; the job is worth more
            log.warning("job %s: progress not recorded: %s", job_id, exc)

    try:
        result = run_job(request, services, job_id=job_id, on_progress=report)
    except SoftTimeLimitExceeded:
        raise JobTimeLimitExceeded(
            f"job {job_id} ran past its soft time limit ({services.settings.task_soft_time_limit_s} s)"
        ) from None
    except EngineUnusable as exc:
        _end_this_process(job_id, exc)
    log_done(job_id, result)
    return result


EXIT_ENGINE_UNUSABLE = 70


def _end_this_process(job_id: str, exc: EngineUnusable) -> NoReturn:
    """The model's device is poisoned: every later job here would fail. Exit without acknowledging
    the job, so that the pool's parent requeues it (`task_reject_on_worker_lost`) and starts a
    fresh process, which loads a fresh model."""
    log.critical("job %s: %s; ending this worker process, the job is requeued", job_id, exc)
    logging.shutdown()
    os._exit(EXIT_ENGINE_UNUSABLE)
