"""`tone`: deterministic synthetic audio at near-zero cost, for benchmarks and fast tests.

Each character becomes a short tone (a space, silence), about one second of audio per 15 characters,
with a Hann envelope per character so that it is click-free like speech. `TONE_RTF` makes it sleep
for that fraction of the audio's duration, to stand in for a slower engine in tests and benchmarks.
"""

from __future__ import annotations

import time

import numpy as np

from tts_worker.engines.base import NO_OPTIONS, Audio, GenerationOptions, VoiceInputs

__all__ = ["ToneEngine"]

CHARS_PER_SECOND = 15


class ToneEngine:
    """The `tone` engine: pitch follows the character code; no voice cloning."""

    name = "tone"
    device = "cpu"
    clones_voices = False
    languages: tuple[str, ...] | None = None
    speeds = (1.0, 1.0)

    def __init__(self, *, sample_rate: int = 22050, rtf: float = 0.0) -> None:
        self.sample_rate = sample_rate
        self.rtf = rtf

    def synthesize(self, text: str, voice: VoiceInputs, options: GenerationOptions = NO_OPTIONS) -> Audio:
        """One tone per character of `text`; the same text always gives the same samples."""
        per_char = self.sample_rate // CHARS_PER_SECOND
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        freqs = np.where(np.char.isspace(list(text)), 0.0, 180.0 + (codes % 48) * 12.5)
        phase = np.cumsum(np.repeat(freqs, per_char) * (2 * np.pi / self.sample_rate))
        envelope = np.tile(np.hanning(per_char), len(text))
        audio = (0.3 * 32767 * envelope * np.sin(phase)).astype(np.int16)
        if self.rtf:
            time.sleep(self.rtf * len(audio) / self.sample_rate)
        return audio
