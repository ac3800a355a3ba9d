"""Joining chunks: lengths, continuity at the joins, equal power through the crossfade, and the same
signal however the chunks' samples are handed out."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tts_worker.audio import StreamJoiner, crossfade, to_int16
from tts_worker.engines.base import Audio

RATE = 22050


def join_chunks(chunks: Sequence[Audio], *, sample_rate: int, crossfade_ms: int) -> Audio:
    """Every chunk through the joiner, and what it held back: the signal a job encodes."""
    joiner = StreamJoiner(sample_rate=sample_rate, crossfade_ms=crossfade_ms)
    return np.concatenate([*(joiner.push(chunk) for chunk in chunks), joiner.flush()])


def reference_join(chunks: Sequence[Audio], *, sample_rate: int, crossfade_ms: int) -> Audio:
    """The same join written the plain way, on the whole signal at once: the oracle for the joiner."""
    chunks = [c for c in chunks if len(c)]
    if not chunks:
        return np.zeros(0, dtype=np.int16)
    joined = chunks[0].astype(np.float32)
    for chunk in chunks[1:]:
        overlap = min(crossfade_ms * sample_rate // 1000, len(joined) // 2, len(chunk) // 2)
        joined = crossfade(joined, chunk.astype(np.float32), overlap)
    return to_int16(joined)


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=0, max_value=3000), min_size=1, max_size=6),
    crossfade_ms=st.integers(min_value=0, max_value=2000),
)
def test_pieces_handed_out_add_up_to_the_whole_join(lengths: list[int], crossfade_ms: int) -> None:
    rng = np.random.default_rng(len(lengths) * 1000 + crossfade_ms)
    chunks = [rng.integers(-20000, 20000, n).astype(np.int16) for n in lengths]
    assert np.array_equal(
        join_chunks(chunks, sample_rate=RATE, crossfade_ms=crossfade_ms),
        reference_join(chunks, sample_rate=RATE, crossfade_ms=crossfade_ms),
    )


def sine(freq: float, seconds: float, *, phase: float = 0.0, amplitude: float = 12000) -> np.ndarray:
    t = np.arange(int(RATE * seconds)) / RATE
    return (amplitude * np.sin(2 * np.pi * freq * t + phase)).astype(np.int16)


def max_step(audio: np.ndarray) -> int:
    return int(np.abs(np.diff(audio.astype(np.int32))).max())


def test_plain_concatenation_when_crossfade_is_off() -> None:
    a, b = sine(220, 0.5), sine(330, 0.4)
    joined = join_chunks([a, b], sample_rate=RATE, crossfade_ms=0)
    assert np.array_equal(joined, np.concatenate([a, b]))


@given(
    lengths=st.lists(st.integers(1, 20_000), min_size=1, max_size=6),
    crossfade_ms=st.integers(0, 1000),
)
def test_length_is_the_sum_less_the_overlaps(lengths: list[int], crossfade_ms: int) -> None:
    chunks = [np.full(n, 1000, dtype=np.int16) for n in lengths]
    joined = join_chunks(chunks, sample_rate=RATE, crossfade_ms=crossfade_ms)
    expected, running = lengths[0], lengths[0]
    for n in lengths[1:]:
        overlap = min(crossfade_ms * RATE // 1000, running // 2, n // 2)
        running = running + n - overlap
        expected = running
    assert len(joined) == expected
    assert joined.dtype == np.int16


def test_crossfade_overlaps_by_the_requested_time() -> None:
    a, b = sine(220, 1.0), sine(330, 1.0)
    joined = join_chunks([a, b], sample_rate=RATE, crossfade_ms=100)
    assert len(joined) == len(a) + len(b) - RATE // 10


@pytest.mark.parametrize("phase", [0.0, np.pi / 2, np.pi, 2.5])
def test_no_click_where_chunks_meet(phase: float) -> None:
    """A hard cut between two out-of-phase sines jumps far more than either signal ever steps.
    Across a crossfade the step stays within the signals' own: cos/sin gains can add two in-phase
    signals up to sqrt(2) of one, never more."""
    a, b = sine(220, 0.5), sine(330, 0.5, phase=phase)
    own = max(max_step(a), max_step(b))
    cut = join_chunks([a[:-37], b], sample_rate=RATE, crossfade_ms=0)
    faded = join_chunks([a[:-37], b], sample_rate=RATE, crossfade_ms=50)
    if phase:
        assert max_step(cut) > 2 * own  # the test can see a click
    assert max_step(faded) <= np.sqrt(2) * own + 2


def test_equal_power_keeps_loudness_steady_for_uncorrelated_chunks() -> None:
    rng = np.random.default_rng(7)
    a = (rng.standard_normal(RATE) * 4000).astype(np.int16)
    b = (rng.standard_normal(RATE) * 4000).astype(np.int16)
    overlap = RATE // 10
    joined = join_chunks([a, b], sample_rate=RATE, crossfade_ms=100).astype(np.float64)
    middle = joined[len(a) - overlap : len(a)]
    rms = lambda x: float(np.sqrt(np.mean(np.square(x))))  # noqa: E731
    assert rms(middle) == pytest.approx(rms(a.astype(np.float64)), rel=0.1)


def test_empty_chunks_are_skipped_and_nothing_gives_nothing() -> None:
    a = sine(220, 0.2)
    assert len(join_chunks([], sample_rate=RATE, crossfade_ms=100)) == 0
    assert np.array_equal(join_chunks([np.zeros(0, np.int16), a], sample_rate=RATE, crossfade_ms=100), a)


def test_loud_overlaps_are_clipped_not_wrapped() -> None:
    loud = np.full(4000, 32000, dtype=np.int16)
    joined = join_chunks([loud, loud], sample_rate=RATE, crossfade_ms=100)
    assert joined.min() > 0  # int16 overflow would wrap to negative
    assert joined.max() == 32767
