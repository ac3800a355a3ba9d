"""`./bootstrap models` (`python -m tts_worker.models`) against a stand-in hub on 127.0.0.1.

The command runs as a subprocess, as the bootstrap script runs it, so that huggingface_hub reads
HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE from its environment; each test has an empty HF_HOME and
CHECKPOINTS_DIR of its own. The stand-in (`tests/fake_hub.py`) logs every request, which is how the
tests see what was downloaded, resumed or sent.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools.stack import free_port
from tests.fake_hub import FakeHub, indextts_repos
from tts_worker import models
from tts_worker.models import local

ROOT = Path(__file__).resolve().parent.parent

# What IndexTTS2 asks the hub for while it loads (indextts/infer_v2.py, s2mel/modules/bigvgan), written
# out here rather than taken from the manifest, so that a file missing from the manifest fails a test.
LOADED_FROM_THE_CACHE = [
    ("facebook/w2v-bert-2.0", "config.json"),
    ("facebook/w2v-bert-2.0", "preprocessor_config.json"),
    ("facebook/w2v-bert-2.0", "model.safetensors"),
    ("amphion/MaskGCT", "semantic_codec/model.safetensors"),
    ("funasr/campplus", "campplus_cn_common.bin"),
    ("nvidia/bigvgan_v2_22khz_80band_256x", "config.json"),
    ("nvidia/bigvgan_v2_22khz_80band_256x", "bigvgan_generator.pt"),
]
LOAD_AS_THE_MODEL_DOES = """
import hashlib, json, sys
from huggingface_hub import hf_hub_download
digests = {}
for repo_id, filename in json.loads(sys.argv[1]):
    with open(hf_hub_download(repo_id, filename=filename), "rb") as stream:
        digests[f"{repo_id}/{filename}"] = hashlib.sha256(stream.read()).hexdigest()
print(json.dumps(digests))
"""
CHECKPOINT_FILES = sorted(indextts_repos()[0].files)
ALL_FILES = [f"IndexTeam/IndexTTS-2/{path}" for path in CHECKPOINT_FILES] + [
    f"{repo_id}/{path}" for repo_id, path in LOADED_FROM_THE_CACHE
]


class Machine:
    """A machine with an empty Hugging Face cache and checkpoints directory, and the hub it talks to."""

    def __init__(self, hub: FakeHub, home: Path) -> None:
        self.hub = hub
        self.checkpoints = home / "checkpoints"
        self.cache = home / "hf" / "hub"
        self.contents = {
            f"{r.repo_id}/{path}": data for r in hub.by_id.values() for path, data in r.files.items()
        }
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
        self.env = {
            **inherited,
            "HF_HOME": str(home / "hf"),
            "HF_ENDPOINT": hub.url,
            "CHECKPOINTS_DIR": str(self.checkpoints),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        }

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        """`./bootstrap models ARGS`, with extra environment."""
        return subprocess.run(
            [sys.executable, "-m", "tts_worker.models", *args],
            cwd=ROOT, env={**self.env, **env}, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip

    def start(self, *args: str) -> subprocess.Popen[str]:
        """`./bootstrap models ARGS`, running in the background."""
        return subprocess.Popen(
            [sys.executable, "-m", "tts_worker.models", *args],
            cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    def fetch(self, *args: str) -> subprocess.CompletedProcess[str]:
        """A fetch that must succeed."""
        done = self.run("fetch", *args)
        assert done.returncode == 0, done.stdout + done.stderr
        return done

    def load_offline(self) -> dict[str, str]:
        """sha256 of each helper file as the model gets it with HF_HUB_OFFLINE=1 (fails if one is missing)."""
        done = subprocess.run(
            [sys.executable, "-c", LOAD_AS_THE_MODEL_DOES, json.dumps(LOADED_FROM_THE_CACHE)],
            env={**self.env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return dict(json.loads(done.stdout))

    def expected_digests(self) -> dict[str, str]:
        return {
            f"{r}/{f}": hashlib.sha256(self.contents[f"{r}/{f}"]).hexdigest()
            for r, f in LOADED_FROM_THE_CACHE
        }

    def cached(self, repo_id: str, path: str) -> Path:
        """The blob behind the snapshot path the model reads."""
        repo = self.hub.by_id[repo_id]
        return (
            self.cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / repo.commit / path
        ).resolve()


@pytest.fixture
def make_machine(tmp_path: Path) -> Iterator[Callable[..., Machine]]:
    """A machine and a fresh stand-in hub, started with the options given (see FakeHub)."""
    hubs: list[FakeHub] = []

    def make(*, sizes: dict[str, int] | None = None, **options: Any) -> Machine:
        hub = FakeHub(indextts_repos(sizes), **options).__enter__()
        hubs.append(hub)
        return Machine(hub, tmp_path)

    yield make
    for hub in hubs:
        hub.__exit__(None, None, None)


@pytest.fixture
def machine(make_machine: Callable[..., Machine]) -> Machine:
    return make_machine()


def test_a_fetch_puts_every_file_where_the_model_loads_it(machine: Machine) -> None:
    done = machine.fetch()

    for path in CHECKPOINT_FILES:
        assert (machine.checkpoints / path).read_bytes() == machine.contents[f"IndexTeam/IndexTTS-2/{path}"]
    assert machine.load_offline() == machine.expected_digests()
    # Only what the model loads: not the other formats and optimiser states the helper repos also hold.
    assert sorted(machine.hub.downloaded()) == sorted(ALL_FILES)
    assert models.missing_model_files(machine.checkpoints, cache_dir=machine.cache) == []
    assert done.stdout.count("  downloading ") == len(ALL_FILES)
    assert f"{len(ALL_FILES)} downloaded" in done.stdout.splitlines()[-1]


def test_a_second_fetch_downloads_nothing(machine: Machine) -> None:
    machine.fetch()
    machine.hub.forget()

    done = machine.fetch()

    assert [s for s in machine.hub.seen if s.file is not None] == []  # not even a HEAD
    assert done.stdout.count("  present ") == len(ALL_FILES)
    assert f"0 downloaded (0 B), {len(ALL_FILES)} already present" in done.stdout


def test_a_new_commit_upstream_brings_only_the_changed_file(machine: Machine) -> None:
    machine.fetch()
    vocoder = machine.hub.by_id["nvidia/bigvgan_v2_22khz_80band_256x"]
    old_commit = vocoder.commit
    vocoder.files["config.json"] = machine.contents["nvidia/bigvgan_v2_22khz_80band_256x/config.json"] = (
        b"{}\n"
    )
    machine.hub.forget()

    machine.fetch()

    assert vocoder.commit != old_commit
    assert machine.hub.downloaded() == ["nvidia/bigvgan_v2_22khz_80band_256x/config.json"]
    # The unchanged generator is linked into the new commit's snapshot, where the model now looks.
    assert machine.load_offline() == machine.expected_digests()
    assert models.missing_model_files(machine.checkpoints, cache_dir=machine.cache) == []


def test_fetches_started_together_download_each_file_once(machine: Machine) -> None:
    # As when several worker containers start at once on one empty volume.
    fetches = [machine.start("fetch") for _ in range(3)]
    outputs = [fetch.communicate(timeout=120) for fetch in fetches]

    assert [fetch.returncode for fetch in fetches] == [0, 0, 0], outputs
    assert sorted(machine.hub.downloaded()) == sorted(ALL_FILES)
    assert machine.load_offline() == machine.expected_digests()


def test_files_already_in_place_without_a_record_are_hashed_not_downloaded(machine: Machine) -> None:
    machine.fetch()
    (machine.checkpoints / local.RECORD_NAME).unlink()  # e.g. checkpoints copied from another machine
    machine.hub.forget()

    machine.fetch()

    assert machine.hub.downloaded() == []
    assert models.verify_model_files(machine.checkpoints, hashes=True, cache_dir=machine.cache) == []


def test_damaged_files_are_found_and_fetched_again(machine: Machine) -> None:
    machine.fetch()
    gpt = machine.checkpoints / "gpt.pth"
    gpt.write_bytes(gpt.read_bytes()[:1000])  # truncated
    vocoder_config = machine.cached("nvidia/bigvgan_v2_22khz_80band_256x", "config.json")
    vocoder_config.write_bytes(b"x" * vocoder_config.stat().st_size)  # same size, new mtime
    campplus = machine.cached("funasr/campplus", "campplus_cn_common.bin")
    before = campplus.stat()
    campplus.write_bytes(b"y" * before.st_size)
    os.utime(campplus, ns=(before.st_atime_ns, before.st_mtime_ns))  # same size, same mtime

    damaged = ["IndexTeam/IndexTTS-2/gpt.pth", "nvidia/bigvgan_v2_22khz_80band_256x/config.json"]
    assert _named(machine.run("verify")) == damaged
    assert _named(machine.run("verify", "--hashes")) == sorted(
        [*damaged, "funasr/campplus/campplus_cn_common.bin"]
    )

    machine.hub.forget()
    machine.fetch()
    assert sorted(machine.hub.downloaded()) == sorted(damaged)
    assert _named(machine.run("verify", "--hashes")) == ["funasr/campplus/campplus_cn_common.bin"]

    machine.hub.forget()
    machine.fetch("--hashes")
    assert machine.hub.downloaded() == ["funasr/campplus/campplus_cn_common.bin"]
    assert machine.run("verify", "--hashes").returncode == 0
    assert machine.load_offline() == machine.expected_digests()
    assert gpt.read_bytes() == machine.contents["IndexTeam/IndexTTS-2/gpt.pth"]


def test_a_dropped_download_resumes_where_it_stopped(make_machine: Callable[..., Machine]) -> None:
    # Larger than huggingface_hub's 10 MiB write block, so that part of it is on disk when the drop comes.
    size = 24_000_000
    machine = make_machine(
        sizes={"IndexTeam/IndexTTS-2/gpt.pth": size}, drop_once={"IndexTeam/IndexTTS-2/gpt.pth"}
    )

    machine.fetch()

    first, second = [s for s in machine.hub.downloads() if s.file == "IndexTeam/IndexTTS-2/gpt.pth"]
    assert first.range is None
    assert second.range is not None and second.range.endswith("-")
    assert 0 < int(second.range.removeprefix("bytes=").rstrip("-")) <= size // 2  # only the rest is asked for
    assert (machine.checkpoints / "gpt.pth").read_bytes() == machine.contents["IndexTeam/IndexTTS-2/gpt.pth"]


def test_an_interrupted_fetch_goes_on_from_the_file_it_stopped_at(
    make_machine: Callable[..., Machine],
) -> None:
    machine = make_machine(refuse={"funasr/campplus/campplus_cn_common.bin"})

    failed = machine.run()
    assert failed.returncode == 1
    assert "HTTP 403" in failed.stderr and "funasr/campplus/campplus_cn_common.bin" in failed.stderr
    assert "Traceback" not in failed.stderr

    machine.hub.refuse.clear()
    machine.hub.forget()
    machine.fetch()
    assert sorted(machine.hub.downloaded()) == [
        "funasr/campplus/campplus_cn_common.bin",
        "nvidia/bigvgan_v2_22khz_80band_256x/bigvgan_generator.pt",
        "nvidia/bigvgan_v2_22khz_80band_256x/config.json",
    ]


def test_an_unreachable_hub_fails_with_one_clear_line(machine: Machine) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"

    done = machine.run(HF_ENDPOINT=nowhere)

    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"cannot reach the Hugging Face hub at {nowhere}" in done.stderr
    assert "HF_ENDPOINT" in done.stderr and "HF_TOKEN" in done.stderr
    assert models.missing_model_files(machine.checkpoints, cache_dir=machine.cache)  # nothing half-done


def test_the_token_is_sent_as_a_bearer_token(make_machine: Callable[..., Machine]) -> None:
    machine = make_machine(token="hf_test_token")

    refused = machine.run()
    assert refused.returncode == 1
    assert "refused IndexTeam/IndexTTS-2 (HTTP 401)" in refused.stderr and "HF_TOKEN" in refused.stderr

    machine.hub.forget()
    done = machine.run("fetch", HF_TOKEN="hf_test_token")
    assert done.returncode == 0, done.stderr
    assert {s.authorization for s in machine.hub.seen} == {"Bearer hf_test_token"}
    assert sorted(machine.hub.downloaded()) == sorted(ALL_FILES)


def test_with_hf_hub_offline_it_only_checks_what_is_here(machine: Machine) -> None:
    empty = machine.run(HF_HUB_OFFLINE="1")
    assert empty.returncode == 1
    assert "unset HF_HUB_OFFLINE" in empty.stderr
    assert machine.hub.seen == []

    machine.fetch()
    machine.hub.forget()
    done = machine.run(HF_HUB_OFFLINE="1")
    assert done.returncode == 0, done.stderr
    assert machine.hub.seen == []


def test_missing_model_files_names_what_is_missing_without_hashing(
    machine: Machine, monkeypatch: pytest.MonkeyPatch
) -> None:
    never_fetched = models.missing_model_files(machine.checkpoints, cache_dir=machine.cache)
    assert never_fetched == [f"{repo.repo_id}: not fetched" for repo in models.MANIFEST]

    machine.fetch()
    (machine.checkpoints / "qwen0.6bemo4-merge" / "model.safetensors").unlink()
    machine.cached("facebook/w2v-bert-2.0", "model.safetensors").write_bytes(b"short")
    monkeypatch.setattr(local, "file_digest", _no_hashing)
    machine.hub.forget()

    assert models.missing_model_files(machine.checkpoints, cache_dir=machine.cache) == [
        "IndexTeam/IndexTTS-2/qwen0.6bemo4-merge/model.safetensors: missing",
        "facebook/w2v-bert-2.0/model.safetensors: size 5 bytes, expected 50000",
    ]
    assert machine.hub.seen == []


def test_a_bad_setting_stops_it_naming_the_variable(machine: Machine) -> None:
    done = machine.run("verify", USE_FP16="maybe")

    assert done.returncode == 2
    assert "bad setting: USE_FP16" in done.stderr


def _named(done: subprocess.CompletedProcess[str]) -> list[str]:
    """The files a failed verify names, sorted."""
    assert done.returncode == 1, done.stdout + done.stderr
    return sorted(
        line.strip().split(": ", 1)[0] for line in done.stderr.splitlines() if line.startswith("  ")
    )


def _no_hashing(path: Path, algorithm: str) -> str:
    raise AssertionError(f"{path} was hashed")
