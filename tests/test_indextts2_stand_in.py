"""The IndexTTS2 engine against the stand-in `indextts` (tests/fake_indextts), for what the real
library with random weights cannot show on this machine: CUDA out of memory, a CUDA error that
poisons the process, accelerators that are not installed, and the engine's calls as the worker makes
them (built once in the pool process, warmed up first). Everything else runs against the real
library in `test_indextts2.py`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import soundfile

from producer.app import TTSTask, create_app
from producer.config import ProducerConfig
from tests.conftest import FAKE_INDEXTTS
from tts_contract.errors import EngineUnusable, GPUOutOfMemory, PoisonedJob
from tts_contract.schema import parse_request
from tts_worker.engines import check_engine
from tts_worker.engines.base import VoiceInputs
from tts_worker.pipeline import voice_inputs
from tts_worker.settings import Settings


@pytest.fixture
def checkpoints(tmp_path: Path) -> Path:
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    (directory / "config.yaml").write_text("version: 2.0\n")
    return directory


@pytest.fixture
def voices(tmp_path: Path) -> Path:
    directory = tmp_path / "voices"
    directory.mkdir()
    for name, freq in [("alice", 220), ("bob", 330), ("carol", 440)]:
        t = np.arange(16000) / 16000
        soundfile.write(directory / f"{name}.wav", 0.3 * np.sin(2 * np.pi * freq * t), 16000)
    return directory


@pytest.fixture
def settings(checkpoints: Path, voices: Path) -> Settings:
    return Settings.from_env(
        {"TTS_ENGINE": "indextts2", "CHECKPOINTS_DIR": str(checkpoints), "AUDIO_VOICES_DIR": str(voices),
         "DEFAULT_VOICE": "alice", "USE_FP16": "true", "USE_CUDA_KERNEL": "true", "USE_DEEPSPEED": "false",
         "USE_ACCEL": "false", "USE_TORCH_COMPILE": "true", "TTS_DEVICE": "cuda:1",
         "MAX_TOKENS_PER_SEGMENT": "80"}
    )  # fmt: skip


def make_engine(settings: Settings) -> Any:
    from tts_worker.engines.indextts2 import IndexTTS2Engine

    return IndexTTS2Engine(settings)


def voice(settings: Settings, **fields: Any) -> VoiceInputs:
    return voice_inputs(parse_request({"text": "x", **fields}), settings)


def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    """Empty packages of these names on sys.path, so that `find_spec` finds them."""
    for module in modules:
        (tmp_path / "installed" / module).mkdir(parents=True)
        (tmp_path / "installed" / module / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "installed"))


def test_constructor_arguments(
    stand_in: None, settings: Settings, checkpoints: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_INDEXTTS_LOG", str(tmp_path / "calls.jsonl"))
    installed(tmp_path, monkeypatch, "flash_attn")
    make_engine(replace(settings, attn_backend="flash", use_accel=True))
    [built] = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert built == {
        "call": "__init__", "model_dir": str(checkpoints), "cfg_path": str(checkpoints / "config.yaml"),
        "use_fp16": True, "device": "cuda:1", "use_cuda_kernel": True, "use_deepspeed": False,
        "use_accel": True, "use_torch_compile": True, "attn_backend": "flash", "pid": os.getpid(),
    }  # fmt: skip


# What upstream's normalize_emo_vec (indextts2-inference 2.1.1, indextts/infer_v2.py lines 325-339:
# emo_bias = [0.9375, 0.875, 1.0, 1.0, 0.9375, 0.9375, 0.6875, 0.5625], then scaled to sum to at
# most 0.8) returns for these vectors, computed with a copy of that function and written out here.
UPSTREAM_NORMALISED = [
    ([0.1, 0, 0, 0, 0, 0, 0, 0.2], [0.09375, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.1125]),
    (
        [1.0] * 8,
        [0.10810810810810811, 0.10090090090090091, 0.11531531531531532, 0.11531531531531532,
         0.10810810810810811, 0.10810810810810811, 0.07927927927927929, 0.06486486486486487],
    ),
    (
        [0.5, 0.2, 0, 0.9, 0, 0.3, 0.6, 1.0],
        [0.13392857142857142, 0.05, 0.0, 0.2571428571428572, 0.0, 0.08035714285714285,
         0.11785714285714285, 0.1607142857142857],
    ),
]  # fmt: skip


@pytest.mark.parametrize(("vector", "expected"), UPSTREAM_NORMALISED)
def test_emotion_vector_gets_the_web_uis_normalisation(vector: list[float], expected: list[float]) -> None:
    from tts_worker.engines.indextts2 import normalize_emo_vector

    assert normalize_emo_vector(vector) == pytest.approx(expected, abs=1e-12)


def test_out_of_memory_retries_the_chunk_with_smaller_segments(
    stand_in: None, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_INDEXTTS_OOM_ABOVE", "30")
    engine = make_engine(settings)
    audio = engine.synthesize("A chunk that does not fit at first.", voice(settings))
    assert len(audio) > 0
    assert [c["max_text_tokens_per_segment"] for c in engine._model.calls] == [80, 40, 20]


def test_out_of_memory_that_persists_is_transient(
    stand_in: None, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_INDEXTTS_OOM_ABOVE", "10")
    engine = make_engine(settings)
    with pytest.raises(GPUOutOfMemory, match="max_text_tokens_per_segment=20"):
        engine.synthesize("Never fits.", voice(settings))
    assert [c["max_text_tokens_per_segment"] for c in engine._model.calls] == [80, 40, 20]


def test_a_device_side_assert_makes_the_engine_unusable(
    stand_in: None, settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FAKE_INDEXTTS_ASSERT_ONCE", str(tmp_path / "fired"))
    engine = make_engine(settings)
    with pytest.raises(EngineUnusable, match="device-side assert"):
        engine.synthesize("This <assert> breaks CUDA.", voice(settings))


def test_out_of_memory_frees_the_cache_after_leaving_the_except_block(
    stand_in: None, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The PyTorch FAQ's pattern: while the exception is being handled its traceback still holds
    the failed call's tensors, so the cache is emptied only once the except block is left."""
    import gc

    events: list[tuple[str, Any]] = []
    cuda = SimpleNamespace(is_available=lambda: True,
                           empty_cache=lambda: events.append(("empty_cache", sys.exc_info()[0])))  # fmt: skip
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=cuda))
    monkeypatch.setattr(gc, "collect", lambda *_: events.append(("collect", sys.exc_info()[0])) or 0)
    monkeypatch.setenv("FAKE_INDEXTTS_OOM_ABOVE", "40")
    engine = make_engine(settings)
    engine.synthesize("Fits at the second try.", voice(settings))
    assert events == [("collect", None), ("empty_cache", None)]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"attn_backend": "sage"}, "ATTN_BACKEND=sage needs the sageattention package"),
        ({"attn_backend": "flash"}, "ATTN_BACKEND=flash needs the flash_attn package"),
        ({"use_accel": True}, "USE_ACCEL=true needs the flash_attn package"),
    ],
)
def test_accelerators_that_are_not_installed_stop_the_engine_before_loading(
    stand_in: None, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    changes: dict[str, Any], message: str,
) -> None:  # fmt: skip
    monkeypatch.setenv("FAKE_INDEXTTS_LOG", str(tmp_path / "calls.jsonl"))
    with pytest.raises(RuntimeError, match=message):
        make_engine(replace(settings, **changes))
    assert not (tmp_path / "calls.jsonl").exists()  # refused before the model was built
    with pytest.raises(RuntimeError, match=message):  # and by the worker's start check and health check
        check_engine(replace(settings, **changes))
    check_engine(settings)


def test_installed_accelerators_and_deepspeed_are_left_to_indextts2(
    stand_in: None, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    installed(tmp_path, monkeypatch, "sageattention")
    engine = make_engine(replace(settings, attn_backend="sage", use_deepspeed=True))
    assert engine._model is not None
    # IndexTTS2 runs without deepspeed when it cannot import it; the worker says so once.
    assert "USE_DEEPSPEED=true but deepspeed is not installed" in caplog.text


@pytest.fixture
def import_markers(tmp_path: Path) -> tuple[Path, Path]:
    """Packages `torch` and `indextts` that leave a marker file when anything imports them (then
    raise ImportError, so that a guarded `try: import torch` carries on and only the file tells)."""
    for name in ("torch", "indextts"):
        (tmp_path / "markers" / name).mkdir(parents=True)
        (tmp_path / "markers" / name / "__init__.py").write_text(
            f"open({str(tmp_path / f'{name}-imported')!r}, 'w').close()\n"
            f"raise ImportError('{name} was imported')\n"
        )
    return tmp_path / "markers", tmp_path


def test_worker_with_piper_never_imports_torch(
    base_env: dict[str, str], import_markers: tuple[Path, Path]
) -> None:
    path, evidence = import_markers
    code = (
        "from tts_worker import runtime; import tts_worker.celery, tts_worker.tasks, tts_worker.health;"
        "from tts_worker.engines import VoiceInputs;"
        "runtime.services().engine.synthesize('Hi.', VoiceInputs()); print('spoke')"
    )
    pythonpath = os.pathsep.join([str(path), base_env.get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))])
    env = {**base_env, "TTS_ENGINE": "piper", "PYTHONPATH": pythonpath}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0 and "spoke" in done.stdout, done.stderr
    assert sorted(p.name for p in evidence.glob("*-imported")) == []
    # The markers work: a guarded import, as a library might try one, leaves its file.
    guarded = "try:\n import torch\nexcept ImportError:\n pass"
    subprocess.run([sys.executable, "-c", guarded], env=env, check=True)
    assert (evidence / "torch-imported").exists()


@pytest.fixture(scope="module")
def indextts2_worker(
    start_worker: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Any, Path, Path]]:
    """A real worker process running the indextts2 engine over the stand-in package."""
    workdir = tmp_path_factory.mktemp("indextts2-worker")
    (workdir / "checkpoints").mkdir()
    (workdir / "checkpoints" / "config.yaml").write_text("version: 2.0\n")
    calls, fired = workdir / "calls.jsonl", workdir / "assert-fired"
    handle = start_worker(
        TTS_ENGINE="indextts2", CHECKPOINTS_DIR=str(workdir / "checkpoints"), DEFAULT_VOICE="alice",
        PYTHONPATH=os.pathsep.join([str(FAKE_INDEXTTS), os.environ.get("PYTHONPATH", "")]),
        FAKE_INDEXTTS_LOG=str(calls), FAKE_INDEXTTS_ASSERT_ONCE=str(fired),
    )  # fmt: skip
    yield handle, calls, fired


def logged_calls(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_worker_loads_once_in_the_child_and_warms_up_before_jobs(indextts2_worker: Any) -> None:
    worker, calls, _ = indextts2_worker
    for text in ["First job.", "Second job."]:
        outcome = worker.tts.delay(text=text, speaker_voice="alice").get(timeout=60)
        assert outcome["metadata"]["engine"] == "indextts2"
        assert outcome["metadata"]["device"] == "cuda:0"
    log = logged_calls(calls)
    [child] = worker.pool_pids()
    built = [c for c in log if c["call"] == "__init__"]
    assert [c["pid"] for c in built] == [child]  # once, in the process serving jobs, never the parent
    infers = [c for c in log if c["call"] == "infer" and c["pid"] == child]
    assert [c["text"] for c in infers[:3]] == ["Warm-up.", "First job.", "Second job."]


def test_a_poisoned_context_ends_the_process_and_the_job_completes_on_a_fresh_one(
    indextts2_worker: Any,
) -> None:
    worker, calls, fired = indextts2_worker
    [before] = worker.pool_pids()
    outcome = worker.tts.delay(text="This <assert> breaks CUDA once.").get(timeout=90)
    assert outcome["status"] == "completed"
    assert fired.exists()
    [after] = worker.pool_pids()
    assert after != before
    assert "the job is requeued" in worker.process.log()
    built = [c["pid"] for c in logged_calls(calls) if c["call"] == "__init__"]
    assert built[-1] == after  # the fresh process loaded a fresh model


def test_a_job_that_poisons_every_process_fails_after_two_instead_of_forever(indextts2_worker: Any) -> None:
    from tts_worker.tasks import MAX_PROCESS_ENDINGS

    worker, calls, _ = indextts2_worker
    sent = worker.tts.delay(text="This <always-assert> breaks CUDA every time.")
    with pytest.raises(PoisonedJob, match=f"job {sent.id} failed for good: it ended 2 worker processes"):
        sent.get(timeout=120)
    assert MAX_PROCESS_ENDINGS == 2
    endings = [line for line in worker.process.log().splitlines()
               if f"job {sent.id}:" in line and "ending this worker process" in line]  # fmt: skip
    assert len(endings) == 2, endings
    assert "process ending 1 of at most 2" in endings[0]
    assert "requeued only to be failed (it ended 2 processes)" in endings[1]
    # The third delivery ran on a fresh process that never gave the job to the engine, and serves on.
    infers = [c for c in logged_calls(calls) if c["call"] == "infer" and "<always-assert>" in c["text"]]
    assert len(infers) == 2
    assert worker.tts.delay(text="Still serving.").get(timeout=60)["status"] == "completed"


@pytest.mark.slow
@pytest.mark.parametrize("load_s", [0, 5], ids=["fails-at-once", "fails-after-the-worker-is-ready"])
def test_a_worker_that_cannot_load_its_model_stops_and_its_jobs_stay_queued(
    start_worker: Any, base_env: dict[str, str], redis_server: Any, fresh_db: int, tmp_path: Path, load_s: int
) -> None:
    """No config.yaml in CHECKPOINTS_DIR: the worker must not take jobs only to fail them."""
    (tmp_path / "checkpoints").mkdir()
    env = {
        **base_env, "TTS_ENGINE": "indextts2", "CHECKPOINTS_DIR": str(tmp_path / "checkpoints"),
        "DEFAULT_VOICE": "alice", "FAKE_INDEXTTS_LOAD_S": str(load_s),
        "PYTHONPATH": os.pathsep.join([str(FAKE_INDEXTTS), os.environ.get("PYTHONPATH", "")]),
        "CELERY_BROKER_URL": f"{redis_server.url}/{fresh_db}",
        "CELERY_RESULT_BACKEND": f"{redis_server.url}/{fresh_db + 1}",
    }  # fmt: skip
    app = create_app(ProducerConfig.from_env(env), name="producer-for-a-broken-worker")
    sent = TTSTask(app).delay(text="Waiting for a worker that can speak.")
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tts_worker", "worker"],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert "cannot load the engine (no config.yaml in" in done.stderr
    assert sent.state == "PENDING"  # not taken and failed
    healthy = start_worker(db=fresh_db)  # tone, on the same queues
    assert healthy.app.AsyncResult(sent.id).get(timeout=60)["status"] == "completed"
    app.close()
