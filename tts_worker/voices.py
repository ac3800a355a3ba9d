"""Reference voices: names resolved inside AUDIO_VOICES_DIR only, and checked to be usable audio.

A voice name comes from the request, so it is treated as hostile: path parts, NUL bytes and symlinks
that lead out of the directory are refused, and the refusal lists the voices that do exist.
"""

from __future__ import annotations

from pathlib import Path

import soundfile

from tts_contract.errors import UnknownVoice, echo

__all__ = ["AUDIO_EXTENSIONS", "available_voices", "resolve_voice"]

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg")
"""Tried in this order when a name comes without an extension."""


def resolve_voice(name: str, voices_dir: Path, *, field: str, max_seconds: float) -> Path:
    """The audio file `name` designates inside `voices_dir`; raises `UnknownVoice` naming `field`."""

    def refuse(why: str) -> UnknownVoice:
        return UnknownVoice(f"{field}: {why}; {_known(voices_dir, max_seconds)}", field=field)

    if not name or "\x00" in name or Path(name).name != name or name in (".", ".."):
        raise refuse(f"must be a plain file name, got {echo(name)}")
    root = voices_dir.resolve()
    candidates = [name] if Path(name).suffix.lower() in AUDIO_EXTENSIONS else []
    candidates += [name + ext for ext in AUDIO_EXTENSIONS]
    for candidate in candidates:
        path = _file_inside(root, candidate)
        if path is None:
            continue
        if not path.is_relative_to(root):
            raise refuse(f"{echo(name)} leads outside AUDIO_VOICES_DIR")
        problem = _audio_problem(path, max_seconds=max_seconds)
        if problem:
            raise refuse(problem)
        return path
    # Never the directory's path: the caller needs the name, not the layout of the worker's disk.
    raise refuse(f"no voice {echo(name)} in AUDIO_VOICES_DIR")


def _file_inside(root: Path, name: str) -> Path | None:
    """`root / name` resolved, if it is a file (wherever it leads); None when it is not, or cannot be
    looked at (a name too long for the file system, a symlink loop, no permission)."""
    try:
        path = (root / name).resolve()
        return path if path.is_file() else None
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop, before Python 3.13
        return None


def available_voices(voices_dir: Path, *, max_seconds: float) -> list[str]:
    """File names of the voices in `voices_dir` that a request may name, sorted: audio files that
    stay inside the directory (symlinks included) and pass the checks of `resolve_voice`."""
    if not voices_dir.is_dir():
        return []
    root = voices_dir.resolve()
    usable = []
    for entry in voices_dir.iterdir():
        path = _file_inside(root, entry.name) if entry.suffix.lower() in AUDIO_EXTENSIONS else None
        if path and path.is_relative_to(root) and _audio_problem(path, max_seconds=max_seconds) is None:
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
        # libsndfile's message names the absolute path; its error string alone does not.
        return f"{path.name} is not readable audio ({getattr(exc, 'error_string', '') or type(exc).__name__})"
    if info.frames == 0:
        return f"{path.name} holds no audio"
    if info.duration > max_seconds:
        return (
            f"{path.name} lasts {info.duration:.1f} s; reference voices must be at most "
            f"{max_seconds:g} s (MAX_VOICE_SECONDS)"
        )
    return None
