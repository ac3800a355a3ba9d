"""What to do with a row once this run has tried to claim it: pure decisions over its claim and its
task's state, apart from the Redis calls that gather them (`producer.backfill.runner`)."""

from __future__ import annotations

import enum

from celery import states

from producer.backfill.guard import Claim
from producer.backfill.results import TaskState
from producer.backfill.rows import Row

__all__ = ["Action", "conflicts", "decide"]


class Action(enum.Enum):
    """What the runner does with a row."""

    RECORD = "record"  # its result is in: write it to the manifest
    TAKEOVER = "takeover"  # it failed and --retry-failed: publish a new attempt under a new task id
    PUBLISH = "publish"  # this run won its claim: publish it
    RESOLVE = "resolve"  # a dead run held it: publish it unless its message is queued or done
    FOLLOW = "follow"  # another live run holds it: await its result
    RECHECK = "recheck"  # its claim vanished between our SET NX and our read: look again soon
    RELEASE = "release"  # this run won a claim for a row in conflict: give the claim back


def conflicts(row: Row, claim: Claim, state: TaskState) -> bool:
    """Whether the row's claim or task state was made for another request (an empty digest is a
    claim made before digests: unknown, not a conflict)."""
    return bool(claim.digest and claim.digest != row.digest) or state.digest not in (None, row.digest)


def decide(
    *, won: bool, claim: Claim | None, state: TaskState, alive: set[str], retry_failed: bool
) -> Action:
    """What to do with a row (not in conflict), given its claim after this run tried to take it and
    its task's state."""
    if claim is None:
        return Action.RECHECK
    if state.outcome is not None:
        return Action.TAKEOVER if state.outcome.status == "failed" and retry_failed else Action.RECORD
    if won:
        return Action.PUBLISH
    if state.state == states.PENDING and claim.run not in alive:
        return Action.RESOLVE
    return Action.FOLLOW
