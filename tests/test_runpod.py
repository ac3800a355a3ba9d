"""The RunPod shim with the seed's requests: in process through `handler`, through the runpod SDK's own
job path (its network sends captured), and through its local mode (`--test_input`), against the real
S3-compatible server and ffmpeg, with no broker."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import runpod
from runpod.serverless.modules import rp_http, rp_scale

from devtools.stack import free_port
from tests.test_audio import join_chunks
from tts_worker import health, runpod_handler, runtime
from tts_worker.engines.base import NO_OPTIONS, Audio, GenerationOptions, VoiceInputs
from tts_worker.engines.tone import ToneEngine

TEXT = "The first sentence is here. The second one follows it! And a third, to be sure?"
NO_BROKER = "redis://127.0.0.1:1/0"  # nothing listens there: the shim must not need it


@pytest.fixture
def rp_env(base_env: dict[str, str]) -> dict[str, str]:
    """The test stack's environment, with a broker and result backend that cannot be reached."""
    return {**base_env, "CELERY_BROKER_URL": NO_BROKER, "CELERY_RESULT_BACKEND": NO_BROKER}


@pytest.fixture
def shim(rp_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """`handler` in this process on the tone engine, with fresh per-process state."""
    for name, value in rp_env.items():
        monkeypatch.setenv(name, value)
    caches = (runtime.settings, runtime.engine, runtime.services)  # tests may replace `runtime.services`
    for cache in caches:
        cache.cache_clear()
    yield
    for cache in caches:
        cache.cache_clear()


def run(fields: Any, job_id: str | None = None) -> list[dict[str, Any]]:
    """The handler's messages; a fresh job id by default (a known one returns its stored result)."""
    return list(runpod_handler.handler({"id": job_id or f"rp-{uuid.uuid4()}", "input": fields}))


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return bytes(response.read())


def test_a_seed_batch_request_gets_the_seed_response(shim: None, s3: Any) -> None:
    # As the seed's clients send it: voice without extension, output_format "pcm_16" (the seed's default).
    fields = {
        "text": TEXT, "speaker_voice": "alice", "session_id": "seed-client-1", "output_format": "pcm_16",
        "max_chars_per_chunk": 50, "enable_crossfade": True, "crossfade_ms": 100, "emo_alpha": 0.5,
    }  # fmt: skip
    [result] = run(fields)
    assert result["status"] == "completed"
    assert result["filename"] == "seed-client-1.ogg" == result["s3_key"]
    meta = result["metadata"]
    assert {k: meta[k] for k in ("sample_rate", "codec", "bitrate", "device")} == {
        "sample_rate": 24000, "codec": "opus", "bitrate": "128k", "device": "cpu",
    }  # fmt: skip
    assert meta["chunks"] == 3 and meta["duration"] > 3
    assert fetch(result["url"])[:4] == b"OggS"
    assert s3.head_object(Bucket="tts-test", Key="seed-client-1.ogg")["ContentType"] == "audio/ogg"


def test_without_session_id_the_object_is_named_after_the_runpod_job(shim: None) -> None:
    [result] = run({"text": "Hello."}, job_id="sync-1234-abcd-u1")
    assert result["filename"] == "sync-1234-abcd-u1.ogg"


def test_our_own_fields_are_accepted_too(shim: None) -> None:
    fields = {"text": "Hello.", "output_format": "mp3", "bitrate": "64k", "presign_expires_s": 120}
    [result] = run(fields, job_id="rp-job-mp3")
    assert result["filename"] == "rp-job-mp3.mp3" and result["metadata"]["bitrate"] == "64k"
    assert "X-Amz-Expires=120" in result["url"]


def test_progress_goes_to_runpod_per_chunk(shim: None, monkeypatch: pytest.MonkeyPatch, job_id: str) -> None:
    sent: list[tuple[str, Any]] = []
    monkeypatch.setattr(runpod_handler, "_ON_RUNPOD", True)
    monkeypatch.setattr(
        runpod.serverless, "progress_update", lambda job, data: sent.append((job["id"], data))
    )
    run({"text": TEXT, "max_chars_per_chunk": 50}, job_id=job_id)
    assert sent == [(job_id, {"chunk": i, "chunks": 3}) for i in (1, 2, 3)]


class CountingTone(ToneEngine):
    """The tone engine, counting its calls."""

    calls = 0

    def synthesize(self, text: str, voice: VoiceInputs, options: GenerationOptions = NO_OPTIONS) -> Audio:
        self.calls += 1
        return super().synthesize(text, voice, options)


def test_a_stream_sends_each_chunk_as_soon_as_it_is_spoken(
    shim: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = CountingTone()
    services = replace(runtime.services(), engine=engine)
    monkeypatch.setattr(runtime, "services", lambda: services)
    fields = {"text": TEXT, "stream": True, "output_format": "pcm_16", "stream_max_chars_per_chunk": 50,
              "stream_crossfade_ms": 40, "max_chars_per_chunk": 1000}  # fmt: skip
    messages, calls_at_first = [], None
    for message in runpod_handler.handler({"id": "s1", "input": fields}):
        calls_at_first = engine.calls if calls_at_first is None else calls_at_first
        messages.append(message)
    assert calls_at_first == 1  # the first piece left before the second chunk was synthesised
    *pieces, done = messages
    assert [m["chunk"] for m in pieces] == [1, 2, 3]
    assert all(m["status"] == "streaming" and m["format"] == "pcm_16" for m in pieces)
    assert {m["sample_rate"] for m in pieces} == {22050}
    assert (done["status"], done["total_chunks"]) == ("complete", 3)
    pcm = np.concatenate([np.frombuffer(base64.b64decode(m["audio_chunk"]), "<i2") for m in pieces])
    sentences = ("The first sentence is here.", "The second one follows it!", "And a third, to be sure?")
    spoken = [ToneEngine().synthesize(sentence, VoiceInputs()) for sentence in sentences]
    assert np.array_equal(pcm, join_chunks(spoken, sample_rate=22050, crossfade_ms=40))


def test_a_stream_takes_the_seed_s_fields_and_always_chunks_as_the_seed_did(shim: None) -> None:
    # The seed split a streamed text whatever enable_chunking said, allowed stream_crossfade_ms up to
    # 2000 (above crossfade_ms's 1000) and read stream_tail_ms without using it.
    fields = {"text": TEXT, "stream": True, "enable_chunking": False, "stream_max_chars_per_chunk": 50,
              "stream_crossfade_ms": 1500, "stream_tail_ms": 250}  # fmt: skip
    *pieces, done = run(fields)
    assert (done["status"], done["total_chunks"]) == ("complete", 3)
    sentences = ("The first sentence is here.", "The second one follows it!", "And a third, to be sure?")
    spoken = [ToneEngine().synthesize(sentence, VoiceInputs()) for sentence in sentences]
    assert np.array_equal(pcm_of(pieces), join_chunks(spoken, sample_rate=22050, crossfade_ms=1500))
    *pieces, _ = run({**fields, "enable_crossfade": False})  # which turns the stream's crossfade off too
    assert np.array_equal(pcm_of(pieces), np.concatenate(spoken))


def pcm_of(messages: list[dict[str, Any]]) -> Audio:
    """The samples of a stream's `streaming` messages, laid end to end."""
    return np.concatenate([np.frombuffer(base64.b64decode(m["audio_chunk"]), "<i2") for m in messages])


def test_the_health_check_reports_each_part_and_skips_the_broker(shim: None) -> None:
    [report] = run({"action": "health_check"})
    assert report["status"] == "healthy"
    checks = report["checks"]
    ours = ["settings", "broker", "storage", "ffmpeg", "engine", "model_files", "gpu"]
    assert list(checks) == [*ours, "configuration", "hardware", "s3", "checkpoints"]
    assert checks["broker"]["status"] == "skip"
    assert {checks[name]["status"] for name in ("settings", "storage", "ffmpeg", "engine")} == {"pass"}
    # A monitor written for the seed reads its own names: each is the check of ours it stands for.
    assert checks["s3"] == checks["storage"] and "bucket 'tts-test'" in checks["s3"]["details"]
    assert checks["configuration"] == checks["settings"] and checks["checkpoints"] == checks["model_files"]
    assert checks["hardware"] == checks["gpu"]
    # A caller reads this reply: no internal host, no path of the worker's disk.
    assert "://" not in json.dumps(report) and os.environ["AUDIO_VOICES_DIR"] not in json.dumps(report)
    assert "bucket 'tts-test' at <url>" in checks["storage"]["details"]


def test_errors_name_no_internal_host_or_path(shim: None, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()  # nothing listens: S3 refuses every connection
    for name, value in {"S3_ENDPOINT_URL": f"http://127.0.0.1:{port}", "STORAGE_RETRY_S": "0"}.items():
        monkeypatch.setenv(name, value)
    [outcome] = run({"text": "Hi."})
    assert outcome["error"].startswith("StorageError: S3 could not look up")
    assert str(port) not in outcome["error"] and "://" not in outcome["error"]


def test_the_seed_s_names_stand_for_failed_checks_too() -> None:
    checks = [health.Check("settings", "pass", "ok"), health.Check("storage", "fail", "no bucket")]
    report = health.report(checks, seed_names=True)
    assert report["status"] == "unhealthy"
    assert report["checks"]["s3"] == {"status": "fail", "details": "no bucket"}
    assert set(report["checks"]) == {"settings", "storage", "configuration", "s3"}
    assert set(health.report(checks)["checks"]) == {"settings", "storage"}  # `check --json` keeps ours


BAD_INPUTS = [
    ({}, "text: field required"),
    ({"text": "Hi.", "speakr_voice": "alice"}, "did you mean 'speaker_voice'"),
    ({"text": "Hi.", "speaker_voice": "../../etc/passwd"}, "speaker_voice: must be a plain file name"),
    ({"text": "Hi.", "speaker_voice": "nobody"}, "no voice 'nobody'"),
    ({"text": "Hi.", "emo_vector": [0.5] * 7}, "emo_vector: needs exactly 8 values"),
    ({"text": "Hi.", "stream": "yes"}, "stream: input should be a valid boolean"),
    ({"text": "Hi.", "stream": True, "output_format": "mp3"}, "output_format: streaming sends 'pcm_16' only"),
    ({"text": "Hi.", "stream": True, "stream_max_chars_per_chunk": 10}, "stream_max_chars_per_chunk"),
    ({"text": "Hi.", "stream": True, "stream_crossfade_ms": 2001}, "stream_crossfade_ms: input should be"),
    ({"text": "Hi.", "stream": True, "stream_tail_ms": -1}, "stream_tail_ms: input should be greater"),
    ({"text": "Hi.", "stream": True, "stream_tail_ms": "200"}, "stream_tail_ms: input should be a valid"),
    ({"text": "Hi.", "stream": True, "sample_rate": 16000}, "sample_rate: a stream is pcm_16"),
    ({"text": "Hi.", "action": "reboot"}, "action: input should be 'health_check'"),
    ("Hello", "input: must be an object"),
]


@pytest.mark.parametrize(("fields", "message"), BAD_INPUTS, ids=[m.split(":")[0] for _, m in BAD_INPUTS])
def test_bad_input_gets_a_clear_error_and_no_traceback(shim: None, fields: Any, message: str) -> None:
    [outcome] = run(fields)
    assert list(outcome) == ["error"]
    assert message in outcome["error"]
    assert "Traceback" not in outcome["error"]


@pytest.fixture
def poisonable(shim: None, stand_in: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The real indextts2 engine over the stand-in, whose CUDA context breaks on cue (text with
    `<assert>`, once per file named by FAKE_INDEXTTS_ASSERT_ONCE); RUNPOD_CONFIG restored after."""
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "config.yaml").write_text("version: 2.0\n")
    for name, value in {"TTS_ENGINE": "indextts2", "CHECKPOINTS_DIR": str(tmp_path / "checkpoints"),
                        "DEFAULT_VOICE": "alice"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    monkeypatch.setitem(runpod_handler.RUNPOD_CONFIG, "refresh_worker", False)
    return tmp_path


def test_an_engine_that_poisons_the_gpu_makes_runpod_replace_the_worker(
    poisonable: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    tmp_path = poisonable
    for stream in (False, True):
        monkeypatch.setenv("FAKE_INDEXTTS_ASSERT_ONCE", str(tmp_path / f"fired-{stream}"))
        [outcome] = run({"text": "This <assert> breaks CUDA.", "stream": stream})
        assert outcome["refresh_worker"] is True and "device-side assert" in outcome["error"]
    # A generator's output cannot carry refresh_worker: the SDK reads it from the config after the job.
    assert runpod_handler.RUNPOD_CONFIG["refresh_worker"] is True
    assert "Traceback" in caplog.text  # the traceback is logged, never sent


def test_an_unexpected_error_is_named_without_a_traceback(
    shim: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtime, "services", lambda: 1 / 0)
    [outcome] = run({"text": "Hi."})
    # Its class alone: an unexpected error's message may hold anything (a path, a host).
    assert outcome == {"error": "internal error (ZeroDivisionError); the worker's log has the details"}


NOT_FOR_LOGS = ("X-Amz-Signature", "audio_chunk")
"""What no log line may hold: a presigned URL's signature (a bearer credential) and the audio itself."""


def assert_nothing_secret_in(output: str) -> None:
    for secret in NOT_FOR_LOGS:
        assert secret not in output, f"{secret} in the output:\n{output[-3000:]}"


def run_on_runpod(fields: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[list[Any], Any, bool]:
    """One job down the SDK's own path on RunPod (the worker loop's `JobScaler.handle_job`, then
    `rp_job.handle_job` and `run_job_generator`), started with `RUNPOD_CONFIG` as `main` starts it.
    Only the HTTP post is replaced, to capture what would reach RunPod. Returns the stream posts, the
    final post (the job's outcome: `output`, else `error`, FAILED) and whether the worker lives on."""
    posts: list[tuple[str, Any]] = []

    async def transmit(session: Any, url: str, job_data: str) -> None:
        posts.append((url, json.loads(job_data)))

    monkeypatch.setattr(rp_http, "_transmit", transmit)
    scaler = rp_scale.JobScaler(runpod_handler.RUNPOD_CONFIG)

    async def one_job() -> None:
        await scaler.jobs_queue.put({"id": f"rp-{uuid.uuid4()}", "input": fields})
        await scaler.handle_job(SimpleNamespace(headers={}), await scaler.jobs_queue.get())

    asyncio.run(one_job())
    streamed = [data for url, data in posts if url.startswith(rp_http.JOB_STREAM_URL)]
    [done] = [data for url, data in posts if url.startswith(rp_http.JOB_DONE_URL)]
    return streamed, done, scaler.is_alive()


def test_on_runpod_a_batch_job_is_one_message_then_a_list_of_it(
    shim: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    streamed, done, alive = run_on_runpod({"text": TEXT, "session_id": "rp-sdk-batch"}, monkeypatch)
    [result] = done["output"]  # return_aggregate_stream: /runsync and /status return the list
    assert streamed == [{"output": result}] and set(done) == {"output"} and alive
    assert (result["status"], result["filename"]) == ("completed", "rp-sdk-batch.ogg")
    assert "X-Amz-Signature" in result["url"] and fetch(result["url"])[:4] == b"OggS"
    captured = capsys.readouterr()
    assert "Finished." in captured.out  # the SDK's own log lines are there, at INFO, and hold nothing secret
    assert_nothing_secret_in(captured.out + captured.err)


def test_on_runpod_a_stream_posts_each_piece_then_completes(
    shim: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fields = {"text": TEXT, "stream": True, "stream_max_chars_per_chunk": 50}
    streamed, done, alive = run_on_runpod(fields, monkeypatch)
    messages = [post["output"] for post in streamed]
    assert [m["status"] for m in messages] == ["streaming"] * 3 + ["complete"]
    assert done == {"output": messages} and alive
    assert round(len(pcm_of(messages[:-1])) / 22050, 3) == messages[-1]["duration"]
    assert_nothing_secret_in("".join(capsys.readouterr()))


def test_on_runpod_a_bad_request_fails_the_job_and_posts_no_stream(
    shim: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    streamed, done, alive = run_on_runpod({"txt": "typo"}, monkeypatch)
    assert streamed == [] and alive
    assert done == {
        "error": "invalid request: text: field required; txt: unknown field (did you mean 'text'?)"
    }


def test_on_runpod_a_poisoned_gpu_fails_the_job_and_the_worker_stops(
    poisonable: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_INDEXTTS_ASSERT_ONCE", str(poisonable / "fired"))
    streamed, done, alive = run_on_runpod({"text": "This <assert> breaks CUDA."}, monkeypatch)
    assert streamed == []
    # The SDK keeps only the message of an error a generator yields, and takes refresh_worker from
    # the config it was started with: the job fails, RunPod stops the pod, the worker loop ends.
    assert set(done) == {"error", "stopPod"} and done["stopPod"] is True
    assert "device-side assert" in done["error"] and "this worker will be replaced" in done["error"]
    assert not alive


def test_main_warms_the_engine_then_starts_the_sdk_with_runpod_config_itself(
    shim: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[tuple[dict[str, Any], int]] = []
    monkeypatch.setattr(runpod_handler, "_ON_RUNPOD", True)
    monkeypatch.setattr(
        runpod.serverless,
        "start",
        lambda config: started.append((config, runtime.engine.cache_info().currsize)),
    )
    assert runtime.engine.cache_info().currsize == 0  # importing the module loaded nothing
    runpod_handler.main([])
    [(config, engines_loaded)] = started
    assert engines_loaded == 1  # warm before the first job
    assert config is runpod_handler.RUNPOD_CONFIG  # the dict that refresh_worker is set in


def run_locally(env: dict[str, str], test_input: dict[str, Any]) -> tuple[int, list[dict[str, Any]], str]:
    """`python -m tts_worker.runpod_handler --test_input ...`, the SDK's log level left to the module:
    exit status, the messages it printed (its JSON lines), and everything else it printed."""
    env = {
        name: value for name, value in env.items() if name not in ("RUNPOD_LOG_LEVEL", "RUNPOD_DEBUG_LEVEL")
    }
    done = subprocess.run(
        [sys.executable, "-m", "tts_worker.runpod_handler", "--test_input", json.dumps(test_input)],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    lines = done.stdout.splitlines()
    messages = [json.loads(line) for line in lines if line.startswith("{")]
    rest = [line for line in lines if not line.startswith("{")]
    return done.returncode, messages, "\n".join(rest) + done.stderr


def test_the_sdk_local_mode_runs_a_batch_job(rp_env: dict[str, str], s3: Any) -> None:
    code, messages, output = run_locally(
        rp_env, {"input": {"text": "Hello from the SDK.", "session_id": "sdk-1"}}
    )
    assert code == 0, output
    [result] = messages
    assert (result["status"], result["filename"]) == ("completed", "sdk-1.ogg")
    assert s3.head_object(Bucket="tts-test", Key="sdk-1.ogg")["ContentLength"] > 0
    assert "Job local_test completed successfully" in output
    # The URL is printed once, as the job's output; the SDK's log (its job result included) lacks it.
    assert "X-Amz-Signature" in result["url"] and "'filename': 'sdk-1.ogg'" in output
    assert_nothing_secret_in(output)


def test_the_sdk_local_mode_runs_a_stream(rp_env: dict[str, str]) -> None:
    code, messages, output = run_locally(
        rp_env, {"input": {"text": TEXT, "stream": True, "max_chars_per_chunk": 50}}
    )
    assert code == 0, output
    assert [m["status"] for m in messages] == ["streaming"] * 3 + ["complete"]
    assert all(m["audio_chunk"] for m in messages[:-1])
    assert_nothing_secret_in(output)


def test_the_sdk_local_mode_fails_a_bad_request_cleanly(rp_env: dict[str, str]) -> None:
    code, messages, output = run_locally(rp_env, {"input": {"txt": "typo"}})
    assert code == 1
    assert messages == [
        {"error": "invalid request: text: field required; txt: unknown field (did you mean 'text'?)"}
    ]
    assert "Traceback" not in output


def test_a_session_id_taken_by_another_job_is_refused_as_on_the_queue(shim: None, s3: Any) -> None:
    name = f"rp-shared-{uuid.uuid4()}"
    [first] = run({"text": TEXT, "session_id": name})
    assert first["status"] == "completed"
    [second] = run({"text": "Other words.", "session_id": name})
    assert list(second) == ["error"] and second["error"].startswith(f"session_id: {name}.ogg holds audio")
    [replaced] = run({"text": "Other words.", "session_id": name, "overwrite": True})
    assert replaced["status"] == "completed"
