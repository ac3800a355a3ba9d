"""What survives what (docs/reliability.md): each promise shown with real processes and a real fault.

Workers here run `celery -A tts_worker worker` against a Redis of the test's own, which the test
stops and starts (with AOF, as compose runs it), or behind a `Gate` whose port refuses connections;
nodes are lost with SIGKILL to the whole process group, as a lost host or `docker kill` does.
"""

from __future__ import annotations

import gc
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.result import AsyncResult

from devtools.stack import WorkerProcess
from producer.app import TTSTask, create_app
from producer.config import ProducerConfig
from tests.conftest import BUCKET, WorkerHandle
from tests.faults import Gate, JobStream, RedisProcess, SentinelGroup
from tests.test_encoding import children_named
from tests.test_worker import decode, wait_for_state
from tts_contract.errors import QueueUnavailable, TransientError

pytestmark = pytest.mark.slow

PASSWORD = "fault-pass-9z"
PERSISTENT = ("--appendonly", "yes", "--appendfsync", "always", "--requirepass", PASSWORD)
"""A Redis that keeps every write across a stop, so that an outage loses nothing of its own."""
SENTENCE = "Every chunk of this job takes its time on the worker, as on a busy GPU. "


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path, *PERSISTENT)
    yield server
    server.stop(signal.SIGKILL)


@pytest.fixture
def fleet(
    own_redis: RedisProcess, base_env: dict[str, str], tmp_path: Path
) -> Iterator[Callable[..., WorkerHandle]]:
    """Start workers that share `own_redis` (one queue, as a fleet does); each is stopped afterwards."""
    started: list[WorkerHandle] = []

    def start(**extra: str) -> WorkerHandle:
        url = f"redis://:{PASSWORD}@127.0.0.1:{own_redis.port}"
        env = {**base_env, "CELERY_BROKER_URL": f"{url}/0", "CELERY_RESULT_BACKEND": f"{url}/1", **extra}
        name = f"fault{len(started)}"
        handle = WorkerHandle(WorkerProcess(env, log_path=tmp_path / f"{name}.log", name=name), env)
        started.append(handle)
        return handle

    yield start
    for handle in started:
        handle.process.stop()
        handle.app.close()


def kill_node(worker: WorkerHandle) -> None:
    """SIGKILL the worker's parent and pool together, as a lost host or `docker kill` does."""
    os.killpg(worker.process.process.pid, signal.SIGKILL)
    worker.process.process.wait()


def starts(workers: list[WorkerHandle], job_id: str) -> list[str]:
    """The workers that started the job, once per start."""
    return [w.process.name for w in workers for _ in range(w.process.log().count(f"job {job_id} start"))]


def wait_for_log(worker: WorkerHandle, text: str, timeout: float) -> float:
    """Wait until the worker's log holds `text`; returns when (time.monotonic())."""
    deadline = time.monotonic() + timeout
    while text not in worker.process.log():
        assert time.monotonic() < deadline, f"{text!r} not in {worker.process.name}'s log after {timeout} s"
        time.sleep(0.05)
    return time.monotonic()


def objects(s3: Any, job_id: str) -> int:
    return int(s3.list_objects_v2(Bucket=BUCKET, Prefix=job_id)["KeyCount"])


# --- node loss -----------------------------------------------------------------------------------


def test_a_lost_nodes_job_is_delivered_to_another_within_recovery_s_and_restored_once(
    fleet: Callable[..., WorkerHandle], s3: Any
) -> None:
    recovery_s = 12
    workers = [fleet(RECOVERY_S=str(recovery_s), TONE_RTF="0.5") for _ in range(3)]
    result = workers[0].tts.delay(text=SENTENCE * 3, max_chars_per_chunk=80)
    wait_for_state(result, {"PROGRESS"})
    [runner] = [w for w in workers if f"job {result.id} start" in w.process.log()]
    kill_node(runner)
    lost_at = time.monotonic()
    survivors = [w for w in workers if w is not runner]
    while not starts(survivors, result.id):
        assert time.monotonic() - lost_at < recovery_s + 5, "the lost node's job was not delivered again"
        time.sleep(0.05)
    recovered_in = time.monotonic() - lost_at
    assert result.get(timeout=60)["status"] == "completed"
    # Both survivors swept: the job was restored once, started once more, finished once.
    time.sleep(recovery_s / 3)
    assert len(starts(survivors, result.id)) == 1
    assert sum(w.process.log().count(f"job {result.id} done") for w in survivors) == 1
    assert recovered_in <= recovery_s + 1, f"recovered after {recovered_in:.1f} s"
    assert objects(s3, result.id) == 1


def test_a_job_longer_than_the_lease_runs_on_one_worker_only(
    fleet: Callable[..., WorkerHandle], s3: Any
) -> None:
    recovery_s = 6  # a lease of 5 s, renewed every second; the job takes about 20 s
    workers = [fleet(RECOVERY_S=str(recovery_s), TONE_RTF="1.0") for _ in range(2)]
    result = workers[0].tts.delay(text=SENTENCE * 4, max_chars_per_chunk=80)
    outcome = result.get(timeout=120)
    assert outcome["metadata"]["timings"]["synthesis_s"] > 3 * recovery_s
    assert len(starts(workers, result.id)) == 1
    assert objects(s3, result.id) == 1


def test_a_warm_shutdown_finishes_a_long_job_without_a_second_delivery(
    fleet: Callable[..., WorkerHandle], s3: Any
) -> None:
    """SIGTERM (`docker stop`): the running job finishes there, holding its lease to the end."""
    workers = [fleet(RECOVERY_S="6", TONE_RTF="1.0") for _ in range(2)]
    result = workers[0].tts.delay(text=SENTENCE * 3, max_chars_per_chunk=80)
    wait_for_state(result, {"PROGRESS"})
    [runner] = [w for w in workers if f"job {result.id} start" in w.process.log()]
    runner.process.process.send_signal(signal.SIGTERM)
    assert result.get(timeout=120)["status"] == "completed"
    runner.process.process.wait(60)
    time.sleep(6)  # a lapsed lease would be swept by the other worker within this
    assert starts(workers, result.id) == [runner.process.name]
    assert objects(s3, result.id) == 1


# --- Redis and S3 outages ------------------------------------------------------------------------


def test_a_job_that_ends_while_redis_is_down_is_recorded_once_redis_is_back(
    fleet: Callable[..., WorkerHandle], own_redis: RedisProcess, s3: Any
) -> None:
    # A lease of 15 s outlasts the 12 s outage (a longer outage looks like a lost worker: the job may be
    # swept back when Redis returns, and its redelivery reuses the stored audio; docs/reliability.md).
    worker = fleet(TONE_RTF="0.5", RECOVERY_S="18")
    result = worker.tts.delay(text=SENTENCE * 3, max_chars_per_chunk=80)
    wait_for_state(result, {"PROGRESS"})
    with own_redis.down_for(12):
        wait_for_log(worker, f"job {result.id} done", timeout=10)  # finished while Redis is away
    outcome = result.get(timeout=120)
    assert outcome["status"] == "completed" and outcome["metadata"]["chunks"] == 3
    assert len(decode(outcome["url"])) / 24000 == pytest.approx(outcome["metadata"]["duration"], abs=0.05)
    assert result.state == "SUCCESS" and result.retries == 0
    assert "Failed operation _store_result" in worker.process.log()  # it waited for Redis
    time.sleep(16)  # were the job's message neither acknowledged nor leased, it would be swept by now
    assert starts([worker], result.id) == [worker.process.name]
    assert objects(s3, result.id) == 1


def test_redis_killed_while_jobs_flow_loses_none_and_does_none_twice(
    fleet: Callable[..., WorkerHandle], own_redis: RedisProcess
) -> None:
    """SIGKILL, as the OOM killer or a crash ends Redis, then a restart from the AOF. The worker
    finishes jobs delivered before the crash on a connection made after it: it must acknowledge them
    and live on (kombu, left to itself, ends the worker trying to ack on the closed channel)."""
    worker = fleet(RECOVERY_S="6", TONE_RTF="0.3")  # a job takes about 0.3 s
    with JobStream(worker.tts, every_s=0.1, output_format="wav") as jobs:
        time.sleep(2)
        while (log := worker.process.log()).count(" start: ") == log.count(" done: "):
            time.sleep(0.01)  # until a job runs: it ends while Redis is down or just after
        with own_redis.down_for(1, signal.SIGKILL):
            pass
        time.sleep(3)
    accepted = jobs.ids
    deadline = time.monotonic() + 60
    while (log := worker.process.log()) and not all(f"job {job} done" in log for job in accepted):
        assert worker.process.process.poll() is None, "the worker died"
        assert time.monotonic() < deadline, "jobs accepted before or after the crash were not done"
        time.sleep(0.5)
    time.sleep(8)  # a message neither acknowledged nor leased would be swept and done again by now
    log = worker.process.log()
    assert max(log.count(f"job {job} done") for job in accepted) == 1
    assert "Unrecoverable error" not in log and worker.process.process.poll() is None
    assert len(accepted) > 30


def test_a_storage_outage_at_upload_is_waited_out_without_a_second_synthesis(
    start_worker: Callable[..., WorkerHandle], s3_server: Any, s3: Any
) -> None:
    gate = Gate(("127.0.0.1", s3_server.port))
    try:
        worker = start_worker(S3_ENDPOINT_URL=f"http://{gate.url}", TONE_RTF="0.5")
        result = worker.tts.delay(text=SENTENCE * 3, max_chars_per_chunk=80)
        wait_for_state(result, {"PROGRESS"})  # looked up before synthesis: the upload is next
        with gate.closed_for(12):
            wait_for_log(worker, f"S3 could not upload {result.id}", timeout=15)
        outcome = result.get(timeout=120)
    finally:
        gate.close()
    assert outcome["status"] == "completed" and result.retries == 0
    log = worker.process.log()
    assert log.count(f"job {result.id} start") == 1  # one synthesis
    assert re.search(rf"S3 could not upload {result.id}\.ogg .*trying again in", log)
    assert objects(s3, result.id) == 1


def test_ffmpeg_killed_mid_job_is_retried_not_failed(slow_worker: WorkerHandle, s3: Any) -> None:
    [child] = slow_worker.pool_pids()
    sending = time.monotonic()
    result = slow_worker.tts.delay(text=SENTENCE * 3, max_chars_per_chunk=80, output_format="mp3")
    sent_in = time.monotonic() - sending
    deadline = time.monotonic() + 30  # ffmpeg starts with the job and encodes while chunks are spoken
    while not (ffmpeg := children_named(child, "ffmpeg")):
        # The job takes about 7 s: ffmpeg lives that long under the pool process.
        assert not result.ready(), f"the job ended before ffmpeg was seen (delay took {sent_in:.1f} s)"
        assert time.monotonic() < deadline, f"no ffmpeg under the pool process {child}"
        time.sleep(0.05)
    time.sleep(0.5)  # into the job
    os.kill(ffmpeg[0], signal.SIGKILL)  # as the OOM killer does
    outcome = result.get(timeout=120)
    assert outcome["status"] == "completed" and result.retries == 1
    log = slow_worker.process.log()
    assert f"job {result.id} retry 1 of" in log and "EncoderKilled: ffmpeg was ended by SIGKILL" in log
    assert objects(s3, result.id) == 1


# --- the producer --------------------------------------------------------------------------------


def test_enqueueing_while_redis_is_down_fails_fast_and_works_again_once_it_is_back(
    own_redis: RedisProcess,
) -> None:
    url = f"redis://:{PASSWORD}@127.0.0.1:{own_redis.port}"
    config = ProducerConfig(broker_url=f"{url}/0", result_backend=f"{url}/1")
    tts = TTSTask(create_app(config))
    before = tts.delay(text="Sent before the outage.")
    own_redis.stop()
    for producer in (tts, TTSTask(create_app(config))):  # one that has used Redis, one that never has
        started = time.monotonic()
        with pytest.raises(QueueUnavailable) as caught:
            producer.delay(text="Sent during the outage.")
        assert time.monotonic() - started < config.connect_timeout_s
        assert isinstance(caught.value, TransientError)
        message = str(caught.value)
        assert f"broker redis://:**@127.0.0.1:{own_redis.port}/0" in message and PASSWORD not in message
    with pytest.raises(QueueUnavailable, match="result backend"):
        before.get(timeout=5)
    own_redis.start()
    after = tts.delay(text="Sent after the outage.")
    broker = redis.Redis.from_url(f"{url}/0")
    queued = [json.loads(raw)["headers"]["id"] for raw in broker.lrange("tts", 0, -1)]
    broker.close()
    assert sorted(queued) == sorted([before.id, after.id])  # nothing lost, nothing sent twice
    assert isinstance(before, AsyncResult)
    del before, after  # let go while Redis is up (Celery unsubscribes when a result is collected)
    gc.collect()
    tts.app.close()


# --- Redis Sentinel --------------------------------------------------------------------------------


def test_a_sentinel_failover_while_jobs_flow_is_ridden_out(
    base_env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A primary, a replica and three sentinels; the primary is SIGKILLed while jobs are enqueued and
    done. The worker and the producer follow the sentinels to the promoted replica. What a failover
    can lose (writes the primary acknowledged and had not yet replicated) is counted and shown."""
    group = SentinelGroup(tmp_path)
    env = {
        **base_env,
        "CELERY_BROKER_URL": group.url(0),
        "CELERY_RESULT_BACKEND": group.url(1),
        "REDIS_SENTINEL_MASTER": SentinelGroup.MASTER,
        "RECOVERY_S": "6",
        "TONE_RTF": "0.3",
    }
    worker = WorkerHandle(WorkerProcess(env, log_path=tmp_path / "worker.log", name="sentinel"), env)
    try:
        with JobStream(worker.tts, every_s=0.1) as jobs:
            time.sleep(3)
            group.primary.stop(signal.SIGKILL)
            killed_at = time.monotonic()
            while group.primary_port() != group.replica.port:
                assert time.monotonic() - killed_at < 30, "the sentinels did not promote the replica"
                time.sleep(0.1)
            promoted_in = time.monotonic() - killed_at
            time.sleep(8)
        accepted, refused = jobs.accepted, jobs.refused
        deadline = time.monotonic() + 60
        late = [job for sent, job in accepted if sent > killed_at + promoted_in + 2]
        while not all(f"job {job} done" in worker.process.log() for job in late):
            assert worker.process.process.poll() is None, "the worker died"
            assert time.monotonic() < deadline, "jobs sent after the failover were not done"
            time.sleep(0.5)
        time.sleep(8)  # a job left unacknowledged and unleased would be swept and done again by now
        log = worker.process.log()
        lost = [job for _, job in accepted if f"job {job} done" not in log]
        twice = [job for _, job in accepted if log.count(f"job {job} done") > 1]
        with capsys.disabled():
            print(
                f"\nsentinel failover: promoted in {promoted_in:.1f} s; {len(accepted)} jobs accepted, "
                f"{refused} refused (QueueUnavailable), {len(lost)} lost, {len(twice)} done twice"
            )
        assert worker.process.process.poll() is None and "Unrecoverable error" not in log
        assert len(lost) <= 3 and not twice  # only what the primary had not replicated when it died
    finally:
        worker.process.stop()
        worker.app.close()
        group.stop()


def test_sentinel_urls_serve_the_health_check_and_tts_backfill(
    base_env: dict[str, str], tmp_path: Path
) -> None:
    group = SentinelGroup(tmp_path)
    env = {
        **base_env,
        "CELERY_BROKER_URL": group.url(0),
        "CELERY_RESULT_BACKEND": group.url(1),
        "REDIS_SENTINEL_MASTER": SentinelGroup.MASTER,
    }
    worker = WorkerProcess(env, log_path=tmp_path / "worker.log", name="sentinel-backfill")
    try:
        check = subprocess.run(
            [sys.executable, "-m", "tts_worker", "check"], env=env, capture_output=True, text=True, timeout=60
        )
        assert check.returncode == 0, check.stdout + check.stderr
        assert f"sentinel://127.0.0.1:{group.sentinels[0].port}/0" in check.stdout
        rows = tmp_path / "rows.jsonl"
        rows.write_text('{"id": "a", "text": "First row."}\n{"id": "b", "text": "Second row."}\n')
        manifest = tmp_path / "manifest.jsonl"
        backfill = subprocess.run(
            [sys.executable, "-m", "producer.backfill", str(rows), "--manifest", str(manifest)],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert backfill.returncode == 0, backfill.stdout + backfill.stderr
        lines = [json.loads(line) for line in manifest.read_text().splitlines()]
        assert sorted((line["id"], line["status"]) for line in lines) == [
            ("a", "completed"),
            ("b", "completed"),
        ]
    finally:
        worker.stop()
        group.stop()
    without_master = {key: value for key, value in env.items() if key != "REDIS_SENTINEL_MASTER"}
    refused = subprocess.run(
        [sys.executable, "-m", "tts_worker", "check"], env=without_master, capture_output=True, text=True
    )
    assert refused.returncode != 0 and "REDIS_SENTINEL_MASTER must name" in refused.stdout + refused.stderr
