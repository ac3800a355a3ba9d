"""Encoding PCM into the output format, in memory, while the audio is still being synthesised.

Lossy formats go through ffmpeg over pipes (no temporary files). An `Encoder` starts ffmpeg at once
and feeds it each piece of audio as it becomes final, from a thread of its own, so that ffmpeg
encodes on another core while the engine speaks the next chunk; what is left when the last chunk is
spoken is the encoding of that chunk alone. WAV and FLAC are written by libsndfile into memory at the
end instead, because ffmpeg cannot seek back on a pipe to fill in their headers' lengths; ffmpeg
still resamples them when the output rate differs from the engine's.
"""

from __future__ import annotations

import contextlib
import io
import queue
import signal
import subprocess
import threading
from types import TracebackType
from typing import IO

import numpy as np
import soundfile

from tts_contract.errors import EncoderKilled, EncodingError
from tts_contract.formats import AudioFormat
from tts_worker.engines.base import Audio

__all__ = ["Encoder", "encode", "resample"]


class Encoder:
    """One file being encoded: `write` pieces of mono int16 PCM at `input_rate`, then `finish` for the
    bytes of the complete file. Used as a context manager, which stops ffmpeg if it is left unfinished
    (the synthesis failed)."""

    def __init__(
        self, *, input_rate: int, fmt: AudioFormat, sample_rate: int, bitrate: str | None,
        ffmpeg: str = "ffmpeg",
    ) -> None:  # fmt: skip
        self._input_rate, self._fmt, self._sample_rate, self._ffmpeg = input_rate, fmt, sample_rate, ffmpeg
        self._pieces: list[Audio] = []
        self._pipe: _FfmpegPipe | None = None
        if not fmt.lossless:
            options = ["-c:a", fmt.encoder, "-ar", str(sample_rate)]
            if bitrate:
                options += ["-b:a", bitrate]
            self._pipe = _FfmpegPipe(
                input_rate=input_rate, options=[*options, "-f", fmt.muxer], ffmpeg=ffmpeg
            )

    def write(self, audio: Audio) -> None:
        """Add the next samples; returns at once (ffmpeg takes them from a queue)."""
        if self._pipe is None:
            self._pieces.append(audio)
        elif len(audio):
            self._pipe.write(audio)

    def finish(self) -> bytes:
        """Wait for the encoder and return the whole file. Raises `EncodingError` with ffmpeg's stderr,
        or `EncoderKilled` (transient) when a signal ended ffmpeg."""
        if self._pipe is not None:
            return self._pipe.finish()
        audio = np.concatenate(self._pieces) if self._pieces else np.zeros(0, dtype=np.int16)
        pcm = resample(audio, input_rate=self._input_rate, sample_rate=self._sample_rate, ffmpeg=self._ffmpeg)
        buffer = io.BytesIO()
        soundfile.write(buffer, pcm, self._sample_rate, format=self._fmt.name.upper(), subtype="PCM_16")
        return buffer.getvalue()

    def __enter__(self) -> Encoder:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._pipe is not None:
            self._pipe.stop()


def encode(
    audio: Audio, *, input_rate: int, fmt: AudioFormat, sample_rate: int, bitrate: str | None,
    ffmpeg: str = "ffmpeg",
) -> bytes:  # fmt: skip
    """Mono int16 `audio` at `input_rate` -> the bytes of a complete file in `fmt`, all at once (for
    audio that is whole already; a job feeds an `Encoder` piece by piece instead)."""
    with Encoder(
        input_rate=input_rate, fmt=fmt, sample_rate=sample_rate, bitrate=bitrate, ffmpeg=ffmpeg
    ) as e:
        e.write(audio)
        return e.finish()


def resample(audio: Audio, *, input_rate: int, sample_rate: int, ffmpeg: str = "ffmpeg") -> Audio:
    """The same audio at `sample_rate`, resampled by ffmpeg (returned as is when the rates match)."""
    if input_rate == sample_rate:
        return audio
    pipe = _FfmpegPipe(input_rate=input_rate, options=["-ar", str(sample_rate), "-f", "s16le"], ffmpeg=ffmpeg)
    try:
        pipe.write(audio)
        return np.frombuffer(pipe.finish(), dtype=np.int16)
    finally:
        pipe.stop()


class _FfmpegPipe:
    """An ffmpeg process reading s16le PCM on stdin and writing `options`' output on stdout. One thread
    writes what `write` queues, two collect stdout and stderr, so no pipe ever fills up and blocks."""

    def __init__(self, *, input_rate: int, options: list[str], ffmpeg: str) -> None:
        self.command = [
            ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error",
            "-f", "s16le", "-ar", str(input_rate), "-ac", "1", "-i", "pipe:0",
            *options, "pipe:1",
        ]  # fmt: skip
        try:
            # A session of its own: it lives as long as the synthesis, and a Ctrl-C or SIGTERM sent to
            # the worker's process group (a terminal, `kill -- -pgid`) must not end it under a job the
            # worker is finishing.
            self._process = subprocess.Popen(
                self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                start_new_session=True,
            )  # fmt: skip
        except OSError as exc:
            raise EncodingError(f"cannot run ffmpeg ({ffmpeg!r}): {exc}") from None
        self._pending: queue.Queue[bytes | None] = queue.Queue()
        self._out: list[bytes] = []
        self._err: list[bytes] = []
        assert self._process.stdin and self._process.stdout and self._process.stderr
        self._threads = [
            threading.Thread(target=self._feed, args=(self._process.stdin,), daemon=True),
            threading.Thread(target=_collect, args=(self._process.stdout, self._out), daemon=True),
            threading.Thread(target=_collect, args=(self._process.stderr, self._err), daemon=True),
        ]
        try:
            for thread in self._threads:
                thread.start()
        except BaseException:
            self._process.kill()
            self._process.wait()
            raise

    def write(self, audio: Audio) -> None:
        if self._process.poll() is not None:  # ended early (a bad option): say why now, not at the end
            self.finish()
            raise EncodingError(f"ffmpeg ended before its input did (command: {' '.join(self.command)})")
        self._pending.put(audio.astype("<i2").tobytes())

    def finish(self) -> bytes:
        self._pending.put(None)
        status = self._process.wait()
        for thread in self._threads:
            thread.join()
        output = b"".join(self._out)
        if status < 0:  # a signal ended it (the OOM killer, most often): the audio was not at fault
            raise EncoderKilled(
                f"ffmpeg was ended by {signal.Signals(-status).name} while encoding; the job is retried"
            )
        if status != 0 or not output:
            stderr = b"".join(self._err).decode(errors="replace").strip()[-2000:]
            raise EncodingError(
                f"ffmpeg exited with status {status}: {stderr or 'no output'} "
                f"(command: {' '.join(self.command)})"
            )
        return output

    def stop(self) -> None:
        """End ffmpeg if it still runs (an encode given up), and its threads."""
        if self._process.poll() is None:
            self._process.kill()
        self._pending.put(None)
        self._process.wait()
        for thread in self._threads:
            thread.join()

    def _feed(self, stdin: IO[bytes]) -> None:
        # An OSError means ffmpeg ended early (a bad option, or stopped): `finish` reports its stderr.
        with contextlib.suppress(OSError):
            while (data := self._pending.get()) is not None:
                stdin.write(data)
        with contextlib.suppress(OSError):
            stdin.close()


def _collect(stream: IO[bytes], into: list[bytes]) -> None:
    while block := stream.read(1 << 16):
        into.append(block)
    stream.close()
