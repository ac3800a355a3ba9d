# ruff: noqa: RUF001  (Chinese and Japanese text, with full-width punctuation)
"""The IndexTTS-2.5 engine against the real library (indextts25-inference) on the CPU, with tiny random
weights made for the session (`tests/tiny_indextts25.py`) and fetched by `./bootstrap models` with
TTS_ENGINE=indextts25. Segments have an exact length (`samples_per_segment`), so the audio's length
tells what the library did with the segment size and the speed.

The library compiles a language's text normalisation grammar at its first use (about 30 s for
English here, cached under ~/.cache/indextts25 for later runs); Arabic has none, so most tests speak
Arabic or English.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile

from tests.conftest import BUCKET, ModelFiles
from tests.spy import spy
from tests.tiny_indextts25 import samples_per_segment
from tts_contract.errors import InvalidRequest, UnreadableText
from tts_contract.schema import parse_request
from tts_worker.engines.base import GenerationOptions
from tts_worker.pipeline import generation_options, voice_inputs
from tts_worker.settings import Settings

RATE = 22050
SILENCE = RATE * 200 // 1000

pytestmark = pytest.mark.filterwarnings(
    # Upstream's own (transformers on the GPT-2 arguments indextts25 passes, librosa's audioread
    # importing aifc and sunau): not ours to fix.
    "ignore::FutureWarning",
    "ignore::UserWarning",
    "ignore::DeprecationWarning",
)


def length(segments: int, speed: float = 1.0, silence: int = SILENCE) -> int:
    return segments * samples_per_segment(speed) + (segments - 1) * silence


@pytest.fixture(scope="module")
def voices(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("voices")
    for name, freq in [("alice", 220), ("bob", 330)]:
        t = np.arange(16000) / 16000
        soundfile.write(directory / f"{name}.wav", 0.3 * np.sin(2 * np.pi * freq * t), 16000)
    return directory


@pytest.fixture(scope="module")
def settings(indextts25_files: ModelFiles, voices: Path) -> Settings:
    return Settings.from_env(
        {"TTS_ENGINE": "indextts25", "CHECKPOINTS_DIR": str(indextts25_files.checkpoints),
         "AUDIO_VOICES_DIR": str(voices), "DEFAULT_VOICE": "alice", "TTS_DEVICE": "cpu",
         "MAX_TOKENS_PER_SEGMENT": "120"}
    )  # fmt: skip


@pytest.fixture(scope="module")
def engine(settings: Settings) -> Any:
    from tts_worker.engines.indextts25 import IndexTTS25Engine

    return IndexTTS25Engine(settings)


def speak(engine: Any, settings: Settings, **fields: Any) -> Any:
    request = parse_request({"text": "x", **fields})
    return engine.synthesize(
        request.text, voice_inputs(request, settings), generation_options(request, engine)
    )


def test_the_model_is_built_from_the_settings_and_speaks(engine: Any) -> None:
    assert type(engine._model).__module__ == "indextts25.api"
    assert (engine.name, engine.sample_rate, engine.device, engine.clones_voices) == (
        "indextts25", RATE, "cpu", True,
    )  # fmt: skip
    assert engine.languages == ("ar", "en", "es", "ja", "zh")


def test_language_and_voice_reach_the_library(
    engine: Any, settings: Settings, voices: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = spy(monkeypatch, engine._model, "stream")
    audio = speak(engine, settings, text="مرحبا بالعالم.", language="ar", speaker_voice="bob")
    [call] = stream.calls
    assert (call["lang"], call["voice"]) == ("ar", str((voices / "bob.wav").resolve()))
    assert audio.dtype == np.int16 and len(audio) == length(1)
    assert np.abs(audio).max() > 0


@pytest.mark.parametrize(
    ("language", "text"), [("ja", "こんにちは、世界。"), ("zh", "你好，世界。"), ("ar", "مرحبا بالعالم.")]
)
def test_each_language_goes_through_the_librarys_own_text_handling(
    engine: Any, settings: Settings, monkeypatch: pytest.MonkeyPatch, language: str, text: str
) -> None:
    """Japanese through fugashi, Chinese through WeTextProcessing (the gpu25 extra brings both);
    Spanish and English through NeMo grammars, which take half a minute each to compile here."""
    stream = spy(monkeypatch, engine._model, "stream")
    audio = speak(engine, settings, text=text, language=language)
    assert stream.calls[0]["lang"] == language and len(audio) == length(1)


def test_english_is_the_default_language(
    engine: Any, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = spy(monkeypatch, engine._model, "stream")
    audio = speak(engine, settings, text="Hello there.")
    assert stream.calls[0]["lang"] == "en" and len(audio) == length(1)


@pytest.mark.parametrize("speed", [0.5, 0.8, 1.25])
def test_speed_changes_the_length_as_the_library_does(engine: Any, settings: Settings, speed: float) -> None:
    audio = speak(engine, settings, text="مرحبا.", language="ar", speed=speed)
    assert len(audio) == length(1, speed)  # 2.0 would be twice as fast: the inverse duration factor


def test_a_speed_the_engine_cannot_reach_names_the_field(engine: Any) -> None:
    request = parse_request({"text": "Hi.", "speed": 2.0})
    with pytest.raises(
        InvalidRequest, match=r"speed: TTS_ENGINE=indextts25 speaks from 0.5 to 1.25, not at 2.0"
    ):
        generation_options(request, engine)


def test_segment_size_and_interval_silence_reach_the_library(engine: Any, settings: Settings) -> None:
    text = "واحد اثنان ثلاثة. أربعة خمسة ستة. سبعة ثمانية تسعة. عشرة أحد عشر اثنا عشر."
    whole = speak(engine, settings, text=text, language="ar")
    engine._max_tokens = 20  # as MAX_TOKENS_PER_SEGMENT=20 would
    try:
        split = speak(engine, settings, text=text, language="ar", interval_silence=300)
    finally:
        engine._max_tokens = 120
    silence = RATE * 300 // 1000
    before = (len(whole) + SILENCE) // (samples_per_segment() + SILENCE)
    after = (len(split) + silence) // (samples_per_segment() + silence)
    assert len(whole) == length(before) and len(split) == length(after, silence=silence)
    assert after > before  # the library's segmenter split the text finer


def test_sampling_options_and_the_emotion_reach_the_library(
    engine: Any, settings: Settings, voices: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tts_worker.engines.indextts2 import normalize_emo_vector

    generate = spy(monkeypatch, engine._model._tts, "infer_generator")
    vector = [0.5, 0.2, 0, 0.9, 0, 0.3, 0.6, 1.0]
    speak(engine, settings, text="مرحبا.", language="ar", emo_vector=vector, emo_alpha=0.5,
          temperature=0.6, top_p=0.9, top_k=20, use_random=True)  # fmt: skip
    speak(engine, settings, text="مرحبا.", language="ar", emo_audio_prompt="bob", emo_alpha=0.7)
    first, second = generate.calls
    assert first["emo_vector"] == pytest.approx(normalize_emo_vector(vector), abs=1e-12)
    assert (first["temperature"], first["top_p"], first["top_k"], first["use_random"]) == (0.6, 0.9, 20, True)
    assert first["emo_alpha"] == 0.5
    assert (second["emo_audio_prompt"], second["emo_alpha"]) == (str((voices / "bob.wav").resolve()), 0.7)


def test_emotion_from_text_is_refused_naming_the_field(engine: Any, settings: Settings) -> None:
    with pytest.raises(InvalidRequest, match="use_emo_text: indextts25 has no model that reads the emotion"):
        speak(engine, settings, text="Hi.", use_emo_text=True)


def test_text_with_nothing_to_speak_is_unreadable(engine: Any, settings: Settings) -> None:
    with pytest.raises(UnreadableText, match=r"text: IndexTTS-2.5 found nothing to speak in '…!'"):
        engine.synthesize("…!", voice_inputs(parse_request({"text": "x"}), settings), GenerationOptions())


def test_a_language_no_engine_speaks_is_refused_before_enqueueing() -> None:
    with pytest.raises(InvalidRequest, match="language"):
        parse_request({"text": "Bonjour.", "language": "fr"})


# --- whole jobs through a real worker process -------------------------------------------------------


@pytest.fixture(scope="module")
def indextts25_worker(start_worker: Any, indextts25_files: ModelFiles, voices: Path) -> Any:
    """`celery -A tts_worker worker` with TTS_ENGINE=indextts25, the real library, on the CPU."""
    return start_worker(
        TTS_ENGINE="indextts25", CHECKPOINTS_DIR=str(indextts25_files.checkpoints), TTS_DEVICE="cpu",
        AUDIO_VOICES_DIR=str(voices), DEFAULT_VOICE="alice", WORKER_PROC_ALIVE_TIMEOUT="300",
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fields", "speed"),
    [
        ({"text": "مرحبا بالعالم.", "language": "ar", "speaker_voice": "bob"}, 1.0),
        ({"text": "مرحبا.", "language": "ar", "speed": 0.8, "emo_vector": [0, 0, 0, 0, 0, 0, 0.8, 0.2]}, 0.8),
        ({"text": "Hello from the queue."}, 1.0),
    ],
    ids=["arabic-cloned-voice", "slower-with-emotion", "english"],
)
def test_whole_jobs_through_a_real_worker(
    indextts25_worker: Any, s3: Any, fields: dict[str, Any], speed: float
) -> None:
    outcome = indextts25_worker.tts.delay(**fields, output_format="wav").get(timeout=240)
    assert outcome["status"] == "completed"
    meta = outcome["metadata"]
    assert (meta["engine"], meta["device"]) == ("indextts25", "cpu")
    stored = s3.get_object(Bucket=BUCKET, Key=outcome["s3_key"])["Body"].read()
    audio, rate = soundfile.read(io.BytesIO(stored), dtype="int16")
    assert rate == meta["sample_rate"]
    assert meta["duration"] == pytest.approx(len(audio) / rate, abs=0.01)
    assert meta["duration"] == pytest.approx(samples_per_segment(speed) / RATE, abs=0.005)


@pytest.mark.slow
def test_a_job_asking_for_what_the_engine_cannot_fails_at_once_naming_the_field(
    indextts25_worker: Any,
) -> None:
    sent = indextts25_worker.tts.delay(text="Too fast.", speed=3.0)
    with pytest.raises(InvalidRequest, match=r"speed: TTS_ENGINE=indextts25 speaks from 0\.5 to 1\.25"):
        sent.get(timeout=120)
    assert indextts25_worker.tts.delay(text="Still serving.").get(timeout=240)["status"] == "completed"
