"""`tts-backfill INPUT --manifest OUT.jsonl`: the command line, start to finish."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import redis
from kombu.exceptions import OperationalError

from producer.backfill import naming
from producer.backfill.broker import Publisher
from producer.backfill.connect import Connections
from producer.backfill.guard import Guard
from producer.backfill.manifest import ManifestBusy, ManifestIndex, ManifestWriter, record
from producer.backfill.progress import Progress, Tally
from producer.backfill.rows import InvalidRow, Row, RowReader, input_format
from producer.backfill.runner import Backfill, Options
from producer.config import ConfigError, ProducerConfig
from tts_contract.names import BACKFILL_QUEUE

__all__ = ["main", "parser"]

_SHOWN_INVALID = 50


def parser() -> argparse.ArgumentParser:
    """The command line's options."""
    cli = argparse.ArgumentParser(
        prog="tts-backfill",
        description="Synthesise every row of a JSONL or CSV file once, through the tts queue, "
        "recording each outcome in a manifest that a re-run resumes from.",
    )
    cli.add_argument(
        "input", type=Path, metavar="INPUT", help="JSONL or CSV: request fields and an optional id"
    )
    cli.add_argument(
        "--manifest", type=Path, required=True, metavar="OUT.jsonl", help="one JSON line per row"
    )
    cli.add_argument("--max-in-flight", type=_positive, default=1000, metavar="N", help="default 1000")
    cli.add_argument("--queue", default=BACKFILL_QUEUE, metavar="NAME", help=f"default {BACKFILL_QUEUE}")
    cli.add_argument(
        "--priority", type=int, choices=range(10), default=9, metavar="P",
        help="0 (first) to 9 (last), default 9: behind every interactive job",
    )  # fmt: skip
    cli.add_argument("--retry-failed", action="store_true", help="send rows that failed before again")
    cli.add_argument("--dry-run", action="store_true", help="validate and count; send and write nothing")
    cli.add_argument("--strict", action="store_true", help="send nothing if any row is invalid")
    cli.add_argument("--namespace", help="what row ids are unique within (default: INPUT's name)")
    cli.add_argument("--format", choices=["jsonl", "csv"], help="default: from INPUT's extension")
    cli.add_argument(
        "--lease-seconds", type=float, default=30.0, metavar="S",
        help="a run silent this long counts as dead, and its unsent rows are taken over (default 30)",
    )  # fmt: skip
    return cli


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


@dataclass
class _Setup:
    reader: RowReader
    namespace: str
    config: ProducerConfig
    index: ManifestIndex = field(default_factory=ManifestIndex)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 all completed, 1 rows failed, invalid or in
    conflict, 2 nothing could be done, 130 interrupted)."""
    args = parser().parse_args(argv)
    try:
        return _main(args)
    except KeyboardInterrupt:  # before sending began (handlers of their own while sending)
        print("\ntts-backfill: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


def _main(args: argparse.Namespace) -> int:
    try:
        setup = _setup(args)
        if args.dry_run:
            setup.index = _load_index(args, setup.namespace)
            return _dry_run(args, setup)
        manifest = ManifestWriter(args.manifest)
    except (ConfigError, ManifestBusy, ValueError, OSError) as exc:  # UnicodeDecodeError is a ValueError
        print(f"tts-backfill: {exc}", file=sys.stderr)
        return 2
    try:
        # Read under the lock, so that the last writer's last lines are in it.
        setup.index = _load_index(args, setup.namespace)
    except (ValueError, OSError) as exc:
        manifest.close()
        print(f"tts-backfill: {exc}", file=sys.stderr)
        return 2
    try:
        return _run(args, setup, manifest)
    except UnicodeDecodeError as exc:  # a CSV that is not UTF-8: found while validating, nothing sent
        print(f"tts-backfill: {args.input}: {exc}", file=sys.stderr)
        return 2
    finally:
        manifest.close()


def _setup(args: argparse.Namespace) -> _Setup:
    config = ProducerConfig.from_env()
    namespace = args.namespace or naming.namespace_for(args.input)
    if not naming.valid_namespace(namespace):
        raise ValueError(f"--namespace must match [A-Za-z0-9][A-Za-z0-9_-]{{0,39}} (got {namespace!r})")
    if not args.input.is_file():
        raise ValueError(f"{args.input}: no such file")
    fmt = input_format(args.input, args.format)
    reader = RowReader(args.input, fmt=fmt, namespace=namespace, max_text_chars=config.max_text_chars)
    return _Setup(reader, namespace, config)


def _load_index(args: argparse.Namespace, namespace: str) -> ManifestIndex:
    """The manifest's index; refused when it was written under another namespace than the default
    one now in use (the default rule changed, or INPUT was renamed) and none is given."""
    index = ManifestIndex.load(args.manifest)
    if index.unreadable_lines:
        print(
            f"tts-backfill: {args.manifest}: {index.unreadable_lines} unreadable lines skipped "
            "(a line torn by a crash; the rows on it are looked up again)",
            file=sys.stderr,
        )
    if args.namespace is None and index.namespace not in (None, namespace):
        raise ValueError(
            f"{args.manifest} records task ids of namespace {index.namespace!r}, but the default "
            f"namespace of {args.input} is {namespace!r}: pass --namespace {index.namespace} to go on "
            f"with that run (or --namespace {namespace} to go on under the new name)"
        )
    return index


def _validate(
    args: argparse.Namespace, setup: _Setup, manifest: ManifestWriter | None
) -> tuple[Tally, set[int]]:
    """The first pass: count rows, report invalid ones (by line), see what the manifest has done."""
    tally, skip, index = Tally(), set[int](), setup.index
    for row in setup.reader.validate():
        if isinstance(row, InvalidRow):
            skip.add(row.line)
            _report_invalid(row, tally, manifest, index)
            continue
        tally.rows += 1
        status = index.status.get(row.row_id)
        tally.done_before += status == "completed"
        tally.failed_before += status == "failed" and not args.retry_failed
    if tally.invalid > _SHOWN_INVALID:
        print(f"tts-backfill: ... and {tally.invalid - _SHOWN_INVALID} more invalid rows", file=sys.stderr)
    return tally, skip


def _report_invalid(
    row: InvalidRow, tally: Tally, manifest: ManifestWriter | None, index: ManifestIndex
) -> None:
    tally.invalid += 1
    if len(tally.invalid_lines) < 10:
        tally.invalid_lines.append(row.line)
    if tally.invalid <= _SHOWN_INVALID:
        print(f"tts-backfill: line {row.line}: invalid: {row.error}", file=sys.stderr)
    if manifest is not None and row.line not in index.invalid_lines:
        manifest.write([record(row.row_id, row.line, "invalid", error=row.error)])


def _dry_run(args: argparse.Namespace, setup: _Setup) -> int:
    tally, _ = _validate(args, setup, None)
    to_send = tally.rows - tally.done_before - tally.failed_before
    print(
        f"dry run: {tally.rows} valid rows, {tally.invalid} invalid; {tally.done_before} completed and "
        f"{tally.failed_before} failed in the manifest; {to_send} would be sent to {args.queue} "
        f"(namespace {setup.namespace})"
    )
    return 1 if tally.invalid else 0


def _run(args: argparse.Namespace, setup: _Setup, manifest: ManifestWriter) -> int:
    before = os.stat(args.input)
    tally, skip = _validate(args, setup, manifest)
    after = os.stat(args.input)
    validated, setup.reader.digest = setup.reader.digest, None
    try:
        if tally.invalid and args.strict:
            raise ValueError(f"{tally.invalid} invalid rows and --strict: nothing sent")
        if _changed(before, after):
            raise ValueError(f"{args.input} changed while it was read; nothing sent")
        links = Connections.open(setup.config)
    except ValueError as exc:
        print(f"tts-backfill: {exc}", file=sys.stderr)
        return 2
    print(
        f"tts-backfill: {tally.rows} rows in {args.input} (namespace {setup.namespace}), "
        f"{tally.done_before} done before; sending to {args.queue} at priority {args.priority}",
        file=sys.stderr,
    )
    failed_with: int | None = None
    try:
        _send(args, setup, links, manifest, tally, _rows_to_send(args, setup, skip))
    except (redis.RedisError, OperationalError, OSError) as exc:
        print(f"tts-backfill: stopped: {exc}; run the same command again to resume", file=sys.stderr)
        tally.interrupted, failed_with = True, 2
    except KeyboardInterrupt:  # a second Ctrl-C
        tally.interrupted = True
    finally:
        links.close()
    print(tally.summary(queue=args.queue, priority=args.priority))
    if _changed_since_validation(args.input, after, validated, setup.reader.digest):
        print(
            f"tts-backfill: {args.input} changed after it was validated: the rows sent are not all "
            "the rows checked; check the manifest, then run the same command again",
            file=sys.stderr,
        )
        return 2
    return tally.exit_status() if failed_with is None else failed_with


def _changed_since_validation(
    path: Path, after: os.stat_result, validated: str | None, sent: str | None
) -> bool:
    """Whether the sending pass read another INPUT than the one validated (a row changed in between
    went out without the duplicate checks): by digest once it read to the end, else by size and time."""
    if sent is not None:
        return sent != validated
    try:
        return _changed(after, os.stat(path))
    except OSError:
        return True


def _changed(before: os.stat_result, after: os.stat_result) -> bool:
    return (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns)


def _rows_to_send(args: argparse.Namespace, setup: _Setup, skip: set[int]) -> Iterator[Row]:
    """The second pass: valid rows the manifest does not account for (failed ones with --retry-failed)."""
    for row in setup.reader.rows(skip=frozenset(skip)):
        if not isinstance(row, Row):
            continue
        status = setup.index.status.get(row.row_id)
        if status is None or (status == "failed" and args.retry_failed):
            yield row


def _send(
    args: argparse.Namespace, setup: _Setup, links: Connections, manifest: ManifestWriter, tally: Tally,
    rows: Iterator[Row],
) -> None:  # fmt: skip
    app, results, broker = links.app, links.results, links.broker
    options = Options(
        namespace=setup.namespace, queue=args.queue, priority=args.priority, max_in_flight=args.max_in_flight,
        retry_failed=args.retry_failed, lease_s=args.lease_seconds,
    )  # fmt: skip
    stop = threading.Event()
    progress = Progress(tally, stream=sys.stderr, tty=sys.stderr.isatty())
    guard = Guard(broker, namespace=setup.namespace, run_id=uuid.uuid4().hex[:12], lease_s=args.lease_seconds)
    backfill = Backfill(
        options, guard=guard, publisher=Publisher(app, queue=args.queue, priority=args.priority),
        results=results, broker=broker, manifest=manifest, tally=tally, progress=progress, stop=stop,
    )  # fmt: skip
    previous = _on_signals(stop)
    try:
        backfill.run(rows)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        progress.close()


def _on_signals(stop: threading.Event) -> dict[int, signal._HANDLER]:
    """Ctrl-C (or SIGTERM) once: finish the current step and stop; twice: stop at once."""

    def handle(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print("\ntts-backfill: stopping (press Ctrl-C again to quit at once)", file=sys.stderr, flush=True)

    return {signum: signal.signal(signum, handle) for signum in (signal.SIGINT, signal.SIGTERM)}
