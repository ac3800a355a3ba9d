"""`tts-backfill`: synthesise every row of a JSONL or CSV file once, with a manifest to resume from.

    tts-backfill rows.jsonl --manifest rows.manifest.jsonl [--max-in-flight N] [--queue NAME]
                 [--priority P] [--retry-failed] [--dry-run] [--strict] [--namespace NAME]

How it keeps "every row once" (details in each module):
- rows: INPUT is streamed twice, once to validate every row (invalid ones are reported by line and
  left out) and once to send; a row's id is given, or derived from its content.
- naming: task id `backfill:<namespace>:<name>` and object `<namespace>.<name>.<ext>` follow from
  the row id, so the worker's own idempotency (object key + job id) applies to redeliveries.
- guard: a Redis claim per row (SET NX) is taken before publishing and marked `sent` after, so
  concurrent runs and re-runs never publish a row twice; a dead run's unmarked claims are resolved
  by looking for the message in the broker before publishing again.
- manifest: one JSON line per row, appended as outcomes arrive; a re-run skips completed rows without
  touching Redis.
- broker: messages are published in batches with kombu's `Producer.batch()`.
- runner: at most `--max-in-flight` rows are in flight; Ctrl-C stops between steps.

Importing this package imports neither torch, numpy, soundfile, boto3 nor the worker.
"""

from __future__ import annotations

from producer.backfill.cli import main

__all__ = ["main"]
