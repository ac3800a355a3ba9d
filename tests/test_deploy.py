"""docker-compose.yml and Dockerfile.gpu: the files parse, and the commands they run work here.

There is no Docker engine on this machine: `docker compose config` (or docker-compose v1) parses
and interpolates the compose file without one, and the commands the image and the compose file
run (`./bootstrap worker`, the healthcheck's `celery inspect ping`) are exercised directly.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as pip vendors it
    from pip._vendor import tomli as tomllib

import pytest
import redis
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from devtools.stack import free_port, wait_until
from tests.conftest import BUCKET
from tts_worker.settings import Settings
from tts_worker.storage import make_storage

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


def test_redis_has_a_password_persistence_a_memory_limit_and_no_eviction(
    config: dict[str, Any], tmp_path: Path
) -> None:
    command = " ".join(config["services"]["redis"]["command"])
    assert "--requirepass change-me-redis" in command
    assert "--appendonly yes --appendfsync always" in command  # a crash loses no accepted job
    assert "--maxmemory 1gb" in command  # without a limit, noeviction never refuses anything
    assert "--maxmemory-policy noeviction" in command
    # The limit comes from .env, and has a default when .env does not set it.
    example = (ROOT / ".env.example").read_text()
    for value, expected in (("REDIS_MAXMEMORY=6gb\n", "--maxmemory 6gb"), ("", "--maxmemory 1gb")):
        env = tmp_path / f".env-{len(value)}"
        env.write_text("".join(line + "\n" for line in example.splitlines()
                               if not line.startswith("REDIS_MAXMEMORY=")) + value)  # fmt: skip
        assert expected in " ".join(compose_config(env)["services"]["redis"]["command"])


def test_redis_accepts_the_compose_command(config: dict[str, Any], tmp_path: Path) -> None:
    """The arguments as compose passes them (a limit Redis cannot parse would stop it at start)."""
    command = config["services"]["redis"]["command"]
    assert command[0] == "redis-server"
    port = free_port()
    server = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", *command[1:], "--port", str(port),
         "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    client = redis.Redis(port=port, password="change-me-redis", socket_timeout=5)

    def answers() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    try:
        wait_until(answers, timeout=30, what="redis-server", process=server)
        assert client.config_get("maxmemory") == {"maxmemory": str(1 << 30)}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert client.config_get("appendfsync") == {"appendfsync": "always"}
    finally:
        client.close()
        server.terminate()
        server.wait(30)


def test_worker_reserves_its_gpu_and_reaches_redis_and_minio(config: dict[str, Any]) -> None:
    worker = config["services"]["worker"]
    [device] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["device_ids"] == ["0"]
    env = worker["environment"]
    assert env["CELERY_BROKER_URL"] == "redis://:change-me-redis@redis:6379/0"
    assert env["S3_ENDPOINT_URL"] == "http://minio:9000" and env["TTS_ENGINE"] == "indextts2"
    assert env["S3_PUBLIC_ENDPOINT_URL"] == "http://localhost:9000"  # where MinIO's port is published
    assert "127.0.0.1:9000:9000" in str(config["services"]["minio"]["ports"])
    assert worker["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    second = config["services"]["worker-gpu1"]
    assert second["profiles"] == ["gpu1"]
    assert second["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["1"]
    # Inside a container the reserved GPU is device 0: a host index there would hide it from torch.
    for service in (worker, second):
        assert "CUDA_VISIBLE_DEVICES" not in service["environment"]
    assert second["environment"]["CELERY_BROKER_URL"] == env["CELERY_BROKER_URL"]


def test_presigned_urls_name_the_public_endpoint_and_download(
    s3_server: Any, base_env: dict[str, str]
) -> None:
    """As in compose, where the worker reaches MinIO as http://minio:9000 and clients as
    http://localhost:9000: here the worker uses 127.0.0.1 and the URL names localhost."""
    public = s3_server.url.replace("127.0.0.1", "localhost")
    storage = make_storage(Settings.from_env({**base_env, "S3_PUBLIC_ENDPOINT_URL": public}))
    storage.put(
        "public-endpoint.ogg",
        b"OggS public",
        content_type="audio/ogg",
        metadata={"job-id": "p"},
        replace=True,
    )
    url = storage.url("public-endpoint.ogg", expires_s=60)
    assert url.startswith(f"{public}/{BUCKET}/public-endpoint.ogg?") and "X-Amz-Signature=" in url
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == b"OggS public"
    unset = make_storage(Settings.from_env(base_env)).url("public-endpoint.ogg", expires_s=60)
    assert unset.startswith(f"{s3_server.url}/{BUCKET}/")  # S3_ENDPOINT_URL's host by default


def test_bucket_and_lifecycle_rule_are_created_at_start(config: dict[str, Any]) -> None:
    script = config["services"]["minio-init"]["entrypoint"][-1].replace("$$", "$")  # `config` keeps escapes
    assert 'mc mb --ignore-existing "local/$S3_BUCKET_NAME"' in script
    assert 'mc ilm rule add --expire-days "$CLEANUP_DAYS"' in script


def run_minio_init(config: dict[str, Any], tmp_path: Path, **env: str) -> tuple[int, list[str], Any]:
    """minio-init's script under sh, with a stand-in `mc` that records its calls (there is no MinIO
    here): the exit status, the mc calls, and the policy given to the workers' user."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    calls = tmp_path / "mc-calls"
    mc = bin_dir / "mc"
    keep_policy = f'[ "$1 $2 $3" != "admin policy create" ] || cp "$6" {tmp_path}/policy.json'
    mc.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n{keep_policy}\n')
    mc.chmod(0o755)
    service = config["services"]["minio-init"]
    script = service["entrypoint"][-1].replace("$$", "$")
    variables = {**{k: str(v) for k, v in service["environment"].items()}, **env}
    done = subprocess.run(
        ["sh", "-ec", script], env={**variables, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    made = calls.read_text().splitlines() if calls.exists() else []
    policy = (
        json.loads((tmp_path / "policy.json").read_text()) if (tmp_path / "policy.json").exists() else None
    )
    return done.returncode, made, policy


def test_minio_init_refuses_the_example_passwords(config: dict[str, Any], tmp_path: Path) -> None:
    status, calls, _ = run_minio_init(config, tmp_path)  # .env.example's values
    assert status != 0 and calls == []  # nothing is created, so nothing that depends on it starts


def test_workers_get_a_user_of_their_bucket_not_minios_root(config: dict[str, Any], tmp_path: Path) -> None:
    secrets = {"REDIS_PASSWORD": "r4nd0m-r", "MINIO_ROOT_PASSWORD": "r4nd0m-m",
               "S3_WORKER_SECRET_KEY": "r4nd0m-w", "FLOWER_BASIC_AUTH": "operator:r4nd0m-f"}  # fmt: skip
    status, calls, policy = run_minio_init(config, tmp_path, **secrets)
    assert status == 0, calls
    assert "admin user add local tts-worker r4nd0m-w" in calls
    assert "admin policy attach local tts-worker --user tts-worker" in calls
    [objects, bucket] = policy["Statement"]
    assert (objects["Action"], objects["Resource"]) == (
        ["s3:PutObject", "s3:GetObject"],
        ["arn:aws:s3:::tts/*"],
    )
    assert bucket["Resource"] == ["arn:aws:s3:::tts"] and "s3:DeleteObject" not in json.dumps(policy)
    worker = config["services"]["worker"]["environment"]
    assert worker["S3_ACCESS_KEY_ID"] == "tts-worker"  # the name presigned URLs carry
    assert (
        worker["S3_SECRET_ACCESS_KEY"]
        == config["services"]["minio-init"]["environment"]["S3_WORKER_SECRET_KEY"]
    )


def test_bootstrap_env_writes_random_passwords_that_everything_accepts(tmp_path: Path) -> None:
    for name in ("bootstrap", ".env.example"):
        shutil.copy(ROOT / name, tmp_path / name)
    done = subprocess.run(["./bootstrap", "env"], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    env_file = tmp_path / ".env"
    values = [
        line.partition("=")[2] for line in env_file.read_text().splitlines() if not line.startswith("#")
    ]
    assert env_file.stat().st_mode & 0o777 == 0o600 and not any("change-me" in value for value in values)
    names = [
        line.split("=")[0] for line in env_file.read_text().splitlines() if "=" in line and line[0] != "#"
    ]
    assert names == [line.split("=")[0] for line in (ROOT / ".env.example").read_text().splitlines()
                     if "=" in line and line[0] != "#"]  # fmt: skip
    config = compose_config(env_file)
    status, _, _ = run_minio_init(config, tmp_path)
    assert status == 0
    worker = {k: str(v) for k, v in config["services"]["worker"]["environment"].items()}
    Settings.from_env(worker)  # the settings check finds no example password
    first = env_file.read_text()
    again = subprocess.run(["./bootstrap", "env"], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert again.returncode == 1 and "--force" in again.stderr and env_file.read_text() == first
    subprocess.run(["./bootstrap", "env", "--force"], cwd=tmp_path, capture_output=True, check=True)
    assert env_file.read_text() != first


def test_secrets_stay_out_of_git_and_the_image() -> None:
    assert ".env" in (ROOT / ".gitignore").read_text().splitlines()
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ".env" in ignored and ".git" in ignored and ".venv" in ignored


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
    packages = re.search(r"include = \[([^\]]*)\]", (ROOT / "pyproject.toml").read_text())
    assert packages is not None
    for package in re.findall(r'"(\w+)\*"', packages.group(1)):  # every package the wheel holds
        assert f"COPY {package} {package}" in dockerfile and f" {package}/__init__.py" in dockerfile
    for source in sources:
        assert (ROOT / source).exists(), f"Dockerfile.gpu copies {source}, which is not in the repository"


@pytest.mark.parametrize(
    ("engine", "extra"), [("indextts2", "gpu"), ("indextts25", "gpu25"), ("piper", None)]
)
def test_the_engine_build_argument_picks_the_projects_extra(engine: str, extra: str | None) -> None:
    """`--build-arg ENGINE=...` runs the build stage's own `case` (read from Dockerfile.gpu) here."""
    [run] = [line for line in dockerfile_stage("build") if line.startswith('RUN case "$ENGINE"')]
    choose = run.removeprefix("RUN ").split(" && ")[0]
    done = subprocess.run(
        ["sh", "-c", f'{choose} && echo "$extra"'], env={"ENGINE": engine, "PATH": os.environ["PATH"]},
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if extra is None:
        assert done.returncode == 1 and "ENGINE=piper: indextts2 or indextts25" in done.stderr
        return
    assert done.returncode == 0 and done.stdout.strip() == extra
    assert f"\n{extra} = [" in (ROOT / "pyproject.toml").read_text()  # an extra of the project


def stage_env(stage: list[str]) -> dict[str, str]:
    """The variables a stage's own ENV instructions set (`ENV A=1 B=2` form)."""
    pairs = [shlex.split(line.split(None, 1)[1]) for line in stage if line.split(None, 1)[0] == "ENV"]
    return dict(pair.split("=", 1) for words in pairs for pair in words)


def test_the_runpod_image_logs_at_info_and_runs_as_root() -> None:
    """The runpod SDK's default DEBUG logs every output (presigned URLs, base64 audio); RunPod mounts
    /runpod-volume owned by root, and the stage writes its models, voices and outputs there."""
    runpod = dockerfile_stage("runpod")
    env = stage_env(runpod)
    assert env["RUNPOD_LOG_LEVEL"] == "INFO"
    assert all(env[name].startswith("/runpod-volume/") for name in
               ("CHECKPOINTS_DIR", "HF_HOME", "AUDIO_VOICES_DIR", "OUTPUT_AUDIO_DIR"))  # fmt: skip
    assert instruction(runpod, "USER") == "root"
    worker = dockerfile_stage("worker")  # the Celery worker stays the base stage's non-root user
    assert not [line for line in worker if line.startswith("USER")]
    assert instruction(dockerfile_stage("base"), "USER") == "tts"


# The Requires-Dist lines (extras left out) of the pinned wheels' METADATA that name a package pinned
# in docker/constraints-gpu.txt, copied by hand (no network here; see that file's header for how).
# Keyed by the pin they were read from, so that changing a pin fails the test until they are read
# again from the new version.
PINNED_REQUIREMENTS = {
    "indextts2-inference==2.1.1": [
        "accelerate>=1.0", "huggingface-hub>=0.20", "librosa>=0.10", "nemo-text-processing>=1.1",
        "omegaconf>=2.3", "safetensors>=0.4", "sentencepiece>=0.2", "torch>=2.0", "torchaudio>=2.0",
        "transformers>=5.0",
    ],
    "indextts25-inference==0.2.0": [
        "huggingface-hub>=0.30", "librosa>=0.10", "nemo-text-processing>=1.1", "numpy>=1.26",
        "omegaconf>=2.3", "safetensors>=0.4.3", "tiktoken>=0.7", "torch>=2.8", "transformers>=4.52",
        "fugashi>=1.2", "unidic-lite>=1.0", "wetextprocessing>=1.2",  # its ja and zh extras
    ],
    "nemo-text-processing==1.2.0": ["pynini==2.1.6.post1", "transformers"],
    "transformers==5.24.0": ["huggingface-hub<3.0,>=1.31.0", "numpy>=1.17", "safetensors>=0.8.0"],
    "accelerate==1.15.0": ["numpy>=1.17", "torch>=2.0.0", "huggingface_hub>=0.21.0", "safetensors>=0.4.3"],
    "torchaudio==2.9.1": ["torch==2.9.1"],
    "librosa==0.11.0": ["numpy>=1.22.3", "soundfile>=0.12.1"],
    "celery==5.7.0": ["kombu>=5.7.0", "redis<9.0.0,>=6.4.0"],  # the second from its `redis` extra
    "kombu==5.7.0": ["redis<9.0.0,>=6.4.0"],  # its `redis` extra
    "flower==2.2.0": ["celery>=5.0.5"],
}  # fmt: skip


def constraint_pins() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "docker" / "constraints-gpu.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, equals, version = line.strip().partition("==")
            assert equals and name and version, f"not a NAME==VERSION pin: {line!r}"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_the_gpu_pins_agree_with_what_the_pinned_packages_require() -> None:
    pins = constraint_pins()
    assert {"indextts2-inference", "nemo-text-processing", "pynini", "librosa"} <= set(pins)
    for pin, lines in PINNED_REQUIREMENTS.items():
        name, _, version = pin.partition("==")
        assert pins[canonicalize_name(name)] == Version(version), f"{pin}: read its requirements again"
        for line in lines:
            required = Requirement(line)
            pinned = pins[canonicalize_name(required.name)]
            assert required.specifier.contains(pinned, prereleases=True), (
                f"{pin} requires {line}, docker/constraints-gpu.txt pins {required.name}=={pinned}"
            )


def test_the_gpu_pins_agree_with_the_projects_own_requirements() -> None:
    pins = constraint_pins()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    lines = [
        *project["dependencies"],
        *(line for extra in ("worker", "gpu", "gpu25", "monitoring", "runpod") for line in extras[extra]),
    ]
    checked = 0
    for line in lines:
        required = Requirement(line)
        if canonicalize_name(required.name) in pins:
            pinned = pins[canonicalize_name(required.name)]
            assert required.specifier.contains(pinned), f"pyproject.toml wants {line}; pinned {pinned}"
            checked += 1
    assert checked >= 8


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
