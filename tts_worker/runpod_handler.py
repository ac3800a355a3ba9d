"""RunPod serverless shim: the seed's handler, running the same pipeline as the Celery task.

The seed is the single-file RunPod worker this project started from (docs/runpod.md).

    python -m tts_worker.runpod_handler                                      # the image's command
    python -m tts_worker.runpod_handler --test_input '{"input": {"text": "Hello"}}'   # one job, here

Requests and responses keep the seed's shape, so its clients work unchanged:
- batch (default): `{"status": "completed", "url", "filename", "s3_key", "metadata"}`, the object named
  `<session_id>.ogg`, else `<RunPod job id>.ogg`;
- `stream: true`: `{"status": "streaming", "chunk", "format": "pcm_16", "audio_chunk", "sample_rate"}`
  per piece, as soon as it is spoken, then `{"status": "complete", "total_chunks", ...}`;
- `action: "health_check"`: the checks of `python -m tts_worker check`, the broker skipped, each also
  under the seed's name (`configuration`, `hardware`, `s3`, `checkpoints`);
- errors: `{"error": "<message>"}`, the traceback only in the log. When the engine leaves the GPU
  unusable, the worker asks RunPod to replace it (`refresh_worker`).

Replies go to whoever may call the endpoint: errors and health details name no internal host or
absolute path (`<url>`, `<path>` stand in for them; the worker's log keeps them whole), and an
unexpected error says only its class.

As in the seed, the handler is a generator started with `return_aggregate_stream`: a batch job's
output is a one-item list. The seed's `output_format: "pcm_16"` means opus in batch mode (the seed
encoded opus whatever it said); our other formats are accepted too. No broker is used.

Importing this module loads nothing: `main` (what `python -m tts_worker.runpod_handler` runs) loads
and warms the engine, then hands `RUNPOD_CONFIG` itself to `runpod.serverless.start`. A custom entry
script should call `main()` rather than `runpod.serverless.start` with a dict of its own: that would
load the model on the first job, and miss `refresh_worker`, which is set in `RUNPOD_CONFIG`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import uuid
from collections.abc import Iterator, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tts_contract.errors import EngineUnusable, InvalidRequest, PermanentError, TTSError, echo
from tts_contract.schema import TTSRequest, parse_request
from tts_worker import health, runtime
from tts_worker.chunking import text_chunks
from tts_worker.pipeline import Services, log_done, run_job
from tts_worker.settings import SettingsError
from tts_worker.streaming import PCM_FORMAT, stream_pcm

# The runpod SDK logs at DEBUG unless told otherwise, and at DEBUG it prints every message a handler
# yields: presigned URLs (bearer credentials for the audio) and base64 audio would fill RunPod's
# logs. It reads the level once, when first imported, so choose INFO before importing it (and set
# it again in case something imported it first). RUNPOD_LOG_LEVEL, or the SDK's older
# RUNPOD_DEBUG_LEVEL, still wins when set, as does its --rp_log_level flag.
_SDK_LEVEL_CHOSEN = bool({"RUNPOD_LOG_LEVEL", "RUNPOD_DEBUG_LEVEL"} & set(os.environ))
if not _SDK_LEVEL_CHOSEN:
    os.environ["RUNPOD_LOG_LEVEL"] = "INFO"  # also for any process the SDK starts

import runpod  # noqa: E402
from runpod.serverless.modules import rp_job  # noqa: E402
from runpod.serverless.modules.rp_logger import RunPodLogger  # noqa: E402

if not _SDK_LEVEL_CHOSEN:
    RunPodLogger.level = "INFO"

__all__ = ["RUNPOD_CONFIG", "RunPodOptions", "handler", "main", "split_options"]

log = logging.getLogger(__name__)

_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class RunPodOptions(BaseModel):
    """The fields only the RunPod shim knows (the seed's streaming switches and its health action)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    action: Literal["health_check"] | None = None
    stream: bool = False
    stream_max_chars_per_chunk: int | None = Field(default=None, ge=50, le=1000)
    stream_crossfade_ms: int | None = Field(default=None, ge=0, le=2000)
    """The seed's bound, above `crossfade_ms`'s: a stream's crossfade is applied by `stream_pcm`."""
    stream_tail_ms: int | None = Field(default=None, ge=0)
    """Accepted and ignored, as the seed's handler did (a tail buffer it documented but never applied)."""


def split_options(fields: Mapping[str, Any]) -> tuple[RunPodOptions, dict[str, Any]]:
    """Take the RunPod-only fields out of `fields`; returns them validated, and the request fields
    translated for `parse_request` (`pcm_16` dropped; when streaming, the text always chunked, as the
    seed did whatever `enable_chunking` said, at `stream_max_chars_per_chunk` when given)."""
    ours = {name: fields[name] for name in RunPodOptions.model_fields if name in fields}
    rest = {name: value for name, value in fields.items() if name not in ours}
    try:
        options = RunPodOptions.model_validate(ours)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else "input"
        message = f"invalid request: {field}: {error['msg'].lower()} (got {echo(error['input'])})"
        raise InvalidRequest(message, field=field) from None
    if rest.get("output_format") == PCM_FORMAT:
        del rest["output_format"]  # the seed's default: raw PCM when streaming, opus otherwise
    elif options.stream and "output_format" in rest:
        raise InvalidRequest(
            f"invalid request: output_format: streaming sends {PCM_FORMAT!r} only "
            f"(got {echo(rest['output_format'])})",
            field="output_format",
        )
    if options.stream:
        _check_stream_fields(rest)
        rest["enable_chunking"] = True
        if options.stream_max_chars_per_chunk is not None:
            rest["max_chars_per_chunk"] = options.stream_max_chars_per_chunk
    return options, rest


def _check_stream_fields(fields: Mapping[str, Any]) -> None:
    for field in ("sample_rate", "bitrate"):
        if field in fields:
            raise InvalidRequest(
                f"invalid request: {field}: a stream is {PCM_FORMAT} at the engine's own rate, "
                "stated in each message's sample_rate; leave it out",
                field=field,
            )


def handler(job: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """RunPod's entry point: one job in the seed's shape; yields its result, or its stream's messages."""
    job_id = _NAME_UNSAFE.sub("-", str(job.get("id") or uuid.uuid4()))[:128]
    try:
        yield from _handle(job, job_id)
    except Exception as exc:  # the client gets a message; the log gets the traceback
        yield _error(job_id, exc)


def _handle(job: dict[str, Any], job_id: str) -> Iterator[dict[str, Any]]:
    fields = job.get("input")
    if not isinstance(fields, dict):
        raise InvalidRequest("invalid request: input: must be an object of request fields", field="input")
    options, request_fields = split_options(fields)
    if options.action == "health_check":
        checks = health.run_checks(skip_broker="the RunPod handler uses no broker", loaded=runtime.services)
        reply = health.report(checks, seed_names=True)
        for entry in reply["checks"].values():
            entry["details"] = public(entry["details"])
        yield reply
        return
    services = runtime.services()
    request = parse_request(request_fields, max_text_chars=services.settings.max_text_chars)
    chunks = len(text_chunks(request))
    mode = "stream" if options.stream else "batch"
    log.info("job %s start: %s engine=%s chunks=%d", job_id, mode, services.engine.name, chunks)
    if options.stream:
        yield from _stream(request, services, job_id, crossfade_ms=options.stream_crossfade_ms)
    else:
        yield _batch(job, request, services, job_id)


def _batch(job: dict[str, Any], request: TTSRequest, services: Services, job_id: str) -> dict[str, Any]:
    def progress(done: int, total: int) -> None:
        if _ON_RUNPOD:  # the SDK posts to RunPod's endpoint, which only exists there
            runpod.serverless.progress_update(job, {"chunk": done, "chunks": total})

    result = run_job(request, services, job_id=job_id, on_progress=progress)
    log_done(job_id, result)
    return result


def _stream(
    request: TTSRequest, services: Services, job_id: str, *, crossfade_ms: int | None
) -> Iterator[dict[str, Any]]:
    for message in stream_pcm(request, services, crossfade_ms=crossfade_ms):
        if message["status"] == "complete":
            log.info(
                "job %s done: engine=%s chunks=%s audio_s=%s",
                job_id, services.engine.name, message["total_chunks"], message["duration"],
            )  # fmt: skip
        yield message


def _error(job_id: str, exc: Exception) -> dict[str, Any]:
    """The seed's error shape; asks RunPod for a fresh worker when this one's GPU is poisoned."""
    if isinstance(exc, PermanentError):
        log.warning("job %s failed: %s", job_id, exc)
        return {"error": public(str(exc))}
    log.error("job %s failed: %s", job_id, exc, exc_info=exc)
    if isinstance(exc, EngineUnusable):
        # A generator handler's output cannot carry refresh_worker: the SDK reads it from the config.
        RUNPOD_CONFIG["refresh_worker"] = True
        return {"error": public(f"{exc} (this worker will be replaced)"), "refresh_worker": True}
    if isinstance(exc, TTSError):
        return {"error": public(f"{type(exc).__name__}: {exc}")}
    if isinstance(exc, SettingsError):
        return {"error": "the worker is misconfigured (a bad setting, named in its log)"}
    return {"error": f"internal error ({type(exc).__name__}); the worker's log has the details"}


_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s'\"()<>]+", re.IGNORECASE)
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])/(?:[\w.@+-]+/?)+")


def public(text: str) -> str:
    """`text` with URLs (hosts, credentials) and absolute paths replaced: what a caller may read."""
    return _ABSOLUTE_PATH.sub("<path>", _URL.sub("<url>", text))


_NOT_LOGGED = ("url", "audio_chunk")
"""Fields of a message that no log line may hold: a bearer credential, and the audio itself."""


async def _run_locally(job: dict[str, Any]) -> Any:
    """`--test_input`: the SDK's local mode calls a handler once and does not iterate a generator, so
    this runs ours through the SDK's own generator runner (as on RunPod) and prints each message as a
    JSON line. It returns what the SDK then logs: the error, or the messages without `_NOT_LOGGED`."""
    logged = []
    async for partial in rp_job.run_job_generator(handler, job):
        message = partial.get("output", partial)  # the runner wraps each message in {"output": ...}
        print(json.dumps(message), flush=True)
        if "error" in message:
            return {"error": message["error"]}
        logged.append({name: value for name, value in message.items() if name not in _NOT_LOGGED})
    return logged


RUNPOD_CONFIG: dict[str, Any] = {"handler": handler, "return_aggregate_stream": True}
"""What `main` starts the RunPod worker with (the seed's configuration)."""

_ON_RUNPOD = bool(os.environ.get("RUNPOD_WEBHOOK_GET_JOB"))  # RunPod's own variable, as its SDK reads it


USAGE = """usage: python -m tts_worker.runpod_handler [--warmup | --test_input JSON | --rp_serve_api]

Loads and warms the engine, then:
  (no flag)          serves RunPod jobs (on RunPod, where RUNPOD_WEBHOOK_GET_JOB is set)
  --warmup           exits: the seed's flag, to fill the model's caches ahead of traffic (no storage needed)
  --test_input JSON  runs one job here, as the runpod SDK's local mode does, and exits
  --rp_serve_api     serves the runpod SDK's local test API (its other --rp_* flags apply)"""


def main(argv: list[str] | None = None) -> None:
    """Load and warm the engine, then serve RunPod jobs (or run `--test_input` once and exit)."""
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(USAGE)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if "--warmup" in argv:  # fill the caches (e.g. at image build) and exit: no storage needed
            runtime.engine()
            return
        runtime.services()  # warm before the first job, as the Celery worker is
    except SettingsError as exc:
        raise SystemExit(f"tts_worker: bad setting: {exc}") from None
    except Exception as exc:
        raise SystemExit(f"tts_worker: cannot load the engine: {exc}") from None
    given = {arg.split("=")[0] for arg in argv}
    local = "--test_input" in given or not (_ON_RUNPOD or "--rp_serve_api" in given)  # as the SDK decides
    runpod.serverless.start({**RUNPOD_CONFIG, "handler": _run_locally} if local else RUNPOD_CONFIG)


if __name__ == "__main__":
    main()
