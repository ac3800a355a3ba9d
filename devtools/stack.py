"""A whole local stack on loopback: Redis, an S3-compatible server (moto) and worker processes.

Used by `./bootstrap demo` and by the test suite, so that both run the real parts: `redis-server`
from the system, moto's S3 server over HTTP, and `celery -A tts_worker worker` processes.
Everything binds to 127.0.0.1 on a free port and is stopped by whoever started it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

__all__ = ["RedisServer", "S3Server", "WorkerProcess", "free_port", "local_stack"]

LOCAL_S3_KEYS = {"S3_ACCESS_KEY_ID": "local-key", "S3_SECRET_ACCESS_KEY": "local-secret"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    ready: Callable[[], bool], *, timeout: float, what: str, process: subprocess.Popen[bytes]
) -> None:
    """Poll `ready` until it is true; fail early, with the log, if `process` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode} before it was ready")
        try:
            if ready():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{what} was not ready after {timeout:.0f} s")


class _Process:
    """A child process with its output in a log file, stopped with SIGTERM then SIGKILL."""

    def __init__(self, command: list[str], *, log_path: Path, env: Mapping[str, str] | None = None) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, env=dict(env) if env else None,
            start_new_session=True,
        )  # fmt: skip

    def log(self) -> str:
        """Everything the process has printed so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 15) -> None:
        """Ask it to stop (SIGTERM), then kill its whole process group if it lingers."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()


class RedisServer(_Process):
    """`redis-server` on a free loopback port, without persistence."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found: install it (apt-get install redis-server)")
        self.port = free_port()
        super().__init__(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--databases", "64", "--dir", str(workdir)],
            log_path=workdir / "redis.log",
        )  # fmt: skip
        wait_until(self._pong, timeout=10, what="redis-server", process=self.process)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def _pong(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")


class S3Server(_Process):
    """moto's S3-compatible server over HTTP on a free loopback port."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        super().__init__(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            log_path=workdir / "s3.log",
        )
        wait_until(self._answers, timeout=30, what="moto S3 server", process=self.process)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def create_bucket(self, name: str) -> None:
        """Create `name` (through the HTTP API, as any client would)."""
        import boto3

        boto3.client(
            "s3", endpoint_url=self.url, region_name="us-east-1",
            aws_access_key_id=LOCAL_S3_KEYS["S3_ACCESS_KEY_ID"],
            aws_secret_access_key=LOCAL_S3_KEYS["S3_SECRET_ACCESS_KEY"],
        ).create_bucket(Bucket=name)  # fmt: skip

    def _answers(self) -> bool:
        with urllib.request.urlopen(self.url, timeout=1) as response:
            return bool(response.status == 200)


class WorkerProcess(_Process):
    """`celery -A tts_worker worker` exactly as an operator starts it, plus a node name and log level."""

    def __init__(
        self, env: Mapping[str, str], *, log_path: Path, name: str = "worker", ready_timeout: float = 120
    ):
        self.name = f"{name}@{socket.gethostname()}"
        command = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tts_worker",
            "worker",
            "-n",
            self.name,
            "--loglevel",
            "INFO",
        ]
        super().__init__(command, log_path=log_path, env=env)
        wait_until(
            lambda: "ready." in self.log(),
            timeout=ready_timeout,
            what=f"worker {self.name}",
            process=self.process,
        )


def settings_variables() -> frozenset[str]:
    """Every environment variable the worker's settings read (found by reading an empty environment
    that notes what is asked of it, so that the list cannot drift from `Settings`)."""
    from tts_worker.settings import Settings

    asked: set[str] = set()

    class Noting(dict[str, str]):
        def get(self, key: str, default: Any = None) -> Any:
            asked.add(key)
            return default

    Settings.from_env(Noting())
    return frozenset(asked)


def stack_env(*, redis_url: str, s3_url: str, bucket: str, engine: str, **extra: str) -> dict[str, str]:
    """The environment a worker (and the producer) needs to use the local stack: this process's
    environment without any of the worker's own settings (a developer's `OUTPUT_STORAGE=local` or
    bucket must not leak into the stack), then the stack's."""
    ours = settings_variables()
    return {
        **{name: value for name, value in os.environ.items() if name not in ours},
        "CELERY_BROKER_URL": f"{redis_url}/0",
        "CELERY_RESULT_BACKEND": f"{redis_url}/1",
        "S3_ENDPOINT_URL": s3_url,
        "S3_BUCKET_NAME": bucket,
        "S3_REGION": "us-east-1",
        "TTS_ENGINE": engine,
        **LOCAL_S3_KEYS,
        **extra,
    }


@contextmanager
def local_stack(
    *, engine: str = "piper", workdir: Path | None = None, **extra: str
) -> Iterator[dict[str, str]]:
    """Start Redis, S3 (with a bucket) and one worker; yield the environment that reaches them."""
    with ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tts-stack-")))
        redis = RedisServer(workdir)
        stack.callback(redis.stop)
        s3 = S3Server(workdir)
        stack.callback(s3.stop)
        s3.create_bucket("tts")
        env = stack_env(redis_url=redis.url, s3_url=s3.url, bucket="tts", engine=engine, **extra)
        worker = WorkerProcess(env, log_path=workdir / "worker.log")
        stack.callback(worker.stop)
        yield env
