"""The producer: its public API, its lightness, and every request rule (nothing is sent when one breaks)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import redis

import producer
from devtools.stack import RedisServer
from producer import InvalidRequest, TTSRequest, parse_request
from producer.app import TTSTask, create_app
from producer.config import ConfigError, ProducerConfig
from tests.conftest import databases

VALID = {"text": "Hello there."}

# (fields, the field the error must name, words the rule must contain)
BAD_REQUESTS: list[tuple[dict[str, Any], str, str]] = [
    ({}, "text", "required"),
    ({"text": "   \n"}, "text", "blank"),
    ({"text": 42}, "text", "string"),
    ({"text": "x" * 10_001}, "text", "at most 10000"),
    ({**VALID, "speaker_voice": "../etc/passwd"}, "speaker_voice", "plain file name"),
    ({**VALID, "speaker_voice": "/abs/alice.wav"}, "speaker_voice", "plain file name"),
    ({**VALID, "speaker_voice": "a\\b.wav"}, "speaker_voice", "plain file name"),
    ({**VALID, "speaker_voice": "al\x00ice"}, "speaker_voice", "NUL"),
    ({**VALID, "speaker_voice": ".."}, "speaker_voice", "plain file name"),
    ({**VALID, "emo_audio_prompt": "x/y.wav"}, "emo_audio_prompt", "plain file name"),
    ({**VALID, "emo_vector": [0.1] * 7}, "emo_vector", "exactly 8"),
    ({**VALID, "emo_vector": [0.1] * 7 + [1.5]}, "emo_vector", "less than or equal to 1"),
    ({**VALID, "emo_vector": [0.1] * 7 + [float("nan")]}, "emo_vector", "finite"),
    ({**VALID, "emo_vector": [0.1] * 7 + [-0.1]}, "emo_vector", "greater than or equal to 0"),
    ({**VALID, "emo_vector": "happy"}, "emo_vector", "list"),
    ({**VALID, "emo_alpha": 1.01}, "emo_alpha", "less than or equal to 1"),
    ({**VALID, "emo_alpha": float("inf")}, "emo_alpha", "finite"),
    ({**VALID, "use_emo_text": "yes"}, "use_emo_text", "boolean"),
    ({**VALID, "emo_text": "x" * 1001}, "emo_text", "at most 1000"),
    ({**VALID, "use_random": 1}, "use_random", "boolean"),
    ({**VALID, "enable_chunking": "true"}, "enable_chunking", "boolean"),
    ({**VALID, "max_chars_per_chunk": 49}, "max_chars_per_chunk", "greater than or equal to 50"),
    ({**VALID, "max_chars_per_chunk": 1001}, "max_chars_per_chunk", "less than or equal to 1000"),
    ({**VALID, "max_chars_per_chunk": 300.5}, "max_chars_per_chunk", "integer"),
    ({**VALID, "enable_crossfade": None}, "enable_crossfade", "boolean"),
    ({**VALID, "crossfade_ms": -1}, "crossfade_ms", "greater than or equal to 0"),
    ({**VALID, "crossfade_ms": 1001}, "crossfade_ms", "less than or equal to 1000"),
    ({**VALID, "output_format": "ogg"}, "output_format", "opus"),
    ({**VALID, "bitrate": "fast"}, "bitrate", "128k"),
    ({**VALID, "bitrate": "\uff11\uff12\uff18k"}, "bitrate", "ASCII digits"),  # full-width 128k
    ({**VALID, "bitrate": "1" * 100_000 + "k"}, "bitrate", "(100001 characters)"),
    ({**VALID, "speaker_voice": "v" * 1_000_000}, "speaker_voice", "(1000000 characters)"),
    ({**VALID, "speaker_voice": "v" * 241}, "speaker_voice", "at most 240 bytes"),
    ({**VALID, "emo_audio_prompt": "v" * 1_000_000}, "emo_audio_prompt", "(1000000 characters)"),
    ({"text": ["w" * 1_000_000]}, "text", "characters as text)"),
    ({"text": {"k": "w" * 1_000_000}}, "text", "characters as text)"),
    ({**VALID, "bitrate": "300k"}, "bitrate", "6k to 256k"),
    ({**VALID, "output_format": "mp3", "bitrate": "192k"}, "bitrate", "at 24000 Hz allows 8k, 16k, "),
    ({**VALID, "output_format": "mp3", "bitrate": "150k"}, "bitrate", "144k or 160k (got '150k')"),
    ({**VALID, "output_format": "mp3", "sample_rate": 44100, "bitrate": "384k"}, "bitrate", "256k or 320k"),
    ({**VALID, "output_format": "mp3", "sample_rate": 8000, "bitrate": "80k"}, "bitrate", "56k or 64k"),
    ({**VALID, "output_format": "aac", "bitrate": "320k"}, "bitrate", "aac at 24000 Hz allows 16k to 144k"),
    ({**VALID, "output_format": "aac", "sample_rate": 8000, "bitrate": "64k"}, "bitrate", "16k to 48k"),
    ({**VALID, "output_format": "aac", "bitrate": "8k"}, "bitrate", "16k to 144k"),
    ({**VALID, "output_format": "wav", "bitrate": "128k"}, "bitrate", "lossless"),
    ({**VALID, "output_format": "flac", "bitrate": "64k"}, "bitrate", "lossless"),
    ({**VALID, "sample_rate": 22050}, "sample_rate", "opus allows 8000, 12000, 16000, 24000, 48000"),
    ({**VALID, "output_format": "wav", "sample_rate": 96000}, "sample_rate", "wav allows"),
    ({**VALID, "sample_rate": "24000"}, "sample_rate", "integer"),
    ({**VALID, "session_id": "a/b"}, "session_id", "pattern"),
    ({**VALID, "session_id": ""}, "session_id", "pattern"),
    ({**VALID, "session_id": "x" * 129}, "session_id", "pattern"),
    ({**VALID, "presign_expires_s": 59}, "presign_expires_s", "greater than or equal to 60"),
    ({**VALID, "presign_expires_s": 604_801}, "presign_expires_s", "less than or equal to 604800"),
    ({**VALID, "speakr_voice": "alice"}, "speakr_voice", "did you mean 'speaker_voice'"),
    ({**VALID, "colour": "blue"}, "colour", "unknown field"),
]


def test_public_api_is_pinned() -> None:
    assert sorted(producer.__all__) == sorted(
        [
            "BACKFILL_QUEUE", "INTERACTIVE_QUEUE", "TASK_NAME", "EncoderKilled", "EncodingError",
            "EngineUnusable", "GPUOutOfMemory", "InvalidRequest", "JobTimeLimitExceeded", "PermanentError",
            "PoisonedJob", "QueueUnavailable", "SessionTaken", "StorageError", "TTSError", "TTSRequest",
            "TransientError", "UnknownVoice", "UnreadableText", "app", "parse_request", "synthesize", "tts",
        ]
    )  # fmt: skip
    for name in producer.__all__:
        assert getattr(producer, name) is not None
    assert issubclass(InvalidRequest, ValueError)
    assert issubclass(InvalidRequest, producer.PermanentError)
    assert issubclass(producer.StorageError, producer.TransientError)
    assert issubclass(producer.QueueUnavailable, producer.TransientError)
    assert issubclass(producer.EncoderKilled, producer.TransientError)


def test_importing_producer_stays_light() -> None:
    code = (
        "import sys, producer; producer.tts; producer.app.conf.broker_url;"
        "heavy = ('torch', 'numpy', 'soundfile', 'boto3', 'tts_worker', 'indextts');"
        "print([m for m in heavy if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(("fields", "field", "rule"), BAD_REQUESTS, ids=lambda v: str(v)[:40])
def test_bad_request_names_field_and_rule(fields: dict[str, Any], field: str, rule: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_request(fields)
    assert caught.value.field == field
    assert f"{field}" in str(caught.value)
    assert rule in str(caught.value)
    assert len(str(caught.value)) < 400  # a value is echoed in part, never whole


def test_every_field_can_be_set() -> None:
    request = parse_request(
        {
            "text": "Hi.", "speaker_voice": "alice", "emo_audio_prompt": "bob.wav", "emo_vector": (0,) * 8,
            "emo_alpha": 0.5, "use_emo_text": True, "emo_text": "cheerful", "use_random": True,
            "enable_chunking": False, "max_chars_per_chunk": 50, "enable_crossfade": False, "crossfade_ms": 0,
            "output_format": "mp3", "bitrate": "64k", "sample_rate": 16000, "session_id": "abc-1.2_3",
            "presign_expires_s": 60,
        }
    )  # fmt: skip
    assert request.emo_vector == [0.0] * 8
    assert request.effective_bitrate == "64k"
    assert json.loads(json.dumps(request.to_message()))["emo_vector"] == [0.0] * 8


def test_defaults_follow_the_format() -> None:
    opus = parse_request(VALID)
    assert (opus.output_format, opus.effective_bitrate, opus.effective_sample_rate) == ("opus", "128k", 24000)
    wav = parse_request({**VALID, "output_format": "wav"})
    assert wav.effective_bitrate is None
    # 128k, unless the codec cannot carry that much at the output rate
    lowered = [("mp3", 8000, "64k"), ("aac", 8000, "48k"), ("aac", 16000, "96k"),
               ("aac", 24000, "128k"), ("mp3", 16000, "128k"), ("opus", 8000, "128k")]  # fmt: skip
    for fmt, rate, bitrate in lowered:
        request = parse_request({**VALID, "output_format": fmt, "sample_rate": rate})
        assert request.effective_bitrate == bitrate
    assert opus.to_message() == VALID  # only what the caller set travels


def test_text_limit_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAX_TEXT_CHARS", "20")
    limited = TTSTask(create_app(ProducerConfig.from_env(), name="limited"))
    with pytest.raises(InvalidRequest, match=r"text: .*at most 20 characters"):
        limited.delay(text="x" * 21)  # refused before any broker is reached
    monkeypatch.setenv("MAX_TEXT_CHARS", "lots")
    with pytest.raises(ConfigError, match="MAX_TEXT_CHARS"):
        ProducerConfig.from_env()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"PRODUCER_CONNECT_TIMEOUT_S": "0"},
            "PRODUCER_CONNECT_TIMEOUT_S must be a number of seconds from 1 to 300",
        ),
        ({"PRODUCER_CONNECT_TIMEOUT_S": "soon"}, "PRODUCER_CONNECT_TIMEOUT_S must be"),
        ({"CELERY_BROKER_URL": "sentinel://s1:26379/0"}, "REDIS_SENTINEL_MASTER must name"),
    ],
)
def test_bad_producer_settings_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ProducerConfig.from_env(env)


def test_request_model_is_frozen() -> None:
    request = parse_request(VALID)
    with pytest.raises(ValueError, match="frozen"):
        request.text = "changed"  # type: ignore[misc]
    assert isinstance(request, TTSRequest)


@pytest.fixture(scope="module")
def unserved_db() -> int:
    return next(databases)


@pytest.fixture
def unserved(redis_server: RedisServer, unserved_db: int) -> Iterator[tuple[TTSTask, redis.Redis]]:
    """A producer on databases no worker reads, and a client of its broker database, emptied first:
    what is sent stays there."""
    config = ProducerConfig(
        broker_url=f"{redis_server.url}/{unserved_db}", result_backend=f"{redis_server.url}/{unserved_db + 1}"
    )
    app = create_app(config, name="unserved")
    client = redis.Redis.from_url(config.broker_url)
    client.flushdb()
    yield TTSTask(app), client
    client.close()
    app.close()


@pytest.mark.parametrize(("fields", "field", "rule"), BAD_REQUESTS, ids=lambda v: str(v)[:40])
def test_nothing_is_enqueued_for_a_bad_request(
    fields: dict[str, Any], field: str, rule: str, unserved: tuple[TTSTask, redis.Redis]
) -> None:
    tts, broker = unserved
    with pytest.raises(InvalidRequest, match=field):
        tts.delay(**fields)
    with pytest.raises(InvalidRequest, match=field):
        tts.apply_async(kwargs=fields, priority=3)
    assert [k for k in broker.scan_iter() if not k.startswith(b"_kombu.binding.")] == []


@pytest.mark.parametrize("task_id", ["x" * 129, "backfill:book:7"])
def test_a_task_id_that_would_name_the_audio_must_be_a_plain_name(
    task_id: str, unserved: tuple[TTSTask, redis.Redis]
) -> None:
    tts, broker = unserved
    with pytest.raises(
        InvalidRequest, match=r"task_id: names the audio when session_id is not set"
    ) as caught:
        tts.apply_async(kwargs={"text": "Hello."}, task_id=task_id)
    assert caught.value.field == "task_id"
    assert broker.llen("tts") == 0
    tts.apply_async(
        kwargs={"text": "Hello.", "session_id": "order-1234"}, task_id=task_id
    )  # it names nothing
    assert broker.llen("tts") == 1


@pytest.mark.parametrize("task_id", ["orders/1234", "a b", "", "x" * 201, "../up", "ok\nERROR forged line"])
def test_every_task_id_is_checked_session_id_or_not(
    task_id: str, unserved: tuple[TTSTask, redis.Redis]
) -> None:
    tts, broker = unserved
    for fields in ({"text": "Hello."}, {"text": "Hello.", "session_id": "order-1234"}):
        with pytest.raises(InvalidRequest, match=r"task_id: must match") as caught:
            tts.apply_async(kwargs=fields, task_id=task_id)
        assert caught.value.field == "task_id" and "\n" not in str(caught.value)
    assert broker.llen("tts") == 0


def test_a_good_request_is_enqueued_by_name(unserved: tuple[TTSTask, redis.Redis]) -> None:
    tts, broker = unserved
    result = tts.apply_async(kwargs={"text": "Hello."}, task_id="fixed-id")
    assert result.id == "fixed-id"
    [raw] = broker.lrange("tts", 0, -1)
    message = json.loads(raw)
    assert message["headers"]["task"] == "tts.synthesize"
    assert message["headers"]["id"] == "fixed-id"
    with pytest.raises(TypeError, match="keyword"):
        tts.apply_async(("Hello",))
