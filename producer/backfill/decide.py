"""What to do with a row once this run has tried to claim it: pure decisions over its claim and its
task's state, apart from the Redis calls that gather them (`producer.backfill.runner`)."""

from __future__ import annotations

from celery import states

from producer.backfill.guard import Claim
from producer.backfill.results import TaskState
from producer.backfill.rows import Row

__all__ = ["conflicts", "decide"]


def conflicts(row: Row, claim: Claim, state: TaskState) -> bool:
    """Whether the row's claim or task state was made for another request (an empty digest is a
    claim made before digests: unknown, not a conflict)."""
    return bool(claim.digest and claim.digest != row.digest) or state.digest not in (None, row.digest)


def decide(*, won: bool, claim: Claim | None, state: TaskState, alive: set[str], retry_failed: bool) -> str:
    """What to do with a row, given its claim after this run tried to take it and its task's state.

    `record`, `takeover` (publish a new attempt), `publish`, `resolve`, `follow` or `recheck`."""
    if claim is None:
        return "recheck"  # the claim vanished between our SET NX and our read: look again soon
    if state.outcome is not None:
        return "takeover" if state.outcome.status == "failed" and retry_failed else "record"
    if won:
        return "publish"
    if state.state == states.PENDING and claim.run not in alive:
        return "resolve"
    return "follow"
