"""Output formats: what each codec is called, where it goes, and which bitrates and rates it allows.

Part of the contract, so that the producer refuses a bitrate the codec cannot honour before anything
is enqueued; the worker's encoder reads the same table. Limits were checked against ffmpeg's encoders:
libopus refuses rates other than 8/12/16/24/48 kHz and bitrates over 256k for mono, while libmp3lame
silently clamps a bitrate its MPEG version cannot carry, which is why mp3's range depends on the rate.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FORMATS", "AudioFormat", "parse_bitrate"]

_COMMON_RATES = frozenset({8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000})


@dataclass(frozen=True)
class AudioFormat:
    """One output format: file extension, MIME type, ffmpeg encoder and muxer, and its limits."""

    name: str
    extension: str
    content_type: str
    encoder: str
    muxer: str
    sample_rates: frozenset[int]
    lossless: bool = False
    default_bitrate: str | None = "128k"

    def bitrate_range_kbps(self, sample_rate: int) -> tuple[int, int] | None:
        """The bitrates (kbit/s, inclusive) allowed at this sample rate; None for lossless formats."""
        if self.lossless:
            return None
        if self.name == "opus":
            return (6, 256)
        if self.name == "mp3":
            # MPEG-1 layer III (32-48 kHz), MPEG-2 (16-24 kHz), MPEG-2.5 (8-12 kHz).
            if sample_rate >= 32000:
                return (32, 320)
            return (8, 160) if sample_rate >= 16000 else (8, 64)
        return (16, 320)  # aac


FORMATS: dict[str, AudioFormat] = {
    "opus": AudioFormat(
        "opus", ".ogg", "audio/ogg", "libopus", "ogg", frozenset({8000, 12000, 16000, 24000, 48000})
    ),
    "mp3": AudioFormat("mp3", ".mp3", "audio/mpeg", "libmp3lame", "mp3", _COMMON_RATES),
    "aac": AudioFormat("aac", ".aac", "audio/aac", "aac", "adts", _COMMON_RATES),
    "wav": AudioFormat(
        "wav", ".wav", "audio/wav", "pcm_s16le", "wav", _COMMON_RATES, lossless=True, default_bitrate=None
    ),
    "flac": AudioFormat(
        "flac", ".flac", "audio/flac", "flac", "flac", _COMMON_RATES, lossless=True, default_bitrate=None
    ),
}


def parse_bitrate(bitrate: str) -> int:
    """'128k' -> 128 (kbit/s). Raises ValueError for anything else."""
    if not (bitrate.endswith("k") and bitrate[:-1].isdigit()):
        raise ValueError(f"must look like '128k' (got {bitrate!r})")
    return int(bitrate[:-1])
