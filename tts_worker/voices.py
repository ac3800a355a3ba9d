"""Reference voices: names resolved inside AUDIO_VOICES_DIR only, and checked to be usable audio.

A voice name comes from the request, so it is treated as hostile: path parts, NUL bytes and symlinks
that lead out of the directory are refused, and the refusal lists the voices that do exist.
"""

from __future__ import annotations

from pathlib import Path

import soundfile

from producer.errors import UnknownVoice

__all__ = ["AUDIO_EXTENSIONS", "available_voices", "resolve_voice"]

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg")
"""Tried in this order when a name comes without an extension."""


def resolve_voice(name: str, voices_dir: Path, *, field: str, max_seconds: float) -> Path:
    """The audio file `name` designates inside `voices_dir`; raises `UnknownVoice` naming `field`."""
    if not name or "\x00" in name or Path(name).name != name or name in (".", ".."):
        raise UnknownVoice(f"{field}: must be a plain file name, got {name!r}", field=field)
    root = voices_dir.resolve()
    candidates = [name] if Path(name).suffix.lower() in AUDIO_EXTENSIONS else []
    candidates += [name + ext for ext in AUDIO_EXTENSIONS]
    for candidate in candidates:
        path = (root / candidate).resolve()
        if path.is_file():
            if not path.is_relative_to(root):
                raise UnknownVoice(f"{field}: {name!r} leads outside AUDIO_VOICES_DIR", field=field)
            _check_audio(path, field=field, max_seconds=max_seconds)
            return path
    raise UnknownVoice(f"{field}: no voice {name!r} in {voices_dir}; {_known(voices_dir)}", field=field)


def available_voices(voices_dir: Path) -> list[str]:
    """File names of the audio files in `voices_dir`, sorted."""
    if not voices_dir.is_dir():
        return []
    return sorted(p.name for p in voices_dir.iterdir() if p.suffix.lower() in AUDIO_EXTENSIONS)


def _known(voices_dir: Path) -> str:
    names = available_voices(voices_dir)
    if not names:
        return "no voices are installed there"
    shown = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
    return f"available: {shown}"


def _check_audio(path: Path, *, field: str, max_seconds: float) -> None:
    """Refuse files that are not audio, are empty or are too long, before the engine sees them."""
    try:
        info = soundfile.info(str(path))
    except (soundfile.LibsndfileError, RuntimeError) as exc:
        raise UnknownVoice(f"{field}: {path.name} is not readable audio ({exc})", field=field) from None
    if info.frames == 0:
        raise UnknownVoice(f"{field}: {path.name} holds no audio", field=field)
    if info.duration > max_seconds:
        raise UnknownVoice(
            f"{field}: {path.name} lasts {info.duration:.1f} s; reference voices must be at most "
            f"{max_seconds:g} s (MAX_VOICE_SECONDS)",
            field=field,
        )
