"""Model files on this machine: where each one is, whether it is whole, and the record that says so.

`fetch` writes a record, `CHECKPOINTS_DIR/.model-files.json`: for each repository of the manifest
the commit it fetched and, for each file, the size and digest the hub listed (sha256 for LFS files,
the git blob id for small ones), plus the mtime at which the local copy last hashed to that digest.
With it, presence and sizes are answered from `stat` alone (the worker's start check), and a file is
hashed again only when its size or mtime changed since it was verified: a second run does not re-read
gigabytes, yet a truncated or rewritten file is caught.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from huggingface_hub import try_to_load_from_cache

from tts_worker.models.manifest import CHECKPOINTS, ModelRepo

__all__ = ["RECORD_NAME", "ExpectedFile", "Hashing", "Inspection", "Record", "inspect", "local_path"]

RECORD_NAME = ".model-files.json"
_FORMAT = 1
_BLOCK = 1 << 20

Hashing = Literal["never", "if-changed", "always"]


@dataclass(frozen=True)
class ExpectedFile:
    """A file as the hub lists it, and when its local copy last matched."""

    repo_id: str
    path: str
    size: int
    digest: str
    """`sha256:<hex>` for LFS files, `git-sha1:<hex>` (the git blob id) for the others."""
    verified_mtime_ns: int | None = None

    @property
    def name(self) -> str:
        """`<repo id>/<path>`, as messages name the file."""
        return f"{self.repo_id}/{self.path}"


@dataclass(frozen=True)
class Inspection:
    """What a look at one local file found."""

    problem: str | None
    """None when the file is whole; else what is wrong, e.g. "missing"."""
    verified_mtime_ns: int | None = None
    """Set when this look hashed the file and it matched: the mtime to record."""


def local_path(
    repo: ModelRepo, path: str, *, checkpoints_dir: Path, cache_dir: Path | None, commit: str | None = None
) -> Path | None:
    """Where the model will look for this file; None when the Hugging Face cache has no copy.

    In the cache, by default, the snapshot that `repo.revision` names now, as the model asks; with
    `commit`, that commit's snapshot, which a fetch must fill before the revision is moved to it.
    """
    if repo.destination == CHECKPOINTS:
        return checkpoints_dir / path
    revision = commit or repo.revision
    found = try_to_load_from_cache(repo.repo_id, path, cache_dir=cache_dir, revision=revision)
    return Path(found) if isinstance(found, str) else None


def inspect(expected: ExpectedFile, path: Path | None, *, hashing: Hashing) -> Inspection:
    """Check presence and size, and the digest as `hashing` says."""
    try:
        stat = path.stat() if path is not None else None
    except FileNotFoundError:
        stat = None
    if path is None or stat is None:
        return Inspection("missing")
    if stat.st_size != expected.size:
        return Inspection(f"size {stat.st_size} bytes, expected {expected.size}")
    if hashing == "never" or (hashing == "if-changed" and stat.st_mtime_ns == expected.verified_mtime_ns):
        return Inspection(None)
    if file_digest(path, expected.digest.split(":", 1)[0]) != expected.digest:
        return Inspection(f"content differs from the hub's ({expected.digest.split(':', 1)[0]} mismatch)")
    return Inspection(None, verified_mtime_ns=stat.st_mtime_ns)


def file_digest(path: Path, algorithm: str) -> str:
    """`sha256:<hex>` of the content, or `git-sha1:<hex>`, the id git (and the hub) gives a small file."""
    if algorithm == "sha256":
        digest = hashlib.sha256()
    elif algorithm == "git-sha1":
        digest = hashlib.sha1(usedforsecurity=False)  # git's object id, not a security measure
        digest.update(f"blob {path.stat().st_size}\0".encode())
    else:
        raise ValueError(f"unknown digest algorithm {algorithm!r}")
    with path.open("rb") as stream:
        while block := stream.read(_BLOCK):
            digest.update(block)
    return f"{algorithm}:{digest.hexdigest()}"


class Record:
    """The JSON record of what `fetch` listed and verified, kept next to the checkpoints."""

    def __init__(self, path: Path, repos: dict[str, tuple[str, dict[str, ExpectedFile]]]) -> None:
        self.path = path
        self.repos = repos
        """repo id -> (commit, path in repo -> expected file)"""

    @classmethod
    def load(cls, checkpoints_dir: Path) -> Record:
        """The record in `checkpoints_dir`; an empty one when there is none or it cannot be read."""
        path = checkpoints_dir / RECORD_NAME
        try:
            data = json.loads(path.read_text())
            if data["format"] != _FORMAT:
                raise ValueError(f"record format {data['format']}")
            repos = {repo_id: _entry(repo_id, entry) for repo_id, entry in data["repos"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            # No record, or one from another format: everything is checked from scratch.
            repos = {}
        return cls(path, repos)

    def files(self, repo_id: str) -> list[ExpectedFile] | None:
        """The files recorded for a repository; None when it was never listed."""
        entry = self.repos.get(repo_id)
        return None if entry is None else list(entry[1].values())

    def set_listing(self, repo_id: str, commit: str, files: list[ExpectedFile]) -> list[ExpectedFile]:
        """Record what the hub lists now; a file whose digest did not change keeps its verification."""
        old = self.repos.get(repo_id, ("", {}))[1]
        kept = [
            replace(f, verified_mtime_ns=old[f.path].verified_mtime_ns)
            if f.path in old and old[f.path].digest == f.digest
            else f
            for f in files
        ]
        self.repos[repo_id] = (commit, {f.path: f for f in kept})
        return kept

    def mark_verified(self, expected: ExpectedFile, mtime_ns: int) -> None:
        """Remember that the local copy hashed to the expected digest at this mtime."""
        self.repos[expected.repo_id][1][expected.path] = replace(expected, verified_mtime_ns=mtime_ns)

    def save(self) -> None:
        """Write the record atomically, so an interrupted fetch leaves the previous one or this one."""
        data = {
            "format": _FORMAT,
            "repos": {
                repo_id: {
                    "commit": commit,
                    "files": {p: _without_names(f) for p, f in sorted(files.items())},
                }
                for repo_id, (commit, files) in sorted(self.repos.items())
            },
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")  # one per writer
        partial.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(partial, self.path)


def _entry(repo_id: str, entry: dict[str, Any]) -> tuple[str, dict[str, ExpectedFile]]:
    files = {path: ExpectedFile(repo_id, path, **fields) for path, fields in entry["files"].items()}
    return str(entry["commit"]), files


def _without_names(expected: ExpectedFile) -> dict[str, object]:
    fields = asdict(expected)
    del fields["repo_id"], fields["path"]
    return fields
