"""Encoding PCM into the output format, in memory.

Lossy formats go through ffmpeg over pipes (no temporary files). WAV and FLAC are written by
libsndfile into memory instead, because ffmpeg cannot seek back on a pipe to fill in their headers'
lengths; ffmpeg still resamples them when the output rate differs from the engine's.
"""

from __future__ import annotations

import io
import subprocess

import numpy as np
import soundfile

from producer.errors import EncodingError
from producer.formats import AudioFormat
from tts_worker.engines.base import Audio

__all__ = ["encode", "resample"]


def encode(
    audio: Audio,
    *,
    input_rate: int,
    fmt: AudioFormat,
    sample_rate: int,
    bitrate: str | None,
    ffmpeg: str = "ffmpeg",
) -> bytes:
    """Mono int16 `audio` at `input_rate` -> the bytes of a complete file in `fmt`."""
    if fmt.lossless:
        pcm = resample(audio, input_rate=input_rate, sample_rate=sample_rate, ffmpeg=ffmpeg)
        buffer = io.BytesIO()
        soundfile.write(buffer, pcm, sample_rate, format=fmt.name.upper(), subtype="PCM_16")
        return buffer.getvalue()
    options = ["-c:a", fmt.encoder, "-ar", str(sample_rate)]
    if bitrate:
        options += ["-b:a", bitrate]
    return _ffmpeg(audio, input_rate=input_rate, options=[*options, "-f", fmt.muxer], ffmpeg=ffmpeg)


def resample(audio: Audio, *, input_rate: int, sample_rate: int, ffmpeg: str = "ffmpeg") -> Audio:
    """The same audio at `sample_rate`, resampled by ffmpeg (returned as is when the rates match)."""
    if input_rate == sample_rate:
        return audio
    raw = _ffmpeg(
        audio, input_rate=input_rate, options=["-ar", str(sample_rate), "-f", "s16le"], ffmpeg=ffmpeg
    )
    return np.frombuffer(raw, dtype=np.int16)


def _ffmpeg(audio: Audio, *, input_rate: int, options: list[str], ffmpeg: str) -> bytes:
    command = [
        ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error",
        "-f", "s16le", "-ar", str(input_rate), "-ac", "1", "-i", "pipe:0",
        *options, "pipe:1",
    ]  # fmt: skip
    try:
        done = subprocess.run(command, input=audio.astype("<i2").tobytes(), capture_output=True, check=False)
    except OSError as exc:
        raise EncodingError(f"cannot run ffmpeg ({ffmpeg!r}): {exc}") from None
    if done.returncode != 0 or not done.stdout:
        stderr = done.stderr.decode(errors="replace").strip()[-2000:]
        raise EncodingError(
            f"ffmpeg exited with status {done.returncode}: {stderr or 'no output'} "
            f"(command: {' '.join(command)})"
        )
    return done.stdout
