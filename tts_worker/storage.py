"""Audio objects in S3 (or any S3-compatible server: MinIO, moto), through boto3.

An object is written in one PUT once its bytes are complete, so no reader ever sees half a file
under its final key. URLs are presigned with SigV4, which MinIO and AWS require (boto3's default for
presigning is still SigV2 on some endpoints).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from producer.errors import StorageError
from tts_worker.settings import Settings, SettingsError

__all__ = ["S3Storage"]


class S3Storage:
    """One bucket of an S3-compatible server. Make it in the process that uses it (boto3 clients do
    not survive a fork)."""

    def __init__(self, settings: Settings) -> None:
        if not settings.s3_bucket_name:
            raise SettingsError("S3_BUCKET_NAME is required to store audio and not set")
        self.bucket = settings.s3_bucket_name
        self.endpoint = settings.s3_endpoint_url or "AWS S3"
        self._client = boto3.client(
            "s3",
            endpoint_url=settings.s3_endpoint_url,
            aws_access_key_id=settings.s3_access_key_id,
            aws_secret_access_key=settings.s3_secret_access_key,
            region_name=settings.s3_region,
            config=Config(
                signature_version="s3v4",
                retries={"mode": "standard", "max_attempts": 3},
                connect_timeout=10,
                read_timeout=60,
                # Custom endpoints (MinIO, moto) rarely have per-bucket DNS names.
                s3={"addressing_style": "path" if settings.s3_endpoint_url else "auto"},
            ),
        )

    def check_bucket(self) -> None:
        """Raise `StorageError` saying what is wrong if the bucket cannot be used."""
        with self._errors("use the bucket", missing="does the bucket exist?"):
            self._client.head_bucket(Bucket=self.bucket)

    def put(self, key: str, data: bytes, *, content_type: str, metadata: Mapping[str, str]) -> None:
        """Write the whole object in one request."""
        with self._errors(f"upload {key}"):
            self._client.put_object(
                Bucket=self.bucket, Key=key, Body=data, ContentType=content_type, Metadata=dict(metadata)
            )

    def metadata(self, key: str) -> dict[str, str] | None:
        """The user metadata of `key`, or None when there is no such object."""
        try:
            with self._errors(f"look up {key}"):
                head = self._client.head_object(Bucket=self.bucket, Key=key)
        except StorageError as exc:
            if isinstance(exc.__cause__, ClientError) and _status(exc.__cause__) == 404:
                return None
            raise
        return dict(head.get("Metadata", {}))

    def presign(self, key: str, *, expires_s: int) -> str:
        """A GET URL for `key`, valid for `expires_s` seconds."""
        with self._errors(f"presign {key}"):
            url: str = self._client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expires_s
            )
        return url

    @contextmanager
    def _errors(self, action: str, *, missing: str = "") -> Iterator[None]:
        """Turn boto's errors into `StorageError`s saying what we tried, where, and what S3 answered."""
        where = f"bucket {self.bucket!r} at {self.endpoint}"
        try:
            yield
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code") or str(_status(exc))
            hint = f" ({missing})" if missing and _status(exc) == 404 else ""
            raise StorageError(f"S3 could not {action} ({where}): {code}{hint}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"S3 could not {action} ({where}): {exc}") from exc


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
