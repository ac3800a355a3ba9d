# ruff: noqa: E402  (the Hugging Face variables below are set before the imports that read them)
"""Real parts for the suite: one redis-server and one S3-compatible server (moto, over HTTP) per
session, real `celery -A tts_worker worker` processes, and real ffmpeg.

Each worker gets its own pair of Redis databases, so that a job sent for one worker is never taken
by another; Redis is cleaned before each test (everything but kombu's queue bindings, which the
running workers need).
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The suite never reaches the Hugging Face hub and never touches the developer's own cache; set before
# anything imports huggingface_hub, which reads both once. Worker processes inherit them.
OPERATOR_ENV = dict(os.environ)
"""The environment the suite was started with (the gpu test reads the operator's model settings)."""
HF_HOME = Path(tempfile.mkdtemp(prefix="tts-tests-hf-"))
os.environ["HF_HOME"] = str(HF_HOME)
os.environ["HF_HUB_OFFLINE"] = "1"
atexit.register(shutil.rmtree, HF_HOME, ignore_errors=True)

import boto3
import pytest
import redis

from devtools.stack import (
    LOCAL_S3_KEYS,
    RedisServer,
    S3Server,
    WorkerProcess,
    settings_variables,
    stack_env,
)
from producer.app import TTSTask, create_app
from producer.config import ProducerConfig
from tts_worker.settings import Settings

BUCKET = "tts-test"
databases = itertools.count(2, 2)
"""Broker databases (each with the next for results) for workers and producers of their own; 0 and 1
belong to the default producer."""


FAKE_INDEXTTS = Path(__file__).parent / "fake_indextts"
"""The stand-in `indextts` package (see its module's docstring for what it copies and its cues)."""


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Import `indextts` from the stand-in for this test only (the real one, if imported, is put
    aside and back)."""

    def take_indextts() -> dict[str, Any]:
        names = [m for m in sys.modules if m == "indextts" or m.startswith("indextts.")]
        return {name: sys.modules.pop(name) for name in names}

    real = take_indextts()
    monkeypatch.syspath_prepend(str(FAKE_INDEXTTS))
    yield
    take_indextts()
    sys.modules.update(real)


@pytest.fixture(scope="session")
def stack_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="session")
def redis_server(stack_dir: Path) -> Iterator[RedisServer]:
    server = RedisServer(stack_dir)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server(stack_dir: Path) -> Iterator[S3Server]:
    server = S3Server(stack_dir)
    server.create_bucket(BUCKET)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def voices_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A voices directory with one short reference voice, `alice.wav`."""
    import numpy as np
    import soundfile

    directory = tmp_path_factory.mktemp("voices")
    t = np.arange(22050) / 22050
    soundfile.write(directory / "alice.wav", 0.3 * np.sin(2 * np.pi * 220 * t), 22050, subtype="PCM_16")
    return directory


@pytest.fixture(scope="session")
def base_env(redis_server: RedisServer, s3_server: S3Server, voices_dir: Path) -> dict[str, str]:
    """The environment of a tone worker on Redis databases 0/1 (the producer's defaults here)."""
    return stack_env(
        redis_url=redis_server.url, s3_url=s3_server.url, bucket=BUCKET, engine="tone",
        AUDIO_VOICES_DIR=str(voices_dir),
    )  # fmt: skip


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the developer's own settings (broker, bucket, output directory, limits, ...)."""
    for name in settings_variables() & set(os.environ):
        monkeypatch.delenv(name)


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client of database 0, with the databases cleaned of everything but queue bindings."""
    client = redis.Redis.from_url(f"{redis_server.url}/0")
    for db in range(64):
        scoped = redis.Redis.from_url(f"{redis_server.url}/{db}")
        stale = [k for k in scoped.scan_iter() if not k.startswith(b"_kombu.binding.")]
        if stale:
            scoped.delete(*stale)
        scoped.close()
    yield client
    client.close()


class WorkerHandle:
    """A running worker and a producer-side `tts` that reaches only it."""

    def __init__(self, process: WorkerProcess, env: dict[str, str]) -> None:
        self.process = process
        self.env = env
        self.settings = Settings.from_env(env)
        self.app = create_app(ProducerConfig.from_env(env), name=f"producer-for-{process.name}")
        self.tts = TTSTask(self.app)

    def pool_pids(self) -> list[int]:
        stats = self.app.control.inspect(destination=[self.process.name], timeout=5).stats() or {}
        return list(stats[self.process.name]["pool"]["processes"])


@pytest.fixture
def fresh_db() -> int:
    """A broker database (and the next one, for results) that no worker uses yet."""
    return next(databases)


@pytest.fixture(scope="session")
def start_worker(
    base_env: dict[str, str], redis_server: RedisServer, stack_dir: Path
) -> Iterator[Callable[..., WorkerHandle]]:
    """Start `celery -A tts_worker worker` with extra environment, on databases of its own."""
    handles: list[WorkerHandle] = []

    def start(*, db: int | None = None, **extra: str) -> WorkerHandle:
        """`db` (and db + 1) are the worker's broker and result databases; fresh ones by default."""
        db = next(databases) if db is None else db
        name = f"w{db}"
        env = {
            **base_env,
            "CELERY_BROKER_URL": f"{redis_server.url}/{db}",
            "CELERY_RESULT_BACKEND": f"{redis_server.url}/{db + 1}",
            **extra,
        }
        handle = WorkerHandle(WorkerProcess(env, log_path=stack_dir / f"{name}.log", name=name), env)
        handles.append(handle)
        return handle

    yield start
    for handle in handles:
        handle.process.stop()
        handle.app.close()


@pytest.fixture(scope="session")
def tone_worker(start_worker: Callable[..., WorkerHandle]) -> WorkerHandle:
    return start_worker()


@pytest.fixture(scope="session")
def slow_worker(start_worker: Callable[..., WorkerHandle]) -> WorkerHandle:
    """A tone worker that takes half a second per second of audio, like a busy GPU."""
    return start_worker(TONE_RTF="0.5")


@pytest.fixture(scope="session")
def piper_worker(start_worker: Callable[..., WorkerHandle]) -> WorkerHandle:
    """The CPU worker, on the databases the default `producer.tts` uses here."""
    return start_worker(db=0, TTS_ENGINE="piper")


@pytest.fixture(scope="session")
def flaky_s3_worker(start_worker: Callable[..., WorkerHandle], dropping_proxy: str) -> WorkerHandle:
    """A tone worker whose every upload is cut off: tried again in place for 1 s, then the job is
    retried twice, 1 s apart."""
    return start_worker(
        S3_ENDPOINT_URL=dropping_proxy, STORAGE_RETRY_S="1", TASK_MAX_RETRIES="2", RETRY_BACKOFF_S="1"
    )


@pytest.fixture(scope="session")
def s3(s3_server: S3Server) -> Any:
    """A plain boto3 client of the test server, to look at what the worker stored."""
    return boto3.client(
        "s3", endpoint_url=s3_server.url, region_name="us-east-1",
        aws_access_key_id=LOCAL_S3_KEYS["S3_ACCESS_KEY_ID"],
        aws_secret_access_key=LOCAL_S3_KEYS["S3_SECRET_ACCESS_KEY"],
    )  # fmt: skip


@pytest.fixture
def job_id() -> str:
    return f"test-{uuid.uuid4()}"


@pytest.fixture
def default_producer(base_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> TTSTask:
    """`producer.tts` itself, configured from the environment as an app would, on databases 0/1."""
    import producer

    for name in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"):
        monkeypatch.setenv(name, base_env[name])
    # The app reads the environment once, on first use; every test sets the same values.
    assert producer.app.conf.broker_url == base_env["CELERY_BROKER_URL"]
    return producer.tts


class _DropUploads(socketserver.ThreadingTCPServer):
    """A TCP proxy to the S3 server that forwards everything but cuts every PUT halfway through."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        super().__init__(("127.0.0.1", 0), _DropUploadsHandler)


class _DropUploadsHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server: _DropUploads = self.server  # type: ignore[assignment]
        first = self.request.recv(65536)
        if first.startswith(b"PUT "):
            self.request.close()  # mid-upload: the body never arrives
            return
        with socket.create_connection(server.upstream) as upstream:
            upstream.sendall(first)
            upstream.shutdown(socket.SHUT_WR)
            while data := upstream.recv(65536):
                self.request.sendall(data)


@pytest.fixture(scope="session")
def dropping_proxy(base_env: dict[str, str]) -> Iterator[str]:
    host, port = base_env["S3_ENDPOINT_URL"].removeprefix("http://").split(":")
    proxy = _DropUploads((host, int(port)))
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{proxy.server_address[1]}"
    proxy.shutdown()
    proxy.server_close()


@dataclass(frozen=True)
class ModelFiles:
    """An IndexTTS engine's files with tiny random weights, where `./bootstrap models` put them."""

    checkpoints: Path
    hub_cache: Path


@pytest.fixture(scope="session")
def tiny_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A stand-in hub serving the IndexTTS2 and IndexTTS-2.5 repositories with tiny random weights
    (`tests/tiny_indextts2.py`, `tests/tiny_indextts25.py`), made by the real libraries."""
    from tests import tiny_indextts2, tiny_indextts25
    from tests.fake_hub import FakeHub, FakeRepo

    root = tmp_path_factory.mktemp("tiny-models")
    built = tiny_indextts2.build(root)
    built[tiny_indextts25.CHECKPOINTS_REPO] = tiny_indextts25.build(root / tiny_indextts25.CHECKPOINTS_REPO)
    repos = [
        FakeRepo(repo_id, {p.relative_to(folder).as_posix(): p.read_bytes()
                           for p in sorted(folder.rglob("*")) if p.is_file()})
        for repo_id, folder in built.items()
    ]  # fmt: skip
    shutil.rmtree(root)
    with FakeHub(repos) as hub:
        yield hub


def fetched(hub: Any, engine: str, checkpoints: Path) -> ModelFiles:
    """`TTS_ENGINE=engine ./bootstrap models` from `hub` into `checkpoints` and the suite's cache."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    done = subprocess.run(
        [sys.executable, "-m", "tts_worker.models", "fetch"],
        env={**env, "HF_ENDPOINT": hub.url, "CHECKPOINTS_DIR": str(checkpoints), "TTS_ENGINE": engine,
             "HF_HUB_DISABLE_PROGRESS_BARS": "1"},
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return ModelFiles(checkpoints=checkpoints, hub_cache=HF_HOME / "hub")


@pytest.fixture(scope="session")
def indextts2_files(tiny_hub: Any, tmp_path_factory: pytest.TempPathFactory) -> ModelFiles:
    """IndexTTS2's files, fetched: every test that loads the library from them also shows that the
    manifest fetches what the library loads."""
    return fetched(tiny_hub, "indextts2", tmp_path_factory.mktemp("indextts2") / "checkpoints")


@pytest.fixture(scope="session")
def indextts25_files(tiny_hub: Any, tmp_path_factory: pytest.TempPathFactory) -> ModelFiles:
    """IndexTTS-2.5's files, fetched (its helper models are IndexTTS2's: one cache holds both)."""
    return fetched(tiny_hub, "indextts25", tmp_path_factory.mktemp("indextts25") / "checkpoints")
