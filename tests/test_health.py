"""`python -m tts_worker check`, the Docker healthcheck: every part reported on its own, against the real
Redis, S3-compatible server and ffmpeg; GPU and model files with stand-ins for torch and nvidia-smi."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tts_worker import health

SECRET_PASSWORD = "hunter2-not-for-logs"


def check(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tts_worker", "check", *args],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def lines(output: str) -> dict[str, str]:
    """{check name: its status mark} from the printed report."""
    return {line.split()[1]: line.split()[0] for line in output.splitlines() if len(line.split()) > 2}


def test_a_healthy_worker_passes_every_check(base_env: dict[str, str]) -> None:
    done = check(base_env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert lines(done.stdout) == {
        "settings": "ok", "broker": "ok", "storage": "ok", "ffmpeg": "ok", "engine": "ok",
        "model_files": "skip", "gpu": "skip",
    }  # fmt: skip
    assert done.stdout.rstrip().endswith("healthy")


def test_each_problem_is_named_and_the_exit_status_is_not_zero(base_env: dict[str, str]) -> None:
    broker = f"redis://:{SECRET_PASSWORD}@127.0.0.1:1/0"
    env = {**base_env, "S3_BUCKET_NAME": "no-such-bucket", "CELERY_BROKER_URL": broker,
           "CELERY_RESULT_BACKEND": "", "FFMPEG_BINARY": "no-ffmpeg"}  # fmt: skip
    done = check(env)
    assert done.returncode == 1
    marks = lines(done.stdout)
    assert [name for name, mark in marks.items() if mark == "FAIL"] == ["broker", "storage", "ffmpeg"]
    assert "does the bucket exist?" in done.stdout and "FFMPEG_BINARY='no-ffmpeg'" in done.stdout
    assert done.stdout.rstrip().endswith("unhealthy: broker, storage, ffmpeg")
    everything = done.stdout + done.stderr
    assert SECRET_PASSWORD not in everything and base_env["S3_SECRET_ACCESS_KEY"] not in everything


def test_a_bad_setting_stops_the_other_checks(base_env: dict[str, str]) -> None:
    done = check({**base_env, "TTS_ENGINE": "espeak"}, "--json")
    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert report["status"] == "unhealthy"
    assert report["checks"]["settings"]["status"] == "fail"
    assert "TTS_ENGINE must be one of" in report["checks"]["settings"]["details"]
    assert {c["status"] for name, c in report["checks"].items() if name != "settings"} == {"skip"}


@pytest.fixture
def forget_torch() -> Iterator[None]:
    """Whatever `torch` a test imports is forgotten after it, and the real one (if any) comes back."""
    saved = sys.modules.pop("torch", None)
    yield
    sys.modules.pop("torch", None)
    if saved is not None:
        sys.modules["torch"] = saved


@pytest.fixture
def torch_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, forget_torch: None) -> Path:
    """A `torch` that leaves this file behind when anything imports it (and then fails the import;
    `sys.modules` forgets a failed import, and a check that breaks is only reported, so the file is
    the evidence)."""
    marker = tmp_path / "torch-was-imported"
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nraise RuntimeError('torch was imported')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return marker


@pytest.mark.parametrize("engine", ["tone", "piper"])
def test_cpu_engines_never_import_torch(base_env: dict[str, str], torch_imported: Path, engine: str) -> None:
    checks = health.run_checks({**base_env, "TTS_ENGINE": engine})
    assert {c.name: c.status for c in checks}["gpu"] == "skip"
    assert all(c.status != "fail" for c in checks), checks
    assert not torch_imported.exists()


@pytest.fixture
def gpu_env(base_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """indextts2 settings with an empty checkpoints directory and a PATH without nvidia-smi."""
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    return {
        **base_env,
        "TTS_ENGINE": "indextts2",
        "CHECKPOINTS_DIR": str(checkpoints),
        "DEFAULT_VOICE": "alice",
    }


def statuses(env: dict[str, str]) -> dict[str, health.Check]:
    return {c.name: c for c in health.run_checks(env, skip_broker="not needed here")}


def test_the_gpu_is_reported_by_nvidia_smi_without_importing_torch(
    gpu_env: dict[str, str], torch_imported: Path, tmp_path: Path
) -> None:
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 1 MiB, 81559 MiB'\n")
    smi.chmod(0o755)
    gpu = statuses(gpu_env)["gpu"]
    assert (gpu.status, gpu.details) == ("pass", "NVIDIA H100 80GB HBM3, 1 MiB, 81559 MiB")
    assert not torch_imported.exists()


@pytest.mark.parametrize(("available", "status"), [(True, "pass"), (False, "fail")])
def test_without_nvidia_smi_torch_is_asked(
    gpu_env: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    forget_torch: None,
    available: bool,
    status: str,
) -> None:
    fake = tmp_path / "fake_torch"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text(
        "import types\n__version__ = '2.8.0'\n"
        f"cuda = types.SimpleNamespace(is_available=lambda: {available}, device_count=lambda: 1,\n"
        "                              get_device_name=lambda i: 'NVIDIA L4')\n"
    )
    monkeypatch.syspath_prepend(str(fake))
    gpu = statuses(gpu_env)["gpu"]
    assert gpu.status == status
    assert ("sees NVIDIA L4" if available else "sees no CUDA device") in gpu.details


def test_model_files_never_fetched_are_named(gpu_env: dict[str, str]) -> None:
    model_files = statuses(gpu_env)["model_files"]  # the check is `tts_worker.models`' own, tested there
    assert model_files.status == "fail"
    assert model_files.details.startswith("IndexTeam/IndexTTS-2: not fetched")
    assert model_files.details.endswith("(run ./bootstrap models)")


@pytest.mark.parametrize(
    "command", [["tts_worker", "warmup"], ["tts_worker.runpod_handler", "--warmup"]], ids=["worker", "runpod"]
)
def test_warmup_loads_the_engine_and_exits_without_broker_or_storage(
    base_env: dict[str, str], command: list[str]
) -> None:
    env = {k: v for k, v in base_env.items() if not k.startswith(("S3_", "CELERY_"))}
    env["CELERY_BROKER_URL"] = "redis://127.0.0.1:1/0"  # nothing listens there: must not matter
    done = subprocess.run(
        [sys.executable, "-m", *command], env={**env, "TTS_ENGINE": "piper"},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "piper loaded and warmed up on cpu" in done.stdout + done.stderr


def test_the_runpod_help_loads_nothing(base_env: dict[str, str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tts_worker.runpod_handler", "--help"],
        env={**base_env, "TTS_ENGINE": "indextts2"}, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr  # indextts2 is not installed here: nothing tried to load it
    assert "--warmup" in done.stdout and "--test_input JSON" in done.stdout
