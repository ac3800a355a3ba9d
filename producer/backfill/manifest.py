"""The manifest: one JSON line per row, appended as outcomes arrive; what a re-run resumes from.

    {"id": "ch-1", "line": 2, "status": "completed", "task_id": "backfill:book:ch-1", "url": "...",
     "s3_key": "book.ch-1.ogg", "duration": 3.4, "error": null}

`status` is `completed`, `failed`, `invalid` or `conflict` (the row's task id holds another request:
not done, tried again by a re-run). Lines are written whole with one `write` on a file
opened for appending, as soon as outcomes are known, so a reader (`tail -f`, `jq`) sees whole lines
while it grows and a crash loses only the rows still in flight, never what was written. If a row
appears more than once (a failed row retried), the last line is the row's state.

One run at a time writes a manifest: the writer holds an exclusive `flock` on it for the whole run.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from producer.backfill.naming import namespace_of

__all__ = ["FINAL_STATUSES", "ManifestBusy", "ManifestIndex", "ManifestWriter", "record"]

FINAL_STATUSES = ("completed", "failed")
"""Statuses of rows that were sent (or found done); `invalid` rows are known by line instead."""


class ManifestBusy(RuntimeError):
    """Another run is writing this manifest."""


def record(
    row_id: str | None, line: int, status: str, *, task_id: str | None = None, url: str | None = None,
    s3_key: str | None = None, duration: float | None = None, error: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One manifest line, with every field present (null when it does not apply)."""
    return {
        "id": row_id, "line": line, "status": status, "task_id": task_id, "url": url, "s3_key": s3_key,
        "duration": duration, "error": error,
    }  # fmt: skip


@dataclass
class ManifestIndex:
    """What an existing manifest says: each row's last status, the lines recorded as invalid, the
    namespace of the last task id it records, and how many lines could not be read (a line torn by
    a crash)."""

    status: dict[str, str] = field(default_factory=dict)
    invalid_lines: set[int] = field(default_factory=set)
    namespace: str | None = None
    unreadable_lines: int = 0

    @classmethod
    def load(cls, path: Path) -> ManifestIndex:
        """Read `path` line by line (a missing file is an empty manifest; a torn line is skipped)."""
        index = cls()
        if not path.exists():
            return index
        with path.open(encoding="utf-8", errors="replace") as lines:
            for text in lines:
                index._add(text)
        return index

    def _add(self, text: str) -> None:
        try:
            entry = json.loads(text)
            row_id, status = entry.get("id"), entry["status"]
        except (ValueError, KeyError, AttributeError):
            self.unreadable_lines += 1
            return
        task = entry.get("task_id")
        if isinstance(task, str) and (namespace := namespace_of(task)):
            self.namespace = namespace
        if status in FINAL_STATUSES and isinstance(row_id, str):
            self.status[row_id] = status
        elif status == "conflict" and isinstance(row_id, str):
            self.status.pop(row_id, None)  # the last line is the row's state: not done
        elif status == "invalid" and isinstance(entry.get("line"), int):
            self.invalid_lines.add(entry["line"])


class ManifestWriter:
    """Appends records to the manifest, holding an exclusive lock on it until closed."""

    SYNC_EVERY_S = 2.0

    def __init__(self, path: Path) -> None:
        self.path = path
        # Private: each completed line holds a presigned URL, a credential for that audio.
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.fchmod(self._fd, 0o600)  # a manifest made before this rule, too
        except OSError:
            os.close(self._fd)
            raise
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise ManifestBusy(f"{path} is being written by another run (one run per manifest)") from None
        self._synced_at = time.monotonic()
        if _ends_without_newline(path):  # a line torn by a machine crash: start ours on a fresh line
            os.write(self._fd, b"\n")

    def write(self, records: Iterable[dict[str, Any]]) -> None:
        """Append whole lines, in one write; sync to disk every couple of seconds."""
        data = b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n" for r in records)
        while data:
            data = data[os.write(self._fd, data) :]
        if time.monotonic() - self._synced_at > self.SYNC_EVERY_S:
            os.fsync(self._fd)
            self._synced_at = time.monotonic()

    def close(self) -> None:
        """Sync, release the lock and close."""
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1


def _ends_without_newline(path: Path) -> bool:
    with path.open("rb") as stream:
        if stream.seek(0, os.SEEK_END) == 0:
            return False
        stream.seek(-1, os.SEEK_END)
        return stream.read(1) != b"\n"
