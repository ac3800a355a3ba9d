"""The request schema: every field a synthesis job accepts, with its rule.

It is the contract between producer and worker: the producer validates before anything reaches the
broker, and the worker validates again with the same model, because a message can reach the queue
without passing through the producer. Unknown fields are errors, so a typo is never silently ignored.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from tts_contract.errors import ECHO_LIMIT, InvalidRequest, echo
from tts_contract.formats import FORMATS, parse_bitrate

__all__ = [
    "EMOTIONS",
    "MAX_TEXT_CHARS",
    "TTSRequest",
    "check_task_id",
    "object_name",
    "parse_request",
    "request_digest",
]

MAX_TEXT_CHARS = 10_000
"""Default limit on `text`; the MAX_TEXT_CHARS environment variable lowers or raises it."""

EMOTIONS = ("happy", "angry", "sad", "afraid", "disgusted", "melancholic", "surprised", "calm")
"""The order of the eight `emo_vector` components, as IndexTTS2 expects them."""

_SESSION_ID_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"
_TASK_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,200}$"
OutputFormat = Literal["opus", "mp3", "wav", "flac", "aac"]
Language = Literal["ar", "en", "es", "ja", "zh"]
"""The languages an engine can be told to read the text in (ISO 639-1): IndexTTS-2.5's five."""
UnitFloat = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]


class TTSRequest(BaseModel):
    """One synthesis job, as sent by `producer.tts.delay(**fields)`."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    text: str
    speaker_voice: str | None = None
    emo_audio_prompt: str | None = None
    emo_vector: list[UnitFloat] | None = None
    emo_alpha: UnitFloat = 1.0
    use_emo_text: bool = False
    emo_text: str | None = Field(default=None, max_length=1000)
    use_random: bool = False
    enable_chunking: bool = True
    max_chars_per_chunk: int = Field(default=300, ge=50, le=1000)
    enable_crossfade: bool = True
    crossfade_ms: int = Field(default=100, ge=0, le=1000)
    output_format: OutputFormat = "opus"
    bitrate: str | None = None
    sample_rate: int | None = None
    session_id: str | None = Field(default=None, pattern=_SESSION_ID_PATTERN)
    overwrite: bool = False
    presign_expires_s: int | None = Field(default=None, ge=60, le=604_800)
    # IndexTTS2's generation options; None keeps the engine's own default. Other engines ignore them.
    interval_silence: int | None = Field(default=None, ge=0, le=2000)
    temperature: float | None = Field(default=None, ge=0.1, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int | None = Field(default=None, ge=1, le=200)
    max_mel_tokens: int | None = Field(default=None, ge=50, le=1815)
    # The language to read the text in (None: the engine's default) and the speaking rate (2.0 is
    # twice as fast). An engine that cannot do what is asked fails the job naming the field.
    language: Language | None = None
    speed: float = Field(default=1.0, ge=0.25, le=4.0, allow_inf_nan=False)

    @field_validator("text")
    @classmethod
    def _text_fits(cls, text: str, info: ValidationInfo) -> str:
        limit = (info.context or {}).get("max_text_chars", MAX_TEXT_CHARS)
        if not text.strip():
            raise ValueError("must not be blank")
        if len(text) > limit:
            raise ValueError(f"must be at most {limit} characters (got {len(text)})")
        return text

    @field_validator("speaker_voice", "emo_audio_prompt")
    @classmethod
    def _plain_file_name(cls, name: str | None) -> str | None:
        if name is None:
            return None
        # A file name holds at most 255 bytes, and the worker may add an extension: keep room for it.
        if not name or name in (".", "..") or any(c in name for c in "/\\\x00") or len(name.encode()) > 240:
            raise ValueError(
                f"must be a plain file name inside AUDIO_VOICES_DIR (no path parts, no NUL, at most 240 "
                f"bytes), got {echo(name)}"
            )
        return name

    @field_validator("emo_vector", mode="before")
    @classmethod
    def _eight_emotions(cls, value: Any) -> Any:
        if isinstance(value, tuple):
            value = list(value)
        if isinstance(value, list) and len(value) != len(EMOTIONS):
            raise ValueError(f"needs exactly 8 values ({', '.join(EMOTIONS)}), got {len(value)}")
        return value

    @model_validator(mode="after")
    def _codec_allows(self) -> TTSRequest:
        fmt = FORMATS[self.output_format]
        if self.sample_rate is not None and self.sample_rate not in fmt.sample_rates:
            allowed = ", ".join(str(r) for r in sorted(fmt.sample_rates))
            raise _FieldError("sample_rate", f"{fmt.name} allows {allowed} (got {self.sample_rate})")
        if self.bitrate is None:
            return self
        if fmt.lossless:
            raise _FieldError("bitrate", f"{fmt.name} is lossless and takes no bitrate")
        try:
            kbps = parse_bitrate(self.bitrate)
        except ValueError as exc:
            raise _FieldError("bitrate", str(exc)) from None
        rate = self.effective_sample_rate
        if kbps not in fmt.bitrates_kbps(rate):
            allowed = f"{fmt.name} at {rate} Hz allows {fmt.describe_bitrates(rate)}"
            raise _FieldError("bitrate", f"{allowed} (got {echo(self.bitrate)})")
        return self

    @property
    def effective_sample_rate(self) -> int:
        """The output sample rate: the one asked for, else 24000 Hz."""
        return self.sample_rate or 24000

    @property
    def effective_bitrate(self) -> str | None:
        """The output bitrate as ffmpeg is given it (`<kbps>k`): the one asked for, else the format's
        default at the output rate (None when lossless)."""
        if self.bitrate:
            return f"{parse_bitrate(self.bitrate)}k"
        return FORMATS[self.output_format].default_bitrate(self.effective_sample_rate)

    def to_message(self) -> dict[str, Any]:
        """The fields the caller set, as JSON-ready kwargs for the task message."""
        return self.model_dump(mode="json", exclude_unset=True)


def check_task_id(task_id: Any) -> None:
    """Refuse a task id that would forge lines in the worker's log (a newline) or hold a path: every
    task id is letters, digits and `._:-` (Celery's UUIDs, tts-backfill's `backfill:<ns>:<row>`)."""
    if not isinstance(task_id, str) or not re.fullmatch(_TASK_ID_PATTERN, task_id):
        raise InvalidRequest(
            f"invalid request: task_id: must match {_TASK_ID_PATTERN} (got {echo(task_id)})", field="task_id"
        )


def object_name(request: TTSRequest, job_id: str) -> str:
    """The name the audio is stored under (before its extension): `session_id`, else the job's (task)
    id, which must then follow session_id's rule, since it becomes a file or object name."""
    check_task_id(job_id)
    if request.session_id is None and not re.fullmatch(_SESSION_ID_PATTERN, job_id):
        raise InvalidRequest(
            f"invalid request: task_id: names the audio when session_id is not set, so it must match "
            f"{_SESSION_ID_PATTERN} (got {echo(job_id)}); choose another or set session_id",
            field="task_id",
        )
    return request.session_id or job_id


class _FieldError(ValueError):
    """A cross-field rule broken by one field (pydantic's own errors cannot name it from here)."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(rule)
        self.field = field


def parse_request(fields: Mapping[str, Any], *, max_text_chars: int = MAX_TEXT_CHARS) -> TTSRequest:
    """Validate raw request fields. Raises `InvalidRequest` naming every broken field and its rule."""
    try:
        return TTSRequest.model_validate(dict(fields), context={"max_text_chars": max_text_chars})
    except ValidationError as exc:
        problems = [_describe(error) for error in exc.errors()]
        message = "invalid request: " + "; ".join(problem for _, problem in problems)
        raise InvalidRequest(message, field=problems[0][0]) from None


def _describe(error: Any) -> tuple[str, str]:
    """(field, 'field: rule') for one pydantic error, in words a caller can act on."""
    loc = [str(part) for part in error["loc"]]
    name = loc[0] if loc else "request"
    field = name[:ECHO_LIMIT]  # an unknown field's name is the caller's input too
    ctx_error = (error.get("ctx") or {}).get("error")
    if isinstance(ctx_error, _FieldError):
        return ctx_error.field, f"{ctx_error.field}: {ctx_error}"
    where = field + "".join(f"[{part}]" for part in loc[1:])
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(field, TTSRequest.model_fields, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return field, f"{field if field == name else echo(name)}: unknown field{hint}"
    message = str(ctx_error) if error["type"] == "value_error" else error["msg"]
    message = message[:1].lower() + message[1:]
    shown = "" if error["type"] in ("missing", "value_error") else f" (got {echo(error.get('input'))})"
    return field, f"{where}: {message}{shown}"


def request_digest(fields: Mapping[str, Any]) -> str:
    """A digest of a task's kwargs (session_id included), as sent and as a worker records it: two
    requests that share a task id but ask for different audio have different digests."""
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]
