"""`pip install indextts-queue` with no extra is the producer alone: an app that only enqueues gets
Celery, kombu, redis-py and pydantic, and can send a job."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from devtools.stack import RedisServer

ROOT = Path(__file__).resolve().parent.parent
WORKER_STACK = {"numpy", "boto3", "botocore", "soundfile", "torch", "huggingface-hub", "tenacity", "tqdm",
                "moto", "flower", "prometheus-client", "runpod", "piper-tts"}  # fmt: skip

ENQUEUE = """
import json, sys
from producer import tts
sent = tts.delay(text="Hello from a producer-only install.")
print(json.dumps({"id": sent.id, "modules": sorted(m for m in sys.modules if "." not in m)}))
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_producer_only_install_enqueues(tmp_path: Path, redis_server: RedisServer, fresh_db: int) -> None:
    source = tmp_path / "source"  # a copy, so that pip's build leaves nothing in the repository
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "producer", "tts_contract", "tts_worker"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, source / name)  # type: ignore[operator]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    installed = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(source)],
        capture_output=True, text=True, timeout=500, check=False,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr[-3000:]
    listed = subprocess.run([python, "-m", "pip", "list", "--format=json"], capture_output=True, text=True)
    packages = {entry["name"].lower().replace("_", "-") for entry in json.loads(listed.stdout)}
    assert {"celery", "kombu", "redis", "pydantic", "indextts-queue"} <= packages
    assert packages & WORKER_STACK == set()

    env = {
        "CELERY_BROKER_URL": f"{redis_server.url}/{fresh_db}",
        "CELERY_RESULT_BACKEND": f"{redis_server.url}/{fresh_db + 1}",
        "PATH": "/usr/bin:/bin",
    }
    done = subprocess.run(
        [python, "-c", ENQUEUE],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    sent = json.loads(done.stdout.strip().splitlines()[-1])
    assert not {"numpy", "boto3", "soundfile", "torch", "tts_worker"} & set(sent["modules"])
    broker = redis.Redis.from_url(env["CELERY_BROKER_URL"])
    [message] = [json.loads(raw) for raw in broker.lrange("tts", 0, -1)]
    assert message["headers"]["id"] == sent["id"] and message["headers"]["task"] == "tts.synthesize"
    broker.close()

    worker = subprocess.run(
        [python, "-m", "celery", "-A", "tts_worker", "worker"], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert worker.returncode != 0
    assert "tts_worker needs the worker extra (missing boto3, numpy, soundfile, tenacity)" in worker.stderr
