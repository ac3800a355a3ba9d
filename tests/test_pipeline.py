"""The pipeline in process, against the real S3-compatible server and real ffmpeg (tone engine)."""

from __future__ import annotations

import logging
import os
import threading
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile

from tts_contract.errors import (
    EncodingError,
    InvalidRequest,
    SessionTaken,
    StorageError,
    TransientError,
    UnknownVoice,
    UnreadableText,
)
from tts_contract.formats import FORMATS
from tts_contract.schema import parse_request
from tts_worker.chunking import split_text, text_chunks
from tts_worker.encoding import Encoder
from tts_worker.engines.base import NO_OPTIONS, Audio, GenerationOptions, VoiceInputs
from tts_worker.engines.tone import ToneEngine
from tts_worker.pipeline import Services, run_job
from tts_worker.settings import Settings
from tts_worker.storage import S3Storage, make_storage

TEXT = "The first sentence is here. The second one follows it! And a third, to be sure?"


@pytest.fixture
def settings(base_env: dict[str, str]) -> Settings:
    return Settings.from_env(base_env)


@pytest.fixture
def services(settings: Settings) -> Services:
    return Services(settings=settings, engine=ToneEngine(), storage=S3Storage(settings))


def keys(s3: Any, prefix: str) -> list[str]:
    return [o["Key"] for o in s3.list_objects_v2(Bucket="tts-test", Prefix=prefix).get("Contents", [])]


def test_result_has_the_seed_shape_and_the_audio_is_there(services: Services, job_id: str) -> None:
    progress: list[tuple[int, int]] = []
    result = run_job(parse_request({"text": TEXT, "max_chars_per_chunk": 50}), services, job_id=job_id,
                     on_progress=lambda done, total: progress.append((done, total)))  # fmt: skip
    assert result["status"] == "completed"
    assert result["filename"] == f"{job_id}.ogg" == result["s3_key"]
    meta = result["metadata"]
    assert {k: meta[k] for k in ("sample_rate", "codec", "bitrate", "device", "engine", "chunks")} == {
        "sample_rate": 24000, "codec": "opus", "bitrate": "128k",
        "device": "cpu", "engine": "tone", "chunks": 3,
    }  # fmt: skip
    assert progress == [(1, 3), (2, 3), (3, 3)]
    assert set(meta["timings"]) == {"synthesis_s", "encode_s", "upload_s"}
    assert meta["rtf"] == pytest.approx(meta["timings"]["synthesis_s"] / meta["duration"], abs=1e-3)
    assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in result["url"]  # SigV4, as MinIO and AWS need
    with urllib.request.urlopen(result["url"]) as response:
        assert response.headers["Content-Type"] == "audio/ogg"
        assert response.read(4) == b"OggS"
    # Three chunks of tones, crossfaded by 100 ms at the two joins.
    chars = sum(len(c.strip()) for c in ["The first sentence is here.", "The second one follows it!",
                                         "And a third, to be sure?"])  # fmt: skip
    assert meta["duration"] == pytest.approx((chars * (22050 // 15) - 2 * 2205) / 22050, abs=0.001)


def test_session_id_and_prefix_name_the_object(settings: Settings, s3: Any, job_id: str) -> None:
    prefixed = replace(settings, s3_key_prefix="audio/")
    services = Services(settings=prefixed, engine=ToneEngine(), storage=S3Storage(prefixed))
    request = parse_request({"text": "Hi.", "session_id": f"s-{job_id}", "output_format": "mp3"})
    result = run_job(request, services, job_id=job_id)
    assert result["filename"] == f"s-{job_id}.mp3"
    assert result["s3_key"] == f"audio/s-{job_id}.mp3"
    assert keys(s3, f"audio/s-{job_id}") == [f"audio/s-{job_id}.mp3"]


def test_a_job_id_that_cannot_name_the_object_is_refused(services: Services, s3: Any) -> None:
    """A message sent past the producer with a task id like 'a/b' and no session_id."""
    with pytest.raises(InvalidRequest, match="task_id") as caught:
        run_job(parse_request({"text": "Hi."}), services, job_id="orders/1234")
    assert caught.value.field == "task_id"
    assert keys(s3, "orders") == []


def test_a_redelivered_job_returns_the_stored_result_without_synthesising(
    services: Services, job_id: str
) -> None:
    class Counting(ToneEngine):
        calls = 0

        def synthesize(self, text: str, voice: VoiceInputs, options: GenerationOptions = NO_OPTIONS) -> Audio:
            Counting.calls += 1
            return super().synthesize(text, voice, options)

    counted = replace(services, engine=Counting())
    request = parse_request({"text": TEXT})
    first = run_job(request, counted, job_id=job_id)
    second = run_job(request, counted, job_id=job_id)
    assert Counting.calls == 1
    assert second["s3_key"] == first["s3_key"]
    # The same result, field for field and type for type, but for what this delivery did not do.
    reused = dict(second["metadata"])
    assert reused.pop("reused") is True
    assert reused.pop("timings") == {**first["metadata"]["timings"], "upload_s": 0.0}
    assert reused == {key: value for key, value in first["metadata"].items() if key != "timings"}
    # Another job naming the same object is refused before any synthesis, unless it says overwrite.
    with pytest.raises(SessionTaken, match=f"session_id: {job_id}.ogg holds audio another job stored"):
        run_job(parse_request({"text": TEXT, "session_id": job_id}), counted, job_id="other-job")
    assert Counting.calls == 1
    run_job(
        parse_request({"text": TEXT, "session_id": job_id, "overwrite": True}), counted, job_id="other-job"
    )
    assert Counting.calls == 2


@pytest.mark.parametrize("storage", ["s3", "local"])
def test_a_taken_name_is_never_replaced_without_overwrite_even_in_a_race(
    settings: Settings, storage: str, tmp_path: Path, job_id: str
) -> None:
    """Two jobs for one session_id at once: both look and find nothing, both synthesise; the store
    takes one write (S3's If-None-Match, a hard link), and the other job fails with nothing stored."""
    chosen = replace(settings, output_storage=storage, output_audio_dir=tmp_path)
    services = Services(settings=chosen, engine=ToneEngine(rtf=0.3), storage=make_storage(chosen))
    request = parse_request({"text": "Two jobs, one name.", "session_id": f"race-{job_id}"})
    outcomes: dict[str, Any] = {}

    def run(job: str) -> None:
        try:
            outcomes[job] = run_job(request, services, job_id=job)
        except SessionTaken as exc:
            outcomes[job] = exc

    threads = [threading.Thread(target=run, args=(job,)) for job in ("first", "second")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    [won] = [job for job, outcome in outcomes.items() if isinstance(outcome, dict)]
    [lost] = [outcome for outcome in outcomes.values() if isinstance(outcome, SessionTaken)]
    assert "nothing was stored" in str(lost)
    assert services.storage.metadata(f"race-{job_id}.ogg")["job-id"] == won  # the winner's audio, whole
    assert run_job(request, services, job_id=won)["metadata"]["reused"] is True  # its redelivery reuses it


def test_metadata_that_cannot_be_read_means_the_job_is_done_again(services: Services, job_id: str) -> None:
    """Say, an object stored before the metadata was JSON: synthesise again rather than fail."""
    old = {"job-id": job_id, "codec": "opus", "duration": "1.5"}
    services.storage.put(f"{job_id}.ogg", b"old", content_type="audio/ogg", metadata=old, replace=True)
    result = run_job(parse_request({"text": "Hi."}), services, job_id=job_id)
    assert "reused" not in result["metadata"] and result["metadata"]["codec"] == "opus"
    with urllib.request.urlopen(result["url"]) as response:
        assert response.read(4) == b"OggS"  # replaced by the new audio


def test_voice_inputs_are_checked_and_the_result_says_they_were_not_cloned(
    services: Services, voices_dir: Path, job_id: str
) -> None:
    request = parse_request({"text": "Hi.", "speaker_voice": "alice"})
    result = run_job(request, services, job_id=job_id)
    assert result["metadata"]["voice_cloning"] is False
    assert "tone speaks with its own voice" in result["metadata"]["note"]
    again = run_job(request, services, job_id=job_id)["metadata"]  # a redelivery says so too
    assert again["reused"] is True and again["voice_cloning"] is False
    assert again["note"] == result["metadata"]["note"]
    with pytest.raises(UnknownVoice, match=r"available: alice\.wav"):
        run_job(parse_request({"text": "Hi.", "emo_audio_prompt": "nobody"}), services, job_id=job_id)


SENTENCES = ["The first sentence is here.", "The second one follows it!", "And a third, to be sure?"]
TONE_SAMPLES = [len(sentence) * (22050 // 15) for sentence in SENTENCES]  # the tone engine's length


@pytest.mark.parametrize(
    ("fields", "chunks", "samples"),
    [
        ({"max_chars_per_chunk": 50}, 3, sum(TONE_SAMPLES) - 2 * 2205),  # 100 ms crossfades
        ({"max_chars_per_chunk": 50, "crossfade_ms": 300}, 3, sum(TONE_SAMPLES) - 2 * 6615),
        ({"max_chars_per_chunk": 50, "enable_crossfade": False}, 3, sum(TONE_SAMPLES)),  # end to end
        ({"max_chars_per_chunk": 50, "crossfade_ms": 0}, 3, sum(TONE_SAMPLES)),
        ({"max_chars_per_chunk": 50, "enable_chunking": False}, 1, len(TEXT) * (22050 // 15)),
    ],
)
def test_chunking_and_crossfade_fields_shape_the_audio(
    services: Services, job_id: str, fields: dict[str, Any], chunks: int, samples: int
) -> None:
    meta = run_job(parse_request({"text": TEXT, **fields, "output_format": "wav"}), services,
                   job_id=job_id)["metadata"]  # fmt: skip
    assert meta["chunks"] == chunks
    assert meta["duration"] == pytest.approx(samples / 22050, abs=0.001)


@pytest.mark.parametrize(
    "text",
    [
        "She paused" + " ..." * 20 + " Then she left.",  # a chunk of dots alone at 50 characters
        "... " * 30 + "and then she spoke.",  # punctuation first
        "It ended. " + "— " * 40,  # punctuation last
        "\u4ed6\u8d70\u4e86\u3002 " + "\u3002 " * 80 + "\u5979\u7b11\u4e86\u3002",  # CJK full stops alone
        "Hello there. " + "! " * 4000 + "Bye now.",  # punctuation runs far past the limit
    ],
)
def test_punctuation_alone_joins_a_neighbour_within_the_limit_instead_of_failing_the_job(text: str) -> None:
    """Piper speaks nothing for "...", and IndexTTS2 fails: no chunk may hold only punctuation, and
    none may grow past `max_chars_per_chunk` by taking it in (silent punctuation is left out then)."""
    pieces = split_text(text, 50)
    assert any(not any(char.isalnum() for char in piece) for piece in pieces)  # the case arises
    chunks = text_chunks(parse_request({"text": text, "max_chars_per_chunk": 50}))
    assert all(any(char.isalnum() for char in chunk) for chunk in chunks), chunks
    assert max(len(chunk) for chunk in chunks) <= 50
    spoken = "".join(char for char in text if char.isalnum())
    assert "".join(char for char in "".join(chunks) if char.isalnum()) == spoken  # no word lost


def test_a_text_of_punctuation_alone_stays_one_chunk_within_the_limit() -> None:
    chunks = text_chunks(parse_request({"text": "! " * 5000, "max_chars_per_chunk": 300}))
    assert len(chunks) == 1 and len(chunks[0]) <= 300  # the engine then says it is unreadable


def test_unreadable_text_is_a_permanent_error(services: Services, job_id: str) -> None:
    class Mute(ToneEngine):
        def synthesize(self, text: str, voice: VoiceInputs, options: GenerationOptions = NO_OPTIONS) -> Audio:
            return np.zeros(0, dtype=np.int16)

    with pytest.raises(UnreadableText, match="chunk 1 of 1"):
        run_job(parse_request({"text": "…"}), replace(services, engine=Mute()), job_id=job_id)


def test_the_encoder_has_the_first_chunk_while_the_next_is_spoken(
    settings: Settings, tmp_path: Path, job_id: str
) -> None:
    """ffmpeg is fed as the audio becomes final, not once the whole text is spoken."""
    fed = tmp_path / "fed.pcm"
    spy = tmp_path / "ffmpeg"  # ffmpeg behind a tee that keeps what reached its stdin
    spy.write_text(f'#!/bin/sh\ntee {fed} | exec ffmpeg "$@"\n')
    spy.chmod(0o755)
    seen_before: list[int] = []

    class Watching(ToneEngine):
        def synthesize(self, text: str, voice: VoiceInputs, options: GenerationOptions = NO_OPTIONS) -> Audio:
            if seen_before:  # from the second chunk on: wait (a while at most) for the first to arrive
                deadline = time.monotonic() + 30
                while not (fed.exists() and fed.stat().st_size) and time.monotonic() < deadline:
                    time.sleep(0.01)
                seen_before.append(fed.stat().st_size if fed.exists() else 0)
            else:
                seen_before.append(-1)
            return super().synthesize(text, voice, options)

    spied = replace(settings, ffmpeg_binary=str(spy))
    services = Services(settings=spied, engine=Watching(), storage=S3Storage(spied))
    result = run_job(parse_request({"text": TEXT, "max_chars_per_chunk": 50}), services, job_id=job_id)
    first, *later = seen_before
    assert first == -1 and len(later) == 2
    assert later[0] > 0  # the first chunk's samples (less the crossfade held back) were with ffmpeg
    assert fed.stat().st_size == 2 * (sum(TONE_SAMPLES) - 2 * 2205)  # then every sample, once
    assert result["metadata"]["duration"] == pytest.approx(fed.stat().st_size / 2 / 22050, abs=0.001)


def test_a_failed_synthesis_leaves_no_encoder_behind(settings: Settings, tmp_path: Path, job_id: str) -> None:
    pid_file = tmp_path / "ffmpeg.pid"
    spy = tmp_path / "ffmpeg"
    spy.write_text(f'#!/bin/sh\necho $$ > {pid_file}\nexec ffmpeg "$@"\n')
    spy.chmod(0o755)
    sessions: list[int] = []

    class FailingSecond(ToneEngine):
        calls = 0

        def synthesize(self, text: str, voice: VoiceInputs, options: GenerationOptions = NO_OPTIONS) -> Audio:
            FailingSecond.calls += 1
            if FailingSecond.calls == 1:
                return super().synthesize(text, voice, options)
            pid = int(pid_file.read_text())
            sessions.append(os.getsid(pid))
            return np.zeros(0, dtype=np.int16)  # unreadable: the job fails here

    threads = threading.active_count()
    spied = replace(settings, ffmpeg_binary=str(spy))
    services = Services(settings=spied, engine=FailingSecond(), storage=S3Storage(spied))
    with pytest.raises(UnreadableText, match="chunk 2 of 3"):
        run_job(parse_request({"text": TEXT, "max_chars_per_chunk": 50}), services, job_id=job_id)
    pid = int(pid_file.read_text())
    assert sessions == [pid]  # ffmpeg led a session of its own: the worker's Ctrl-C does not reach it
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # stopped and reaped
    assert threading.active_count() == threads


def test_an_encoder_that_ends_early_fails_the_next_write(tmp_path: Path) -> None:
    """A bad option ends ffmpeg at once: the job learns it then, not after speaking every chunk."""
    broken = tmp_path / "ffmpeg"
    broken.write_text("#!/bin/sh\necho 'Unrecognized option' >&2\nexit 1\n")
    broken.chmod(0o755)
    with Encoder(input_rate=22050, fmt=FORMATS["opus"], sample_rate=24000, bitrate="64k",
                 ffmpeg=str(broken)) as encoder:  # fmt: skip
        assert encoder._pipe is not None
        encoder._pipe._process.wait()  # as a job's ffmpeg would have while the first chunk is spoken
        with pytest.raises(EncodingError, match="status 1: Unrecognized option"):
            encoder.write(np.ones(100, dtype=np.int16))


def test_no_object_under_the_final_key_when_encoding_fails(
    settings: Settings, s3: Any, tmp_path: Path, job_id: str
) -> None:
    """An ffmpeg that writes half a file and then fails: nothing may be stored."""
    broken = tmp_path / "ffmpeg"
    broken.write_text("#!/bin/sh\nhead -c 1000 /dev/urandom\necho 'encoder exploded' >&2\nexit 1\n")
    broken.chmod(0o755)
    failing = replace(settings, ffmpeg_binary=str(broken))
    services = Services(settings=failing, engine=ToneEngine(), storage=S3Storage(failing))
    with pytest.raises(EncodingError, match="encoder exploded"):
        run_job(parse_request({"text": TEXT}), services, job_id=job_id)
    assert keys(s3, job_id) == []


def test_no_object_under_the_final_key_when_the_upload_breaks(
    settings: Settings, s3: Any, dropping_proxy: str, job_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    flaky = replace(settings, s3_endpoint_url=dropping_proxy, storage_retry_s=2)
    services = Services(settings=flaky, engine=ToneEngine(), storage=S3Storage(flaky))
    with (
        caplog.at_level(logging.WARNING, logger="tts_worker.storage"),
        pytest.raises(StorageError, match=f"upload {job_id}.ogg") as caught,
    ):
        run_job(parse_request({"text": TEXT}), services, job_id=job_id)
    assert isinstance(caught.value, TransientError)  # so the task retries it
    assert keys(s3, job_id) == []
    # Tried again in place (the audio kept) until STORAGE_RETRY_S ran out, before giving up.
    assert any(f"could not upload {job_id}.ogg" in m and "trying again" in m for m in caplog.messages)


def test_wav_output_is_a_complete_file(services: Services, job_id: str, tmp_path: Path) -> None:
    result = run_job(parse_request({"text": TEXT, "output_format": "wav", "sample_rate": 16000}), services,
                     job_id=job_id)  # fmt: skip
    target = tmp_path / "out.wav"
    with urllib.request.urlopen(result["url"]) as response:
        assert response.headers["Content-Type"] == "audio/wav"
        target.write_bytes(response.read())
    info = soundfile.info(str(target))
    assert info.samplerate == 16000
    assert info.duration == pytest.approx(result["metadata"]["duration"], abs=0.01)
