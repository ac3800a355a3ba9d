"""Encoding through real ffmpeg: every format decodes, with its rate, bitrate and length."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile

from tts_contract.errors import EncoderKilled, EncodingError, TransientError
from tts_contract.formats import FORMATS
from tts_worker.encoding import Encoder, encode, resample
from tts_worker.engines.base import VoiceInputs
from tts_worker.engines.tone import ToneEngine

AUDIO = ToneEngine().synthesize("Three seconds of tones, give or take a few.", VoiceInputs())
SECONDS = len(AUDIO) / 22050


def probe(data: bytes) -> dict[str, str]:
    done = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "stream=codec_name,sample_rate,bit_rate",
         "-of", "json", "-"],
        input=data, capture_output=True, check=True,
    )  # fmt: skip
    info = json.loads(done.stdout)
    return dict(info["streams"][0])


def decode(data: bytes) -> np.ndarray:
    done = subprocess.run(
        ["ffmpeg", "-v", "error", "-i", "-", "-f", "s16le", "-ac", "1", "-ar", "24000", "-"],
        input=data, capture_output=True, check=True,
    )  # fmt: skip
    return np.frombuffer(done.stdout, dtype=np.int16)


@pytest.mark.parametrize(
    ("name", "codec", "rate", "bitrate"),
    [
        ("opus", "opus", 24000, "128k"),
        ("opus", "opus", 48000, "32k"),
        ("mp3", "mp3", 24000, "128k"),
        ("mp3", "mp3", 44100, "192k"),
        ("aac", "aac", 24000, "96k"),
        ("wav", "pcm_s16le", 24000, None),
        ("wav", "pcm_s16le", 22050, None),
        ("flac", "flac", 16000, None),
    ],
)
def test_every_format_decodes_with_its_settings(
    name: str, codec: str, rate: int, bitrate: str | None
) -> None:
    data = encode(AUDIO, input_rate=22050, fmt=FORMATS[name], sample_rate=rate, bitrate=bitrate)
    info = probe(data)
    assert info["codec_name"] == codec
    if codec != "opus":  # Ogg Opus always decodes at 48 kHz; the encoder input rate is in its header
        assert int(info["sample_rate"]) == rate
    if name == "mp3":
        assert int(info["bit_rate"]) == int(bitrate[:-1]) * 1000  # type: ignore[index]
    pcm = decode(data)
    assert len(pcm) / 24000 == pytest.approx(SECONDS, abs=0.08)
    assert np.sqrt(np.mean(pcm.astype(np.float64) ** 2)) > 1000  # not silent


@pytest.mark.parametrize("rate", [8000, 16000, 24000, 44100])
def test_every_mp3_bitrate_allowed_is_the_bitrate_written(rate: int) -> None:
    """libmp3lame rounds a bitrate its MPEG version lacks to a neighbour: the table must hold only
    bitrates it keeps as they are."""
    for kbps in FORMATS["mp3"].bitrates_kbps(rate):
        data = encode(
            AUDIO[:22050], input_rate=22050, fmt=FORMATS["mp3"], sample_rate=rate, bitrate=f"{kbps}k"
        )
        assert int(probe(data)["bit_rate"]) == kbps * 1000, f"{kbps}k at {rate} Hz"


@pytest.mark.parametrize("rate", [8000, 11025, 24000, 48000])
def test_aac_allows_bitrates_up_to_where_ffmpeg_starts_clamping(rate: int) -> None:
    """ffmpeg's aac encoder warns and clamps above 6144 bits per 1024-sample frame: the highest
    bitrate allowed must pass without that warning (unless 320k caps it first), one more must not."""
    top = FORMATS["aac"].bitrates_kbps(rate)[-1]

    def clamps(kbps: int) -> bool:
        done = subprocess.run(
            ["ffmpeg", "-nostdin", "-loglevel", "warning", "-f", "s16le", "-ar", "22050", "-ac", "1",
             "-i", "pipe:0", "-c:a", "aac", "-ar", str(rate), "-b:a", f"{kbps}k", "-f", "adts", "pipe:1"],
            input=AUDIO[:22050].astype("<i2").tobytes(), capture_output=True, check=True,
        )  # fmt: skip
        return b"clamping" in done.stderr

    assert not clamps(top)
    assert top == 320 or clamps(top + 1)


@pytest.mark.parametrize("name", ["wav", "flac"])
def test_lossless_headers_carry_the_true_length(name: str) -> None:
    """ffmpeg writing to a pipe cannot fill these in; libsndfile writing to memory does."""
    data = encode(AUDIO, input_rate=22050, fmt=FORMATS[name], sample_rate=24000, bitrate=None)
    info = soundfile.info(io.BytesIO(data))
    assert info.frames == pytest.approx(SECONDS * 24000, abs=24)
    samples, rate = soundfile.read(io.BytesIO(data), dtype="int16")
    assert rate == 24000 and len(samples) == info.frames


def test_resample_keeps_duration_and_skips_matching_rates() -> None:
    assert resample(AUDIO, input_rate=22050, sample_rate=22050) is AUDIO
    up = resample(AUDIO, input_rate=22050, sample_rate=48000)
    assert len(up) == pytest.approx(len(AUDIO) * 48000 / 22050, abs=48)


def test_ffmpeg_failure_carries_its_stderr() -> None:
    with pytest.raises(EncodingError) as caught:
        encode(AUDIO, input_rate=22050, fmt=FORMATS["opus"], sample_rate=22050, bitrate="64k")
    assert "sample rate 22050 is not supported" in str(caught.value)
    assert "libopus" in str(caught.value)


def test_missing_ffmpeg_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EncodingError, match="cannot run ffmpeg"):
        encode(AUDIO, input_rate=22050, fmt=FORMATS["mp3"], sample_rate=24000, bitrate="64k",
               ffmpeg=str(tmp_path / "no-ffmpeg"))  # fmt: skip


def children_named(parent: int, name: str) -> list[int]:
    """Pids of `parent`'s child processes running `name` (read from /proc, as `pgrep -P` would)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)
        except OSError:
            continue  # gone meanwhile
        command, ppid = fields[0].split("(", 1)[1], int(fields[1].split()[1])
        if ppid == parent and command == name:
            found.append(int(stat.parent.name))
    return found


def test_ffmpeg_ended_by_a_signal_is_transient_not_a_bad_request() -> None:
    with Encoder(input_rate=22050, fmt=FORMATS["opus"], sample_rate=24000, bitrate="64k") as encoder:
        encoder.write(AUDIO)
        [ffmpeg] = children_named(os.getpid(), "ffmpeg")
        os.kill(ffmpeg, signal.SIGKILL)  # as the OOM killer does
        with pytest.raises(EncoderKilled, match="ended by SIGKILL") as caught:
            encoder.finish()
    assert isinstance(caught.value, TransientError) and not isinstance(caught.value, EncodingError)
