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

    def refuse(why: str) -> UnknownVoice:
        return UnknownVoice(f"{field}: {why}; {_known(voices_dir, max_seconds)}", field=field)

    if not name or "\x00" in name or Path(name).name != name or name in (".", ".."):
        raise refuse(f"must be a plain file name, got {name!r}")
    root = voices_dir.resolve()
    candidates = [name] if Path(name).suffix.lower() in AUDIO_EXTENSIONS else []
    candidates += [name + ext for ext in AUDIO_EXTENSIONS]
    for candidate in candidates:
        path = (root / candidate).resolve()
        if path.is_file():
            if not path.is_relative_to(root):
                raise refuse(f"{name!r} leads outside AUDIO_VOICES_DIR")
            problem = _audio_problem(path, max_seconds=max_seconds)
            if problem:
                raise refuse(problem)
            return path
    raise refuse(f"no voice {name!r} in {voices_dir}")


def available_voices(voices_dir: Path, *, max_seconds: float) -> list[str]:
    """File names of the voices in `voices_dir` that a request may name, sorted: audio files that
    stay inside the directory (symlinks included) and pass the checks of `resolve_voice`."""
    if not voices_dir.is_dir():
        return []
    root = voices_dir.resolve()
    usable = []
    for entry in voices_dir.iterdir():
        path = entry.resolve()
        inside = entry.suffix.lower() in AUDIO_EXTENSIONS and path.is_file() and path.is_relative_to(root)
        if inside and _audio_problem(path, max_seconds=max_seconds) is None:
            usable.append(entry.name)
    return sorted(usable)


def _known(voices_dir: Path, max_seconds: float) -> str:
    names = available_voices(voices_dir, max_seconds=max_seconds)
    if not names:
        return "no voices are installed there"
    shown = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
    return f"available: {shown}"


def _audio_problem(path: Path, *, max_seconds: float) -> str | None:
    """Why the file cannot serve as a reference voice (not audio, empty, too long), or None."""
    try:
        info = soundfile.info(str(path))
    except (soundfile.LibsndfileError, RuntimeError) as exc:
        return f"{path.name} is not readable audio ({exc})"
    if info.frames == 0:
        return f"{path.name} holds no audio"
    if info.duration > max_seconds:
        return (
            f"{path.name} lasts {info.duration:.1f} s; reference voices must be at most "
            f"{max_seconds:g} s (MAX_VOICE_SECONDS)"
        )
    return None
