"""The engine protocol: what the pipeline needs from a text-to-speech model, and nothing more."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

__all__ = ["NO_OPTIONS", "Audio", "Engine", "GenerationOptions", "VoiceInputs"]

Audio = npt.NDArray[np.int16]
"""Mono 16-bit PCM at the engine's `sample_rate`."""


@dataclass(frozen=True)
class VoiceInputs:
    """How a chunk should sound: the voice to clone and the emotion, already resolved and validated."""

    speaker_voice: Path | None = None
    emo_audio_prompt: Path | None = None
    emo_vector: tuple[float, ...] | None = None
    emo_alpha: float = 1.0
    use_emo_text: bool = False
    emo_text: str | None = None
    use_random: bool = False


@dataclass(frozen=True)
class GenerationOptions:
    """How to speak: language and rate (already checked against the engine's `languages` and
    `speeds`), and the sampling options of the IndexTTS engines; None keeps the engine's default."""

    language: str | None = None
    speed: float = 1.0
    interval_silence: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_mel_tokens: int | None = None


NO_OPTIONS = GenerationOptions()


class Engine(Protocol):
    """A loaded model. One instance per worker process; not shared between threads."""

    name: str
    """As in TTS_ENGINE and the result's metadata."""
    sample_rate: int
    """The rate of the audio `synthesize` returns."""
    device: str
    """Where it runs, e.g. "cpu" or "cuda:0"."""
    clones_voices: bool
    """False when `speaker_voice` and the emotion inputs are ignored (said so in the result)."""
    languages: tuple[str, ...] | None
    """The languages it speaks, as the request's `language` names them; None for any (tone)."""
    speeds: tuple[float, float]
    """The speaking rates it can be asked for, lowest and highest; (1.0, 1.0) for its own only."""

    def synthesize(self, text: str, voice: VoiceInputs, options: GenerationOptions = ...) -> Audio:
        """Speak one chunk of text. Returns mono int16 samples (may be empty for unreadable text)."""
        ...
