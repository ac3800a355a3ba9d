"""docker-compose.yml and Dockerfile.gpu: the files parse, and the commands they run work here.

There is no Docker engine on this machine: `docker compose config` (or docker-compose v1) parses
and interpolates the compose file without one, and the commands the image and the compose file
run (`./bootstrap worker`, the healthcheck's `celery inspect ping`) are exercised directly.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tts_worker.devstack import wait_until

ROOT = Path(__file__).resolve().parent.parent


def compose_command() -> list[str]:
    if (
        shutil.which("docker")
        and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    ):
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("neither `docker compose` nor docker-compose is installed (./bootstrap test installs it)")


def compose_config(env_file: Path) -> dict[str, Any]:
    done = subprocess.run(
        [*compose_command(), "--env-file", str(env_file), "-f", str(ROOT / "docker-compose.yml"), "config"],
        capture_output=True, text=True, check=False, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    config: dict[str, Any] = yaml.safe_load(done.stdout)
    return config


def dockerfile_stage(target: str) -> list[str]:
    """The instructions of one stage of Dockerfile.gpu, continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile.gpu").read_text().replace("\\\n", " ")
    stages = text.split("\nFROM ")
    [stage] = [s for s in stages if s.split("\n", 1)[0].endswith(f" AS {target}")]
    return [line.strip() for line in stage.splitlines()[1:] if line.strip() and not line.startswith("#")]


def instruction(stage: list[str], name: str) -> str:
    """The arguments of the stage's last `name` instruction (the one that counts)."""
    return [line for line in stage if line.split(None, 1)[0] == name][-1].split(None, 1)[1]


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return compose_config(ROOT / ".env.example")


def test_every_service_has_a_healthcheck_and_a_restart_policy(config: dict[str, Any]) -> None:
    services = config["services"]
    assert set(services) == {"redis", "minio", "minio-init", "worker", "worker-gpu1", "flower"}
    for name, service in services.items():
        assert service.get("restart") in ("unless-stopped", "on-failure", "always"), name
        assert "test" in service.get("healthcheck", {}), name


def test_redis_has_a_password_persistence_and_no_eviction(config: dict[str, Any]) -> None:
    command = " ".join(config["services"]["redis"]["command"])
    assert "--requirepass change-me-redis" in command
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command


def test_worker_reserves_its_gpu_and_reaches_redis_and_minio(config: dict[str, Any]) -> None:
    worker = config["services"]["worker"]
    [device] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["device_ids"] == ["0"]
    env = worker["environment"]
    assert env["CELERY_BROKER_URL"] == "redis://:change-me-redis@redis:6379/0"
    assert env["S3_ENDPOINT_URL"] == "http://minio:9000" and env["TTS_ENGINE"] == "indextts2"
    assert worker["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    second = config["services"]["worker-gpu1"]
    assert second["profiles"] == ["gpu1"]
    assert second["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["1"]
    # Inside a container the reserved GPU is device 0: a host index there would hide it from torch.
    for service in (worker, second):
        assert "CUDA_VISIBLE_DEVICES" not in service["environment"]
    assert second["environment"]["CELERY_BROKER_URL"] == env["CELERY_BROKER_URL"]


def test_bucket_and_lifecycle_rule_are_created_at_start(config: dict[str, Any]) -> None:
    script = config["services"]["minio-init"]["entrypoint"][-1].replace("$$", "$")  # `config` keeps escapes
    assert 'mc mb --ignore-existing "local/$S3_BUCKET_NAME"' in script
    assert 'mc ilm rule add --expire-days "$CLEANUP_DAYS"' in script


def test_flower_needs_basic_auth(config: dict[str, Any]) -> None:
    flower = config["services"]["flower"]
    assert flower["entrypoint"] == ["python", "-m", "tts_worker", "flower"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"] == "operator:change-me-flower"


def test_missing_secrets_are_refused(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text("MINIO_ROOT_USER=a\nMINIO_ROOT_PASSWORD=b\nFLOWER_BASIC_AUTH=u:p\nDEFAULT_VOICE=v.wav\n")
    done = subprocess.run(
        [*compose_command(), "--env-file", str(env), "-f", str(ROOT / "docker-compose.yml"), "config"],
        capture_output=True, text=True, check=False, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode != 0
    assert "REDIS_PASSWORD" in done.stderr


def test_dockerfile_runs_the_bootstrap_entry_point_as_a_non_root_user() -> None:
    dockerfile = (ROOT / "Dockerfile.gpu").read_text()
    assert 'ENTRYPOINT ["tini", "--", "/app/bootstrap", "worker"]' in dockerfile
    assert "\nUSER tts\n" in dockerfile
    assert 'CMD ["--hostname", "worker@%h"' in dockerfile
    assert 'inspect ping --destination "worker@$(hostname)"' in dockerfile
    assert "python -m tts_worker check" in dockerfile
    assert dockerfile.rstrip().splitlines()[-1].startswith("CMD")  # the worker is the default target
    assert 'ENTRYPOINT ["tini", "--", "/app/bootstrap", "runpod"]' in dockerfile
    copies = [line.split()[1:] for line in dockerfile.splitlines() if line.startswith("COPY ")]
    sources = [path for args in copies if not args[0].startswith("--from") for path in args[:-1]
               if not path.startswith("--")]  # fmt: skip
    assert len(sources) >= 5
    for source in sources:
        assert (ROOT / source).exists(), f"Dockerfile.gpu copies {source}, which is not in the repository"


def test_the_image_entry_point_starts_a_worker_that_the_healthcheck_reaches(
    base_env: dict[str, str], redis_server: Any, tmp_path: Path
) -> None:
    """`./bootstrap worker` with the image's CMD arguments, then the HEALTHCHECK's command, both read
    from Dockerfile.gpu."""
    stage = dockerfile_stage("worker")
    assert json.loads(instruction(stage, "ENTRYPOINT"))[-2:] == ["/app/bootstrap", "worker"]
    image_cmd = json.loads(instruction(stage, "CMD"))
    healthcheck = instruction(stage, "HEALTHCHECK").split(" CMD ", 1)[1]
    env = {
        **base_env,
        "CELERY_BROKER_URL": f"{redis_server.url}/40",
        "CELERY_RESULT_BACKEND": f"{redis_server.url}/41",
        "AUDIO_VOICES_DIR": str(tmp_path / "voices"),
        "OUTPUT_AUDIO_DIR": str(tmp_path / "out"),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),  # python, celery
    }
    log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [str(ROOT / "bootstrap"), "worker", *image_cmd],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        wait_until(lambda: "ready." in (tmp_path / "worker.log").read_text(), timeout=60, what="worker",
                   process=process)  # fmt: skip
        assert (tmp_path / "voices").is_dir() and (tmp_path / "out").is_dir()
        healthy = subprocess.run(
            ["sh", "-c", healthcheck], env=env, capture_output=True, text=True, timeout=120
        )
        assert healthy.returncode == 0, f"{shlex.quote(healthcheck)}: {healthy.stdout}{healthy.stderr}"
    finally:
        process.terminate()
        process.wait(30)
        log.close()
    dead = subprocess.run(["sh", "-c", healthcheck], env=env, capture_output=True, text=True, timeout=120)
    assert dead.returncode != 0  # a stopped worker fails the healthcheck


def test_the_runpod_entry_point_runs_the_handler(base_env: dict[str, str], tmp_path: Path) -> None:
    """The runpod image's entry point, with the SDK's local test mode."""
    env = {
        **base_env,
        "AUDIO_VOICES_DIR": str(tmp_path / "voices"),
        "OUTPUT_AUDIO_DIR": str(tmp_path / "out"),
    }
    job = '{"input": {"text": "Hello from the entry point.", "session_id": "entry-point"}}'
    done = subprocess.run(
        [str(ROOT / "bootstrap"), "runpod", "--test_input", job],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert '"status": "completed"' in done.stdout and "entry-point.ogg" in done.stdout
