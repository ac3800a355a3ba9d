"""Measure what the faults of docs/reliability.md cost, with real processes on loopback.

1. node loss: two tone workers share one Redis; the one running a job is SIGKILLed with its pool (a
   lost host); the time until the other starts the job, over several runs, against RECOVERY_S.
2. Redis SIGKILL: a producer enqueues jobs in a loop while a worker completes them; Redis is
   SIGKILLed and started again from its AOF. Counts the jobs whose `tts.delay` returned but that
   never completed (lost), and those that completed twice, for each `appendfsync` policy.

Usage: python bench/bench_faults.py [--runs 5] [--recovery-s 60] [--skip-node-loss] [--skip-redis]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devtools.stack import S3Server, WorkerProcess, stack_env
from producer.app import TTSTask, create_app
from producer.config import ProducerConfig
from tests.faults import JobStream, RedisProcess

TEXT = "Every chunk of this job takes its time on the worker, as on a busy GPU. " * 3


def node_loss(workdir: Path, *, runs: int, recovery_s: int) -> list[float]:
    s3 = S3Server(workdir)
    s3.create_bucket("tts")
    times = []
    try:
        for run in range(runs):
            redis = RedisProcess(workdir)
            env = stack_env(
                redis_url=f"redis://127.0.0.1:{redis.port}", s3_url=s3.url, bucket="tts", engine="tone",
                TONE_RTF="1.0", RECOVERY_S=str(recovery_s),
            )  # fmt: skip
            workers = [WorkerProcess(env, log_path=workdir / f"w{run}-{i}.log", name=f"w{i}") for i in (0, 1)]
            app = create_app(ProducerConfig.from_env(env))
            try:
                result = TTSTask(app).delay(text=TEXT, max_chars_per_chunk=80)
                while not (runner := [w for w in workers if f"job {result.id} start" in w.log()]):
                    time.sleep(0.05)
                time.sleep(1)
                os.killpg(runner[0].process.pid, signal.SIGKILL)
                lost_at = time.monotonic()
                [other] = [w for w in workers if w is not runner[0]]
                while f"job {result.id} start" not in other.log():
                    time.sleep(0.05)
                times.append(time.monotonic() - lost_at)
                result.get(timeout=120)
                print(f"  run {run + 1}: delivered again after {times[-1]:.1f} s", flush=True)
            finally:
                app.close()
                for worker in workers:
                    worker.stop()
                redis.stop(signal.SIGKILL)
    finally:
        s3.stop()
    return times


def redis_crash(workdir: Path, fsync: str, *, seconds: float = 8.0) -> dict[str, int]:
    """Enqueue in a loop, SIGKILL Redis halfway, restart it from its AOF, let the worker drain."""
    s3 = S3Server(workdir)
    s3.create_bucket("tts")
    redis = RedisProcess(workdir / fsync, "--appendonly", "yes", "--appendfsync", fsync)
    env = stack_env(redis_url=f"redis://127.0.0.1:{redis.port}", s3_url=s3.url, bucket="tts", engine="tone")
    worker = WorkerProcess({**env, "RECOVERY_S": "12"}, log_path=workdir / f"crash-{fsync}.log")
    app = create_app(ProducerConfig.from_env({**env, "PRODUCER_CONNECT_TIMEOUT_S": "2"}))
    try:
        # About as fast as the worker completes them.
        with JobStream(TTSTask(app), every_s=0.02, output_format="wav") as jobs:
            time.sleep(seconds / 2)
            redis.stop(signal.SIGKILL)
            time.sleep(1)
            redis.start()
            time.sleep(seconds / 2)
        done = drained(worker, jobs.ids, quiet_s=25)  # > RECOVERY_S: a lapsed lease is swept meanwhile
        return {
            "accepted": len(jobs.ids),
            "refused": jobs.refused,
            "lost": sum(1 for n in done.values() if n == 0),
            "done twice": sum(1 for n in done.values() if n > 1),
        }
    finally:
        app.close()
        worker.stop()
        redis.stop(signal.SIGKILL)
        s3.stop()


def drained(worker: WorkerProcess, jobs: list[str], *, quiet_s: float) -> dict[str, int]:
    """How many times each job was done, once all are done or none finished for `quiet_s`."""
    last, quiet_since = -1, time.monotonic()
    while True:
        log = worker.log()
        done = {job: log.count(f"job {job} done") for job in jobs}
        finished = sum(1 for n in done.values() if n)
        if finished == len(jobs) or time.monotonic() - quiet_since > quiet_s:
            return done
        if finished != last:
            last, quiet_since = finished, time.monotonic()
        time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--recovery-s", type=int, default=60)
    parser.add_argument("--skip-node-loss", action="store_true")
    parser.add_argument("--skip-redis", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-faults-") as tmp:
        workdir = Path(tmp)
        if not args.skip_node_loss:
            print(f"node loss, RECOVERY_S={args.recovery_s}, {args.runs} runs:", flush=True)
            times = node_loss(workdir, runs=args.runs, recovery_s=args.recovery_s)
            print(
                f"  median {statistics.median(times):.1f} s, max {max(times):.1f} s "
                f"({max(times) / args.recovery_s:.0%} of RECOVERY_S)"
            )
        if not args.skip_redis:
            for fsync in ("everysec", "always"):
                (workdir / fsync).mkdir()
                print(f"Redis SIGKILL with appendfsync {fsync}: {redis_crash(workdir, fsync)}", flush=True)


if __name__ == "__main__":
    main()
