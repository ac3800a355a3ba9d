"""`./bootstrap demo`, the README's first command, as a new user runs it (its Python half)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

pytestmark = pytest.mark.slow


def stack_processes() -> list[str]:
    """Command lines of the processes a local stack starts (redis, moto, celery) that are running."""
    done = subprocess.run(["ps", "-e", "-o", "args="], capture_output=True, text=True, check=True)
    return [
        line for line in done.stdout.splitlines()
        if "tts-stack-" in line or "moto.server" in line or "celery -A tts_worker" in line
    ]  # fmt: skip


def run_demo(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "devtools.demo", *args], cwd=cwd, capture_output=True, text=True,
        timeout=170, check=False, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )  # fmt: skip


def test_the_demo_speaks_the_words_it_is_given_and_stops_what_it_started(tmp_path: Path) -> None:
    before = stack_processes()
    done = run_demo("Hello", "from", "the", "demo.", "--output-format", "wav", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    [saved] = (tmp_path / "out").iterdir()
    assert saved.suffix == ".wav" and "presigned URL" in done.stdout and "X-Amz-Signature" in done.stdout
    samples, rate = soundfile.read(saved, dtype="int16")
    assert rate == 24000 and 0.8 < len(samples) / rate < 4  # four words of Piper speech
    assert 20 * np.log10(np.sqrt(np.mean(samples.astype(np.float64) ** 2)) / 32768) > -35  # not silence
    assert f"saved out/{saved.name}" in done.stdout and "engine piper" in done.stdout
    assert stack_processes() == before  # Redis, S3 and the worker are gone


def test_the_demo_refuses_bad_text_before_starting_anything(tmp_path: Path) -> None:
    done = run_demo("   ", cwd=tmp_path)
    assert done.returncode == 2
    assert "text: must not be blank" in done.stderr
    assert not (tmp_path / "out").exists()
