"""Names derived from a row id: task ids, object names and guard keys, all deterministic.

A row is identified by its namespace (by default the input file's name) and its id. Users' ids may
hold any character, but object names must match `[A-Za-z0-9._-]{1,128}`, so an id that is not
already a plain name is mapped to `_<readable part>.<sha256 prefix>`. Plain names start with a letter
or digit, mapped ones with `_`, so the two sets never meet; the original id stays in the manifest.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "content_id",
    "namespace_for",
    "namespace_of",
    "next_task_id",
    "object_name",
    "session_id",
    "task_id",
    "valid_namespace",
]

"""Prefix of every Redis key the backfill writes (guards and run leases) in the broker database."""

_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}")
_NAMESPACE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,39}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def object_name(row_id: str) -> str:
    """A name for `row_id` that is safe in an object key and a task id, and unique per id."""
    if _PLAIN_NAME.fullmatch(row_id):
        return row_id
    digest = hashlib.sha256(row_id.encode("utf-8")).hexdigest()[:20]
    readable = _UNSAFE.sub("-", row_id).strip("-._")[:40]
    return f"_{readable}.{digest}" if readable else f"_{digest}"


def content_id(message: Mapping[str, Any]) -> str:
    """A stable id for a row without one: a digest of its validated fields (CSV and JSONL agree)."""
    return "auto-" + _sha256(message)[:24]


def _sha256(message: Mapping[str, Any]) -> str:
    canonical = json.dumps(message, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def valid_namespace(namespace: str) -> bool:
    """Namespaces are plain (no dots), so that `<namespace>.<name>` splits one way only."""
    return bool(_NAMESPACE.fullmatch(namespace))


def namespace_for(path: Path) -> str:
    """The default namespace: the input file's name without its extension, made plain. Runs of other
    characters than `[A-Za-z0-9_-]` become one `-` (so `book.part1.jsonl` and `book.part2.jsonl`
    keep apart), leading and trailing `-`/`_` go; a name longer than 40 is cut to 31 and gets `-` and
    8 hex digits of the whole stem's sha256; nothing left gives `backfill`.

    Different names can still map to one namespace (`book part1`, `book.part1`); the digest kept in
    each row's claim turns that into a reported conflict instead of shared audio."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "-", path.stem).strip("-_")
    if len(cleaned) > 40:
        digest = hashlib.sha256(path.stem.encode("utf-8", "surrogateescape")).hexdigest()[:8]
        cleaned = f"{cleaned[:31].rstrip('-_')}-{digest}"
    return cleaned or "backfill"


def namespace_of(task: str) -> str | None:
    """The namespace in a task id made by `task_id` (None for another kind of id)."""
    kind, _, rest = task.partition(":")
    namespace = rest.partition(":")[0]
    return namespace if kind == "backfill" and valid_namespace(namespace) else None


def session_id(namespace: str, name: str) -> str:
    """The request's `session_id`, which names the object: `<namespace>.<name>` (at most 122 chars)."""
    return f"{namespace}.{name}"


def task_id(namespace: str, name: str) -> str:
    """The first task id of a row. Colons cannot occur in names, so ids of rows never collide."""
    return f"backfill:{namespace}:{name}"


def next_task_id(current: str) -> str:
    """The task id of the next attempt (`--retry-failed`): `...:<name>:2`, then `:3`, ..."""
    base, _, attempt = current.rpartition(":")
    if base.count(":") == 2 and attempt.isdigit():
        return f"{base}:{int(attempt) + 1}"
    return f"{current}:2"
