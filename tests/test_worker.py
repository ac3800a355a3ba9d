"""Real `celery -A tts_worker worker` processes, driven through the producer as an application would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from typing import Any

import numpy as np
import pytest
import redis
from celery.result import AsyncResult

import producer
from producer.app import TTSTask
from tests.conftest import WorkerHandle
from tests.test_producer import BAD_REQUESTS
from tts_contract import keys
from tts_contract.errors import InvalidRequest, SessionTaken, StorageError, UnknownVoice

pytestmark = pytest.mark.slow

SPEECH = (
    "Queues let a small team serve a large audience. Each worker loads the model once, "
    "then takes one job at a time, for as long as there is work to do."
)


def decode(url: str) -> np.ndarray:
    with urllib.request.urlopen(url, timeout=30) as response:
        data = response.read()
    done = subprocess.run(
        ["ffmpeg", "-v", "error", "-i", "-", "-f", "s16le", "-ac", "1", "-ar", "24000", "-"],
        input=data, capture_output=True, check=True,
    )  # fmt: skip
    return np.frombuffer(done.stdout, dtype=np.int16)


def wait_for_state(result: AsyncResult, states: set[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while result.state not in states:
        assert time.monotonic() < deadline, f"still {result.state} after {timeout} s"
        time.sleep(0.05)


def test_piper_speech_round_trip_through_the_producer(
    piper_worker: WorkerHandle, default_producer: TTSTask
) -> None:
    result = producer.tts.delay(text=SPEECH, max_chars_per_chunk=100)
    outcome = result.get(timeout=120)
    meta = outcome["metadata"]
    assert (meta["engine"], meta["codec"], meta["sample_rate"], meta["chunks"]) == ("piper", "opus", 24000, 2)
    # About 12 characters a second is ordinary speech; this text has 161.
    assert 7 < meta["duration"] < 20
    pcm = decode(outcome["url"])
    assert len(pcm) / 24000 == pytest.approx(meta["duration"], abs=0.05)
    rms_dbfs = 20 * np.log10(np.sqrt(np.mean(pcm.astype(np.float64) ** 2)) / 32768)
    assert rms_dbfs > -35  # speech, not silence
    assert outcome["filename"] == f"{result.id}.ogg"


def test_synthesize_blocks_until_the_result(piper_worker: WorkerHandle, default_producer: TTSTask) -> None:
    outcome = producer.synthesize(text="Short and sweet.", output_format="mp3", timeout=60)
    assert outcome["status"] == "completed" and outcome["filename"].endswith(".mp3")
    assert len(decode(outcome["url"])) > 24000 * 0.5


def test_progress_is_reported_per_chunk(slow_worker: WorkerHandle) -> None:
    text = " ".join(["This sentence is here to take up fifty characters."] * 3)
    result = slow_worker.tts.delay(text=text, max_chars_per_chunk=60)
    seen: list[dict[str, int]] = []
    while not result.ready():
        if result.state == "PROGRESS" and result.info not in seen:
            seen.append(result.info)
        time.sleep(0.05)
    assert result.get(timeout=10)["metadata"]["chunks"] == 3
    assert {"chunk": 1, "chunks": 3} in seen and {"chunk": 2, "chunks": 3} in seen


# Every request the producer refuses, plus what only the worker can check (the voice files), sent raw.
RAW_BAD_REQUESTS = [
    *BAD_REQUESTS,
    ({"text": "Hi.", "speaker_voice": "nobody"}, "speaker_voice", "available: alice.wav"),
    ({"text": "Hi.", "emo_audio_prompt": "nobody.wav"}, "emo_audio_prompt", "no voice 'nobody.wav'"),
]


def test_bad_requests_sent_past_the_producer_fail_once_and_the_worker_carries_on(
    tone_worker: WorkerHandle,
) -> None:
    pids = tone_worker.pool_pids()
    results = [
        tone_worker.app.send_task("tts.synthesize", kwargs=fields) for fields, _, _ in RAW_BAD_REQUESTS
    ]
    results.append(tone_worker.app.send_task("tts.synthesize", args=["positional text"]))
    good = tone_worker.tts.delay(text="Still serving.")
    assert good.get(timeout=60)["status"] == "completed"
    expected = [*RAW_BAD_REQUESTS, ({}, "request", "keyword fields only")]
    for result, (fields, field, rule) in zip(results, expected, strict=True):
        with pytest.raises(InvalidRequest) as caught:  # rebuilt as the producer's own class
            result.get(timeout=10)
        assert f"{field}" in str(caught.value) and rule in str(caught.value), fields
        assert result.state == "FAILURE"
        assert result.retries == 0
    assert isinstance(caught.value, InvalidRequest)
    with pytest.raises(UnknownVoice):
        results[len(BAD_REQUESTS)].get(timeout=1)
    assert tone_worker.pool_pids() == pids  # the process serving jobs survived every one of them
    assert "Retry in" not in tone_worker.process.log()


def test_transient_storage_errors_are_retried_a_bounded_number_of_times(
    flaky_s3_worker: WorkerHandle, s3: Any
) -> None:
    result = flaky_s3_worker.tts.delay(text="Upload me if you can.")
    with pytest.raises(StorageError, match="could not upload"):
        result.get(timeout=90)
    assert result.retries == 2
    log = flaky_s3_worker.process.log()
    assert log.count(f"Task tts.synthesize[{result.id}] retry") == 2
    assert s3.list_objects_v2(Bucket="tts-test", Prefix=result.id).get("KeyCount") == 0


def test_a_job_whose_process_is_killed_is_completed_once_after_recovery(
    slow_worker: WorkerHandle, s3: Any
) -> None:
    text = " ".join(["A long job that will be interrupted halfway through its work."] * 3)  # ~12 s audio
    [child] = slow_worker.pool_pids()
    result = slow_worker.tts.delay(text=text, max_chars_per_chunk=70)
    wait_for_state(result, {"PROGRESS"})
    os.kill(child, signal.SIGKILL)
    outcome = result.get(timeout=90)
    assert outcome["status"] == "completed"
    assert slow_worker.pool_pids() != [child]  # a fresh child took the job over
    wait_until_idle(slow_worker)  # so that a duplicate delivery, if there were one, would have run
    log = slow_worker.process.log()
    assert "WorkerLostError" in log or "SIGKILL" in log
    # Started twice (the killed run and the recovery), finished once.
    assert (log.count(f"job {result.id} start"), log.count(f"job {result.id} done")) == (2, 1)
    assert s3.list_objects_v2(Bucket="tts-test", Prefix=result.id)["KeyCount"] == 1


def queue_lists(broker: redis.Redis) -> list[bytes]:
    """The Redis lists of both queues, one per priority step, that hold messages."""
    return [name.encode() for queue in ("tts", "tts.backfill") for name in keys.priority_lists(queue)
            if broker.exists(name)]  # fmt: skip


def wait_until_idle(worker: WorkerHandle, timeout: float = 60) -> None:
    """Until the worker runs and holds no job and its queues are empty."""
    broker = redis.Redis.from_url(worker.env["CELERY_BROKER_URL"])
    inspect = worker.app.control.inspect(destination=[worker.process.name], timeout=5)
    deadline = time.monotonic() + timeout
    try:
        while True:
            queued = sum(broker.llen(q) for q in queue_lists(broker))
            held = [*(inspect.active() or {}).values(), *(inspect.reserved() or {}).values()]
            if not queued and held and not any(held):
                return
            assert time.monotonic() < deadline, f"worker still busy: {queued} queued, holding {held}"
            time.sleep(0.2)
    finally:
        broker.close()


def test_the_running_worker_has_the_designed_configuration(tone_worker: WorkerHandle) -> None:
    conf = tone_worker.app.control.inspect(destination=[tone_worker.process.name], timeout=5).conf()
    conf = conf[tone_worker.process.name]
    assert conf["worker_concurrency"] == 1
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["task_acks_late"] is True and conf["task_reject_on_worker_lost"] is True
    assert conf["worker_send_task_events"] is True
    # A lease, not a timeout above the longest job: 5/6 of RECOVERY_S, swept and renewed every 1/6.
    transport = conf["broker_transport_options"]
    assert (transport["visibility_timeout"], transport["unacked_restore_interval"]) == (50, 10)
    assert transport["unacked_restore_throttle"] == 1
    assert conf["result_backend_always_retry"] is True
    assert conf["broker_transport_options"]["queue_order_strategy"] == "priority"
    queues = tone_worker.app.control.inspect(
        destination=[tone_worker.process.name], timeout=5
    ).active_queues()
    assert [q["name"] for q in queues[tone_worker.process.name]] == ["tts", "tts.backfill"]


def test_a_task_id_with_a_line_break_is_refused_and_forges_no_log_line(tone_worker: WorkerHandle) -> None:
    """Sent raw, past the producer's check: Celery logs the id as it receives it, the worker refuses it."""
    forged = "ok\nERROR/MainProcess] forged line"
    result = tone_worker.app.send_task("tts.synthesize", kwargs={"text": "Hi."}, task_id=forged)
    with pytest.raises(InvalidRequest, match="task_id: must match") as caught:
        result.get(timeout=30)
    assert "\n" not in str(caught.value)
    assert tone_worker.tts.delay(text="Still serving.").get(timeout=30)["status"] == "completed"
    log = tone_worker.process.log()
    assert "ok\\nERROR/MainProcess] forged line" in log  # escaped on the line that carries it
    assert not any(line.startswith("ERROR/MainProcess] forged") for line in log.splitlines())


def test_a_job_cannot_replace_another_jobs_audio_unless_it_says_overwrite(
    tone_worker: WorkerHandle, s3: Any, job_id: str
) -> None:
    name = f"shared-{job_id}"
    first = tone_worker.tts.delay(text="The first job's words.", session_id=name).get(timeout=30)
    stored = s3.get_object(Bucket="tts-test", Key=f"{name}.ogg")["Body"].read()
    second = tone_worker.tts.delay(text="Somebody else's words.", session_id=name)
    with pytest.raises(
        SessionTaken, match=f"session_id: {name}.ogg holds audio another job stored"
    ) as caught:
        second.get(timeout=30)
    assert isinstance(caught.value, producer.PermanentError) and second.retries == 0
    assert s3.get_object(Bucket="tts-test", Key=f"{name}.ogg")["Body"].read() == stored  # untouched
    assert len(decode(first["url"])) > 0  # the first job's URL still serves the first job's audio
    third = tone_worker.tts.delay(text="Replacing it on purpose.", session_id=name, overwrite=True)
    assert third.get(timeout=30)["status"] == "completed"
    assert s3.get_object(Bucket="tts-test", Key=f"{name}.ogg")["Body"].read() != stored


def test_results_keep_no_request_fields(tone_worker: WorkerHandle) -> None:
    """The text would otherwise stay in Redis (and its AOF) for as long as the result, a week."""
    text = "A private letter that must not outlive its job in Redis."
    result = tone_worker.tts.delay(text=text, emo_text="quietly sad")
    assert result.get(timeout=30)["status"] == "completed"
    backend = redis.Redis.from_url(tone_worker.env["CELERY_RESULT_BACKEND"])
    stored = backend.get(f"celery-task-meta-{result.id}") or b""
    backend.close()
    assert b"private letter" not in stored and b"quietly sad" not in stored
    meta = json.loads(stored)
    assert "kwargs" not in meta and "args" not in meta
    assert (meta["name"], meta["retries"], meta["queue"]) == ("tts.synthesize", 0, "tts")  # the rest stays
