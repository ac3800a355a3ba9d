"""Joining synthesised chunks into one signal, with an equal-power crossfade or plain concatenation.

`StreamJoiner` joins chunks as they are spoken and hands out every sample no later chunk can change,
so that the batch pipeline can encode while it synthesises and the RunPod stream can send at once;
both get the same signal.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from tts_worker.engines.base import Audio

__all__ = ["StreamJoiner", "crossfade", "to_int16"]


class StreamJoiner:
    """Crossfades chunks as they arrive and hands out every sample that no later chunk can change.

    With `crossfade_ms` > 0, neighbours overlap by that long (or by half the shorter side, when that
    is shorter) under cos/sin gains, whose squares sum to one, so the loudness holds steady through
    the join and no sample jumps where the chunks meet. With 0 the chunks are laid end to end."""

    def __init__(self, *, sample_rate: int, crossfade_ms: int) -> None:
        self._crossfade = crossfade_ms * sample_rate // 1000
        self._held: npt.NDArray[np.float32] = np.zeros(0, dtype=np.float32)
        self._joined = 0  # samples joined so far, handed out or held

    def push(self, chunk: Audio) -> Audio:
        """Join one chunk; returns the samples that are final now (possibly none)."""
        if len(chunk) == 0:
            return np.zeros(0, dtype=np.int16)
        tail = chunk.astype(np.float32)
        if self._joined:
            # The overlap is capped by half of each side (the held part already is).
            overlap = min(len(self._held), len(tail) // 2)
            tail = crossfade(self._held, tail, overlap)
            self._joined += len(chunk) - overlap
        else:
            self._joined = len(chunk)
        keep = min(self._crossfade, self._joined // 2)
        ready, self._held = tail[: len(tail) - keep], tail[len(tail) - keep :]
        return to_int16(ready)

    def flush(self) -> Audio:
        """The samples still held back (after the last chunk)."""
        held, self._held = self._held, np.zeros(0, dtype=np.float32)
        return to_int16(held)


def crossfade(
    head: npt.NDArray[np.float32], tail: npt.NDArray[np.float32], overlap: int
) -> npt.NDArray[np.float32]:
    """`head` then `tail`, the last `overlap` samples of one blended with the first of the other."""
    if overlap <= 0:
        return np.concatenate([head, tail])
    t = np.linspace(0.0, np.pi / 2, overlap, dtype=np.float32)
    mixed = head[-overlap:] * np.cos(t) + tail[:overlap] * np.sin(t)
    return np.concatenate([head[:-overlap], mixed, tail[overlap:]])


def to_int16(samples: npt.NDArray[np.float32]) -> Audio:
    """Round and clip to 16-bit samples (a loud overlap must clip, not wrap around)."""
    return np.clip(np.rint(samples), -32768, 32767).astype(np.int16)
