"""Task states and outcomes, read from the result backend many at a time.

One MGET per few hundred tasks instead of an `AsyncResult` per task: a backfill follows up to
`--max-in-flight` jobs at once. A task that has no result yet reads as PENDING (Celery stores nothing
for a task that is only queued). Results hold no request fields; the worker records the digest of
each job's request beside its result (`tts_contract.keys.request_digest`), which tells whether the result
answers the row at hand (results stored with their kwargs, before that, are read too).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from celery import Celery, states
from celery.backends.base import BaseKeyValueStoreBackend

from tts_contract import keys
from tts_contract.schema import request_digest

__all__ = ["Outcome", "ResultReader", "TaskState"]

_CHUNK = 500


@dataclass(frozen=True)
class Outcome:
    """How a finished task ended, in the manifest's terms."""

    status: str  # "completed" or "failed"
    url: str | None = None
    s3_key: str | None = None
    duration: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class TaskState:
    """A task's Celery state, and its outcome once it is ready."""

    state: str
    outcome: Outcome | None = None
    digest: str | None = None
    """The request digest of the kwargs the task ran with; None where the backend kept none."""

    @property
    def ready(self) -> bool:
        """True once the task has finished, one way or the other."""
        return self.outcome is not None


PENDING = TaskState(states.PENDING)


class ResultReader:
    """Reads the states of many tasks at once from the app's (Redis) result backend."""

    def __init__(self, app: Celery) -> None:
        backend = app.backend
        if not isinstance(backend, BaseKeyValueStoreBackend):
            raise ValueError(f"tts-backfill needs a Redis result backend (got {type(backend).__name__})")
        self.backend = backend

    def states(self, task_ids: Sequence[str]) -> list[TaskState]:
        """The state of each task, in order."""
        found: list[TaskState] = []
        for start in range(0, len(task_ids), _CHUNK):
            chunk = task_ids[start : start + _CHUNK]
            results = [self.backend.get_key_for_task(t) for t in chunk]
            values = self.backend.mget(results + [keys.request_digest(t) for t in chunk])
            found += [
                PENDING if raw is None else _state(self.backend.decode(raw), digest)
                for raw, digest in zip(values[: len(chunk)], values[len(chunk) :], strict=True)
            ]
        return found

    def ping(self) -> None:
        """Read one key, so that an unreachable backend shows before anything is sent."""
        self.backend.get(self.backend.get_key_for_task("tts-backfill-ping"))


def _state(meta: dict[str, Any], recorded: bytes | str | None) -> TaskState:
    state = str(meta.get("status", states.PENDING))
    result, kwargs = meta.get("result"), meta.get("kwargs")
    if recorded is not None:
        digest: str | None = recorded.decode() if isinstance(recorded, bytes) else recorded
    else:
        digest = request_digest(kwargs) if isinstance(kwargs, dict) else None
    if state == states.SUCCESS:
        return TaskState(state, _completed(result), digest)
    if state in states.READY_STATES:
        return TaskState(state, Outcome("failed", error=_error(state, result)), digest)
    return TaskState(state, digest=digest)


def _completed(result: Any) -> Outcome:
    if not isinstance(result, dict) or result.get("status") != "completed":
        return Outcome("failed", error=f"unexpected result: {str(result)[:200]}")
    duration = (result.get("metadata") or {}).get("duration")
    return Outcome("completed", url=result.get("url"), s3_key=result.get("s3_key"), duration=duration)


def _error(state: str, result: Any) -> str:
    """`ExcType: message` from Celery's serialised exception, without importing its class."""
    if isinstance(result, dict) and "exc_type" in result:
        message = result.get("exc_message")
        if isinstance(message, (list, tuple)):
            message = " ".join(str(part) for part in message)
        return f"{result['exc_type']}: {message}"
    return f"{state.lower()}: {result}" if result else state.lower()
