"""Speaker and emotion conditionings of IndexTTS2, remembered by the content of the voice file.

IndexTTS2 keeps one speaker conditioning and one emotion conditioning, keyed by the path string it
was given: a voice file replaced at the same path is served stale, and two voices used in turn are
recomputed on every job (a second or more of GPU time each). This cache keys them on the sha256 of
the file's bytes instead, and keeps the last few of each in an LRU.

It works through the model's own cache attributes (`cache_spk_*`, `cache_emo_*`, as named in
indextts2-inference's `infer_v2.py`): before a call it loads the entry for this content, or empties
the model's slot so that the model computes it afresh; after the call it keeps what the model made.
Those attributes are private: should a release rename one, writing the old name would change
nothing the model reads, and a replaced voice file would be served stale without a word. So the
cache refuses to start unless the model has every one of them (see `ConditioningCache`).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import Any

__all__ = ["ConditioningCache", "file_digest"]

SPEAKER_SLOT = ("cache_spk_cond", "cache_s2mel_style", "cache_s2mel_prompt", "cache_mel")
SPEAKER_KEY = "cache_spk_audio_prompt"
EMOTION_SLOT = ("cache_emo_cond",)
EMOTION_KEY = "cache_emo_audio_prompt"


def file_digest(path: Path) -> str:
    """sha256 of the file's bytes (reference voices are small: a few milliseconds)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _Slot:
    """One of the model's single-entry caches, made into an LRU keyed by content."""

    def __init__(self, model: Any, attributes: tuple[str, ...], key_attribute: str, size: int) -> None:
        self.model, self.attributes, self.key_attribute, self.size = model, attributes, key_attribute, size
        self.entries: OrderedDict[str, tuple[Any, ...]] = OrderedDict()
        self.hits = self.misses = 0

    def prepare(self, path: Path, digest: str) -> None:
        """Make the model find this content's conditioning, or compute it afresh."""
        entry = self.entries.get(digest)
        if entry is None:
            self.misses += 1
            setattr(self.model, self.attributes[0], None)  # the model recomputes when its first is None
            return
        self.hits += 1
        self.entries.move_to_end(digest)
        for name, value in zip(self.attributes, entry, strict=True):
            setattr(self.model, name, value)
        setattr(self.model, self.key_attribute, str(path))

    def keep(self, path: Path, digest: str) -> None:
        """Remember what the model holds now, if it holds this file's conditioning."""
        if self.size == 0 or getattr(self.model, self.key_attribute, None) != str(path):
            return
        self.entries[digest] = tuple(getattr(self.model, name) for name in self.attributes)
        self.entries.move_to_end(digest)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)


class ConditioningCache:
    """Per-process LRU of speaker and emotion conditionings for one IndexTTS2 model.

    Raises RuntimeError when the model lacks one of the attributes it works through. Failing is the
    safe choice: disabling the LRU would not help, since even with VOICE_CACHE_SIZE=0 it is this
    cache that empties the model's path-keyed slot so that a replaced file is analysed afresh;
    without that, IndexTTS2 itself serves the old voice for the same path."""

    def __init__(self, model: Any, *, size: int) -> None:
        missing = [name for name in (*SPEAKER_SLOT, SPEAKER_KEY, *EMOTION_SLOT, EMOTION_KEY)
                   if not hasattr(model, name)]  # fmt: skip
        if missing:
            raise RuntimeError(
                f"this IndexTTS2 ({type(model).__module__}) has no {', '.join(missing)}: its voice "
                "caches changed, and voice files replaced under the same name would be served stale; "
                "install the indextts2-inference version pinned in docker/constraints-gpu.txt"
            )
        self.speaker = _Slot(model, SPEAKER_SLOT, SPEAKER_KEY, size)
        self.emotion = _Slot(model, EMOTION_SLOT, EMOTION_KEY, size)

    def prepare(self, speaker: Path, emotion: Path) -> tuple[str, str]:
        """Set the model up for these two files; returns their digests for `keep`."""
        digests = file_digest(speaker), file_digest(emotion)
        self.speaker.prepare(speaker, digests[0])
        self.emotion.prepare(emotion, digests[1])
        return digests

    def keep(self, speaker: Path, emotion: Path, digests: tuple[str, str]) -> None:
        """After a successful call: remember the conditionings the model computed or reused."""
        self.speaker.keep(speaker, digests[0])
        self.emotion.keep(emotion, digests[1])
