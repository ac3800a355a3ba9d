"""Settings are read once, validated, and a bad value stops the worker naming the variable."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tts_worker.celery import worker_config
from tts_worker.settings import Settings, SettingsError

MINIMAL = {"S3_BUCKET_NAME": "audio"}


def test_defaults() -> None:
    settings = Settings.from_env(MINIMAL)
    assert settings.tts_engine == "piper"
    assert settings.celery_result_backend == settings.celery_broker_url
    assert settings.task_time_limit_s > settings.task_soft_time_limit_s
    assert (settings.recovery_s, settings.storage_retry_s, settings.result_retry_s) == (60, 120, 300)
    assert settings.metrics_address == "127.0.0.1"  # metrics reach another host only when asked to
    assert settings.audio_voices_dir == Path("voices")


def test_values_are_parsed() -> None:
    settings = Settings.from_env(
        {**MINIMAL, "USE_FP16": "true", "USE_DEEPSPEED": "0", "MAX_TOKENS_PER_SEGMENT": "200",
         "TTS_ENGINE": "tone", "CELERY_BROKER_URL": "redis://r:6379/0", "S3_KEY_PREFIX": "tts/",
         "TONE_RTF": "0.5"}
    )  # fmt: skip
    assert settings.use_fp16 is True and settings.use_deepspeed is False
    assert settings.max_tokens_per_segment == 200
    assert settings.celery_result_backend == "redis://r:6379/0"
    assert (settings.s3_key_prefix, settings.tone_rtf) == ("tts/", 0.5)


def test_urls_are_parsed() -> None:
    settings = Settings.from_env(
        {**MINIMAL, "S3_ENDPOINT_URL": "http://minio:9000", "CELERY_BROKER_URL": "rediss://:pw@r:6380/0",
         "CELERY_RESULT_BACKEND": "redis://r:6379/1"}
    )  # fmt: skip
    assert settings.s3_public_endpoint_url == "http://minio:9000"  # presigned for the same host by default
    assert (settings.celery_broker_url, settings.celery_result_backend) == (
        "rediss://:pw@r:6380/0",
        "redis://r:6379/1",
    )
    public = Settings.from_env({**MINIMAL, "S3_ENDPOINT_URL": "http://minio:9000",
                                "S3_PUBLIC_ENDPOINT_URL": "https://s3.example.com"})  # fmt: skip
    assert public.s3_endpoint_url == "http://minio:9000"
    assert public.s3_public_endpoint_url == "https://s3.example.com"
    assert Settings.from_env(MINIMAL).s3_public_endpoint_url is None  # AWS: boto3 picks the endpoint


def test_a_bad_broker_url_does_not_show_its_password() -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({**MINIMAL, "CELERY_BROKER_URL": "amqp://user:hunter2@rabbit//"})
    assert "hunter2" not in str(raised.value) and "got scheme 'amqp'" in str(raised.value)


def test_secrets_stay_out_of_repr() -> None:
    settings = Settings.from_env({**MINIMAL, "S3_SECRET_ACCESS_KEY": "hunter2", "HF_TOKEN": "hf_abc"})
    assert "hunter2" not in repr(settings) and "hf_abc" not in repr(settings)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({**MINIMAL, "TTS_ENGINE": "espeak"}, "TTS_ENGINE must be one of"),
        ({**MINIMAL, "USE_FP16": "maybe"}, "USE_FP16 must be true or false"),
        ({**MINIMAL, "MAX_TOKENS_PER_SEGMENT": "lots"}, "MAX_TOKENS_PER_SEGMENT must be an integer"),
        ({**MINIMAL, "MAX_TOKENS_PER_SEGMENT": "5"}, "MAX_TOKENS_PER_SEGMENT must be between 20 and 600"),
        (
            {**MINIMAL, "MAX_TOKENS_PER_SEGMENT": "601"},
            "MAX_TOKENS_PER_SEGMENT must be between 20 and 600: IndexTTS-2's gpt.max_text_tokens is 600",
        ),
        (
            {**MINIMAL, "S3_ENDPOINT_URL": "minio:9000"},
            "S3_ENDPOINT_URL must be a URL starting with http:// or https:// (got 'minio:9000')",
        ),
        ({**MINIMAL, "S3_ENDPOINT_URL": "http://"}, "S3_ENDPOINT_URL must be a URL starting with http://"),
        (
            {**MINIMAL, "S3_PUBLIC_ENDPOINT_URL": "localhost:9000"},
            "S3_PUBLIC_ENDPOINT_URL must be a URL starting with http:// or https://",
        ),
        (
            {**MINIMAL, "CELERY_BROKER_URL": "amqp://guest@rabbit//"},
            "CELERY_BROKER_URL must be a Redis URL starting with redis://, rediss://, sentinel:// "
            "(got scheme 'amqp')",
        ),
        ({**MINIMAL, "CELERY_BROKER_URL": "localhost:6379"}, "CELERY_BROKER_URL must be a Redis URL"),
        (
            {**MINIMAL, "CELERY_RESULT_BACKEND": "db+sqlite:///results.db"},
            "CELERY_RESULT_BACKEND must be a Redis URL starting with redis://",
        ),
        ({**MINIMAL, "CLEANUP_DAYS": "-1"}, "CLEANUP_DAYS must be between"),
        (
            {**MINIMAL, "RETRY_BACKOFF_S": "600"},
            "RETRY_BACKOFF_S must be between 1 and 300: the longest wait between retries (got '600')",
        ),
        ({**MINIMAL, "TONE_RTF": "nan"}, "TONE_RTF must be between"),
        ({**MINIMAL, "METRICS_PORT": "http"}, "METRICS_PORT must be an integer"),
        ({**MINIMAL, "METRICS_PORT": "70000"}, "METRICS_PORT must be between 0 and 65535"),
        ({**MINIMAL, "ATTN_BACKEND": "fast"}, "ATTN_BACKEND must be one of '', 'sage', 'flash'"),
        ({**MINIMAL, "OUTPUT_STORAGE": "disk"}, "OUTPUT_STORAGE must be one of 's3', 'local'"),
        (
            {**MINIMAL, "OUTPUT_BASE_URL": "cdn.example"},
            "OUTPUT_BASE_URL must be a URL starting with http:// or https://",
        ),
        ({**MINIMAL, "VISIBILITY_TIMEOUT": "7200"}, "VISIBILITY_TIMEOUT is no longer read"),
        ({**MINIMAL, "S3_SECRET_ACCESS_KEY": "change-me-worker-secret"}, "S3_SECRET_ACCESS_KEY still holds"),
        (
            {**MINIMAL, "CELERY_BROKER_URL": "redis://:change-me-redis@r:6379/0"},
            "CELERY_BROKER_URL still holds",
        ),
        ({**MINIMAL, "CELERY_BROKER_URL": "sentinel://s1:26379/0"}, "REDIS_SENTINEL_MASTER must name"),
        ({**MINIMAL, "RECOVERY_S": "5"}, "RECOVERY_S must be between 6 and 3600"),
        ({**MINIMAL, "STORAGE_RETRY_S": "-1"}, "STORAGE_RETRY_S must be between 0 and 3600"),
        ({**MINIMAL, "RESULT_RETRY_S": "soon"}, "RESULT_RETRY_S must be an integer"),
        ({**MINIMAL, "TASK_SOFT_TIME_LIMIT": "1800"}, "TASK_SOFT_TIME_LIMIT (1800) must be below"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(message)):
        Settings.from_env(env)


@pytest.mark.parametrize(
    ("env", "messages"),
    [
        (
            {"USE_FP16": "sometimes"},
            ["tts_worker: bad setting: USE_FP16 must be true or false (got 'sometimes')"],
        ),
        (
            {"S3_ENDPOINT_URL": "minio:9000"},
            ["tts_worker: bad setting: S3_ENDPOINT_URL must be a URL starting with http:// or https://"],
        ),
        (
            {"FFMPEG_BINARY": "/nowhere/ffmpeg"},
            ["cannot start: ffmpeg not found (FFMPEG_BINARY='/nowhere/ffmpeg')"],
        ),
        (
            {"S3_BUCKET_NAME": ""},
            ["cannot start: S3_BUCKET_NAME is required to store audio in S3 and not set (or set OUTPUT_"],
        ),
        (
            {"OUTPUT_STORAGE": "local", "OUTPUT_AUDIO_DIR": "/dev/null/audio"},
            ["cannot start: cannot write audio to OUTPUT_AUDIO_DIR /dev/null/audio: Not a directory"],
        ),
        (
            {"S3_BUCKET_NAME": "no-such-bucket"},
            [
                "cannot start: S3 could not use the bucket (bucket 'no-such-bucket' at http://127.0.0.1:",
                "404 (does the bucket exist?)",
            ],
        ),
    ],
)
def test_worker_that_cannot_work_stops_at_start_saying_why(
    base_env: dict[str, str], env: dict[str, str], messages: list[str]
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tts_worker", "worker"],
        env={**base_env, **env}, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode != 0
    for message in messages:
        assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_sentinel_urls_with_the_primarys_name() -> None:
    urls = "sentinel://:pw@s1:26379/0;sentinel://:pw@s2:26379/0"
    settings = Settings.from_env({**MINIMAL, "CELERY_BROKER_URL": urls, "REDIS_SENTINEL_MASTER": "mymaster"})
    assert (settings.celery_result_backend, settings.redis_sentinel_master) == (urls, "mymaster")
    transport = worker_config(settings)["broker_transport_options"]
    assert transport["master_name"] == "mymaster"
    assert worker_config(settings)["result_backend_transport_options"]["master_name"] == "mymaster"
