"""Benchmark `tts-backfill`: its enqueue rate against a plain `apply_async` loop, and its peak memory.

1. Enqueue rate, in this process, against a redis-server of its own (no worker needed): the
   backfill's own path for fresh rows (validate, claim in Redis, check for results, publish with
   kombu's `Producer.batch()`, mark sent; `Backfill._settle`, the code a run executes) against
   `tts.apply_async(kwargs=..., task_id=..., queue=..., priority=...)` in a loop over the same rows.
   Runs alternate, medians are reported (target: ratio >= 3).
2. Peak memory: the real command (`python -m producer.backfill`) on a generated file of `--rows`
   rows (100,000 by default), once with `--dry-run` and once to completion against Redis, with a
   stand-in worker thread that takes each message and stores a result, as fast as Redis allows.
   Peak RSS is the child's own (wait4). Target: under 200 MB.

Usage: python bench/bench_backfill.py [--rows 100000] [--enqueue-rows 5000] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # devtools: not installed

from devtools.stack import RedisServer
from producer.app import TTSTask, create_app
from producer.backfill.broker import Publisher
from producer.backfill.guard import Guard
from producer.backfill.manifest import ManifestWriter
from producer.backfill.progress import Progress, Tally
from producer.backfill.results import ResultReader
from producer.backfill.rows import Row
from producer.backfill.runner import Backfill, Options
from producer.config import ProducerConfig
from tts_contract.names import BACKFILL_QUEUE
from tts_contract.schema import parse_request

PRIORITY = 9
BATCH = 500


def texts(count: int) -> list[dict[str, object]]:
    return [
        {"text": f"Row number {i} of the benchmark, a sentence of ordinary length."} for i in range(count)
    ]


def plain_loop(tts: TTSTask, rows: list[dict[str, object]], tag: str) -> None:
    for i, fields in enumerate(rows):
        # A task id that names the audio (no session_id) must be a plain name: no colons.
        tts.apply_async(kwargs=fields, task_id=f"plain-{tag}-{i}", queue=BACKFILL_QUEUE, priority=PRIORITY)


def backfill_path(backfill: Backfill, rows: list[dict[str, object]], tag: str) -> None:
    for start in range(0, len(rows), BATCH):
        chunk = [
            Row(line=start + i, row_id=f"{tag}-{start + i}", name=f"{tag}-{start + i}",
                message={**parse_request(fields).to_message(), "session_id": f"bench.{tag}-{start + i}"})
            for i, fields in enumerate(rows[start : start + BATCH])
        ]  # fmt: skip
        backfill._settle(chunk, retry_failed=False)
    backfill.tracked.clear()  # nothing will finish here: forget them, as the run is not waiting


def bench_enqueue(url: str, workdir: Path, count: int, runs: int) -> None:
    config = ProducerConfig(broker_url=f"{url}/0", result_backend=f"{url}/1")
    app = create_app(config, name="bench")
    client = redis.Redis.from_url(config.broker_url)
    options = Options(namespace="bench", queue=BACKFILL_QUEUE, priority=PRIORITY, max_in_flight=10**9)
    manifest = ManifestWriter(workdir / "bench.manifest.jsonl")
    tally = Tally()
    backfill = Backfill(
        options, guard=Guard(client, namespace="bench", run_id="bench", lease_s=60),
        publisher=Publisher(app, queue=BACKFILL_QUEUE, priority=PRIORITY), results=ResultReader(app),
        broker=client, manifest=manifest, tally=tally, progress=Progress(tally, stream=sys.stderr, tty=False),
        stop=threading.Event(),
    )  # fmt: skip
    backfill.guard.start()  # publishing needs a held lease
    rows, tts = texts(count), TTSTask(app)

    def timed(run: Callable[[str], None]) -> float:
        tag = uuid.uuid4().hex[:8]
        started = time.perf_counter()
        run(tag)
        elapsed = time.perf_counter() - started
        client.flushdb()  # keep the queue from growing across runs
        backfill.guard.start()  # the lease went with it
        return elapsed

    (
        timed(lambda tag: plain_loop(tts, rows[:200], tag)),
        timed(lambda tag: backfill_path(backfill, rows[:200], tag)),
    )
    plain, batched = [], []
    for _ in range(runs):
        plain.append(timed(lambda tag: plain_loop(tts, rows, tag)))
        batched.append(timed(lambda tag: backfill_path(backfill, rows, tag)))
    manifest.close()
    app.close()
    p, b = count / statistics.median(plain), count / statistics.median(batched)
    print(f"enqueue rate, {count} rows, {runs} alternating runs each (medians):")
    print(f"  plain tts.apply_async loop            {p:8.0f} jobs/s")
    print(f"  backfill (claim + batched publish)    {b:8.0f} jobs/s")
    print(f"  ratio                                 {b / p:8.2f}   (target >= 3)")


def write_input(path: Path, count: int) -> None:
    with path.open("w") as out:
        for i, fields in enumerate(texts(count)):
            out.write(json.dumps({"id": f"row-{i}", **fields}) + "\n")


def stand_in_worker(url: str, stop: threading.Event) -> None:
    """Takes messages off the backfill queue and stores a completed result for each, in bulk."""
    broker, results = redis.Redis.from_url(f"{url}/0"), redis.Redis.from_url(f"{url}/1")
    key = f"{BACKFILL_QUEUE}\x06\x16{PRIORITY}"
    while not stop.is_set():
        raw = broker.rpop(key, 500)
        if not isinstance(raw, list) or not raw:
            time.sleep(0.01)
            continue
        pipe = results.pipeline(transaction=False)
        for message in raw:
            task_id = json.loads(message)["headers"]["id"]
            result = {
                "status": "completed",
                "url": "http://x/",
                "s3_key": f"{task_id}.ogg",
                "metadata": {"duration": 1.0},
            }
            pipe.set(
                f"celery-task-meta-{task_id}",
                json.dumps({"status": "SUCCESS", "result": result, "task_id": task_id}),
            )
        pipe.execute()


def run_cli(args: list[str], env: dict[str, str]) -> tuple[int, float, float]:
    """(exit status, seconds, peak RSS in MB) of one run of the command."""
    started = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-m", "producer.backfill", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    return child.returncode, time.perf_counter() - started, usage.ru_maxrss / 1024


def bench_memory(url: str, workdir: Path, count: int) -> None:
    rows, manifest = workdir / "big.jsonl", workdir / "big.manifest.jsonl"
    write_input(rows, count)
    env = {**os.environ, "CELERY_BROKER_URL": f"{url}/0", "CELERY_RESULT_BACKEND": f"{url}/1"}
    redis.Redis.from_url(f"{url}/0").flushall()
    status, seconds, peak = run_cli([str(rows), "--manifest", str(manifest), "--dry-run"], env)
    print(f"\ntts-backfill on {count} rows ({rows.stat().st_size / 1e6:.1f} MB of JSONL):")
    print(
        f"  --dry-run (validate, read manifest)   {seconds:6.1f} s   peak RSS {peak:6.1f} MB   exit {status}"
    )
    stop = threading.Event()
    worker = threading.Thread(target=stand_in_worker, args=(url, stop), daemon=True)
    worker.start()
    status, seconds, peak = run_cli([str(rows), "--manifest", str(manifest)], env)
    stop.set()
    worker.join()
    lines = sum(1 for _ in manifest.open())
    print(
        f"  full run, stand-in worker             {seconds:6.1f} s   peak RSS {peak:6.1f} MB   exit {status}"
    )
    print(f"  manifest lines {lines}; {count / seconds:.0f} rows/s end to end   (target: peak < 200 MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="rows in the file of the memory benchmark")
    parser.add_argument("--enqueue-rows", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores\n")
    with tempfile.TemporaryDirectory(prefix="bench-backfill-") as tmp:
        server = RedisServer(Path(tmp))
        try:
            bench_enqueue(server.url, Path(tmp), args.enqueue_rows, args.runs)
            bench_memory(server.url, Path(tmp), args.rows)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
