"""`indextts2`: IndexTTS2 (zero-shot voice cloning with emotion control) from `indextts2-inference`.

The only module that touches torch or `indextts`. One model per worker process, built from the
settings and warmed up before the process takes a job. What it adds around `IndexTTS2.infer`:
- audio in memory (`output_path=None` -> 22050 Hz int16), never a temporary file;
- `MAX_TOKENS_PER_SEGMENT` really passed as `max_text_tokens_per_segment`;
- the web UI's emotion-vector normalisation, which `infer` itself does not apply;
- conditionings keyed on the voice file's content, several kept (see `voice_cache`);
- CUDA out of memory: free the cache and retry the chunk with halved segments, then fail as
  transient; a CUDA error that poisons the context (device-side assert) raises `EngineUnusable`
  so the caller replaces the process;
- text in which IndexTTS2 finds nothing to speak (2.1.1 then fails in `torch.cat` of no segments)
  raises `UnreadableText`, a permanent error, instead of a bare RuntimeError;
- options whose packages are missing (ATTN_BACKEND=sage, flash, USE_ACCEL) refused before loading.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tts_contract.errors import InvalidRequest, UnreadableText
from tts_worker.engines.base import NO_OPTIONS, Audio, GenerationOptions, VoiceInputs
from tts_worker.engines.cuda import shrinking_on_oom
from tts_worker.engines.voice_cache import ConditioningCache
from tts_worker.settings import Settings

__all__ = ["EMOTION_BIAS", "IndexTTS2Engine", "missing_packages", "normalize_emo_vector"]

log = logging.getLogger(__name__)

EMOTION_BIAS = (0.9375, 0.875, 1.0, 1.0, 0.9375, 0.9375, 0.6875, 0.5625)
"""The web UI's per-emotion weights (happy ... calm): it damps those that sound strange when strong."""
MAX_EMOTION_SUM = 0.8


def normalize_emo_vector(vector: Sequence[float]) -> list[float]:
    """What IndexTTS2's web UI does to an emotion vector before `infer`: weight each emotion by
    EMOTION_BIAS, then scale the whole down so that it sums to at most 0.8."""
    weighted = [value * bias for value, bias in zip(vector, EMOTION_BIAS, strict=True)]
    total = sum(weighted)
    return [value * MAX_EMOTION_SUM / total for value in weighted] if total > MAX_EMOTION_SUM else weighted


class IndexTTS2Engine:
    """The `indextts2` engine."""

    name = "indextts2"
    clones_voices = True
    languages: tuple[str, ...] | None = ("en", "zh")  # it tells them apart in the text itself
    speeds = (1.0, 1.0)
    sample_rate = 22050

    def __init__(self, settings: Settings) -> None:
        problems = missing_packages(settings)
        if problems:  # before minutes of loading, and named by our variables rather than upstream's
            raise RuntimeError("; ".join(problems))
        if settings.use_deepspeed and importlib.util.find_spec("deepspeed") is None:
            log.warning("USE_DEEPSPEED=true but deepspeed is not installed: IndexTTS2 runs without it")
        try:
            from indextts.infer_v2 import IndexTTS2
        except ImportError as exc:
            raise RuntimeError(
                f"TTS_ENGINE=indextts2 needs the gpu extra: pip install '.[gpu]' ({exc})"
            ) from exc
        self._model = IndexTTS2(**model_arguments(settings))
        self.device = str(self._model.device)
        self._max_tokens = settings.max_tokens_per_segment
        self.voices = ConditioningCache(self._model, size=settings.voice_cache_size)

    def synthesize(self, text: str, voice: VoiceInputs, options: GenerationOptions = NO_OPTIONS) -> Audio:
        """Speak `text` in `voice`; raises GPUOutOfMemory or EngineUnusable for CUDA failures."""
        if voice.speaker_voice is None:
            raise InvalidRequest(
                "speaker_voice: indextts2 speaks in a cloned voice: name one (or set DEFAULT_VOICE)",
                field="speaker_voice",
            )
        speaker, emotion = voice.speaker_voice, _emotion_reference(voice)
        digests = self.voices.prepare(speaker, emotion)
        arguments = infer_arguments(voice, options)
        audio = shrinking_on_oom(lambda tokens: self._infer(text, tokens, arguments), self._max_tokens)
        self.voices.keep(speaker, emotion, digests)
        return audio

    def _infer(self, text: str, tokens: int, arguments: dict[str, Any]) -> Audio:
        try:
            result = self._model.infer(
                text=text, output_path=None, max_text_tokens_per_segment=tokens, **arguments
            )
        except (RuntimeError, ValueError) as exc:  # which one depends on the torch release
            if _no_segments(exc):
                raise _unreadable(text) from exc
            raise
        if result is None:  # what `infer` returns when its generator yields nothing
            raise _unreadable(text)
        rate, samples = result
        if rate != self.sample_rate:
            raise RuntimeError(f"IndexTTS2 returned {rate} Hz audio; this engine expects {self.sample_rate}")
        return np.asarray(samples, dtype=np.int16).reshape(-1)


def missing_packages(settings: Settings) -> list[str]:
    """What the settings ask for that is not installed and would make loading fail (no import)."""
    wanted = []
    if settings.attn_backend == "sage":
        wanted.append(("sageattention", "ATTN_BACKEND=sage", "pip install sageattention"))
    if settings.attn_backend == "flash" or settings.use_accel:
        what = "ATTN_BACKEND=flash" if settings.attn_backend == "flash" else "USE_ACCEL=true"
        wanted.append(("flash_attn", what, "pip install flash-attn, built for this torch and CUDA"))
    return [
        f"{what} needs the {module} package, which is not installed ({install}; the image has none)"
        for module, what, install in wanted
        if importlib.util.find_spec(module) is None
    ]


def model_arguments(settings: Settings) -> dict[str, Any]:
    """`IndexTTS2(...)` keyword arguments from the settings."""
    arguments: dict[str, Any] = {
        "model_dir": str(settings.checkpoints_dir),
        "cfg_path": str(settings.checkpoints_dir / "config.yaml"),
        "use_fp16": settings.use_fp16,
        "device": settings.tts_device,
        "use_cuda_kernel": settings.use_cuda_kernel,
        "use_deepspeed": settings.use_deepspeed,
        "use_accel": settings.use_accel,
        "use_torch_compile": settings.use_torch_compile,
    }
    if settings.attn_backend:  # only recent releases know the argument
        arguments["attn_backend"] = settings.attn_backend
    return arguments


def infer_arguments(voice: VoiceInputs, options: GenerationOptions) -> dict[str, Any]:
    """`IndexTTS2.infer(...)` keyword arguments (besides text and segment size) for one request."""
    arguments: dict[str, Any] = {
        "spk_audio_prompt": str(voice.speaker_voice),
        "emo_audio_prompt": str(voice.emo_audio_prompt) if voice.emo_audio_prompt else None,
        "emo_alpha": voice.emo_alpha,
        "emo_vector": normalize_emo_vector(voice.emo_vector) if voice.emo_vector else None,
        "use_emo_text": voice.use_emo_text,
        # Blank means "none", as in the web UI: IndexTTS2 then reads the emotion from the text itself
        # (it replaces only None by the text, and would analyse "" as it is).
        "emo_text": voice.emo_text if voice.emo_text and voice.emo_text.strip() else None,
        "use_random": voice.use_random,
    }
    if options.interval_silence is not None:
        arguments["interval_silence"] = options.interval_silence
    generation = {
        "temperature": options.temperature,
        "top_p": options.top_p,
        "top_k": options.top_k,
        "max_mel_tokens": options.max_mel_tokens,
    }
    arguments.update({key: value for key, value in generation.items() if value is not None})
    return arguments


def _emotion_reference(voice: VoiceInputs) -> Path:
    """The file IndexTTS2 takes the emotion from: the emotion prompt, unless an emotion vector or the
    text overrides it (then, as without one, the speaker's own voice)."""
    assert voice.speaker_voice is not None
    overridden = voice.use_emo_text or voice.emo_vector is not None
    return voice.emo_audio_prompt if voice.emo_audio_prompt and not overridden else voice.speaker_voice


def _no_segments(exc: Exception) -> bool:
    # indextts2-inference 2.1.1 concatenates the audio of every segment with `torch.cat(wavs)`,
    # which fails so when the tokenizer made no segment of the text (a zero-width space, say):
    # with a RuntimeError in older torch releases, a ValueError in 2.9.
    return "expected a non-empty list of Tensors" in str(exc)


def _unreadable(text: str) -> UnreadableText:
    return UnreadableText(f"text: IndexTTS2 found nothing to speak in {text[:60]!r}")
