"""Output formats: what each codec is called, where it goes, and which bitrates and rates it allows.

Part of the contract, so that the producer refuses a bitrate the codec cannot honour before anything
is enqueued; the worker's encoder reads the same table. Limits were checked against ffmpeg's encoders:
libopus refuses rates other than 8/12/16/24/48 kHz and bitrates over 256k for mono; libmp3lame
silently rounds a bitrate to the nearest one its MPEG version defines (150k becomes 160k), and
ffmpeg's aac silently clamps above 6144 bits per 1024-sample frame (320k at 24 kHz gives 110k). Both
would leave a result whose metadata states a bitrate the file does not have, so both are refused.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from tts_contract.errors import echo

__all__ = ["FORMATS", "AudioFormat", "parse_bitrate"]

_COMMON_RATES = frozenset({8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000})
# The layer III bitrates of MPEG-1 (32-48 kHz), MPEG-2 (16-24 kHz) and MPEG-2.5 (8-12 kHz; LAME's
# limit is 64k there), in kbit/s.
_MP3_BITRATES = {
    32000: (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    16000: (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
    8000: (8, 16, 24, 32, 40, 48, 56, 64),
}
_DEFAULT_KBPS = 128


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

    def bitrates_kbps(self, sample_rate: int) -> Sequence[int]:
        """The bitrates (kbit/s) this codec honours at this sample rate; empty for lossless formats."""
        if self.lossless:
            return ()
        if self.name == "opus":
            return range(6, 257)
        if self.name == "mp3":
            return next(rates for floor, rates in _MP3_BITRATES.items() if sample_rate >= floor)
        return range(16, min(320, 6 * sample_rate // 1000) + 1)  # aac: 6144 bits per 1024 samples

    def default_bitrate(self, sample_rate: int) -> str | None:
        """128k, or the highest bitrate the codec honours at this rate when that is lower."""
        allowed = [kbps for kbps in self.bitrates_kbps(sample_rate) if kbps <= _DEFAULT_KBPS]
        return f"{max(allowed)}k" if allowed else None

    def describe_bitrates(self, sample_rate: int) -> str:
        """The allowed bitrates in words, for error messages: "8k to 48k" or "8k, 16k, ... or 64k"."""
        allowed = self.bitrates_kbps(sample_rate)
        if isinstance(allowed, range):
            return f"{allowed[0]}k to {allowed[-1]}k"
        return ", ".join(f"{kbps}k" for kbps in allowed[:-1]) + f" or {allowed[-1]}k"


FORMATS: dict[str, AudioFormat] = {
    "opus": AudioFormat(
        "opus", ".ogg", "audio/ogg", "libopus", "ogg", frozenset({8000, 12000, 16000, 24000, 48000})
    ),
    "mp3": AudioFormat("mp3", ".mp3", "audio/mpeg", "libmp3lame", "mp3", _COMMON_RATES),
    "aac": AudioFormat("aac", ".aac", "audio/aac", "aac", "adts", _COMMON_RATES),
    "wav": AudioFormat("wav", ".wav", "audio/wav", "pcm_s16le", "wav", _COMMON_RATES, lossless=True),
    "flac": AudioFormat("flac", ".flac", "audio/flac", "flac", "flac", _COMMON_RATES, lossless=True),
}


def parse_bitrate(bitrate: str) -> int:
    """'128k' -> 128 (kbit/s). ASCII digits only: `str.isdigit` also takes full-width and other
    digits, which ffmpeg does not. Raises ValueError for anything else."""
    if not re.fullmatch(r"[0-9]{1,6}k", bitrate):
        raise ValueError(f"must be ASCII digits then 'k', like '128k' (got {echo(bitrate)})")
    return int(bitrate[:-1])
