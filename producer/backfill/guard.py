"""The duplicate-submit guard: one Redis key per row, in the broker's database, set before publishing.

    tts-backfill:<namespace>:row:<name>  -> {"state": "claimed"|"sent", "run": ..., "task": ..., "queue": ...,
                                             "digest": <request digest>}
    tts-backfill:<namespace>:run:<run>   -> a lease, refreshed while that run is alive

A run claims a row with `SET NX` (so of two runs, one wins), publishes, then marks the claim `sent`.
A row claimed by another run is followed (its result awaited), never published again, unless that
run is dead (its lease expired) and the claim still says `claimed`: then the message may or may not
have reached the broker, and the queue is searched before the row is published again (see
`producer.backfill.broker.find_queued`). Changes to a claim are compare-and-set, so two runs can
never both take a row over. Claims last `GUARD_TTL_S` (7 days), never longer than the results they
point to; after that the worker's own idempotency (object key and job id) still keeps a row from
being synthesised twice.

A claim carries the digest of the row's request (`tts_contract.schema.request_digest`): a row whose claim has
another digest is a different request under the same task id (another input mapped to the same
namespace, or a row edited since it was sent), reported as a conflict by the runner.

A lease is renewed only while it exists (`SET XX`): a run that was paused past its lease learns that
it lapsed, and that other runs may have taken its claims over; it then takes a lease under a new run
id and settles its rows again (compare-and-set from its old claims), instead of publishing them.

A claim marked `sent` whose message was then lost from Redis (a purged queue, a Redis restart
without persistence) is found by the runner's lost-message checks, and the message sent again.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import redis

from tts_contract import keys

__all__ = ["GUARD_TTL_S", "Claim", "Guard"]

GUARD_TTL_S = 7 * 24 * 3600
"""How long a claim lasts: the workers' `result_expires`, so a live claim always has its result."""

# Compare-and-set of many keys in one call: KEYS[i] becomes ARGV[2i] where it is ARGV[2i-1]
# (is deleted where ARGV[2i] is empty).
_COMPARE_AND_SET = """
local done = {}
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[2 * i - 1] then
    if ARGV[2 * i] == '' then
      redis.call('DEL', key)
    else
      redis.call('SET', key, ARGV[2 * i], 'KEEPTTL')
    end
    done[i] = 1
  else
    done[i] = 0
  end
end
return done
"""
_SWAP_CHUNK = 500


@dataclass(frozen=True)
class Claim:
    """Who holds a row, whether its message was published, and under which task id and queue."""

    state: Literal["claimed", "sent"]
    run: str
    task: str
    queue: str
    digest: str = ""
    """The request digest of the row that made the claim; empty in claims made before digests."""

    def dump(self) -> str:
        """The stored form; canonical, because compare-and-set compares it byte for byte."""
        fields = {"queue": self.queue, "run": self.run, "state": self.state, "task": self.task}
        if self.digest:
            fields["digest"] = self.digest
        return json.dumps(fields, separators=(",", ":"), sort_keys=True)

    @classmethod
    def parse(cls, raw: bytes | str | None) -> Claim | None:
        """The claim stored as `raw`, or None for a missing or unreadable key."""
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            return cls(
                state=data["state"], run=data["run"], task=data["task"], queue=data["queue"],
                digest=data.get("digest", ""),
            )  # fmt: skip
        except (ValueError, KeyError, TypeError):
            return None


class Guard:
    """The claims of one namespace, and this run's lease."""

    def __init__(self, client: redis.Redis, *, namespace: str, run_id: str, lease_s: float) -> None:
        self.client = client
        self.run_id = run_id
        self.lease_s = lease_s
        self.namespace = namespace
        self._cas = client.register_script(_COMPARE_AND_SET)

    def key(self, name: str) -> str:
        """The guard key of the row named `name`."""
        return keys.backfill_row(self.namespace, name)

    def claim(self, items: Sequence[tuple[str, Claim]]) -> list[bool]:
        """Claim each (name, claim) unless it is claimed already; True where this call won."""
        pipe = self.client.pipeline(transaction=False)
        for name, claim in items:
            pipe.set(self.key(name), claim.dump(), nx=True, ex=GUARD_TTL_S)
        return [bool(won) for won in pipe.execute()]

    def read(self, names: Sequence[str]) -> list[Claim | None]:
        """The current claim of each row (None where there is none)."""
        if not names:
            return []
        return [Claim.parse(raw) for raw in self.client.mget([self.key(n) for n in names])]

    def swap(self, items: Sequence[tuple[str, Claim, Claim | None]]) -> list[bool]:
        """For each (name, expected, new): replace the claim (or delete it, where `new` is None) if it
        is still `expected`; True where done."""
        done: list[bool] = []
        for start in range(0, len(items), _SWAP_CHUNK):
            chunk = items[start : start + _SWAP_CHUNK]
            names = [self.key(name) for name, _, _ in chunk]
            args = [v for _, old, new in chunk for v in (old.dump(), new.dump() if new else "")]
            done += [bool(flag) for flag in self._cas(keys=names, args=args)]
        return done

    def start(self) -> None:
        """Take this run's lease (run ids are fresh, so nobody else holds it)."""
        self.client.set(self._run_key(self.run_id), "alive", ex=self._lease_ttl(), nx=True)

    def beat(self) -> bool:
        """Renew this run's lease if it still holds it. False when it had lapsed: other runs may have
        taken over claims made under it (see `restart`)."""
        return bool(self.client.set(self._run_key(self.run_id), "alive", ex=self._lease_ttl(), xx=True))

    def restart(self) -> None:
        """Go on under a new run id and lease, after the old one lapsed: claims of the old id are then
        a dead run's to every run, this one included, and are taken back only by compare-and-set."""
        self.run_id = uuid.uuid4().hex[:12]
        self.start()

    def alive(self, runs: Iterable[str]) -> set[str]:
        """Which of `runs` hold a lease now."""
        runs = sorted(set(runs))
        pipe = self.client.pipeline(transaction=False)
        for run in runs:
            pipe.exists(self._run_key(run))
        return {run for run, exists in zip(runs, pipe.execute(), strict=True) if exists}

    def end(self) -> None:
        """Give up the lease, so that a re-run need not wait for it to expire."""
        self.client.delete(self._run_key(self.run_id))

    def _run_key(self, run: str) -> str:
        return keys.backfill_run(self.namespace, run)

    def _lease_ttl(self) -> int:
        return max(1, round(self.lease_s))
