"""Stand-in `indextts.infer_v2.IndexTTS2`: records its calls, mimics the real caching, fails on cue.

Only for what the real library (run in the suite with tiny random weights, `tests/tiny_indextts2.py`)
cannot show on a machine without a GPU: CUDA out of memory, a CUDA error that poisons the process
(device-side assert), accelerator packages that are not installed, a model that takes long to load,
and a log of the calls as the worker makes them, across processes. Everything else is tested against
the real library (`tests/test_indextts2.py`).

What it copies from indextts2-inference 2.1.1 (`indextts/infer_v2.py`):
- the constructor's keyword arguments and the `infer` signature (`output_path` positional, no
  default), returning `(22050, int16 array of shape (N, 1))` when `output_path` is None;
- the single-entry speaker and emotion caches keyed by the path string, in the same attributes
  (`cache_spk_cond`, `cache_s2mel_style`, `cache_s2mel_prompt`, `cache_mel`,
  `cache_spk_audio_prompt`, `cache_emo_cond`, `cache_emo_audio_prompt`), recomputed when the first
  attribute is None or the path differs; and "emotion from the speaker" when no emotion prompt is
  given or a vector/text overrides it;
The audio depends on the conditioning's content (its pitch comes from the bytes of the voice file
read when the conditioning was computed), so a stale cache is audible in the samples.

Cues, from the environment (read at each call, so that a test can set them per worker):
- FAKE_INDEXTTS_LOG: append one JSON line per constructor and `infer` call;
- FAKE_INDEXTTS_OOM_ABOVE=N: raise OutOfMemoryError while max_text_tokens_per_segment > N;
- FAKE_INDEXTTS_ASSERT_ONCE=PATH: raise a device-side assert on text containing "<assert>", once
  (PATH is created when it fires, and it does not fire while PATH exists);
- text containing "<always-assert>" raises a device-side assert on every call (no variable needed);
- FAKE_INDEXTTS_CONDITIONING_S: seconds each conditioning computation takes (default 0);
- FAKE_INDEXTTS_LOAD_S: seconds the constructor takes, as the real one takes minutes (default 0).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np


class OutOfMemoryError(RuntimeError):
    """Named like torch.OutOfMemoryError, which the engine recognises by name."""


class IndexTTS2:
    def __init__(
        self,
        model_dir: str | None = None,
        cfg_path: str | None = None,
        use_fp16: bool = False,
        device: str | None = None,
        use_cuda_kernel: bool | None = None,
        use_deepspeed: bool = False,
        use_accel: bool = False,
        use_torch_compile: bool = False,
        language: str | None = None,
        attn_backend: str | None = None,
    ) -> None:
        time.sleep(float(os.environ.get("FAKE_INDEXTTS_LOAD_S", "0")))
        if model_dir is None or not Path(model_dir, "config.yaml").is_file():
            raise FileNotFoundError(f"no config.yaml in {model_dir}")
        self.device = device or "cuda:0"
        self.calls: list[dict[str, Any]] = []
        self.conditionings = {"speaker": 0, "emotion": 0}
        self.cache_spk_cond: Any = None
        self.cache_s2mel_style: Any = None
        self.cache_s2mel_prompt: Any = None
        self.cache_mel: Any = None
        self.cache_spk_audio_prompt: str | None = None
        self.cache_emo_cond: Any = None
        self.cache_emo_audio_prompt: str | None = None
        _record({"call": "__init__", "model_dir": model_dir, "cfg_path": cfg_path, "use_fp16": use_fp16,
                 "device": device, "use_cuda_kernel": use_cuda_kernel, "use_deepspeed": use_deepspeed,
                 "use_accel": use_accel, "use_torch_compile": use_torch_compile, "attn_backend": attn_backend,
                 "pid": os.getpid()})  # fmt: skip

    def infer(
        self,
        spk_audio_prompt: str,
        text: str,
        output_path: str | None,
        emo_audio_prompt: str | None = None,
        emo_alpha: float = 1.0,
        emo_vector: list[float] | None = None,
        use_emo_text: bool = False,
        emo_text: str | None = None,
        use_random: bool = False,
        interval_silence: int = 200,
        verbose: bool = False,
        max_text_tokens_per_segment: int = 120,
        **generation_kwargs: Any,
    ) -> tuple[int, np.ndarray]:
        call = {"call": "infer", "spk_audio_prompt": spk_audio_prompt, "text": text,
                "output_path": output_path, "emo_audio_prompt": emo_audio_prompt, "emo_alpha": emo_alpha,
                "emo_vector": emo_vector, "use_emo_text": use_emo_text, "emo_text": emo_text,
                "use_random": use_random, "interval_silence": interval_silence,
                "max_text_tokens_per_segment": max_text_tokens_per_segment,
                "generation_kwargs": generation_kwargs, "pid": os.getpid()}  # fmt: skip
        self.calls.append(call)
        _record(call)
        self._fail_on_cue(text, max_text_tokens_per_segment)
        if use_emo_text or emo_vector is not None or emo_audio_prompt is None:
            emo_audio_prompt = spk_audio_prompt
        pitch = self._speaker_conditioning(spk_audio_prompt)
        self._emotion_conditioning(emo_audio_prompt)
        samples = 22050 * max(1, sum(c.isalnum() for c in text)) // 15
        t = np.arange(samples) / 22050
        wav = (8000 * np.sin(2 * np.pi * pitch * t)).astype(np.int16).reshape(-1, 1)
        return 22050, wav

    def _fail_on_cue(self, text: str, tokens: int) -> None:
        oom_above = os.environ.get("FAKE_INDEXTTS_OOM_ABOVE")
        if oom_above and tokens > int(oom_above):
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if "<always-assert>" in text:
            raise RuntimeError("CUDA error: device-side assert triggered")
        marker = os.environ.get("FAKE_INDEXTTS_ASSERT_ONCE")
        if marker and "<assert>" in text and not Path(marker).exists():
            Path(marker).touch()
            raise RuntimeError("CUDA error: device-side assert triggered")

    def _speaker_conditioning(self, path: str) -> float:
        if self.cache_spk_cond is None or self.cache_spk_audio_prompt != path:
            self.conditionings["speaker"] += 1
            time.sleep(float(os.environ.get("FAKE_INDEXTTS_CONDITIONING_S", "0")))
            digest = hashlib.sha256(Path(path).read_bytes()).digest()
            self.cache_spk_cond = 150.0 + digest[0] * 2  # the "voice" is a pitch from the content
            self.cache_s2mel_style = self.cache_s2mel_prompt = self.cache_mel = digest
            self.cache_spk_audio_prompt = path
        return float(self.cache_spk_cond)

    def _emotion_conditioning(self, path: str) -> None:
        if self.cache_emo_cond is None or self.cache_emo_audio_prompt != path:
            self.conditionings["emotion"] += 1
            time.sleep(float(os.environ.get("FAKE_INDEXTTS_CONDITIONING_S", "0")))
            self.cache_emo_cond = hashlib.sha256(Path(path).read_bytes()).digest()
            self.cache_emo_audio_prompt = path


def _record(entry: dict[str, Any]) -> None:
    log = os.environ.get("FAKE_INDEXTTS_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")
