"""Where finished audio goes: an S3 bucket (the default) or a local directory (OUTPUT_STORAGE=local).

Either way a file appears under its final name only once its bytes are complete, so no reader ever
sees half of one: S3 gets the object in one PUT; the directory gets a hidden temporary file that is
renamed into place. Each stored file carries the metadata a redelivered job rebuilds its result from.

A file is written only where none is, unless the caller says to replace it (`replace=True`), and that
is decided by the store itself, atomically, not by looking first: S3's conditional write
(`If-None-Match: *`), a hard link for the directory. Two jobs racing for one name: one stores, the
other gets `KeyTaken`.

S3 outages are waited out in place: an upload that cannot reach the server (connection refused or
cut, a timeout, a 5xx or a throttling answer) is tried again with backoff for STORAGE_RETRY_S, the
encoded audio kept in memory, before the job fails with a `StorageError` (which the task retries from
the start). The look-up before synthesis waits briefly the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import quote

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_before_delay, wait_random_exponential

from tts_contract.errors import StorageError
from tts_contract.formats import FORMATS
from tts_worker.settings import Settings, SettingsError

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

__all__ = ["LOOKUP_RETRY_S", "KeyTaken", "LocalStorage", "S3Storage", "Storage", "make_storage"]

log = logging.getLogger(__name__)

LOOKUP_RETRY_S = 15.0
"""How long the look-up before synthesis waits out an S3 outage: briefly, for nothing is lost by
failing then (the job is retried before any synthesis was done)."""
_RETRY_WAIT_MAX_S = 15.0
"""The longest pause between two tries, so that the store is tried soon after it is back."""
_PASSING_CODES = frozenset(
    # ConditionalRequestConflict: AWS's answer to a conditional write racing another on the same key.
    {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "ServiceUnavailable",
     "ConditionalRequestConflict"}
)  # fmt: skip


class KeyTaken(Exception):
    """A file is stored under the key already, and the write was not to replace it."""


class Storage(Protocol):
    """What the pipeline needs of a place to keep audio."""

    def check(self) -> None:
        """Raise `StorageError` saying what is wrong if nothing can be stored."""

    def put(
        self, key: str, data: bytes, *, content_type: str, metadata: Mapping[str, str], replace: bool
    ) -> None:
        """Store `data` under `key`, all of it or nothing; unless `replace`, only where nothing is
        stored yet (else `KeyTaken`, and nothing is written)."""

    def metadata(self, key: str) -> dict[str, str] | None:
        """The metadata stored with `key`, or None when there is no such file."""

    def url(self, key: str, *, expires_s: int) -> str:
        """Where the client fetches `key` (valid for `expires_s` seconds where the back end can say so)."""

    def describe(self) -> str:
        """Where files go, for logs and health checks (no secrets)."""


def make_storage(settings: Settings) -> Storage:
    """The storage OUTPUT_STORAGE names. Make it in the process that uses it (boto3 clients do not
    survive a fork)."""
    if settings.output_storage == "local":
        return LocalStorage(settings)
    return S3Storage(settings)


class S3Storage:
    """One bucket of an S3-compatible server (AWS, MinIO, moto), through boto3. URLs are presigned
    with SigV4, which MinIO and AWS require (boto3 still presigns with SigV2 on some endpoints)."""

    def __init__(self, settings: Settings) -> None:
        if not settings.s3_bucket_name:
            raise SettingsError(
                "S3_BUCKET_NAME is required to store audio in S3 and not set (or set OUTPUT_STORAGE=local)"
            )
        self.bucket = settings.s3_bucket_name
        self.endpoint = settings.s3_endpoint_url or "AWS S3"
        self.retry_s = settings.storage_retry_s
        self._client = _client(settings, settings.s3_endpoint_url)
        # SigV4 signs the host, so a URL for clients outside the worker's network (compose's
        # http://minio:9000 means nothing to them) must be signed for the host they reach.
        public = settings.s3_public_endpoint_url or settings.s3_endpoint_url
        self._presigner = self._client if public == settings.s3_endpoint_url else _client(settings, public)

    def describe(self) -> str:
        return f"bucket {self.bucket!r} at {self.endpoint}"

    def check(self) -> None:
        """Raise `StorageError` saying what is wrong if the bucket cannot be used."""
        with self._errors("use the bucket", missing="does the bucket exist?"):
            self._client.head_bucket(Bucket=self.bucket)

    def put(
        self, key: str, data: bytes, *, content_type: str, metadata: Mapping[str, str], replace: bool
    ) -> None:
        """Write the whole object in one request, tried again while S3 cannot be reached (for
        STORAGE_RETRY_S); unless `replace`, as a conditional write that S3 refuses (412) when the
        key exists."""
        condition = {} if replace else {"IfNoneMatch": "*"}
        try:
            for attempt in self._retrying(f"upload {key}", within_s=self.retry_s):
                with attempt, self._errors(f"upload {key}"):
                    self._client.put_object(
                        Bucket=self.bucket, Key=key, Body=data, ContentType=content_type,
                        Metadata=dict(metadata), **condition,  # type: ignore[arg-type]
                    )  # fmt: skip
        except StorageError as exc:
            if isinstance(exc.__cause__, ClientError) and _status(exc.__cause__) == 412:
                raise KeyTaken(key) from None
            raise

    def metadata(self, key: str) -> dict[str, str] | None:
        """The user metadata of `key`, or None when there is no such object (tried again while S3
        cannot be reached, for LOOKUP_RETRY_S)."""
        try:
            for attempt in self._retrying(f"look up {key}", within_s=min(LOOKUP_RETRY_S, self.retry_s)):
                with attempt, self._errors(f"look up {key}"):
                    head = self._client.head_object(Bucket=self.bucket, Key=key)
        except StorageError as exc:
            if isinstance(exc.__cause__, ClientError) and _status(exc.__cause__) == 404:
                return None
            raise
        return dict(head.get("Metadata", {}))

    def url(self, key: str, *, expires_s: int) -> str:
        """A presigned GET URL for `key`, valid for `expires_s` seconds."""
        with self._errors(f"presign {key}"):
            url: str = self._presigner.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expires_s
            )
        return url

    def _retrying(self, action: str, *, within_s: float) -> Retrying:
        """Tries of one request: again, with exponential backoff and jitter, while the failure is one
        that passes (see `_passing`) and a new try can start within `within_s` of the first."""

        def note(state: RetryCallState) -> None:
            wait = state.upcoming_sleep
            log.warning(
                "S3 could not %s (%s): %s; trying again in %.1f s (try %d, giving up %.0f s after the first)",
                action, self.describe(), state.outcome.exception() if state.outcome else "?", wait,
                state.attempt_number + 1, within_s,
            )  # fmt: skip

        return Retrying(
            retry=retry_if_exception(_passing),
            stop=stop_before_delay(within_s),
            wait=wait_random_exponential(multiplier=1, max=_RETRY_WAIT_MAX_S),
            before_sleep=note,
            reraise=True,
        )

    @contextmanager
    def _errors(self, action: str, *, missing: str = "") -> Iterator[None]:
        """Turn boto's errors into `StorageError`s saying what we tried, where, and what S3 answered."""
        where = self.describe()
        try:
            yield
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code") or str(_status(exc))
            hint = f" ({missing})" if missing and _status(exc) == 404 else ""
            raise StorageError(f"S3 could not {action} ({where}): {code}{hint}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"S3 could not {action} ({where}): {exc}") from exc


def _client(settings: Settings, endpoint_url: str | None) -> S3Client:
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=settings.s3_access_key_id,
        aws_secret_access_key=settings.s3_secret_access_key,
        region_name=settings.s3_region,
        config=Config(
            signature_version="s3v4",
            retries={"mode": "standard", "max_attempts": 3},
            connect_timeout=10,
            read_timeout=60,
            # Custom endpoints (MinIO, moto) rarely have per-bucket DNS names.
            s3={"addressing_style": "path" if endpoint_url else "auto"},
        ),
    )


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _passing(exc: BaseException) -> bool:
    """Whether a `StorageError` is a fault that passes by itself (S3 unreachable, overloaded or
    restarting), worth waiting out; not one the same request would meet again (no bucket, access
    denied, a bad request)."""
    cause = exc.__cause__
    if isinstance(cause, (BotoConnectionError, HTTPClientError)):
        return True
    if isinstance(cause, ClientError):
        return _status(cause) >= 500 or cause.response.get("Error", {}).get("Code") in _PASSING_CODES
    return False


class LocalStorage:
    """Files under OUTPUT_AUDIO_DIR, for one host or a shared volume; no S3 needed.

    The URL is OUTPUT_BASE_URL + key when a web server publishes the directory, else a file:// URL
    (URLs do not expire). Metadata lives in a hidden `.<name>.json` beside each file, with the digest
    of the bytes it describes: two jobs writing the same name at once cannot pair one's audio with the
    other's metadata unnoticed. Files older than CLEANUP_DAYS are removed at start and then at most
    once an hour, as jobs store new ones."""

    SWEEP_EVERY_S = 3600.0

    def __init__(self, settings: Settings) -> None:
        self.root = settings.output_audio_dir.resolve()
        self.base_url = settings.output_base_url
        self.cleanup_days = settings.cleanup_days
        self._swept_at: float | None = None

    def describe(self) -> str:
        return f"OUTPUT_AUDIO_DIR {self.root}"

    def check(self) -> None:
        """Raise `StorageError` unless files can be written in the directory (creating it if need be)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.root):
                pass
        except OSError as exc:
            raise StorageError(f"cannot write audio to {self.describe()}: {exc.strerror or exc}") from None
        self._sweep_if_due()

    def put(
        self, key: str, data: bytes, *, content_type: str, metadata: Mapping[str, str], replace: bool
    ) -> None:
        """Write the audio and its metadata, each to a temporary file put in place at once: renamed
        over what was there with `replace`, else hard-linked, which fails when the name exists.
        The audio goes first: its name is the claim, and metadata describing other bytes is ignored."""
        path = self._path(key)
        described = {**metadata, _DIGEST: hashlib.sha256(data).hexdigest()}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_atomically(path, data, replace=replace)
            _write_atomically(_sidecar(path), json.dumps(described).encode(), replace=True)
        except FileExistsError:
            raise KeyTaken(key) from None
        except OSError as exc:
            raise StorageError(f"cannot write {key} to {self.describe()}: {exc.strerror or exc}") from exc
        self._sweep_if_due()

    def metadata(self, key: str) -> dict[str, str] | None:
        """The metadata stored with `key`; empty when it is missing or describes other bytes (so the
        job is done again), None when there is no such file."""
        path = self._path(key)
        try:
            data = path.read_bytes()
            stored = json.loads(_sidecar(path).read_text())
        except FileNotFoundError as exc:
            return None if exc.filename == str(path) else {}
        except (OSError, ValueError):
            return {}
        if not isinstance(stored, dict) or stored.pop(_DIGEST, None) != hashlib.sha256(data).hexdigest():
            return {}
        return {str(k): str(v) for k, v in stored.items()}

    def url(self, key: str, *, expires_s: int) -> str:
        if self.base_url:
            return self.base_url.rstrip("/") + "/" + quote(key)
        return self._path(key).as_uri()

    def sweep(self) -> int:
        """Remove the files this storage wrote (audio, its metadata, left-over temporary files) that
        are older than CLEANUP_DAYS; how many went. Nothing else is touched, wherever
        OUTPUT_AUDIO_DIR points (a model folder, a home directory)."""
        if not self.cleanup_days or not self.root.is_dir():
            return 0
        cutoff, removed = time.time() - self.cleanup_days * 86_400, 0
        for path in self.root.rglob("*"):
            with suppress(OSError):  # gone meanwhile, or not ours to remove: leave it
                ours = _written_here(path.name) and path.is_file() and not path.is_symlink()
                if ours and path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
        return removed

    def _sweep_if_due(self) -> None:
        now = time.monotonic()
        if self._swept_at is None or now - self._swept_at >= self.SWEEP_EVERY_S:
            self._swept_at = now
            removed = self.sweep()
            if removed:
                log.info("removed %d files older than %d days from %s", removed, self.cleanup_days, self.root)

    def _path(self, key: str) -> Path:
        # Keys are S3_KEY_PREFIX plus a name the schema restricts to [A-Za-z0-9._-] and an audio
        # extension, so they never collide with the .json and .part files; only the prefix could lead out.
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise StorageError(f"{key!r} is not a file name inside {self.describe()}")
        return path


_DIGEST = "sha256"


_AUDIO_NAME = re.compile(
    r"[A-Za-z0-9._-]+(" + "|".join(re.escape(fmt.extension) for fmt in FORMATS.values()) + ")"
)


def _written_here(name: str) -> bool:
    """Whether a file name is one this storage writes: audio (`<id>.<ext>`), its metadata
    (`.<id>.<ext>.json`) or a temporary file of either (`.<name>.<random>.part`)."""
    if name.startswith(".") and name.endswith(".part"):  # `_write_atomically`'s temporary name
        name = name[1:].rsplit(".", 2)[0]
    if name.startswith(".") and name.endswith(".json"):  # `_sidecar`
        name = name[1:-5]
    return bool(_AUDIO_NAME.fullmatch(name))


def _sidecar(path: Path) -> Path:
    return path.with_name(f".{path.name}.json")


def _write_atomically(path: Path, data: bytes, *, replace: bool) -> None:
    """`data` under `path`, complete or not at all: a hidden temporary file, fsynced, then renamed
    over `path` (`replace`) or linked to it, which raises FileExistsError when `path` exists."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o644)  # mkstemp makes it private; the audio is meant to be served
        if replace:
            os.replace(temporary, path)
        else:
            os.link(temporary, path)
            os.unlink(temporary)
    except BaseException:
        with suppress(OSError):
            os.unlink(temporary)
        raise
