"""`indextts25`: IndexTTS-2.5 (voice cloning, emotion, five languages, a speed control) from
`indextts25-inference`.

About a third faster than IndexTTS2 (RTF 0.21 against 0.33 on an RTX 4090, as published) and speaks
Arabic, Chinese, English, Japanese and Spanish; it has no emotion-from-text model. What this adds
around `IndexTTS25.stream`:
- audio in memory: the chunks of `stream` (silences between segments included) joined into 22050 Hz
  int16, never a file (`synthesize` only writes files);
- the request's `language` (default English, where the library's own is Spanish) and `speed`
  (2.0 = twice as fast) as the library's `lang` and `speed`, which is a duration factor (2.0 = twice
  as long): hence its inverse, within the rates it follows (faster than 1.25 it saturates);
- the emotion vector normalised as for IndexTTS2 (the same eight emotions, mixed the same way);
- `MAX_TOKENS_PER_SEGMENT` as `segment_tokens`, halved on CUDA out of memory (see `cuda`).
The library keys its voice caches on the file's path and mtime, so a replaced file is analysed again.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from tts_contract.errors import InvalidRequest, UnreadableText
from tts_worker.engines.base import NO_OPTIONS, Audio, GenerationOptions, VoiceInputs
from tts_worker.engines.cuda import shrinking_on_oom
from tts_worker.engines.indextts2 import normalize_emo_vector
from tts_worker.settings import Settings

__all__ = ["DEFAULT_LANGUAGE", "IndexTTS25Engine"]

log = logging.getLogger(__name__)

DEFAULT_LANGUAGE = "en"


class IndexTTS25Engine:
    """The `indextts25` engine."""

    name = "indextts25"
    clones_voices = True
    sample_rate = 22050
    languages: tuple[str, ...] | None = ("ar", "en", "es", "ja", "zh")
    speeds = (0.5, 1.25)

    def __init__(self, settings: Settings) -> None:
        if settings.attn_backend == "sage" or settings.use_accel or settings.use_deepspeed:
            raise RuntimeError(
                "TTS_ENGINE=indextts25 takes ATTN_BACKEND=flash (with flash-attn installed) as its only "
                "accelerator: unset ATTN_BACKEND=sage, USE_ACCEL and USE_DEEPSPEED"
            )
        try:
            from indextts25 import IndexTTS25
        except ImportError as exc:
            raise RuntimeError(
                f"TTS_ENGINE=indextts25 needs the gpu25 extra: pip install '.[gpu25]' ({exc})"
            ) from exc
        self._model = IndexTTS25(
            model_dir=settings.checkpoints_dir,
            attn_backend="flash" if settings.attn_backend == "flash" else "sdpa",
            fp16=settings.use_fp16,
            device=settings.tts_device,
        )
        self.device = str(self._model._tts.device)  # where the library put it (its own choice if unset)
        self._max_tokens = settings.max_tokens_per_segment

    def synthesize(self, text: str, voice: VoiceInputs, options: GenerationOptions = NO_OPTIONS) -> Audio:
        """Speak `text` in `voice`; raises GPUOutOfMemory or EngineUnusable for CUDA failures."""
        if voice.speaker_voice is None:
            raise InvalidRequest(
                "speaker_voice: indextts25 speaks in a cloned voice: name one (or set DEFAULT_VOICE)",
                field="speaker_voice",
            )
        if voice.use_emo_text:
            raise InvalidRequest(
                "use_emo_text: indextts25 has no model that reads the emotion from the text; "
                "give emo_vector or emo_audio_prompt instead",
                field="use_emo_text",
            )
        arguments = stream_arguments(voice, options)
        return shrinking_on_oom(lambda tokens: self._speak(text, tokens, arguments), self._max_tokens)

    def _speak(self, text: str, tokens: int, arguments: dict[str, Any]) -> Audio:
        chunks = [chunk.audio for chunk in self._model.stream(text, segment_tokens=tokens, **arguments)]
        if not chunks:  # what `stream` does with text that has nothing to pronounce
            raise UnreadableText(f"text: IndexTTS-2.5 found nothing to speak in {text[:60]!r}")
        # The chunks are the library's int16 samples divided by 32767: exactly back again.
        audio: Audio = np.rint(np.concatenate(chunks) * 32767).astype(np.int16)
        return audio


def stream_arguments(voice: VoiceInputs, options: GenerationOptions) -> dict[str, Any]:
    """`IndexTTS25.stream(...)` keyword arguments (besides text and segment size) for one request."""
    assert voice.speaker_voice is not None
    arguments: dict[str, Any] = {
        "voice": str(voice.speaker_voice),
        "lang": options.language or DEFAULT_LANGUAGE,
        "speed": 1.0 / options.speed,  # the library's is a duration factor
        "emotion": str(voice.emo_audio_prompt) if voice.emo_audio_prompt else None,
        "emotion_strength": voice.emo_alpha,
        "include_silence": True,  # the gaps between segments, as IndexTTS2 leaves them
        "use_random": voice.use_random,
    }
    sampling = {
        "emo_vector": normalize_emo_vector(voice.emo_vector) if voice.emo_vector else None,
        "interval_silence": options.interval_silence,
        "temperature": options.temperature,
        "top_p": options.top_p,
        "top_k": options.top_k,
        "max_mel_tokens": options.max_mel_tokens,
    }
    arguments.update({key: value for key, value in sampling.items() if value is not None})
    return arguments
