"""Monitoring against real processes: a worker serving its own /metrics, and Flower started the documented
way (`python -m tts_worker flower`) on the same settings, with jobs sent through the producer."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.result import AsyncResult
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from devtools.stack import RedisServer, free_port, wait_until
from producer.app import TTSTask, create_app, shown_fields
from producer.config import ProducerConfig
from tests.conftest import WorkerHandle
from tts_contract import keys
from tts_contract.errors import EncodingError, InvalidRequest, StorageError, UnknownVoice, UnreadableText
from tts_contract.names import BACKFILL_QUEUE
from tts_worker import runtime
from tts_worker.metrics import QueueDepthCollector, loggable_message, queue_depths
from tts_worker.settings import Settings

pytestmark = pytest.mark.slow

CREDENTIALS = "ops:correct-horse-battery"
LONG_TEXT = " ".join(["This sentence is here to take up fifty characters."] * 6)  # 20 s of tone audio


def http_get(url: str, credentials: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if credentials:
        request.add_header("Authorization", "Basic " + base64.b64encode(credentials.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""


class Flower:
    """`python -m tts_worker flower` on a free loopback port, with basic auth."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        flower_env = {**env, "FLOWER_BASIC_AUTH": CREDENTIALS, "FLOWER_PORT": str(port),
                      "FLOWER_ADDRESS": "127.0.0.1"}  # fmt: skip
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tts_worker", "flower"],
                env=flower_env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(
            lambda: self.get("/healthcheck")[0] == 200, timeout=60, what="flower", process=self.process
        )

    def get(self, path: str, credentials: str | None = CREDENTIALS) -> tuple[int, Any]:
        status, body = http_get(self.url + path, credentials)
        return status, json.loads(body) if body.startswith(("{", "[")) else body

    def task(self, task_id: str, state: str, timeout: float = 20) -> dict[str, Any]:
        """Flower's view of a task, once its events have brought it to `state`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, info = self.get(f"/api/task/info/{task_id}")
            if status == 200 and info.get("state") == state:
                return dict(info)
            time.sleep(0.2)
        raise AssertionError(
            f"Flower never showed {task_id} as {state}:\n{self.log_path.read_text()[-2000:]}"
        )

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def worker(start_worker: Any) -> WorkerHandle:
    """A tone worker at half real time, serving /metrics on a loopback port."""
    handle: WorkerHandle = start_worker(
        TONE_RTF="0.5", METRICS_PORT=str(free_port()), METRICS_ADDRESS="127.0.0.1"
    )
    return handle


@pytest.fixture(scope="module")
def flower(worker: WorkerHandle, stack_dir: Path) -> Iterator[Flower]:
    process = Flower(worker.env, stack_dir / "flower.log")
    name = worker.process.name
    try:
        wait_until(
            lambda: process.get("/api/workers?status=true")[1] == {name: True},
            timeout=30, what="the worker in Flower", process=process.process,
        )  # fmt: skip
        yield process
    finally:
        process.stop()


def _le(bound: float) -> str:
    """A bucket bound as prometheus_client writes it in the `le` label."""
    return "+Inf" if bound == float("inf") else repr(bound)


def worker_metrics(worker: WorkerHandle) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, labels): value} from the worker's /metrics."""
    status, text = http_get(f"http://127.0.0.1:{worker.env['METRICS_PORT']}/metrics")
    assert status == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def wait_for_progress(result: AsyncResult[Any], timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while str(result.state) != "PROGRESS":  # a custom state, which celery-types does not know
        assert time.monotonic() < deadline, f"still {result.state}"
        time.sleep(0.05)
    return result.info


def test_a_long_job_is_seen_running_and_done_and_the_worker_stays_online(
    worker: WorkerHandle, flower: Flower
) -> None:
    name = worker.process.name
    result = worker.tts.delay(text=LONG_TEXT, max_chars_per_chunk=110)  # 3 chunks of about 3 s each
    progress = wait_for_progress(result)
    assert progress["chunks"] == 3 and 1 <= progress["chunk"] < 3  # PROGRESS, through AsyncResult
    # While the child synthesises, the parent still answers and Flower still counts the worker online.
    assert worker.app.control.inspect(destination=[name], timeout=3).ping() == {name: {"ok": "pong"}}
    assert flower.get("/api/workers?status=true") == (200, {name: True})
    assert not result.ready()
    outcome = result.get(timeout=60)
    task = flower.task(result.id, "SUCCESS")
    assert (task["name"], task["worker"], task["args"]) == ("tts.synthesize", name, "()")
    assert task["runtime"] >= sum(outcome["metadata"]["timings"].values())  # the whole job, as run
    assert "This sentence is here" in task["kwargs"]
    # The result without its presigned URL (a credential for the audio), which the caller still gets.
    assert (
        "'url': '<not shown>'" in task["result"] and f"'filename': '{outcome['filename']}'" in task["result"]
    )
    assert "X-Amz-Signature" not in str(task) and "X-Amz-Signature" in outcome["url"]


def test_a_failed_job_shows_its_error_in_flower_and_in_the_metrics(
    worker: WorkerHandle, flower: Flower
) -> None:
    result = worker.tts.delay(text="Hi.", speaker_voice="nobody")
    with pytest.raises(UnknownVoice):
        result.get(timeout=30)
    task = flower.task(result.id, "FAILURE")
    assert task["exception"].startswith("UnknownVoice(")
    assert worker_metrics(worker)[("tts_job_failures_total", (("error", "UnknownVoice"),))] >= 1


def test_flower_shows_the_text_and_the_emotion_text_shortened(worker: WorkerHandle, flower: Flower) -> None:
    text = "Start of a long text. " + "Middle. " * 8 + "The very end."  # 99 characters
    emo_text = "Calm at first, " + "then more and more worried, " * 4 + "and at last afraid."
    result = worker.tts.delay(
        text=text, use_emo_text=True, emo_text=emo_text, max_chars_per_chunk=1000, output_format="wav"
    )
    result.get(timeout=60)
    shown = flower.task(result.id, "SUCCESS")["kwargs"]
    assert "Start of a long text." in shown and "The very end." not in shown
    assert "Calm at first," in shown and "afraid" not in shown
    assert len(shown) < 300 and "'output_format': 'wav'" in shown


def test_shown_fields_cut_only_the_free_text_fields() -> None:
    fields = {"text": "x" * 80, "emo_text": "y" * 81, "speaker_voice": "z" * 100}
    assert shown_fields(fields) == repr({**fields, "emo_text": "y" * 79 + "…"})
    assert shown_fields({**fields, "text": "x" * 81}) == repr(
        {**fields, "text": "x" * 79 + "…", "emo_text": "y" * 79 + "…"}
    )
    assert shown_fields({"emo_text": None, "text": "Hi."}) == repr({"emo_text": None, "text": "Hi."})


def test_flower_metrics_answer_and_its_api_wants_credentials(flower: Flower) -> None:
    status, text = flower.get("/metrics", credentials=None)  # Prometheus scrapes it as is
    assert status == 200 and "flower_worker_online" in text
    assert flower.get("/api/tasks", credentials=None)[0] == 401
    assert flower.get("/api/tasks", credentials="ops:wrong")[0] == 401
    assert flower.get("/api/tasks")[0] == 200


def test_flower_refuses_to_start_without_credentials(worker: WorkerHandle) -> None:
    env = {name: value for name, value in worker.env.items() if not name.startswith("FLOWER_")}
    for auth in (None, "ops", "ops:"):
        extra = {"FLOWER_BASIC_AUTH": auth} if auth else {}
        done = subprocess.run(
            [sys.executable, "-m", "tts_worker", "flower"], env={**env, **extra},
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode != 0 and "set FLOWER_BASIC_AUTH=user:password" in done.stderr
    example = {"FLOWER_BASIC_AUTH": "operator:change-me-flower"}  # .env.example's, never changed
    done = subprocess.run(
        [sys.executable, "-m", "tts_worker", "flower"], env={**env, **example},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode != 0 and "still holds the example's change-me password" in done.stderr


def test_the_worker_serves_job_metrics(worker: WorkerHandle) -> None:
    before = worker_metrics(worker)
    meta = worker.tts.delay(text="Measure me, please.").get(timeout=30)["metadata"]
    metrics = worker_metrics(worker)

    def grew(name: str, *labels: tuple[str, str]) -> float:
        return metrics.get((name, labels), 0) - before.get((name, labels), 0)

    tone = ("engine", "tone")
    assert grew("tts_jobs_succeeded_total", tone) == grew("tts_jobs_started_total") == 1
    assert grew("tts_job_audio_seconds_count", tone) == 1
    assert grew("tts_job_audio_seconds_sum", tone) == pytest.approx(meta["duration"])
    assert grew("tts_job_synthesis_seconds_sum", tone) == pytest.approx(meta["timings"]["synthesis_s"])
    # The job's real-time factor lands in the first bucket that holds it, and in none below.
    bounds = sorted(float(dict(labels)["le"]) for name, labels in metrics if name == "tts_job_rtf_bucket")
    first = next(b for b in bounds if meta["rtf"] <= b)
    assert [grew("tts_job_rtf_bucket", tone, ("le", _le(b))) for b in bounds] == [
        0 if b < first else 1 for b in bounds
    ]
    assert metrics[("tts_broker_up", ())] == 1
    assert metrics[("tts_queue_depth", (("queue", "tts"),))] == 0
    assert ("tts_queue_depth", (("queue", "tts.backfill"),)) in metrics


def test_each_job_logs_one_start_and_one_end_line_without_secrets(worker: WorkerHandle) -> None:
    text = "A first sentence of the job. A second sentence, then."
    result = worker.tts.delay(text=text, max_chars_per_chunk=50, output_format="flac")
    outcome = result.get(timeout=60)
    log = worker.process.log()
    [start] = [line for line in log.splitlines() if f"job {result.id} start" in line]
    [done] = [line for line in log.splitlines() if f"job {result.id} done" in line]
    assert "engine=tone" in start
    assert f"engine=tone chunks=2 audio_s={outcome['metadata']['duration']} rtf=" in done
    assert worker.env["S3_SECRET_ACCESS_KEY"] not in log


def test_the_worker_log_holds_no_presigned_url(worker: WorkerHandle) -> None:
    worker.tts.delay(text="Hello.").get(timeout=30)
    assert "X-Amz-Signature" not in worker.process.log()


PRIVATE_TEXT = "Dear Ms Smith, your test results are in."


def lines_of(worker: WorkerHandle, job_id: str, what: str) -> list[str]:
    """This job's log lines of one kind (`failed`, `retry`), once the worker has run a job after it:
    with one process taking one job at a time, the signals of the job before have been handled."""
    worker.tts.delay(text="Next, please.").get(timeout=60)
    return [line for line in worker.process.log().splitlines() if f"job {job_id} {what}" in line]


def test_a_failed_job_logs_one_line_with_its_error_and_not_its_text(worker: WorkerHandle) -> None:
    result = worker.tts.delay(text=PRIVATE_TEXT, speaker_voice="nobody")
    with pytest.raises(UnknownVoice):
        result.get(timeout=30)
    [line] = lines_of(worker, result.id, "failed")
    assert "WARNING" in line and "UnknownVoice: speaker_voice: no voice 'nobody'" in line
    assert PRIVATE_TEXT not in line and "Ms Smith" not in worker.process.log()


def test_a_retried_job_logs_each_retry_then_its_failure(flaky_s3_worker: WorkerHandle) -> None:
    result = flaky_s3_worker.tts.delay(text=PRIVATE_TEXT)
    with pytest.raises(StorageError):
        result.get(timeout=90)
    # The next job fails as well (every upload is cut off): wait for its outcome, not for a log line.
    follow_up = flaky_s3_worker.tts.delay(text="Next, please.")
    with pytest.raises(StorageError):
        follow_up.get(timeout=90)
    log = flaky_s3_worker.process.log().splitlines()
    retries = [line for line in log if f"job {result.id} retry" in line]
    assert [line.split(f"job {result.id} ")[1].split(" in ")[0] for line in retries] == [
        "retry 1 of 2",
        "retry 2 of 2",
    ]
    assert all(": StorageError: S3 could not upload" in line for line in retries)
    [failed] = [line for line in log if f"job {result.id} failed" in line]
    assert "ERROR" in failed and "StorageError: S3 could not upload" in failed
    everything = "\n".join(log)
    assert PRIVATE_TEXT not in everything and flaky_s3_worker.env["S3_SECRET_ACCESS_KEY"] not in everything


def test_an_error_message_is_logged_without_the_text_or_a_credential(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        runtime, "settings", lambda: Settings(s3_secret_access_key="s3cr3t-key", hf_token="hf_tok")
    )
    fields = {"text": "Alpha beta.\n  Gamma delta epsilon.", "emo_text": "Quietly furious"}
    exc = UnreadableText("text: piper produced no audio for chunk 2 of 2 ('Gamma delta epsilon.')")
    assert loggable_message(exc, fields) == (
        "UnreadableText: text: piper produced no audio for chunk 2 of 2 ('<text>')"
    )
    assert loggable_message(InvalidRequest("emo_text: 'Quietly furious' is odd"), fields).endswith(
        "'<text>' is odd"
    )
    storage = StorageError(
        "S3 could not upload (http://u:pw@s3:9000/b/k?X-Amz-Signature=abc): key s3cr3t-key,\ntoken hf_tok"
    )
    assert loggable_message(storage, fields) == (
        "StorageError: S3 could not upload (http://u:**@s3:9000/b/k): key ***, token ***"
    )
    assert len(loggable_message(EncodingError("ffmpeg: " + "x" * 1000), {})) == len("EncodingError: ") + 300


def test_queue_depth_counts_every_priority_list(redis_server: RedisServer) -> None:
    url = f"{redis_server.url}/63"  # a database no worker reads
    client = redis.Redis.from_url(url)
    client.flushdb()
    app = create_app(ProducerConfig(broker_url=url, result_backend=url), name="queue-depth")
    tts = TTSTask(app)
    try:
        for priority in (None, 0, 4, 7, 9):
            tts.apply_async(kwargs={"text": "Waiting."}, priority=priority)
        for _ in range(2):
            tts.apply_async(kwargs={"text": "Backfill."}, queue=BACKFILL_QUEUE)
        stored = {key.decode() for key in client.scan_iter()}
        assert set(keys.priority_lists("tts")[1:]) & stored  # kombu's lists of the other priorities
        assert queue_depths(client) == {"tts": 5, "tts.backfill": 2}
        registry = CollectorRegistry()
        registry.register(QueueDepthCollector(url))
        exposed = generate_latest(registry).decode()
        assert 'tts_queue_depth{queue="tts"} 5.0' in exposed and "tts_broker_up 1.0" in exposed
    finally:
        app.close()
        client.flushdb()
        client.close()
    unreachable = CollectorRegistry()
    unreachable.register(QueueDepthCollector("redis://127.0.0.1:1/0"))
    assert "tts_broker_up 0.0" in generate_latest(unreachable).decode()
