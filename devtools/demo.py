"""`./bootstrap demo [TEXT]`: start a local stack, speak TEXT through `tts.delay`, save the audio.

Starts redis-server, moto's S3 server and one CPU worker (piper), sends the job exactly as an app
would, prints the presigned URL, downloads the audio under out/, then stops everything it started.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from devtools.stack import local_stack
from tts_contract.errors import InvalidRequest
from tts_contract.schema import parse_request

SAMPLE = (
    "Hello! This is IndexTTS queue speaking from a CPU worker. "
    "Your text went through Redis to a Celery worker, was split into chunks, synthesised, "
    "crossfaded, encoded with ffmpeg and stored in S3, and you are listening to the result."
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./bootstrap demo", description=__doc__.splitlines()[0])
    parser.add_argument("text", nargs="*", help="what to say, quoted or not (default: a sample)")
    parser.add_argument("--engine", default="piper", choices=["piper", "tone"])
    parser.add_argument("--output-format", default="opus", choices=["opus", "mp3", "wav", "flac", "aac"])
    parser.add_argument(
        "--out", type=Path, default=Path("out"), help="where to save the audio (default: out/)"
    )
    args = parser.parse_args(argv)
    text = " ".join(args.text) or SAMPLE
    try:  # refused before anything starts, as the producer would refuse it
        parse_request({"text": text, "output_format": args.output_format})
    except InvalidRequest as exc:
        parser.error(str(exc))

    started = time.perf_counter()
    print(f"starting redis-server, an S3 server (moto) and a {args.engine} worker ...", flush=True)
    with local_stack(engine=args.engine) as env:
        os.environ.update(env)  # the producer reads its settings from the environment, as an app would
        from producer import tts

        print(f"stack up in {time.perf_counter() - started:.1f} s; sending the job with tts.delay(...)")
        result = tts.delay(text=text, output_format=args.output_format)
        while not result.ready():
            if str(result.state) == "PROGRESS":  # our custom state, unknown to Celery's types
                print(f"  chunk {result.info['chunk']} of {result.info['chunks']}", flush=True)
            time.sleep(0.25)
        outcome = result.get(timeout=10)
        print(f"\npresigned URL (valid while this demo's S3 server runs):\n  {outcome['url']}\n")
        args.out.mkdir(parents=True, exist_ok=True)
        target = args.out / outcome["filename"]
        with urllib.request.urlopen(outcome["url"], timeout=30) as response:
            target.write_bytes(response.read())
    meta = outcome["metadata"]
    print(
        f"saved {target} ({target.stat().st_size} bytes): {meta['duration']} s of {meta['codec']} "
        f"at {meta['sample_rate']} Hz, {meta['chunks']} chunk(s), engine {meta['engine']}, "
        f"RTF {meta['rtf']}"
    )
    print(f"ffprobe says: {_probe(target)}")
    print(f"demo done in {time.perf_counter() - started:.1f} s; everything it started is stopped")
    return 0


def _probe(path: Path) -> str:
    done = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "format=duration:stream=codec_name",
         "-of", "compact", str(path)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return " ".join(done.stdout.split()) or done.stderr.strip()


if __name__ == "__main__":
    sys.exit(main())
