"""What the conditioning LRU saves when requests alternate between voices.

The real model cannot run here, so this drives the real engine code over the stand-in `indextts`
(tests/fake_indextts), whose conditioning takes COST seconds (a timing hook standing in for the
w2v-BERT + semantic codec + CAMPPlus analysis of a reference voice on the GPU). It prints how many
conditionings were computed and the wall time of the same job sequence without and with the LRU.
Usage: python bench/bench_voice_cache.py [--cost 0.3] [--jobs 30] [--voices 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "fake_indextts"))

from tts_contract.schema import parse_request  # noqa: E402
from tts_worker.engines.indextts2 import IndexTTS2Engine  # noqa: E402
from tts_worker.pipeline import voice_inputs  # noqa: E402
from tts_worker.settings import Settings  # noqa: E402


def run(settings: Settings, names: list[str]) -> tuple[float, int]:
    engine = IndexTTS2Engine(settings)
    started = time.perf_counter()
    for name in names:
        request = parse_request({"text": "A short line.", "speaker_voice": name})
        engine.synthesize(request.text, voice_inputs(request, settings))
    return time.perf_counter() - started, engine._model.conditionings["speaker"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cost", type=float, default=0.3, help="seconds per conditioning (assumed)")
    parser.add_argument("--jobs", type=int, default=30)
    parser.add_argument("--voices", type=int, default=3)
    args = parser.parse_args()
    os.environ["FAKE_INDEXTTS_CONDITIONING_S"] = str(args.cost)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "checkpoints").mkdir()
        (root / "checkpoints" / "config.yaml").write_text("version: 2.0\n")
        (root / "voices").mkdir()
        for index in range(args.voices):
            tone = 0.3 * np.sin(np.arange(16000) / 16000 * 2 * np.pi * (200 + 40 * index))
            soundfile.write(root / "voices" / f"v{index}.wav", tone, 16000)
        env = {"TTS_ENGINE": "indextts2", "CHECKPOINTS_DIR": str(root / "checkpoints"),
               "AUDIO_VOICES_DIR": str(root / "voices"), "DEFAULT_VOICE": "v0"}  # fmt: skip
        names = [f"v{i % args.voices}" for i in range(args.jobs)]
        print(f"{args.jobs} jobs alternating {args.voices} voices, {args.cost} s per conditioning (assumed)")
        for size in (0, 8):
            seconds, computed = run(Settings.from_env({**env, "VOICE_CACHE_SIZE": str(size)}), names)
            print(f"  VOICE_CACHE_SIZE={size}: {computed:3d} speaker conditionings, {seconds:6.2f} s")


if __name__ == "__main__":
    main()
