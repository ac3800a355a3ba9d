"""Every Redis key the project names, made here from one prefix each (as rq's `keys` module does),
and the names kombu's Redis transport gives the keys we read.

Ours:
- `tts:request-digest:<task id>` (result backend): the digest of the request a job ran, so that a
  backfill can tell whose request a stored result answers;
- `tts:process-endings:<task id>` (result backend): the worker processes a job has ended;
- `tts-backfill:<namespace>:row:<name>` and `tts-backfill:<namespace>:run:<run id>` (broker): a
  backfill's claim on each row, and the lease of each run.

kombu's (5.7; `tests/test_contract.py` pins them to the installed kombu): a queue's messages wait
in one list per priority step, `<queue>` for step 0 and `<queue>\\x06\\x16<step>` for the others;
delivered, unacknowledged messages sit in the hash `unacked`, with their delivery times in the
sorted set `unacked_index`.
"""

from __future__ import annotations

from kombu.transport.redis import PRIORITY_STEPS, Channel

__all__ = [
    "BACKFILL_PREFIX",
    "UNACKED",
    "UNACKED_INDEX",
    "backfill_row",
    "backfill_run",
    "priority_lists",
    "process_endings",
    "request_digest",
]

REQUEST_DIGEST_PREFIX = "tts:request-digest"
PROCESS_ENDINGS_PREFIX = "tts:process-endings"
BACKFILL_PREFIX = "tts-backfill"

UNACKED: str = Channel.unacked_key
UNACKED_INDEX: str = Channel.unacked_index_key


def request_digest(task_id: str) -> str:
    """Where the worker records the digest of the request it runs (in the result backend's Redis)."""
    return f"{REQUEST_DIGEST_PREFIX}:{task_id}"


def process_endings(task_id: str) -> str:
    """Where the worker counts the processes a job has ended (in the result backend's Redis)."""
    return f"{PROCESS_ENDINGS_PREFIX}:{task_id}"


def backfill_row(namespace: str, name: str) -> str:
    """A backfill's claim on the row `name` of `namespace` (in the broker's Redis)."""
    return f"{BACKFILL_PREFIX}:{namespace}:row:{name}"


def backfill_run(namespace: str, run_id: str) -> str:
    """The lease of one backfill run of `namespace` (in the broker's Redis)."""
    return f"{BACKFILL_PREFIX}:{namespace}:run:{run_id}"


def priority_lists(queue: str) -> list[str]:
    """The Redis lists that hold `queue`'s waiting messages, one per priority step, as kombu names them."""
    return [queue if step == 0 else f"{queue}{Channel.sep}{step}" for step in PRIORITY_STEPS]
