"""`tts_contract`: what producer and worker share. The names kombu gives its Redis keys are pinned
here to the installed kombu, so that an upgrade that renames them fails this test rather than the
queue-depth metrics, the job leases and tts-backfill's search for queued messages."""

from __future__ import annotations

import json
import uuid

import kombu
import pytest
import redis

from devtools.stack import RedisServer
from producer.app import create_app
from producer.config import ProducerConfig
from tts_contract import errors, keys


def test_kombus_key_names_are_the_ones_the_contract_names() -> None:
    assert kombu.__version__.startswith("5.")
    assert keys.priority_lists("q") == ["q", "q\x06\x163", "q\x06\x166", "q\x06\x169"]
    assert (keys.UNACKED, keys.UNACKED_INDEX) == ("unacked", "unacked_index")


def test_our_key_names() -> None:
    assert keys.request_digest("job-1") == "tts:request-digest:job-1"
    assert keys.process_endings("job-1") == "tts:process-endings:job-1"
    assert keys.backfill_row("book", "ch-1") == "tts-backfill:book:row:ch-1"
    assert keys.backfill_run("book", "r1") == "tts-backfill:book:run:r1"


@pytest.mark.parametrize("module", ["producer.errors", "tts_contract.errors"])
def test_a_failure_stored_under_either_errors_module_is_raised_as_ours(
    redis_server: RedisServer, fresh_db: int, module: str
) -> None:
    """Results stored before the errors moved name `producer.errors`; those after, `tts_contract.errors`."""
    env = {"CELERY_BROKER_URL": f"{redis_server.url}/{fresh_db}",
           "CELERY_RESULT_BACKEND": f"{redis_server.url}/{fresh_db + 1}"}  # fmt: skip
    app = create_app(ProducerConfig.from_env(env), name="contract-test")
    task_id = str(uuid.uuid4())
    stored = {"status": "FAILURE", "task_id": task_id, "traceback": None, "children": [], "date_done": None,
              "result": {"exc_type": "SessionTaken", "exc_module": module,
                         "exc_message": ["session_id: taken"]}}  # fmt: skip
    backend = redis.Redis.from_url(env["CELERY_RESULT_BACKEND"])
    backend.set(f"celery-task-meta-{task_id}", json.dumps(stored))
    try:
        with pytest.raises(errors.SessionTaken, match="session_id: taken"):
            app.AsyncResult(task_id).get(timeout=5)
    finally:
        backend.close()
        app.close()
