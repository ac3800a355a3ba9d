"""OUTPUT_STORAGE=local: audio under OUTPUT_AUDIO_DIR instead of S3, written whole or not at all,
reused on redelivery, and removed after CLEANUP_DAYS; through the pipeline and a real worker."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import WorkerHandle
from tests.test_worker import decode
from tts_contract.errors import EncodingError, StorageError
from tts_contract.schema import parse_request
from tts_worker.engines.tone import ToneEngine
from tts_worker.pipeline import Services, run_job
from tts_worker.settings import Settings
from tts_worker.storage import LocalStorage, make_storage

TEXT = "Local files suit one host. A shared volume suits a few."
DAY_S = 86_400


@pytest.fixture
def settings(base_env: dict[str, str], tmp_path: Path) -> Settings:
    env = {**base_env, "OUTPUT_STORAGE": "local", "OUTPUT_AUDIO_DIR": str(tmp_path / "audio")}
    del env["S3_BUCKET_NAME"]  # no S3 needed
    return Settings.from_env(env)


def services_for(settings: Settings) -> Services:
    return Services(settings=settings, engine=ToneEngine(), storage=make_storage(settings))


def listing(root: Path) -> list[str]:
    """Every file under `root`, hidden ones included, relative to it."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_the_audio_is_a_file_and_the_url_points_at_it(settings: Settings, job_id: str) -> None:
    result = run_job(
        parse_request({"text": TEXT, "output_format": "wav"}), services_for(settings), job_id=job_id
    )
    path = settings.output_audio_dir.resolve() / f"{job_id}.wav"
    assert result["url"] == path.as_uri()
    assert (result["filename"], result["s3_key"]) == (f"{job_id}.wav", f"{job_id}.wav")
    pcm = decode(result["url"])
    assert len(pcm) / 24000 == pytest.approx(result["metadata"]["duration"], abs=0.01)
    assert np.abs(pcm).max() > 1000
    assert listing(settings.output_audio_dir) == [f".{job_id}.wav.json", f"{job_id}.wav"]
    assert path.stat().st_mode & 0o777 == 0o644  # readable by whatever serves the directory


def test_a_redelivered_job_reuses_the_file(settings: Settings, job_id: str) -> None:
    services = services_for(settings)
    first = run_job(parse_request({"text": TEXT}), services, job_id=job_id)
    written = (settings.output_audio_dir / first["filename"]).stat().st_mtime_ns
    second = run_job(parse_request({"text": TEXT}), services, job_id=job_id)
    assert second["metadata"]["reused"] is True
    assert second["metadata"]["duration"] == first["metadata"]["duration"]
    assert (settings.output_audio_dir / first["filename"]).stat().st_mtime_ns == written


def test_the_base_url_and_key_prefix_name_the_file(settings: Settings, job_id: str) -> None:
    served = replace(settings, output_base_url="https://cdn.example/tts/", s3_key_prefix="voice/")
    request = parse_request({"text": TEXT, "session_id": f"s-{job_id}"})
    result = run_job(request, services_for(served), job_id=job_id)
    assert result["url"] == f"https://cdn.example/tts/voice/s-{job_id}.ogg"
    assert (settings.output_audio_dir / "voice" / f"s-{job_id}.ogg").read_bytes()[:4] == b"OggS"


def test_nothing_is_left_when_encoding_fails(settings: Settings, tmp_path: Path, job_id: str) -> None:
    broken = tmp_path / "ffmpeg"
    broken.write_text("#!/bin/sh\nhead -c 1000 /dev/urandom\necho 'encoder exploded' >&2\nexit 1\n")
    broken.chmod(0o755)
    with pytest.raises(EncodingError, match="encoder exploded"):
        run_job(parse_request({"text": TEXT}), services_for(replace(settings, ffmpeg_binary=str(broken))),
                job_id=job_id)  # fmt: skip
    assert listing(settings.output_audio_dir) == []


def test_a_write_that_fails_midway_leaves_no_file_under_the_final_name(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = LocalStorage(settings)
    storage.put("old.ogg", b"OggS old", content_type="audio/ogg", metadata={"job-id": "old"}, replace=True)

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(
        StorageError, match=r"cannot write new\.ogg to OUTPUT_AUDIO_DIR .*No space left on device"
    ):
        storage.put(
            "new.ogg", b"OggS new", content_type="audio/ogg", metadata={"job-id": "new"}, replace=True
        )
    with pytest.raises(StorageError, match="No space left"):
        storage.put(
            "old.ogg", b"OggS replaced", content_type="audio/ogg", metadata={"job-id": "again"}, replace=True
        )
    # No temporary files, no new file, and the old one whole with its own metadata.
    assert listing(settings.output_audio_dir) == [".old.ogg.json", "old.ogg"]
    assert (settings.output_audio_dir / "old.ogg").read_bytes() == b"OggS old"
    assert storage.metadata("old.ogg") == {"job-id": "old"}
    assert storage.metadata("new.ogg") is None


def test_metadata_that_describes_other_bytes_is_not_trusted(settings: Settings) -> None:
    """Two jobs with the same session_id at once: one's audio lands after the other's metadata."""
    storage = LocalStorage(settings)
    storage.put("same.ogg", b"OggS from a", content_type="audio/ogg", metadata={"job-id": "a"}, replace=True)
    assert storage.metadata("same.ogg") == {"job-id": "a"}
    (settings.output_audio_dir / "same.ogg").write_bytes(b"OggS from b")
    assert storage.metadata("same.ogg") == {}  # so a redelivered job "a" synthesises again
    (settings.output_audio_dir / ".same.ogg.json").unlink()
    assert storage.metadata("same.ogg") == {}
    (settings.output_audio_dir / "same.ogg").unlink()
    assert storage.metadata("same.ogg") is None


def test_files_older_than_cleanup_days_are_removed(settings: Settings) -> None:
    storage = LocalStorage(replace(settings, cleanup_days=2))
    for name in ("old.ogg", "new.ogg", "sub/old.mp3"):
        storage.put(name, b"audio", content_type="audio/ogg", metadata={"job-id": name}, replace=True)
    (settings.output_audio_dir / ".crashed.ogg.x1.part").write_bytes(b"half")
    (settings.output_audio_dir / "..crashed.ogg.json.x2.part").write_bytes(b"half")
    # Files this storage never writes, as when OUTPUT_AUDIO_DIR points at a model folder: kept.
    others = ("gpt.pth", "config.yaml", "notes.json", ".hidden", "x.ogg.bak", "voices/alice.wav.txt")
    for name in others:
        (settings.output_audio_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (settings.output_audio_dir / name).write_bytes(b"keep me")
    three_days_ago = time.time() - 3 * DAY_S
    old = ("old.ogg", ".old.ogg.json", "sub/old.mp3", "sub/.old.mp3.json", ".crashed.ogg.x1.part",
           "..crashed.ogg.json.x2.part", *others)  # fmt: skip
    for name in old:
        os.utime(settings.output_audio_dir / name, (three_days_ago, three_days_ago))
    assert LocalStorage(replace(settings, cleanup_days=0)).sweep() == 0  # 0 keeps everything
    assert storage.sweep() == 6
    assert listing(settings.output_audio_dir) == sorted([".new.ogg.json", "new.ogg", *others])


def test_the_worker_stops_at_start_when_the_directory_is_unusable(settings: Settings) -> None:
    storage = make_storage(replace(settings, output_audio_dir=Path("/dev/null/audio")))
    with pytest.raises(StorageError, match="cannot write audio to OUTPUT_AUDIO_DIR /dev/null/audio"):
        storage.check()


@pytest.mark.slow
def test_a_worker_without_s3_serves_jobs_from_the_producer(
    start_worker: Callable[..., WorkerHandle], base_env: dict[str, str], tmp_path: Path
) -> None:
    worker = start_worker(OUTPUT_STORAGE="local", OUTPUT_AUDIO_DIR=str(tmp_path / "audio"), S3_BUCKET_NAME="")
    result: Any = worker.tts.delay(text=TEXT, output_format="mp3", session_id="local-e2e")
    outcome = result.get(timeout=60)
    assert outcome["url"] == (tmp_path / "audio" / "local-e2e.mp3").resolve().as_uri()
    assert len(decode(outcome["url"])) / 24000 == pytest.approx(outcome["metadata"]["duration"], abs=0.1)
