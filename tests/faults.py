"""Faults made the way they happen: a port that refuses connections, a process stopped and started again.

`RedisProcess` is a real `redis-server` that can be stopped (cleanly, or with SIGKILL) and started
again on the same port and data directory, with the persistence asked for.

`Gate` stands between a client and a real server on loopback. Open, it forwards bytes both ways;
closed, its port refuses new connections (nothing listens) and the connections it carried are cut,
as when a server's host drops off the network or the server restarts. Opened again it listens on the
same port, so clients reconnect to the same address.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from devtools.stack import free_port, wait_until

__all__ = ["Gate", "JobStream", "RedisProcess", "SentinelGroup"]


class RedisProcess:
    """`redis-server` on a loopback port of its own, stopped and started at will. `options` are
    redis-server's (persistence, a password); the data lives in `workdir` across restarts."""

    def __init__(
        self, workdir: Path, *options: str, port: int | None = None, config: Path | None = None
    ) -> None:
        self.workdir = workdir
        self.options = options
        self.config = config
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        binary = shutil.which("redis-server") or "redis-server"
        # A sentinel reads (and rewrites) a configuration file, and has no snapshots to turn off.
        head = [binary, str(self.config)] if self.config else [binary, "--save", ""]
        with open(self.workdir / f"redis-{self.port}.log", "ab") as log:
            self.process = subprocess.Popen(
                [*head, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
                 *self.options],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        wait_until(self._answers, timeout=20, what="redis-server", process=self.process)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """End the server with `sig` (SIGTERM: a clean shutdown; SIGKILL: a crash) and wait for it."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(30)
        self.process = None

    @contextlib.contextmanager
    def down_for(self, seconds: float, sig: signal.Signals = signal.SIGTERM) -> Iterator[None]:
        """Stopped for `seconds` from entering the block, then started again."""
        self.stop(sig)
        started = time.monotonic()
        try:
            yield
        finally:
            time.sleep(max(0.0, seconds - (time.monotonic() - started)))
            self.start()

    def _answers(self) -> bool:
        # Any reply means it serves: +PONG, or -NOAUTH where a password is set; -LOADING is not ready.
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))


class JobStream:
    """Jobs enqueued in a loop from a thread, as a busy application does, while a fault is made:
    `accepted` holds (time, task id) of every `delay` that returned, `refused` counts those that
    raised `QueueUnavailable`. Use as a context manager; leaving it stops the loop."""

    def __init__(self, tts: Any, *, every_s: float, **fields: Any) -> None:
        self.accepted: list[tuple[float, str]] = []
        self.refused = 0
        self._tts, self._every_s, self._fields = tts, every_s, {"text": "A short job.", **fields}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def ids(self) -> list[str]:
        return [job for _, job in self.accepted]

    def __enter__(self) -> JobStream:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        from tts_contract.errors import QueueUnavailable

        while not self._stop.is_set():
            try:
                self.accepted.append((time.monotonic(), self._tts.delay(**self._fields).id))
            except QueueUnavailable:
                self.refused += 1
            self._stop.wait(self._every_s)


class SentinelGroup:
    """A Redis primary, one replica and three sentinels on loopback, as a small Sentinel deployment:
    the sentinels promote the replica once the primary has not answered for a second."""

    MASTER = "mymaster"

    def __init__(self, workdir: Path) -> None:
        self.primary = RedisProcess(workdir)
        self.replica = RedisProcess(workdir, "--replicaof", "127.0.0.1", str(self.primary.port))
        self.sentinels = []
        for _ in range(3):
            port = free_port()
            config = workdir / f"sentinel-{port}.conf"
            config.write_text(
                f"sentinel monitor {self.MASTER} 127.0.0.1 {self.primary.port} 2\n"
                f"sentinel down-after-milliseconds {self.MASTER} 1000\n"
                f"sentinel failover-timeout {self.MASTER} 5000\n"
            )
            self.sentinels.append(RedisProcess(workdir, "--sentinel", port=port, config=config))

    def url(self, db: int) -> str:
        """The broker or result backend URL of database `db`, kombu's way."""
        return ";".join(f"sentinel://127.0.0.1:{s.port}/{db}" for s in self.sentinels)

    def primary_port(self) -> int:
        """The port of the primary the sentinels name now."""
        with socket.create_connection(("127.0.0.1", self.sentinels[0].port), timeout=2) as sock:
            sock.sendall(f"SENTINEL get-master-addr-by-name {self.MASTER}\r\n".encode())
            reply = sock.recv(256).decode()
        return int(reply.split("\r\n")[4])

    def stop(self) -> None:
        for server in (*self.sentinels, self.replica, self.primary):
            server.stop(signal.SIGKILL)


class Gate:
    """A TCP forwarder on 127.0.0.1 to `upstream` that can be closed and opened again."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._listener: socket.socket | None = None
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.port = 0
        self.open()

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def open(self) -> None:
        """Listen (again) on the gate's port and forward what arrives."""
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def close(self) -> None:
        """Refuse new connections and cut the open ones."""
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            connections, self._connections = self._connections, set()
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
            connection.close()

    @contextlib.contextmanager
    def closed_for(self, seconds: float) -> Iterator[None]:
        """Closed for `seconds` from entering the block, then open again (later if the block runs longer)."""
        self.close()
        started = time.monotonic()
        try:
            yield
        finally:
            time.sleep(max(0.0, seconds - (time.monotonic() - started)))
            self.open()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                if self._listener is not listener:  # closed meanwhile
                    client.close()
                    server.close()
                    return
                self._connections |= {client, server}
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()
        with self._lock:
            self._connections -= {source, sink}
