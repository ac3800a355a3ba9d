"""`./bootstrap models [fetch | verify [--hashes]]`, or `python -m tts_worker.models ...`.

fetch (the default) downloads what IndexTTS2 needs from the hub and verifies it; verify checks the
files offline. Settings (CHECKPOINTS_DIR, HF_TOKEN) come from the environment like the worker's;
huggingface_hub reads HF_ENDPOINT, HF_HOME / HF_HUB_CACHE and HF_HUB_OFFLINE itself.
"""

from __future__ import annotations

import argparse
import sys

from huggingface_hub import constants

from tts_worker.models.check import verify_model_files
from tts_worker.models.fetch import ModelFilesError, fetch
from tts_worker.settings import Settings, SettingsError

PROG = "tts_worker.models"


def main(argv: list[str] | None = None) -> int:
    """Run the command; the exit status is non-zero when a file is missing or could not be fetched."""
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        return _fail(f"bad setting: {exc}", status=2)
    if args.command == "verify":
        repair = "./bootstrap models fetch --hashes" if args.hashes else "./bootstrap models"
        return _verify(settings, hashes=args.hashes, hint=f"run {repair} to fetch them")
    if constants.HF_HUB_OFFLINE:
        _say("HF_HUB_OFFLINE is set: not asking the hub, only checking the files already here")
        return _verify(settings, hashes=args.hashes, hint="unset HF_HUB_OFFLINE to fetch them")
    return _fetch(settings, hashes=args.hashes)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="./bootstrap models",
        description="Fetch and verify the model files of TTS_ENGINE (indextts2 unless indextts25).",
    )
    parser.set_defaults(command="fetch", hashes=False)
    commands = parser.add_subparsers(dest="command")
    fetching = commands.add_parser("fetch", help="download what is missing or damaged (the default)")
    verifying = commands.add_parser("verify", help="check offline that every file is present and whole")
    for command in (fetching, verifying):
        command.add_argument(
            "--hashes", action="store_true", help="hash every file (default: sizes; hashes of changed files)"
        )
    return parser


def _fetch(settings: Settings, *, hashes: bool) -> int:
    _say(
        f"fetching the model files from {constants.ENDPOINT} into {settings.checkpoints_dir} "
        f"and the Hugging Face cache {constants.HF_HUB_CACHE}"
    )
    try:
        report = fetch(
            settings.checkpoints_dir,
            token=settings.hf_token,
            engine=settings.tts_engine,
            hashes=hashes,
            say=_say,
        )
    except ModelFilesError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return _fail("interrupted; run again to go on from where it stopped", status=130)
    _say(f"done: {report.summary()}; the worker can now run with HF_HUB_OFFLINE=1")
    return 0


def _verify(settings: Settings, *, hashes: bool, hint: str) -> int:
    problems = verify_model_files(settings.checkpoints_dir, engine=settings.tts_engine, hashes=hashes)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)
    if problems:
        return _fail(f"{len(problems)} model file(s) missing or damaged (listed above): {hint}")
    checked = "every file hashed" if hashes else "sizes, and hashes of files changed since verified"
    _say(f"every model file is present and whole ({checked})")
    return 0


def _say(line: str) -> None:
    print(line, flush=True)


def _fail(message: str, *, status: int = 1) -> int:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
