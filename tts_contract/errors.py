"""The errors of the text-to-speech queue, shared by producer and worker.

They live in the producer because they are part of the contract: a client catches the same classes
that the worker raises (Celery rebuilds a failed task's exception from its class name, and finds it
here because importing ``producer`` imports this module).

    TTSError
    ├── PermanentError            never retried: the same request would fail the same way
    │   ├── InvalidRequest        a field breaks a rule (also a ValueError)
    │   │   └── UnknownVoice      a voice name that is not a usable file in AUDIO_VOICES_DIR
    │   ├── UnreadableText        the engine produced no audio for the text
    │   ├── EncodingError         ffmpeg refused the audio (its stderr is in the message)
    │   ├── SessionTaken          the audio's name holds another job's audio (`overwrite` not set)
    │   ├── JobTimeLimitExceeded  the job ran past its soft time limit
    │   └── PoisonedJob           the job poisoned the engine's device in several worker processes
    └── TransientError            retried with backoff, a bounded number of times
        ├── StorageError          S3 could not be reached or refused the request
        ├── QueueUnavailable      the producer could not reach the broker (Redis) to enqueue
        ├── EncoderKilled         ffmpeg was ended by a signal (the OOM killer), not by the audio
        ├── GPUOutOfMemory        CUDA ran out of memory, even after retrying with smaller segments
        └── EngineUnusable        the engine's device is poisoned (a CUDA device-side assert): the
                                  worker process must be replaced before the job runs again

Every class takes one message string, so that Celery can rebuild it on the client from its args.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "EncoderKilled",
    "EncodingError",
    "EngineUnusable",
    "GPUOutOfMemory",
    "InvalidRequest",
    "JobTimeLimitExceeded",
    "PermanentError",
    "PoisonedJob",
    "QueueUnavailable",
    "SessionTaken",
    "StorageError",
    "TTSError",
    "TransientError",
    "UnknownVoice",
    "UnreadableText",
]


ECHO_LIMIT = 60
"""How much of a caller's value an error message repeats: enough to recognise it, never a document."""


def echo(value: Any, limit: int = ECHO_LIMIT) -> str:
    """`repr(value)` for an error message, cut to `limit` characters with its full length said."""
    shown = repr(value)
    if len(shown) <= limit:
        return shown
    size = f"{len(value)} characters" if isinstance(value, str) else f"{len(shown)} characters as text"
    return f"{shown[:limit]}… ({size})"


class TTSError(Exception):
    """Base class of every error this project raises on purpose."""


class PermanentError(TTSError):
    """The request cannot succeed as sent; retrying would fail the same way."""


class TransientError(TTSError):
    """A passing failure of something outside the job (storage, broker, GPU memory); worth a retry."""


class InvalidRequest(PermanentError, ValueError):
    """A request field breaks a rule; the message names the field and the rule."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class UnknownVoice(InvalidRequest):
    """A voice name that does not resolve to a usable audio file inside AUDIO_VOICES_DIR."""


class UnreadableText(PermanentError):
    """The engine produced no audio for a chunk of the text."""


class SessionTaken(PermanentError):
    """The name the audio would be stored under (`session_id`) holds audio another job stored; nothing
    is stored. `overwrite: true` replaces it; a redelivery of the job that stored it reuses it."""


class EncodingError(PermanentError):
    """ffmpeg failed to encode the audio."""


class JobTimeLimitExceeded(PermanentError):
    """The job ran past its soft time limit."""


class PoisonedJob(PermanentError):
    """The job left the engine's device unusable (`EngineUnusable`) in several worker processes in a
    row: it is failed rather than requeued again, where it would end one process after another."""


class StorageError(TransientError):
    """The object store could not be reached or refused a request."""


class QueueUnavailable(TransientError):
    """The producer could not reach the broker (or the result backend) to enqueue a job; nothing was
    sent. The message names the broker, its password hidden; the same process can try again later."""


class EncoderKilled(TransientError):
    """ffmpeg was ended by a signal (most often the OOM killer): the audio was fine, so the job is
    retried rather than failed as a bad request."""


class GPUOutOfMemory(TransientError):
    """CUDA ran out of memory on a chunk, even after freeing the cache and retrying smaller."""


class EngineUnusable(TransientError):
    """The engine can no longer run in this process (e.g. a CUDA device-side assert poisoned the
    context); the process must be replaced and the job run again elsewhere."""
