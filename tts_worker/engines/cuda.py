"""What the IndexTTS engines do when CUDA fails: shrink the segments on out of memory, give up on a
process whose CUDA context is poisoned. Imports no torch (it reaches it through sys.modules)."""

from __future__ import annotations

import gc
import logging
import sys
from collections.abc import Callable

from tts_contract.errors import EngineUnusable, GPUOutOfMemory
from tts_worker.engines.base import Audio

__all__ = ["MIN_TOKENS_PER_SEGMENT", "shrinking_on_oom"]

log = logging.getLogger(__name__)

MIN_TOKENS_PER_SEGMENT = 20


def shrinking_on_oom(speak: Callable[[int], Audio], tokens: int) -> Audio:
    """`speak(tokens)`, the most text tokens per segment; on CUDA out of memory, free the cache and
    try again with half as many, down to MIN_TOKENS_PER_SEGMENT, then raise GPUOutOfMemory (a
    transient error). A CUDA error that poisons the context raises EngineUnusable, so that the
    caller replaces the process."""
    while True:
        try:
            return speak(tokens)
        except Exception as exc:
            if not _out_of_memory(exc):
                if _poisons_context(exc):
                    raise EngineUnusable(f"CUDA failed in a way that poisons this process: {exc}") from exc
                raise
            failure = str(exc)
        # Out of the except block: the exception's traceback holds the frames, and with them the
        # tensors, of the failed call; only now can the cache give that memory back.
        _free_cuda_cache()
        if tokens <= MIN_TOKENS_PER_SEGMENT:
            raise GPUOutOfMemory(
                f"CUDA out of memory even with max_text_tokens_per_segment={tokens}: {failure}"
            )
        tokens = max(MIN_TOKENS_PER_SEGMENT, tokens // 2)
        log.warning("CUDA out of memory; retrying the chunk with max_text_tokens_per_segment=%d", tokens)


def _out_of_memory(exc: BaseException) -> bool:
    # torch.OutOfMemoryError ("CUDA out of memory. Tried to allocate ..."), or a library's
    # "CUDA error: out of memory", which frees like the first and does not poison the context.
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc)


def _poisons_context(exc: BaseException) -> bool:
    """After these, every later CUDA call in the process fails too: only a new process recovers."""
    message = str(exc)
    return "device-side assert" in message or "CUDA error" in message or "illegal memory access" in message


def _free_cuda_cache() -> None:
    """Collect what the failed call left (reference cycles included), then hand the CUDA cache back
    (the PyTorch FAQ's recovery from out of memory). Call it outside the `except` block."""
    # torch is loaded by the engine's library; never import it here for its own sake.
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()
