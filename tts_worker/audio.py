"""Joining synthesised chunks into one signal, with an equal-power crossfade or plain concatenation."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from tts_worker.engines.base import Audio

__all__ = ["crossfade", "join_chunks", "to_int16"]


def join_chunks(chunks: Sequence[Audio], *, sample_rate: int, crossfade_ms: int) -> Audio:
    """Join mono int16 chunks. With `crossfade_ms` > 0, neighbours overlap by that long (or by half the
    shorter one, when that is shorter) under cos/sin gains, whose squares sum to one, so the loudness
    holds steady through the join and no sample jumps where the chunks meet."""
    chunks = [c for c in chunks if len(c)]
    if not chunks:
        return np.zeros(0, dtype=np.int16)
    joined = chunks[0].astype(np.float32)
    for chunk in chunks[1:]:
        overlap = min(crossfade_ms * sample_rate // 1000, len(joined) // 2, len(chunk) // 2)
        joined = crossfade(joined, chunk.astype(np.float32), overlap)
    return to_int16(joined)


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
