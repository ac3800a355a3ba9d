"""Per-process state of a worker: settings read once, the engine loaded once, storage made once."""

from __future__ import annotations

import functools
import logging
import time

from tts_contract.schema import parse_request
from tts_worker.engines import Engine, load_engine
from tts_worker.pipeline import Services, voice_inputs
from tts_worker.settings import Settings
from tts_worker.storage import make_storage

__all__ = ["engine", "services", "settings"]

log = logging.getLogger(__name__)


@functools.cache
def settings() -> Settings:
    """This process's settings, read from the environment on first use."""
    return Settings.from_env()


@functools.cache
def engine() -> Engine:
    """Load the engine and warm it up with one short synthesis (once per process)."""
    current = settings()
    started = time.perf_counter()
    loaded = load_engine(current)
    # One short synthesis in the default voice, so that the first job pays no lazy initialisation.
    loaded.synthesize("Warm-up.", voice_inputs(parse_request({"text": "Warm-up."}), current))
    log.info(
        "engine %s loaded and warmed up on %s in %.1f s",
        loaded.name, loaded.device, time.perf_counter() - started,
    )  # fmt: skip
    return loaded


@functools.cache
def services() -> Services:
    """The warmed engine and the storage: what a job needs (once per process)."""
    current = settings()
    return Services(settings=current, engine=engine(), storage=make_storage(current))
