"""`tts-backfill`: synthesise every row of a JSONL or CSV file once, with a manifest to resume from.

    tts-backfill rows.jsonl --manifest rows.manifest.jsonl [--max-in-flight N] [--queue NAME]
                 [--priority P] [--retry-failed] [--dry-run] [--strict] [--namespace NAME]

How it keeps "every row once" (details in each module):
- rows: INPUT is streamed twice, once to validate every row (invalid ones are reported by line and
  left out) and once to send, each taking a digest of what it read (a file changed in between is
  an error); a row's id is given, or derived from its content.
- naming: task id `backfill:<namespace>:<name>` and object `<namespace>.<name>.<ext>` follow from
  the row id, so the worker's own idempotency (object key + job id) applies to redeliveries.
- guard: a Redis claim per row (SET NX) is taken before publishing and marked `sent` after, so
  concurrent runs and re-runs never publish a row twice; a dead run's unmarked claims are resolved
  by looking for the message in the broker before publishing again. A claim holds the digest of
  its row's request: another request under the same task id is a conflict, never shared audio.
- decide: what to do with a row, given its claim and its task's state.
- manifest: one JSON line per row, appended as outcomes arrive (read once its lock is held); a
  re-run skips completed rows without touching Redis.
- connect: the broker and the result backend, reached once before anything is sent.
- broker: messages are published in batches with kombu's `Producer.batch()`.
- runner: at most `--max-in-flight` rows are in flight; Ctrl-C stops between steps.

Importing this package imports neither torch, numpy, soundfile, boto3 nor the worker.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """`tts-backfill` (see `cli.main`). Imported on call: the worker imports `naming` from this
    package, and must not pull in the command's own dependencies (tqdm, the `backfill` extra)."""
    from producer.backfill.cli import main as run

    return run(argv)
