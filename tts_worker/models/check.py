"""Are all model files here and whole? Answered offline, from the record `fetch` keeps."""

from __future__ import annotations

from pathlib import Path

from tts_worker.models.local import Hashing, Record, inspect, local_path
from tts_worker.models.manifest import manifest_for

__all__ = ["missing_model_files", "verify_model_files"]


def missing_model_files(
    checkpoints_dir: Path, *, engine: str = "indextts2", cache_dir: Path | None = None
) -> list[str]:
    """What the model would not find, one line per file (missing, or of the wrong size) or per
    repository never fetched; empty when all is there. Cheap enough for a start check: `stat` only,
    no network, no hashing. `cache_dir` defaults to the Hugging Face cache the model reads."""
    return _problems(checkpoints_dir, engine=engine, cache_dir=cache_dir, hashing="never")


def verify_model_files(
    checkpoints_dir: Path, *, engine: str = "indextts2", hashes: bool = False, cache_dir: Path | None = None
) -> list[str]:
    """`missing_model_files`, and the digest of every file changed since it was verified (of every
    file with `hashes=True`) compared with the hub's. Offline; reads the files it hashes."""
    hashing: Hashing = "always" if hashes else "if-changed"
    return _problems(checkpoints_dir, engine=engine, cache_dir=cache_dir, hashing=hashing)


def _problems(checkpoints_dir: Path, *, engine: str, cache_dir: Path | None, hashing: Hashing) -> list[str]:
    record = Record.load(checkpoints_dir)
    problems: list[str] = []
    for repo in manifest_for(engine):
        files = record.files(repo.repo_id)
        listed = {expected.path for expected in files or []}
        if files is None or (repo.files is not None and not set(repo.files) <= listed):
            problems.append(f"{repo.repo_id}: not fetched")
            continue
        for expected in files:
            path = local_path(repo, expected.path, checkpoints_dir=checkpoints_dir, cache_dir=cache_dir)
            problem = inspect(expected, path, hashing=hashing).problem
            if problem is not None:
                problems.append(f"{expected.name}: {problem}")
    return problems
