"""Thin client of the text-to-speech queue: validate a request, enqueue it, wait for the audio URL.

    from producer import tts
    url = tts.delay(text="Hello").get(timeout=600)["url"]

Importing it imports neither torch, numpy, soundfile, boto3 nor the worker.
"""

from __future__ import annotations

from producer.app import app, synthesize, tts

# From the shim, which keeps `producer.errors` in sys.modules: Celery looks a stored failure's
# exception up there by module name, and results stored before the move name `producer.errors`.
from producer.errors import (
    EncoderKilled,
    EncodingError,
    EngineUnusable,
    GPUOutOfMemory,
    InvalidRequest,
    JobTimeLimitExceeded,
    PermanentError,
    PoisonedJob,
    QueueUnavailable,
    SessionTaken,
    StorageError,
    TransientError,
    TTSError,
    UnknownVoice,
    UnreadableText,
)
from tts_contract.names import BACKFILL_QUEUE, INTERACTIVE_QUEUE, TASK_NAME
from tts_contract.schema import TTSRequest, parse_request

__all__ = [
    "BACKFILL_QUEUE",
    "INTERACTIVE_QUEUE",
    "TASK_NAME",
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
    "TTSRequest",
    "TransientError",
    "UnknownVoice",
    "UnreadableText",
    "app",
    "parse_request",
    "synthesize",
    "tts",
]
