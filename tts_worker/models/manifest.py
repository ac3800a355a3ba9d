"""Every file the IndexTTS engines load, declared in one place: which repository, which revision, which
files, and where they must land. `MANIFESTS` holds one list per engine; `MANIFEST` is IndexTTS2's.

Two destinations, because the model loads from two places (see `indextts/infer_v2.py`):
- `CHECKPOINTS`: the `IndexTeam/IndexTTS-2` (or `-2.5`) repository as plain files in
  `CHECKPOINTS_DIR` (`IndexTTS2(model_dir=CHECKPOINTS_DIR)`), every file of it, as the hub lists them;
- `HF_CACHE`: helper models that the model asks `huggingface_hub` / `transformers` for by repository
  name while it loads (`hf_hub_download(repo, filename)`, `X.from_pretrained(repo)`), so they must
  sit in the normal Hugging Face cache where those calls find them with `HF_HUB_OFFLINE=1`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["CHECKPOINTS", "HF_CACHE", "MANIFEST", "MANIFESTS", "Destination", "ModelRepo", "manifest_for"]

Destination = Literal["checkpoints", "hf-cache"]
CHECKPOINTS: Destination = "checkpoints"
HF_CACHE: Destination = "hf-cache"


@dataclass(frozen=True)
class ModelRepo:
    """One model repository on the hub and the files of it that the worker needs."""

    repo_id: str
    destination: Destination
    files: tuple[str, ...] | None
    """Paths inside the repository; None for every file the hub lists at `revision`."""
    loaded_by: str
    """What asks for these files at start: the reason they are here."""
    revision: str = "main"
    """A branch, not a commit: the model asks the cache for `main`, which a branch name records."""

    def wants(self, path: str) -> bool:
        """Whether the file at `path` in the repository is needed."""
        return self.files is None or path in self.files


W2V_BERT = ModelRepo(
    "facebook/w2v-bert-2.0",
    HF_CACHE,
    # Not the whole repository: it also holds the same weights in another format (conformer_shaw.pt).
    ("config.json", "preprocessor_config.json", "model.safetensors"),
    "SeamlessM4TFeatureExtractor.from_pretrained and Wav2Vec2BertModel.from_pretrained",
)
CAMPPLUS = ModelRepo(
    "funasr/campplus",
    HF_CACHE,
    ("campplus_cn_common.bin",),
    'hf_hub_download("funasr/campplus", filename="campplus_cn_common.bin")',
)
BIGVGAN = ModelRepo(
    "nvidia/bigvgan_v2_22khz_80band_256x",
    HF_CACHE,
    ("config.json", "bigvgan_generator.pt"),
    "BigVGAN.from_pretrained (the vocoder named in config.yaml)",
)

MANIFEST: tuple[ModelRepo, ...] = (
    ModelRepo(
        "IndexTeam/IndexTTS-2",
        CHECKPOINTS,
        None,
        "IndexTTS2(model_dir=CHECKPOINTS_DIR): config.yaml, gpt.pth, s2mel.pth, qwen0.6bemo4-merge/, ...",
    ),
    W2V_BERT,
    ModelRepo(
        "amphion/MaskGCT",
        HF_CACHE,
        ("semantic_codec/model.safetensors",),
        'hf_hub_download("amphion/MaskGCT", filename="semantic_codec/model.safetensors")',
    ),
    CAMPPLUS,
    BIGVGAN,
)

MANIFESTS: dict[str, tuple[ModelRepo, ...]] = {
    "indextts2": MANIFEST,
    "indextts25": (
        ModelRepo(
            "IndexTeam/IndexTTS-2.5",
            CHECKPOINTS,
            None,
            "IndexTTS25(model_dir=CHECKPOINTS_DIR): config.yaml, gpt.pth, codec.pth, s2mel.pth, ...",
        ),
        # indextts25-inference's utils/model_download.py asks the hub for these three, by name.
        W2V_BERT,
        CAMPPLUS,
        BIGVGAN,
    ),
}


def manifest_for(engine: str) -> tuple[ModelRepo, ...]:
    """The files TTS_ENGINE=`engine` loads; IndexTTS2's for an engine that needs none fetched."""
    return MANIFESTS.get(engine, MANIFEST)
