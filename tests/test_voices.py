"""Voice names are resolved inside AUDIO_VOICES_DIR only, and must name usable audio."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile

from tts_contract.errors import InvalidRequest, UnknownVoice
from tts_worker.voices import available_voices, resolve_voice


@pytest.fixture
def voices(tmp_path: Path) -> Path:
    directory = tmp_path / "voices"
    directory.mkdir()
    tone = 0.2 * np.sin(np.arange(8000) / 8000 * 2 * np.pi * 200)
    soundfile.write(directory / "alice.wav", tone, 8000)
    soundfile.write(directory / "bob.flac", tone, 8000)
    soundfile.write(directory / "long.wav", np.zeros(8000 * 5), 8000)
    soundfile.write(directory / "empty.wav", np.zeros(0), 8000)
    (directory / "notes.wav").write_text("not audio at all")
    (tmp_path / "secret.wav").write_bytes((directory / "alice.wav").read_bytes())
    (directory / "escape.wav").symlink_to(tmp_path / "secret.wav")
    (directory / "inside.wav").symlink_to(directory / "alice.wav")
    (directory / "loop.wav").symlink_to(directory / "loop.wav")  # in the listing of every refusal
    return directory


def resolve(name: str, voices: Path) -> Path:
    return resolve_voice(name, voices, field="speaker_voice", max_seconds=4)


def test_extension_is_optional_and_detected(voices: Path) -> None:
    assert resolve("alice", voices) == (voices / "alice.wav").resolve()
    assert resolve("alice.wav", voices) == (voices / "alice.wav").resolve()
    assert resolve("bob", voices) == (voices / "bob.flac").resolve()


def test_symlink_that_stays_inside_is_fine(voices: Path) -> None:
    assert resolve("inside", voices) == (voices / "alice.wav").resolve()


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("../secret.wav", "plain file name"),
        ("../secret", "plain file name"),
        ("/etc/passwd", "plain file name"),
        ("sub/alice.wav", "plain file name"),
        ("alice\x00.wav", "plain file name"),
        ("..", "plain file name"),
        ("", "plain file name"),
        ("escape", "leads outside AUDIO_VOICES_DIR"),
        ("carol", "no voice 'carol'"),
        ("notes", "not readable audio"),
        ("empty", "holds no audio"),
        ("long", "lasts 5.0 s"),
        ("x" * 300, "no voice 'xxxx"),  # too long for the file system: a refusal, not an OSError
        ("loop", "no voice 'loop'"),  # a symlink loop
    ],
)
def test_refusals_say_why(voices: Path, name: str, words: str) -> None:
    with pytest.raises(UnknownVoice) as caught:
        resolve(name, voices)
    assert words in str(caught.value)
    assert str(caught.value).startswith("speaker_voice: ")
    assert caught.value.field == "speaker_voice"
    assert isinstance(caught.value, InvalidRequest)
    # Every refusal lists the voices a request may name: not the link out, not the broken files.
    assert str(caught.value).endswith("; available: alice.wav, bob.flac, inside.wav")
    assert str(voices.parent) not in str(caught.value) and len(str(caught.value)) < 300  # no disk layout


def test_available_voices_are_those_that_resolve(voices: Path) -> None:
    (voices / "folder.wav").mkdir()
    (voices / "readme.txt").write_text("not a voice")
    assert available_voices(voices, max_seconds=4) == ["alice.wav", "bob.flac", "inside.wav"]
    assert available_voices(voices, max_seconds=10) == ["alice.wav", "bob.flac", "inside.wav", "long.wav"]
    for name in available_voices(voices, max_seconds=4):
        assert resolve(name, voices).is_file()


def test_missing_directory_says_so(tmp_path: Path) -> None:
    with pytest.raises(UnknownVoice, match="no voices are installed there"):
        resolve("alice", tmp_path / "nowhere")
    assert available_voices(tmp_path / "nowhere", max_seconds=60) == []
