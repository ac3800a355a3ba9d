"""The loop of a backfill run: claim rows, publish them in batches, follow results, record outcomes.

At most `max_in_flight` rows are tracked at once (published and not yet finished, or followed while
another run's message for them is processed), so memory and the broker's backlog stay bounded
however long INPUT is. Each row is settled by `decide`: record it (its result exists), publish it
(this run won the claim), follow it (another live run has it), take it over (`--retry-failed`), or
resolve it (held by a run that died, maybe before publishing, or its message lost since: search
the broker first). A message this run sent that vanishes from the broker before any worker starts
it (a purged queue, a Redis that lost its data) is sent again, so that no run waits forever.

A row whose claim or existing result carries another request digest than the row's own is a
conflict: its task id (and object) belong to another request, so it is reported, neither published
nor recorded as done. A run whose lease lapsed (it was paused) publishes nothing more under it: it
goes on under a new lease and settles what it held again, as any run settles a dead run's rows.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import redis
from celery import states

from producer.backfill import naming
from producer.backfill.broker import Publisher, find_queued
from producer.backfill.decide import Action, conflicts, decide
from producer.backfill.guard import Claim, Guard
from producer.backfill.manifest import ManifestWriter, record
from producer.backfill.progress import Progress, Tally
from producer.backfill.results import ResultReader, TaskState
from producer.backfill.rows import Row

__all__ = ["Backfill", "Options"]

log = logging.getLogger(__name__)

IDLE_S = 0.2
_POLL_WINDOW = 256


@dataclass(frozen=True)
class Options:
    """How a run sends: where, how much at once, and whether failed rows are sent again."""

    namespace: str
    queue: str
    priority: int
    max_in_flight: int = 1000
    batch_size: int = 500
    retry_failed: bool = False
    lease_s: float = 30.0


@dataclass
class _Tracked:
    row: Row
    task_id: str
    mine: bool
    checked_at: float
    """When it was published (mine) or last settled (followed)."""
    missing: bool = False
    """Mine, never started, and its message was in neither the queue nor a worker's hands at the
    last lost-message check: sent again if the next check finds the same."""


class Backfill:
    """One run over the rows of INPUT that the manifest does not already account for."""

    def __init__(
        self, options: Options, *, guard: Guard, publisher: Publisher, results: ResultReader,
        broker: redis.Redis, manifest: ManifestWriter, tally: Tally, progress: Progress,
        stop: threading.Event,
    ) -> None:  # fmt: skip
        self.options, self.guard, self.publisher, self.results = options, guard, publisher, results
        self.broker, self.manifest, self.tally, self.progress, self.stop = (
            broker,
            manifest,
            tally,
            progress,
            stop,
        )
        self.tracked: dict[str, _Tracked] = {}
        self._exhausted = False
        self._cursor = 0
        self._beat_at = 0.0
        self._lost_checked_at = time.monotonic()

    def run(self, rows: Iterator[Row]) -> None:
        """Work until every row has an outcome, or until `stop` is set (then leave the rest to a re-run)."""
        try:
            self.guard.start()
            self._beat_at = time.monotonic()
            while not self.stop.is_set() and not (self._exhausted and not self.tracked):
                busy = self._fill(rows)
                busy = self._poll() or busy
                self._maintain()
                self.tally.in_flight = len(self.tracked)
                self.progress.update()
                if not busy:
                    self.stop.wait(IDLE_S)
        finally:
            self.tally.in_flight = len(self.tracked)
            self.tally.interrupted = self.stop.is_set() and not (self._exhausted and not self.tracked)
            with contextlib.suppress(redis.RedisError):  # unreachable: the lease expires by itself
                self.guard.end()

    def _fill(self, rows: Iterator[Row]) -> bool:
        room = self.options.max_in_flight - len(self.tracked)
        if self._exhausted or room < min(self.options.batch_size, self.options.max_in_flight) // 4 + 1:
            return False
        want = min(room, self.options.batch_size)
        chunk = list(itertools.islice(rows, want))
        self._exhausted = len(chunk) < want
        self._settle(chunk, retry_failed=self.options.retry_failed)
        return bool(chunk)

    def _settle(self, rows: Sequence[Row], *, retry_failed: bool) -> None:
        """Claim, look, and act on each row (see `decide`)."""
        if not rows:
            return
        me, queue = self.guard.run_id, self.options.queue
        ours = [
            Claim("claimed", me, naming.task_id(self.options.namespace, r.name), queue, r.digest)
            for r in rows
        ]
        won = self.guard.claim([(row.name, claim) for row, claim in zip(rows, ours, strict=True)])
        others = iter(self.guard.read([row.name for row, w in zip(rows, won, strict=True) if not w]))
        claims = [claim if w else next(others) for claim, w in zip(ours, won, strict=True)]
        found = iter(self.results.states([c.task for c in claims if c is not None]))
        task_states = [next(found) if c is not None else TaskState(states.PENDING) for c in claims]
        alive = self.guard.alive(c.run for c in claims if c is not None)
        plan: dict[Action, list[tuple[Row, Claim]]] = {}
        for row, w, mine, claim, state in zip(rows, won, ours, claims, task_states, strict=True):
            if claim is not None and conflicts(row, claim, state):
                self._conflict(row, claim.task)  # reported; a claim it just won goes back
                if w:
                    plan.setdefault(Action.RELEASE, []).append((row, claim))
                continue
            action = decide(won=w, claim=claim, state=state, alive=alive, retry_failed=retry_failed)
            if action is Action.RECORD and claim is not None:
                self._record(row, claim.task, state, mine=False)
            plan.setdefault(action, []).append((row, claim or mine))
        self._act(plan)

    def _act(self, plan: dict[Action, list[tuple[Row, Claim]]]) -> None:
        for row, claim in plan.get(Action.FOLLOW, []):
            self._follow(row, claim.task)
        for row, claim in plan.get(Action.RECHECK, []):
            self._follow(row, claim.task, checked_at=0.0)
        me, queue = self.guard.run_id, self.options.queue
        takeovers = [
            (row, claim, Claim("claimed", me, naming.next_task_id(claim.task), queue, row.digest))
            for row, claim in plan.get(Action.TAKEOVER, [])
        ]
        publish = list(plan.get(Action.PUBLISH, []))
        publish += self._swap_or_follow(takeovers)
        publish += self._resolve(plan.get(Action.RESOLVE, []))
        # A result existed although this run had just won the claim (an earlier claim expired): the
        # message was sent once, so mark it so; nothing is followed, the row is recorded already.
        # A claim just won for a conflicting row is given back: the task id is the other request's.
        self.guard.swap(
            [(r.name, c, replace(c, state="sent")) for r, c in plan.get(Action.RECORD, []) if c.run == me]
            + [(r.name, c, None) for r, c in plan.get(Action.RELEASE, [])]
        )
        self._publish(publish)

    def _swap_or_follow(self, swaps: Sequence[tuple[Row, Claim, Claim]]) -> list[tuple[Row, Claim]]:
        """Compare-and-set each claim; the rows where it held, with their new claims. The others
        changed hands meanwhile: follow them and look again soon."""
        if not swaps:
            return []
        done = self.guard.swap([(row.name, old, new) for row, old, new in swaps])
        for (row, old, _), ok in zip(swaps, done, strict=True):
            if not ok:
                self._follow(row, old.task, checked_at=0.0)
        return [(row, new) for (row, _, new), ok in zip(swaps, done, strict=True) if ok]

    def _resolve(self, items: Sequence[tuple[Row, Claim]]) -> list[tuple[Row, Claim]]:
        """Rows held by a dead run that may not have published them (or whose message was lost
        since): publish only those whose message is neither in the broker nor finished (a result
        may have appeared meanwhile)."""
        if not items:
            return []
        queued = find_queued(self.broker, {c.queue for _, c in items}, [c.task for _, c in items])
        now = self.results.states([c.task for _, c in items])
        found = [(row, c) for (row, c), s in zip(items, now, strict=True) if c.task in queued or s.ready]
        lost = [(row, c) for (row, c), s in zip(items, now, strict=True) if not (c.task in queued or s.ready)]
        # Found: the dead run did publish. Say so in the claim (best effort), and await the result.
        self.guard.swap([(row.name, c, replace(c, state="sent")) for row, c in found])
        for row, claim in found:
            self._follow(row, claim.task)
        me, queue = self.guard.run_id, self.options.queue
        return self._swap_or_follow(
            [(row, c, Claim("claimed", me, c.task, queue, row.digest)) for row, c in lost]
        )

    def _publish(self, items: Sequence[tuple[Row, Claim]]) -> None:
        if not items:
            return
        if not self._lease_held():
            # Paused past the lease: another run may have taken these rows over meanwhile.
            self._settle([row for row, _ in items], retry_failed=self.options.retry_failed)
            return
        self.publisher.publish([(claim.task, row.message) for row, claim in items])
        marked = self.guard.swap([(row.name, claim, replace(claim, state="sent")) for row, claim in items])
        now = time.monotonic()
        for (row, claim), ok in zip(items, marked, strict=True):
            # Not marked: the claim changed hands after all (another run holds it): follow the row,
            # so that this run never sends it again as its own.
            self.tracked[claim.task] = _Tracked(row, claim.task, mine=ok, checked_at=now)
        self.tally.sent += len(items)

    def _follow(self, row: Row, task_id: str, *, checked_at: float | None = None) -> None:
        when = time.monotonic() if checked_at is None else checked_at
        self.tracked[task_id] = _Tracked(row, task_id, mine=False, checked_at=when)

    def _poll(self) -> bool:
        """Record the tracked tasks that finished: the oldest few hundred, and a rotating few hundred."""
        if not self.tracked:
            return False
        ids = list(self.tracked)
        rest = ids[_POLL_WINDOW:]
        self._cursor = self._cursor % len(rest) if rest else 0
        window = ids[:_POLL_WINDOW] + rest[self._cursor : self._cursor + _POLL_WINDOW]
        self._cursor += _POLL_WINDOW
        done = [(t, s) for t, s in zip(window, self.results.states(window), strict=True) if s.ready]
        for task_id, state in done:
            entry = self.tracked.pop(task_id)
            self._record(entry.row, task_id, state, mine=entry.mine)
        return bool(done)

    def _maintain(self) -> None:
        """Renew the lease; now and then, look for lost messages, and look again at rows followed for
        another run (it may have died)."""
        now = time.monotonic()
        self._heartbeat()
        if now - self._lost_checked_at > self.options.lease_s:
            self._lost_checked_at = now
            self._send_lost_again(now)
        stale = [
            t for t in self.tracked.values() if not t.mine and now - t.checked_at > self.options.lease_s / 2
        ]
        for entry in stale:
            del self.tracked[entry.task_id]
        self._settle([entry.row for entry in stale], retry_failed=False)

    def _send_lost_again(self, now: float) -> None:
        """Send again, with the same task id, this run's messages that are missing at two checks a
        lease apart while their task never started. A worker keeps a message it has taken in the
        unacked hash until it acknowledges it, so a missing message is lost, not in a worker's hands
        (the second check covers the instant between its removal from the queue and its arrival in
        the hash)."""
        waiting = [t for t in self.tracked.values() if t.mine and now - t.checked_at > self.options.lease_s]
        if not waiting:
            return
        task_states = self.results.states([t.task_id for t in waiting])
        pending = [t.task_id for t, s in zip(waiting, task_states, strict=True) if s.state == states.PENDING]
        queued = find_queued(self.broker, {self.options.queue}, pending) if pending else set()
        lost = []
        for entry, state in zip(waiting, task_states, strict=True):
            if state.state != states.PENDING or entry.task_id in queued:
                entry.missing = False
            elif entry.missing:
                lost.append(entry)
                entry.missing, entry.checked_at = False, now
            else:
                entry.missing = True
        if lost and self._lease_held():
            log.warning(
                "%d messages vanished from the broker before a worker took them: sent again", len(lost)
            )
            self.publisher.publish([(t.task_id, t.row.message) for t in lost])
            self.tally.resent += len(lost)

    def _heartbeat(self) -> None:
        if time.monotonic() - self._beat_at > self.options.lease_s / 3:
            self._lease_held()

    def _lease_held(self) -> bool:
        """Renew the lease. False when it had lapsed; the run then goes on under a new one, and
        every row it published becomes one to settle again (another run may have taken it over)."""
        held = self.guard.beat()
        if not held:
            log.warning("this run's lease lapsed (was it paused?): its rows are settled again")
            self.guard.restart()
            for entry in self.tracked.values():
                if entry.mine:
                    entry.mine, entry.checked_at = False, 0.0
        self._beat_at = time.monotonic()
        return held

    def _conflict(self, row: Row, task_id: str) -> None:
        namespace = naming.namespace_of(task_id)
        error = (
            f"task {task_id} holds another request (another input mapped to namespace {namespace}, or "
            "this row changed since it was sent): pass --namespace NAME to keep this input apart"
        )
        self.manifest.write([record(row.row_id, row.line, "conflict", task_id=task_id, error=error)])
        self.tally.conflicts += 1

    def _record(self, row: Row, task_id: str, state: TaskState, *, mine: bool) -> None:
        outcome = state.outcome
        if outcome is None:
            return
        if state.digest not in (None, row.digest):  # a result for another request's kwargs
            self._conflict(row, task_id)
            return
        self.manifest.write(
            [
                record(
                    row.row_id, row.line, outcome.status, task_id=task_id, url=outcome.url,
                    s3_key=outcome.s3_key, duration=outcome.duration, error=outcome.error,
                )
            ]
        )  # fmt: skip
        if outcome.status == "completed":
            self.tally.completed += 1
        else:
            self.tally.failed += 1
        self.tally.followed += 0 if mine else 1
