# ruff: noqa: RUF001  (Chinese text, with its full-width commas)
"""The IndexTTS2 engine against the real library (indextts2-inference) on the CPU, with tiny random
weights made for the session (`tests/tiny_indextts2.py`) and fetched by `./bootstrap models`.

Random weights say nothing of how the speech sounds, but everything of how the library is driven:
its constructor and `infer`, its segmenter, its caches, its emotion model, its files. Two weights are
set so that lengths are exact: every segment the segmenter makes is `SAMPLES_PER_SEGMENT` samples,
and segments are joined by `interval_silence` ms of silence. What random weights cannot show (CUDA
out of memory, a poisoned CUDA context, accelerators this machine lacks) is tested against the
stand-in in `test_indextts2_stand_in.py`; the real weights on a GPU, in the `gpu` test at the end.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile

from tests.conftest import BUCKET, OPERATOR_ENV, ModelFiles
from tests.spy import Spy, spy
from tests.tiny_indextts2 import CODES_PER_SEGMENT, SAMPLES_PER_SEGMENT
from tts_contract.errors import InvalidRequest, UnreadableText
from tts_contract.schema import parse_request
from tts_worker.engines.base import GenerationOptions, VoiceInputs
from tts_worker.engines.voice_cache import ConditioningCache
from tts_worker.pipeline import generation_options, voice_inputs
from tts_worker.settings import Settings

RATE = 22050
SILENCE = RATE * 200 // 1000  # upstream's default interval_silence, 200 ms

pytestmark = pytest.mark.filterwarnings(
    # Upstream's own (its tokenizer, its models' configs, librosa's audioread importing aifc and
    # sunau): not ours to fix, and each test module that imports indextts meets them.
    "ignore:The tokens length of segment exceeds limit:RuntimeWarning",
    "ignore::FutureWarning",
    "ignore::UserWarning",
    "ignore::DeprecationWarning",
)


def length(segments: int, silence: int = SILENCE) -> int:
    """The samples of `segments` segments joined by silences, as the tiny model speaks them."""
    return segments * SAMPLES_PER_SEGMENT + (segments - 1) * silence


@pytest.fixture(scope="module")
def voices(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("voices")
    for name, freq in [("alice", 220), ("bob", 330), ("carol", 440)]:
        t = np.arange(16000) / 16000
        soundfile.write(directory / f"{name}.wav", 0.3 * np.sin(2 * np.pi * freq * t), 16000)
    return directory


@pytest.fixture(scope="module")
def settings(indextts2_files: ModelFiles, voices: Path) -> Settings:
    return Settings.from_env(
        {"TTS_ENGINE": "indextts2", "CHECKPOINTS_DIR": str(indextts2_files.checkpoints),
         "AUDIO_VOICES_DIR": str(voices), "DEFAULT_VOICE": "alice", "TTS_DEVICE": "cpu",
         "MAX_TOKENS_PER_SEGMENT": "120"}
    )  # fmt: skip


@pytest.fixture(scope="module")
def loaded(settings: Settings) -> Any:
    """One real model for the module (loading takes seconds)."""
    from tts_worker.engines.indextts2 import IndexTTS2Engine

    return IndexTTS2Engine(settings)


@pytest.fixture
def engine(loaded: Any, settings: Settings) -> Any:
    """The loaded engine with empty conditioning caches, as if just loaded."""
    for name in ("cache_spk_cond", "cache_spk_audio_prompt", "cache_emo_cond", "cache_emo_audio_prompt"):
        setattr(loaded._model, name, None)
    loaded.voices = ConditioningCache(loaded._model, size=settings.voice_cache_size)
    return loaded


def voice(settings: Settings, **fields: Any) -> VoiceInputs:
    return voice_inputs(parse_request({"text": "x", **fields}), settings)


def test_the_model_is_built_from_the_settings_and_speaks(engine: Any, settings: Settings) -> None:
    model = engine._model
    assert type(model).__module__ == "indextts.infer_v2"
    assert (engine.name, engine.sample_rate, engine.device, engine.clones_voices) == (
        "indextts2", RATE, "cpu", True,
    )  # fmt: skip
    assert model.model_dir == str(settings.checkpoints_dir)
    audio = engine.synthesize("Hello there.", voice(settings))
    assert audio.dtype == np.int16 and audio.ndim == 1
    assert len(audio) == length(1)
    assert np.abs(audio).max() > 0


def test_max_tokens_per_segment_reaches_the_real_segmenter(
    engine: Any, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = "One two three. Four five six. Seven eight nine. Ten eleven twelve."
    infer = spy(monkeypatch, engine._model, "infer")
    whole = engine.synthesize(text, voice(settings))
    engine._max_tokens = 20  # as MAX_TOKENS_PER_SEGMENT=20 would
    split = engine.synthesize(text, voice(settings))
    assert [call["max_text_tokens_per_segment"] for call in infer.calls] == [120, 20]
    assert len(whole) == length(1)
    segments = (len(split) + SILENCE) // (SAMPLES_PER_SEGMENT + SILENCE)
    assert segments > 1 and len(split) == length(segments)  # the real segmenter split the text


def test_every_request_field_reaches_the_library(
    engine: Any, settings: Settings, voices: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    request = parse_request(
        {"text": "Hi.", "speaker_voice": "bob", "emo_audio_prompt": "carol.wav", "emo_alpha": 0.4,
         "use_random": True, "interval_silence": 350, "temperature": 0.6, "top_p": 0.9, "top_k": 20,
         "max_mel_tokens": 1200}
    )  # fmt: skip
    infer = spy(monkeypatch, engine._model, "infer")
    generate = spy(monkeypatch, engine._model.gpt, "inference_speech")
    audio = engine.synthesize(
        "Hi there. And again.", voice_inputs(request, settings), generation_options(request, engine)
    )
    [call] = infer.calls
    assert call["spk_audio_prompt"] == str((voices / "bob.wav").resolve())
    assert call["emo_audio_prompt"] == str((voices / "carol.wav").resolve())
    assert (call["emo_alpha"], call["use_random"], call["output_path"]) == (0.4, True, None)
    # What the library did with them:
    assert engine._model.cache_spk_audio_prompt == call["spk_audio_prompt"]
    assert engine._model.cache_emo_audio_prompt == call["emo_audio_prompt"]  # the emotion from carol
    sampling = generate.calls[0]
    assert (sampling["temperature"], sampling["top_p"], sampling["top_k"]) == (0.6, 0.9, 20)
    assert sampling["max_generate_length"] == 1200
    silence = RATE * 350 // 1000
    segments = (len(audio) + silence) // (SAMPLES_PER_SEGMENT + silence)
    assert len(audio) == length(segments, silence)  # interval_silence made every gap


def test_max_mel_tokens_cuts_the_speech_short(engine: Any, settings: Settings) -> None:
    options = GenerationOptions(max_mel_tokens=CODES_PER_SEGMENT // 2)
    with pytest.warns(RuntimeWarning, match="generation stopped due to exceeding `max_mel_tokens`"):
        audio = engine.synthesize("Hello there.", voice(settings), options)
    assert 0 < len(audio) < length(1)


def test_defaults_leave_the_library_its_own(
    engine: Any, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    infer = spy(monkeypatch, engine._model, "infer")
    generate = spy(monkeypatch, engine._model.gpt, "inference_speech")
    engine.synthesize("Hi.", voice(settings), GenerationOptions())
    [call] = infer.calls
    assert call["spk_audio_prompt"].endswith("alice.wav")  # DEFAULT_VOICE when the request names none
    assert not {"interval_silence", "temperature", "top_p", "top_k", "max_mel_tokens"} & set(call)
    sampling = generate.calls[0]  # upstream's defaults, from infer_v2.py
    assert (sampling["temperature"], sampling["top_p"], sampling["top_k"]) == (0.8, 0.8, 30)
    assert sampling["max_generate_length"] == 1500


def test_an_emotion_vector_is_normalised_then_mixed_by_the_library(
    engine: Any, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tts_worker.engines.indextts2 import normalize_emo_vector

    infer = spy(monkeypatch, engine._model, "infer")
    reference = spy(monkeypatch, engine._model, "_get_emotion_conditioning")
    vector = [0.5, 0.2, 0, 0.9, 0, 0.3, 0.6, 1.0]
    audio = engine.synthesize("Hi.", voice(settings, emo_vector=vector, emo_audio_prompt="carol"))
    assert infer.calls[0]["emo_vector"] == pytest.approx(normalize_emo_vector(vector), abs=1e-12)
    # A vector overrides the emotion prompt: the library takes the emotion reference from the speaker.
    assert reference.calls[0]["args"][0].endswith("alice.wav")
    assert len(audio) == length(1)


def test_emotion_from_text_asks_the_real_emotion_model(
    engine: Any, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked = spy(monkeypatch, engine._model.qwen_emo, "inference")
    engine.synthesize("你好，世界。", voice(settings, use_emo_text=True, emo_text="What a surprise!"))
    engine.synthesize("Read my mood from me.", voice(settings, use_emo_text=True))
    assert [call["args"][0] for call in asked.calls] == ["What a surprise!", "Read my mood from me."]
    # The tiny emotion model answers every text so (surprised 0.6, happy 0.3): parsed by upstream.
    assert engine._model.qwen_emo.inference("x") == {
        "happy": 0.3, "angry": 0.0, "sad": 0.0, "afraid": 0.0, "disgusted": 0.0, "melancholic": 0.0,
        "surprised": 0.6, "calm": 0.0,
    }  # fmt: skip


@pytest.mark.parametrize("blank", ["", "   "])
def test_a_blank_emo_text_means_the_text_itself(
    engine: Any, settings: Settings, monkeypatch: pytest.MonkeyPatch, blank: str
) -> None:
    """As in the web UI: IndexTTS2 then reads the emotion from the text, not from ""."""
    asked = spy(monkeypatch, engine._model.qwen_emo, "inference")
    engine.synthesize("Spoken words.", replace(voice(settings, use_emo_text=True), emo_text=blank))
    assert [call["args"][0] for call in asked.calls] == ["Spoken words."]


def test_speaker_voice_is_required_when_there_is_no_default(engine: Any) -> None:
    with pytest.raises(InvalidRequest, match="speaker_voice: indextts2 speaks in a cloned voice"):
        engine.synthesize("Hi.", VoiceInputs())


def conditionings(monkeypatch: pytest.MonkeyPatch, engine: Any) -> Spy:
    """Counts the library's speaker analyses (each runs CAMPPlus once)."""
    return spy(monkeypatch, engine._model, "campplus_model")


def test_a_replaced_voice_file_is_analysed_again(
    engine: Any, settings: Settings, voices: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    analyses = conditionings(monkeypatch, engine)
    saved = tmp_path / "bob.wav"
    shutil.copy(voices / "bob.wav", saved)
    try:
        engine.synthesize("Same words.", voice(settings, speaker_voice="bob"))
        style = engine._model.cache_s2mel_style
        shutil.copy(voices / "carol.wav", voices / "bob.wav")  # same path, other voice
        engine.synthesize("Same words.", voice(settings, speaker_voice="bob"))
        assert len(analyses.calls) == 2  # upstream alone would have reused bob's, by path
        assert not np.allclose(style.detach().numpy(), engine._model.cache_s2mel_style.detach().numpy())
        engine.synthesize("Same words.", voice(settings, speaker_voice="carol"))
        assert len(analyses.calls) == 2  # carol's content, analysed under bob's name: reused
    finally:
        shutil.copy(saved, voices / "bob.wav")


def test_alternating_voices_reuse_their_conditionings(
    engine: Any, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    analyses = conditionings(monkeypatch, engine)
    emotions = spy(monkeypatch, engine._model, "extract_features")  # speaker and emotion analyses
    for name in ["alice", "bob", "carol"] * 3:
        engine.synthesize("Turn by turn.", voice(settings, speaker_voice=name))
    assert len(analyses.calls) == 3
    assert len(emotions.calls) == 6  # each voice once as speaker, once as its own emotion reference
    assert (engine.voices.speaker.hits, engine.voices.speaker.misses) == (6, 3)


def test_without_the_lru_alternating_voices_are_analysed_every_time(
    engine: Any, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine.voices = ConditioningCache(engine._model, size=0)
    analyses = conditionings(monkeypatch, engine)
    for name in ["alice", "bob"] * 2:
        engine.synthesize("Turn by turn.", voice(settings, speaker_voice=name))
    assert len(analyses.calls) == 4


def test_the_lru_forgets_the_least_recently_used(
    engine: Any, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine.voices = ConditioningCache(engine._model, size=2)
    analyses = conditionings(monkeypatch, engine)
    for name in ["alice", "bob", "carol", "alice"]:
        engine.synthesize("x y z.", voice(settings, speaker_voice=name))
    assert len(analyses.calls) == 4  # alice was evicted by carol
    engine.synthesize("x y z.", voice(settings, speaker_voice="carol"))
    assert len(analyses.calls) == 4


def test_text_with_nothing_to_speak_is_unreadable_not_a_crash(engine: Any, settings: Settings) -> None:
    """Text the tokenizer makes no token of (a zero-width space: punctuation alone does make
    tokens): indextts2-inference 2.1.1 then fails in torch.cat with a RuntimeError."""
    with pytest.raises(UnreadableText, match=r"text: IndexTTS2 found nothing to speak in '\\u200b'"):
        engine.synthesize("\u200b", voice(settings))


def test_unreadable_text_fails_the_job_naming_the_text(
    engine: Any, settings: Settings, tmp_path: Path
) -> None:
    from tts_worker.pipeline import Services, run_job
    from tts_worker.storage import make_storage

    local = replace(settings, output_storage="local", output_audio_dir=tmp_path / "audio")
    services = Services(settings=local, engine=engine, storage=make_storage(local))
    with pytest.raises(UnreadableText, match=r"nothing to speak in '\\u200b\\u200b'"):
        run_job(parse_request({"text": "\u200b\u200b"}), services, job_id="unreadable")


def test_infer_returning_none_is_unreadable(
    engine: Any, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`infer` returns None when its generator yields nothing (it catches IndexError for that)."""
    monkeypatch.setattr(engine._model, "infer", lambda *args, **kwargs: None)
    with pytest.raises(UnreadableText, match=r"nothing to speak in 'Silent\.'"):
        engine.synthesize("Silent.", voice(settings))


def test_a_model_without_the_cache_attributes_is_refused(loaded: Any) -> None:
    """Should upstream rename one, the LRU would write a name the model never reads: stale voices."""
    model = loaded._model
    mel = model.__dict__.pop("cache_mel")
    try:
        with pytest.raises(RuntimeError, match="has no cache_mel: its voice caches changed"):
            ConditioningCache(model, size=4)
    finally:
        model.cache_mel = mel


def test_the_library_loads_offline_from_what_bootstrap_models_fetched(
    indextts2_files: ModelFiles,
) -> None:
    """With HF_HUB_OFFLINE=1 and a Hugging Face cache holding only what `./bootstrap models fetch`
    put there, IndexTTS2 loads; and it opens every weight file fetched (those it reads from Python:
    sentencepiece and safetensors open theirs in native code, which the audit hook does not see)."""
    from tts_worker.models.check import verify_model_files

    assert verify_model_files(indextts2_files.checkpoints, hashes=True) == []
    code = f"""
import json, sys
opened = set()
sys.addaudithook(lambda event, args: opened.add(str(args[0])) if event == "open" else None)
from indextts.infer_v2 import IndexTTS2
IndexTTS2(model_dir={str(indextts2_files.checkpoints)!r}, device="cpu")
print(json.dumps(sorted(opened)))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    opened = {Path(p).resolve() for p in json.loads(done.stdout.strip().splitlines()[-1])}
    fetched = [p for root in (indextts2_files.checkpoints, indextts2_files.hub_cache)
               for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")]  # fmt: skip
    # (the hub cache's files are links to blobs named by their digest: the suffix is the link's)
    weights = {p.resolve() for p in fetched if p.suffix in {".pth", ".pt", ".bin", ".yaml"}}
    assert len(weights) == 8  # config.yaml, gpt, s2mel, feat1, feat2, w2v stats, campplus, bigvgan
    assert weights - opened == set(), "fetched but never loaded"


# --- whole jobs through a real worker process -------------------------------------------------------


@pytest.fixture(scope="module")
def indextts2_worker(start_worker: Any, indextts2_files: ModelFiles, voices: Path) -> Any:
    """`celery -A tts_worker worker` with TTS_ENGINE=indextts2, the real library, on the CPU."""
    return start_worker(
        TTS_ENGINE="indextts2", CHECKPOINTS_DIR=str(indextts2_files.checkpoints), TTS_DEVICE="cpu",
        AUDIO_VOICES_DIR=str(voices), DEFAULT_VOICE="alice", WORKER_PROC_ALIVE_TIMEOUT="300",
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    "fields",
    [
        {"text": "A cloned voice.", "speaker_voice": "bob"},
        {"text": "With feeling.", "emo_vector": [0, 0, 0, 0, 0, 0, 0.8, 0.2], "emo_alpha": 0.7},
        {"text": "Read my mood.", "use_emo_text": True, "emo_audio_prompt": "carol"},
        {"text": "你好，世界。今天天气很好。"},
    ],
    ids=["cloned-voice", "emotion-vector", "emotion-from-text", "chinese"],
)
def test_whole_jobs_through_a_real_worker(indextts2_worker: Any, s3: Any, fields: dict[str, Any]) -> None:
    outcome = indextts2_worker.tts.delay(**fields, output_format="wav").get(timeout=240)
    assert outcome["status"] == "completed"
    meta = outcome["metadata"]
    assert (meta["engine"], meta["device"]) == ("indextts2", "cpu")
    stored = s3.get_object(Bucket=BUCKET, Key=outcome["s3_key"])["Body"].read()
    audio, rate = soundfile.read(io.BytesIO(stored), dtype="int16")
    assert rate == meta["sample_rate"]
    assert meta["duration"] == pytest.approx(len(audio) / rate, abs=0.01)
    assert meta["duration"] == pytest.approx(SAMPLES_PER_SEGMENT / RATE, abs=0.005)  # one segment


@pytest.mark.slow
def test_the_worker_log_has_no_progress_bars(indextts2_worker: Any) -> None:
    """The library draws a tqdm bar per segment; a worker would log every redraw as a line."""
    indextts2_worker.tts.delay(text="One. Two. Three.").get(timeout=240)
    log = indextts2_worker.process.log()
    assert "indextts2" in log and "it/s]" not in log and "%|" not in log


# --- the real weights, where a GPU and the checkpoints are ------------------------------------------


def _real_model_available() -> tuple[bool, str]:
    """Skip only for what a machine lacks (CUDA, the checkpoints); a broken install fails instead."""
    checkpoints = Path(OPERATOR_ENV.get("CHECKPOINTS_DIR", "checkpoints"))
    missing = [name for name in ("indextts", "torch") if importlib.util.find_spec(name) is None]
    if missing:
        return False, f"needs the gpu extra (no {', '.join(missing)})"
    import torch

    if not torch.cuda.is_available():
        return False, "needs CUDA"
    if not (checkpoints / "config.yaml").is_file():
        return False, f"needs the IndexTTS2 checkpoints in {checkpoints} (./bootstrap models)"
    return True, ""


REAL_JOB = """
import json, sys
from tts_contract.schema import parse_request
from tts_worker import runtime
from tts_worker.pipeline import run_job
request = parse_request({"text": "The real model, on a real GPU.", "output_format": "wav"})
result = run_job(request, runtime.services(), job_id="gpu-test")
print(json.dumps(result))
"""


@pytest.mark.gpu
@pytest.mark.timeout(1500)  # loading the real model takes minutes
def test_real_model_speaks_through_the_whole_pipeline(tmp_path: Path) -> None:
    """The real model offline, as the worker runs it (HF_HUB_OFFLINE=1, which huggingface_hub reads
    at import: hence a process of its own), through run_job: warm-up, synthesis, encoding, storage."""
    available, reason = _real_model_available()
    if not available:
        pytest.skip(reason)
    env = {**OPERATOR_ENV, "TTS_ENGINE": "indextts2", "HF_HUB_OFFLINE": "1", "OUTPUT_STORAGE": "local",
           "OUTPUT_AUDIO_DIR": str(tmp_path / "audio")}  # fmt: skip
    assert Settings.from_env(env).default_voice, "set DEFAULT_VOICE to a reference voice in AUDIO_VOICES_DIR"
    done = subprocess.run(
        [sys.executable, "-c", REAL_JOB], env=env, capture_output=True, text=True, timeout=1200, check=False
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["status"] == "completed" and result["metadata"]["engine"] == "indextts2"
    assert result["metadata"]["device"].startswith("cuda")
    audio, rate = soundfile.read(tmp_path / "audio" / "gpu-test.wav", dtype="int16")
    assert rate == result["metadata"]["sample_rate"]
    assert 1.0 < len(audio) / rate < 10
    assert np.sqrt(np.mean(audio.astype(np.float64) ** 2)) > 300
