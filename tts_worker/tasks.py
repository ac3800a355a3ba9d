"""The Celery task `tts.synthesize`: a thin caller of the pipeline.

Retries follow the error tree: `TransientError` is retried with exponential backoff and full jitter,
up to TASK_MAX_RETRIES times (waiting up to RETRY_BACKOFF_S, then up to twice that, and so on);
everything else fails at once. The worker process survives both, except `EngineUnusable` (a poisoned
CUDA context): then the process ends and the job is requeued for a fresh one, at most
MAX_PROCESS_ENDINGS times per job (counted in the result backend's Redis), after which the job fails.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, NoReturn

import redis
from celery import Task, shared_task
from celery.exceptions import BackendStoreError, SoftTimeLimitExceeded
from redis.exceptions import RedisError

from tts_contract import keys
from tts_contract.errors import (
    EngineUnusable,
    InvalidRequest,
    JobTimeLimitExceeded,
    PoisonedJob,
    TransientError,
)
from tts_contract.names import TASK_NAME
from tts_contract.schema import check_task_id, parse_request, request_digest
from tts_worker import runtime
from tts_worker.chunking import text_chunks
from tts_worker.lease import LeasedRequest
from tts_worker.pipeline import log_done, run_job
from tts_worker.settings import MAX_RETRY_WAIT_S

__all__ = ["MAX_PROCESS_ENDINGS", "UrlHidingRequest", "synthesize"]

log = logging.getLogger(__name__)

_URL_IN_REPR = re.compile(r"('url': )'[^']*'")


class UrlHidingRequest(LeasedRequest):
    """The worker's view of one delivery, which keeps the presigned URL out of the `task-succeeded`
    event: Celery puts the result's repr there, and Flower shows it to whoever can log in, while a
    presigned URL is a credential for the audio (the worker's log leaves it out too). The caller
    gets the whole result from the result backend."""

    def send_event(self, type: str, **fields: Any) -> None:
        if type == "task-succeeded" and isinstance(fields.get("result"), str):
            fields["result"] = _URL_IN_REPR.sub(r"\1'<not shown>'", fields["result"])
        super().send_event(type, **fields)


class _SynthesisTask(Task[Any, dict[str, Any]]):
    Request = f"{__name__}:UrlHidingRequest"  # Celery takes the class or its name; the stubs know the name


@shared_task(
    name=TASK_NAME,
    bind=True,
    base=_SynthesisTask,
    autoretry_for=(TransientError,),
    retry_backoff_max=MAX_RETRY_WAIT_S,
    retry_jitter=True,
)  # max_retries and retry_backoff come from the settings, as task annotations (see tts_worker.celery)
def synthesize(self: Task[Any, dict[str, Any]], *args: Any, **fields: Any) -> dict[str, Any]:
    """Validate the fields, synthesise, store, and return the result dict with the presigned URL."""
    job_id = str(self.request.id)
    check_task_id(job_id)  # before any log line of ours repeats it
    if args:
        raise InvalidRequest("request: tts.synthesize takes keyword fields only", field="request")
    services = runtime.services()
    request = parse_request(fields, max_text_chars=services.settings.max_text_chars)
    _record_request_digest(self, job_id, fields)
    _refuse_if_it_ended_processes(self, job_id)
    log.info(
        "job %s start: engine=%s chars=%d chunks=%d",
        job_id, services.engine.name, len(request.text), len(text_chunks(request)),
    )  # fmt: skip

    def report(done: int, total: int) -> None:
        try:
            # Tried once (max_retries=0): while Redis is away the job goes on, only its result waits.
            self.update_state(state="PROGRESS", meta={"chunk": done, "chunks": total}, max_retries=0)
        except (RedisError, BackendStoreError) as exc:  # progress is best effort; the job is worth more
            log.warning("job %s: progress not recorded: %s", job_id, exc)

    try:
        result = run_job(request, services, job_id=job_id, on_progress=report)
    except SoftTimeLimitExceeded:
        raise JobTimeLimitExceeded(
            f"job {job_id} ran past its soft time limit ({services.settings.task_soft_time_limit_s} s)"
        ) from None
    except EngineUnusable as exc:
        _end_this_process(self, job_id, exc)
    log_done(job_id, result)
    return result


EXIT_ENGINE_UNUSABLE = 70
MAX_PROCESS_ENDINGS = 2
"""Worker processes one job may end with a poisoned CUDA context before it fails for good: a job
that triggers a device-side assert every time would otherwise be requeued, and end a process,
forever. Two tell a passing fault of one process from a job that breaks every model it meets."""
RESULT_EXPIRES_S = 7 * 86_400
"""How long results are kept (the worker's `result_expires`), and what is recorded beside them."""
ENDINGS_TTL_S = RESULT_EXPIRES_S
"""How long the count is kept: as long as results, for a requeued job may wait behind a backfill."""


def _record_request_digest(task: Task[Any, Any], job_id: str, fields: dict[str, Any]) -> None:
    """Beside the result (which holds no request fields), the digest of the request it answers, so
    that tts-backfill can tell a result made for another request under the same task id."""
    client = _results_redis(task)
    if client is None:
        return
    try:
        client.set(keys.request_digest(job_id), request_digest(fields), ex=RESULT_EXPIRES_S)
    except RedisError as exc:  # only a backfill's conflict check reads it; the job is worth more
        log.warning("job %s: request digest not recorded: %s", job_id, exc)


def _results_redis(task: Task[Any, Any]) -> redis.Redis | None:
    """The result backend's Redis client, for what must outlive the process and be seen by every
    worker (process endings, request digests); None for a backend that is not Redis."""
    client = getattr(task.backend, "client", None)
    return client if isinstance(client, redis.Redis) else None


def _refuse_if_it_ended_processes(task: Task[Any, Any], job_id: str) -> None:
    """Fail the job for good, before the engine sees it, once it has ended MAX_PROCESS_ENDINGS."""
    client = _results_redis(task)
    if client is None:
        return
    try:
        record = client.hgetall(keys.process_endings(job_id))
    except RedisError as exc:  # cannot tell: run it, as without the count
        log.warning("job %s: process endings not read: %s", job_id, exc)
        return
    count = int(record.get(b"count", 0))
    if count >= MAX_PROCESS_ENDINGS:
        last = record.get(b"error", b"")
        last = last.decode(errors="replace") if isinstance(last, bytes) else last
        raise PoisonedJob(
            f"job {job_id} failed for good: it ended {count} worker processes with a CUDA error "
            f"that poisons the device (last: {last}); it is not run again"
        )


def _count_ending(task: Task[Any, Any], job_id: str, exc: EngineUnusable) -> int | None:
    client = _results_redis(task)
    if client is None:
        return None
    key = keys.process_endings(job_id)
    try:
        with client.pipeline() as pipe:
            pipe.hincrby(key, "count", 1)
            pipe.hset(key, "error", str(exc)[:300])
            pipe.expire(key, ENDINGS_TTL_S)
            count, *_ = pipe.execute()
    except RedisError as error:
        log.warning("job %s: process ending not counted: %s", job_id, error)
        return None
    return int(count)


def _end_this_process(task: Task[Any, Any], job_id: str, exc: EngineUnusable) -> NoReturn:
    """The model's device is poisoned: every later job here would fail. Exit without acknowledging
    the job, so that the pool's parent requeues it (`task_reject_on_worker_lost`) and starts a
    fresh process, which loads a fresh model. The ending is counted first, so that the job's
    next delivery fails it instead once it has ended MAX_PROCESS_ENDINGS processes."""
    count = _count_ending(task, job_id, exc)
    if count is not None and count >= MAX_PROCESS_ENDINGS:
        outcome = f"the job is requeued only to be failed (it ended {count} processes)"
    else:
        outcome = f"the job is requeued (process ending {count or '?'} of at most {MAX_PROCESS_ENDINGS})"
    log.critical("job %s: %s; ending this worker process, %s", job_id, exc, outcome)
    logging.shutdown()
    os._exit(EXIT_ENGINE_UNUSABLE)
