"""Streaming synthesis: 16-bit PCM sent piece by piece, each as soon as its chunk of text is spoken.

This is the RunPod shim's `stream: true` mode, kept from the seed: nothing is encoded or stored, and
the first piece leaves as soon as the first chunk exists. Pieces are at the engine's own rate (22050 Hz
for IndexTTS2 and Piper), which every message states in `sample_rate`, as the seed's did; resampling
piece by piece would put a filter edge at every seam.

Crossfades are the batch pipeline's (`StreamJoiner`): each piece holds back the samples that the
next chunk may still blend with, so the pieces laid end to end equal the audio a batch job encodes.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

from tts_contract.schema import TTSRequest
from tts_worker.chunking import text_chunks
from tts_worker.engines import Audio
from tts_worker.pipeline import Services, joined_pieces, voice_inputs

__all__ = ["PCM_FORMAT", "stream_pcm"]

PCM_FORMAT = "pcm_16"
"""The seed's name for mono signed 16-bit little-endian PCM."""


def stream_pcm(
    request: TTSRequest, services: Services, *, crossfade_ms: int | None = None
) -> Iterator[dict[str, Any]]:
    """Synthesise chunk by chunk, yielding the seed's `streaming` messages, then its `complete` one.
    `crossfade_ms` replaces the request's (the seed's `stream_crossfade_ms`, which may run to 2000 ms);
    `enable_crossfade: false` turns either off."""
    engine = services.engine
    voice = voice_inputs(request, services.settings)
    sent = samples = 0
    # The last piece carries what was held back for a crossfade, as the seed sent it.
    for piece in joined_pieces(text_chunks(request), request, engine, voice, crossfade_ms=crossfade_ms):
        if len(piece):
            sent, samples = sent + 1, samples + len(piece)
            yield _pcm_message(piece, chunk=sent, sample_rate=engine.sample_rate)
    yield {
        "status": "complete",
        "format": PCM_FORMAT,
        "message": "All chunks streamed",
        "total_chunks": sent,
        "sample_rate": engine.sample_rate,
        "duration": round(samples / engine.sample_rate, 3),
    }


def _pcm_message(audio: Audio, *, chunk: int, sample_rate: int) -> dict[str, Any]:
    """One `streaming` message: base64 of little-endian int16 samples, numbered from 1."""
    return {
        "status": "streaming",
        "chunk": chunk,
        "format": PCM_FORMAT,
        "audio_chunk": base64.b64encode(audio.astype("<i2").tobytes()).decode("ascii"),
        "sample_rate": sample_rate,
    }
