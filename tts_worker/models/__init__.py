"""The model files IndexTTS2 needs: declared once, fetched from the hub, verified, checked at start.

- `MANIFEST` (`manifest.py`): each repository, its revision, the files wanted and where they go:
  `IndexTeam/IndexTTS-2` as plain files in CHECKPOINTS_DIR, the helper models the model asks for by
  name while loading into the Hugging Face cache.
- `fetch` (`fetch.py`, `./bootstrap models`): downloads what is missing or damaged with
  `huggingface_hub`, checks each file's size and digest against the hub's listing, and keeps a record
  (`CHECKPOINTS_DIR/.model-files.json`) so that a second run downloads and re-hashes nothing.
- `missing_model_files` (`check.py`): the worker's start check, offline and cheap (`stat` only);
  `verify_model_files` also compares digests (`./bootstrap models verify [--hashes]`).

After a fetch the worker runs with `HF_HUB_OFFLINE=1`: everything the model asks the hub for is in
the cache, where `hf_hub_download` finds it without the network.
"""

from __future__ import annotations

from tts_worker.models.check import missing_model_files, verify_model_files
from tts_worker.models.fetch import FetchReport, HubUnreachable, ModelFilesError, fetch
from tts_worker.models.local import RECORD_NAME
from tts_worker.models.manifest import MANIFEST, ModelRepo

__all__ = [
    "MANIFEST",
    "RECORD_NAME",
    "FetchReport",
    "HubUnreachable",
    "ModelFilesError",
    "ModelRepo",
    "fetch",
    "missing_model_files",
    "verify_model_files",
]
