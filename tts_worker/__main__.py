"""Operator commands of the worker package.

    python -m tts_worker check [--json] [--no-broker]   # every health check; non-zero exit on a problem
    python -m tts_worker flower [FLOWER OPTIONS...]      # Flower on the producer's settings, with basic auth
    python -m tts_worker warmup                          # load and warm the engine (filling its caches), exit

`check` is what the Docker healthcheck runs. `flower` refuses to start without FLOWER_BASIC_AUTH
(`user:password`, several separated by commas), so that Flower is never open by accident; it then runs
`celery -A producer flower`, which reads CELERY_BROKER_URL and CELERY_RESULT_BACKEND like every other
part, and Flower's own FLOWER_* variables (FLOWER_PORT, default 5555; FLOWER_ADDRESS, default all).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence

from tts_worker.settings import EXAMPLE_PASSWORD

__all__ = ["flower_command", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m tts_worker", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser(
        "check", help="check settings, broker, storage, ffmpeg, engine, model files, GPU"
    )
    check.add_argument("--json", action="store_true", help="print the seed's health report as JSON")
    check.add_argument("--no-broker", action="store_true", help="skip the broker (a RunPod worker uses none)")
    commands.add_parser("flower", help="start Flower with basic auth (extra options go to Flower)")
    commands.add_parser(
        "warmup", help="load and warm the engine once (e.g. to fill a volume's caches), then exit"
    )
    args, extra = parser.parse_known_args(argv)
    if args.command == "flower":
        command = flower_command(extra, os.environ)
        os.execv(command[0], command)  # Flower takes this process over, so signals reach it directly
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "warmup":
        return _warm_up()
    return _check(as_json=args.json, broker=not args.no_broker)


def _warm_up() -> int:
    from tts_worker import runtime

    engine = runtime.engine()  # loads the model and speaks one short line; needs no broker or storage
    print(f"{engine.name} loaded and warmed up on {engine.device}")
    return 0


def _check(*, as_json: bool, broker: bool) -> int:
    from tts_worker import health  # here: `flower` must not pay for numpy and boto3

    checks = health.run_checks(skip_broker=None if broker else "skipped (--no-broker)")
    print(json.dumps(health.report(checks), indent=2) if as_json else health.format_text(checks))
    return 1 if any(check.status == "fail" for check in checks) else 0


def flower_command(extra: Sequence[str], environ: Mapping[str, str]) -> list[str]:
    """The `celery -A producer flower` command line; exits with a message when no credentials are set."""
    credentials = [entry for entry in (environ.get("FLOWER_BASIC_AUTH") or "").split(",") if entry]
    if not credentials or any(not _user_and_password(entry) for entry in credentials):
        raise SystemExit(
            "tts_worker: set FLOWER_BASIC_AUTH=user:password (several separated by commas): "
            "without it Flower's pages are open to anyone who can reach the port"
        )
    if any(EXAMPLE_PASSWORD in entry.partition(":")[2] for entry in credentials):
        raise SystemExit(
            f"tts_worker: FLOWER_BASIC_AUTH still holds the example's {EXAMPLE_PASSWORD} password: "
            "set your own (./bootstrap env writes a .env with random ones)"
        )
    # The credentials stay in the environment, where Flower reads them, not in `ps` output.
    return [sys.executable, "-m", "celery", "-A", "producer", "flower", *extra]


def _user_and_password(entry: str) -> bool:
    user, _, password = entry.partition(":")
    return bool(user and password)


if __name__ == "__main__":
    sys.exit(main())
