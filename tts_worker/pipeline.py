"""The synthesis pipeline: chunk -> synthesize -> join -> encode -> store, as plain Python.

No Celery here: the Celery task and the RunPod handler are both thin callers of `run_job`.
Encoding overlaps synthesis: each chunk's audio goes to ffmpeg as soon as the crossfade with the
next can no longer change it, so a long job's encode mostly happens while later chunks are spoken.
Jobs are idempotent: the object key is deterministic and records the job id, so a job delivered
again after its worker died (or after its lease lapsed) returns the stored result instead of
synthesising twice. A job never replaces audio another job stored under its name unless it asks to
(`overwrite`): it fails with `SessionTaken` before synthesising when it can tell, and the store
refuses the write atomically when two race.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from tts_contract.errors import InvalidRequest, SessionTaken, UnreadableText
from tts_contract.formats import FORMATS, AudioFormat
from tts_contract.schema import TTSRequest, object_name
from tts_worker.audio import StreamJoiner
from tts_worker.chunking import text_chunks
from tts_worker.encoding import Encoder
from tts_worker.engines import Audio, Engine, GenerationOptions, VoiceInputs
from tts_worker.settings import Settings
from tts_worker.storage import KeyTaken, Storage
from tts_worker.voices import resolve_voice

__all__ = [
    "Services",
    "generation_options",
    "joined_pieces",
    "log_done",
    "run_job",
    "voice_inputs",
]

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
"""Called as (chunks done, chunks in all) after each chunk."""


@dataclass(frozen=True)
class Services:
    """What a job needs, made once per worker process."""

    settings: Settings
    engine: Engine
    storage: Storage


def run_job(
    request: TTSRequest, services: Services, *, job_id: str, on_progress: ProgressCallback | None = None
) -> dict[str, Any]:
    """Synthesise one validated request, store the audio and return the result dict."""
    settings, fmt = services.settings, FORMATS[request.output_format]
    filename = object_name(request, job_id) + fmt.extension
    key = settings.s3_key_prefix + filename
    expires = request.presign_expires_s or settings.presign_expires_s

    voice = voice_inputs(request, settings)
    generation_options(request, services.engine)  # a language or rate it cannot do fails here, at once
    stored = services.storage.metadata(key)
    ours = stored is not None and stored.get("job-id") == job_id  # stored by an earlier delivery
    if ours and (reused := _decode_meta(stored or {})):
        return _result(services, key=key, filename=filename, expires=expires, meta=reused)
    if stored is not None and not ours and not request.overwrite:
        raise _taken(request, filename, job_id)

    started = time.perf_counter()
    chunks = text_chunks(request)
    with Encoder(
        input_rate=services.engine.sample_rate, fmt=fmt, sample_rate=request.effective_sample_rate,
        bitrate=request.effective_bitrate, ffmpeg=settings.ffmpeg_binary,
    ) as encoder:  # fmt: skip
        samples = _synthesize(chunks, request, services.engine, voice, on_progress, encoder.write)
        synthesized = time.perf_counter()
        data = encoder.finish()
    encoded = time.perf_counter()
    meta = _metadata(request, services.engine, fmt, samples=samples, chunks=len(chunks))
    meta["timings"] = {
        "synthesis_s": round(synthesized - started, 3),
        "encode_s": round(encoded - synthesized, 3),
    }
    meta["rtf"] = round((synthesized - started) / meta["duration"], 4) if meta["duration"] else None
    try:
        services.storage.put(
            key,
            data,
            content_type=fmt.content_type,
            metadata=_encode_meta(meta, job_id),
            replace=request.overwrite or ours,
        )
    except KeyTaken:
        # Taken since the look-up: by another job, or by this one (a try whose answer was lost).
        if (services.storage.metadata(key) or {}).get("job-id") != job_id:
            raise _taken(request, filename, job_id) from None
    meta["timings"]["upload_s"] = round(time.perf_counter() - encoded, 3)
    return _result(services, key=key, filename=filename, expires=expires, meta=meta)


def _taken(request: TTSRequest, filename: str, job_id: str) -> SessionTaken:
    field = "session_id" if request.session_id else "task_id"
    return SessionTaken(
        f"{field}: {filename} holds audio another job stored; nothing was stored for job {job_id} "
        "(send overwrite: true to replace it, or choose another name)"
    )


def log_done(job_id: str, result: dict[str, Any]) -> None:
    """The job's closing log line: what an operator needs, never the text nor the presigned URL."""
    meta = result["metadata"]
    log.info(
        "job %s done: engine=%s chunks=%s audio_s=%s rtf=%s",
        job_id, meta["engine"], meta["chunks"], meta["duration"], meta.get("rtf"),
    )  # fmt: skip


def _synthesize(
    chunks: list[str],
    request: TTSRequest,
    engine: Engine,
    voice: VoiceInputs,
    on_progress: ProgressCallback | None,
    write: Callable[[Audio], None],
) -> int:
    """Speak the chunks in turn, handing each piece to `write` as soon as it is final (so the encoder
    works while the next chunk is spoken). Returns how many samples were written."""
    samples = 0
    for done, piece in enumerate(joined_pieces(chunks, request, engine, voice), start=1):
        write(piece)
        samples += len(piece)
        if on_progress:
            on_progress(done, len(chunks))
    return samples


def joined_pieces(
    chunks: list[str],
    request: TTSRequest,
    engine: Engine,
    voice: VoiceInputs,
    *,
    crossfade_ms: int | None = None,
) -> Iterator[Audio]:
    """The request's audio, crossfaded, one piece per chunk as soon as that chunk is spoken: each piece
    holds the samples no later chunk can change, the last one what the joiner held back too.
    `crossfade_ms` replaces the request's; `enable_crossfade: false` turns either off."""
    options = generation_options(request, engine)
    chosen = request.crossfade_ms if crossfade_ms is None else crossfade_ms
    joiner = StreamJoiner(
        sample_rate=engine.sample_rate, crossfade_ms=chosen if request.enable_crossfade else 0
    )
    for index in range(len(chunks)):
        piece = joiner.push(_speak(engine, chunks, index, voice, options))
        yield np.concatenate([piece, joiner.flush()]) if index == len(chunks) - 1 else piece


def _speak(
    engine: Engine, chunks: list[str], index: int, voice: VoiceInputs, options: GenerationOptions
) -> Audio:
    """Synthesise `chunks[index]`; raises `UnreadableText` when the engine makes no sound of it."""
    audio = engine.synthesize(chunks[index], voice, options)
    if len(audio) == 0:
        where = f"chunk {index + 1} of {len(chunks)}"
        raise UnreadableText(f"text: {engine.name} produced no audio for {where} ({chunks[index][:60]!r})")
    return audio


def voice_inputs(request: TTSRequest, settings: Settings) -> VoiceInputs:
    """The engine's voice inputs, with the voice files resolved and checked (by every engine, so that
    a bad name fails the same way everywhere)."""

    def resolve(name: str | None, field: str) -> Any:
        if name is None:
            return None
        return resolve_voice(
            name, settings.audio_voices_dir, field=field, max_seconds=settings.max_voice_seconds
        )

    return VoiceInputs(
        speaker_voice=resolve(request.speaker_voice or settings.default_voice, "speaker_voice"),
        emo_audio_prompt=resolve(request.emo_audio_prompt, "emo_audio_prompt"),
        emo_vector=tuple(request.emo_vector) if request.emo_vector else None,
        emo_alpha=request.emo_alpha,
        use_emo_text=request.use_emo_text,
        emo_text=request.emo_text,
        use_random=request.use_random,
    )


def generation_options(request: TTSRequest, engine: Engine) -> GenerationOptions:
    """The request's language, rate and sampling options, once the engine is known to speak that
    language at that rate (InvalidRequest, naming the field, when it does not)."""
    if request.language and engine.languages is not None and request.language not in engine.languages:
        raise InvalidRequest(
            f"language: TTS_ENGINE={engine.name} speaks {', '.join(engine.languages)}, "
            f"not {request.language!r} (indextts25 speaks ar, en, es, ja and zh)",
            field="language",
        )
    slowest, fastest = engine.speeds
    if not slowest <= request.speed <= fastest:
        can = f"from {slowest} to {fastest}" if slowest < fastest else f"only at {slowest}"
        raise InvalidRequest(
            f"speed: TTS_ENGINE={engine.name} speaks {can}, not at {request.speed}", field="speed"
        )
    return GenerationOptions(
        language=request.language,
        speed=request.speed,
        interval_silence=request.interval_silence,
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=request.top_k,
        max_mel_tokens=request.max_mel_tokens,
    )


def _metadata(
    request: TTSRequest, engine: Engine, fmt: AudioFormat, *, samples: int, chunks: int
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "sample_rate": request.effective_sample_rate,
        "codec": fmt.name,
        "bitrate": request.effective_bitrate,
        "duration": round(samples / engine.sample_rate, 3),
        "device": engine.device,
        "engine": engine.name,
        "chunks": chunks,
    }
    asked_for_voice = request.speaker_voice or request.emo_audio_prompt or request.emo_vector
    if not engine.clones_voices and asked_for_voice:
        meta["voice_cloning"] = False
        meta["note"] = f"{engine.name} speaks with its own voice: speaker and emotion inputs were not used"
    return meta


def _encode_meta(meta: dict[str, Any], job_id: str) -> dict[str, str]:
    """S3 user metadata (ASCII strings) from which a redelivered job rebuilds its result: every
    field of `meta` as JSON, so that types survive the round trip."""
    return {"job-id": job_id, **{key.replace("_", "-"): json.dumps(value) for key, value in meta.items()}}


def _decode_meta(stored: dict[str, str]) -> dict[str, Any] | None:
    """The result metadata recorded with the audio (None when it cannot be read: the job is done again).
    Its timings are those of the delivery that made it; nothing was uploaded this time, so `upload_s`
    is 0."""
    try:
        meta = {key.replace("-", "_"): json.loads(value) for key, value in stored.items() if key != "job-id"}
    except ValueError:
        return None
    meta["timings"] = {**meta.get("timings", {}), "upload_s": 0.0}
    return {**meta, "reused": True}


def _result(
    services: Services, *, key: str, filename: str, expires: int, meta: dict[str, Any]
) -> dict[str, Any]:
    url = services.storage.url(key, expires_s=expires)
    return {"status": "completed", "url": url, "filename": filename, "s3_key": key, "metadata": meta}
