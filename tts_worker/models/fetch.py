"""`fetch`: bring every file of the manifest from the hub into CHECKPOINTS_DIR and the Hugging Face cache.

`huggingface_hub` does the transfers, so HF_ENDPOINT, HF_HOME / HF_HUB_CACHE, proxies, Xet storage,
progress bars and retries behave as everywhere else; a connection dropped in the middle of a file is
resumed with a Range request, within the run. What this module adds around it:
- one listing per repository (`model_info(files_metadata=True)`) gives each file's size and digest;
- a file already whole locally (by the record, or by hashing it) is not asked for at all, so a second
  run downloads nothing; one found truncated or altered is downloaded again (`force_download`, since
  `huggingface_hub` trusts whatever is in place);
- each downloaded file is hashed and compared with the listing;
- the record is saved after every file: an interrupted run starts again at the first file not done
  (the installed `huggingface_hub` drops a partial file when its download fails, so the unit of
  resumption across runs is the file).

Errors::

    ModelFilesError          one line that says what went wrong and what to do
    └── HubUnreachable       no answer from the hub at all (network, proxy, HF_ENDPOINT)
"""

from __future__ import annotations

import fcntl
import importlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoSibling

from tts_worker.models.local import RECORD_NAME, ExpectedFile, Hashing, Record, inspect, local_path
from tts_worker.models.manifest import CHECKPOINTS, ModelRepo, manifest_for

__all__ = ["LOCK_NAME", "FetchReport", "HubUnreachable", "ModelFilesError", "fetch", "human_size"]

LOCK_NAME = RECORD_NAME + ".lock"


class ModelFilesError(RuntimeError):
    """The model files could not be fetched or are not whole; the message says what to do."""


class HubUnreachable(ModelFilesError):
    """The hub did not answer at all."""


@dataclass
class FetchReport:
    """What a fetch did: the files it downloaded and those already in place."""

    downloaded: list[ExpectedFile] = field(default_factory=list)
    present: list[ExpectedFile] = field(default_factory=list)

    def summary(self) -> str:
        """One line: how many files, how much was downloaded."""
        files = self.downloaded + self.present
        return (
            f"{_count(files)} ({human_size(sum(f.size for f in files))}): "
            f"{len(self.downloaded)} downloaded ({human_size(sum(f.size for f in self.downloaded))}), "
            f"{len(self.present)} already present"
        )


def fetch(
    checkpoints_dir: Path,
    *,
    token: str | None,
    engine: str = "indextts2",
    endpoint: str | None = None,
    cache_dir: Path | None = None,
    hashes: bool = False,
    say: Callable[[str], None] = print,
) -> FetchReport:
    """Download what is missing or damaged, verify it, and record it; `say` gets one line per file.

    `token` None lets `huggingface_hub` use its own (HF_TOKEN, or a stored login); `endpoint` and
    `cache_dir` default to HF_ENDPOINT and the Hugging Face cache, where the model looks. A file in
    place is hashed when it changed since it was verified, or always with `hashes=True`.
    """
    hashing: Hashing = "always" if hashes else "if-changed"
    with _one_fetch_at_a_time(checkpoints_dir, say):
        return _Fetcher(
            checkpoints_dir, token=token, endpoint=endpoint, cache_dir=cache_dir, hashing=hashing, say=say
        ).run(manifest_for(engine))


@contextmanager
def _one_fetch_at_a_time(checkpoints_dir: Path, say: Callable[[str], None]) -> Iterator[None]:
    """Several workers started at once on one volume would each download every file: the first
    fetches, the others wait for it and then find everything in place."""
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    with open(checkpoints_dir / LOCK_NAME, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"another fetch into {checkpoints_dir} is running: waiting for it to finish")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield  # the lock goes with the file's closing, also when the process dies


class _Fetcher:
    def __init__(
        self,
        checkpoints_dir: Path,
        *,
        token: str | None,
        endpoint: str | None,
        cache_dir: Path | None,
        hashing: Hashing,
        say: Callable[[str], None],
    ) -> None:
        self.checkpoints_dir = checkpoints_dir
        self.token = token
        self.endpoint = endpoint
        self.hub = (endpoint or constants.ENDPOINT).rstrip("/")
        self.cache_dir = cache_dir
        self.say = say
        self.api = HfApi(endpoint=endpoint, token=token)
        self.record = Record.load(checkpoints_dir)
        self.report = FetchReport()
        self.hashing = hashing

    def run(self, manifest: tuple[ModelRepo, ...]) -> FetchReport:
        for repo in manifest:
            with self.explained(repo.repo_id):
                commit, listed = self.listing(repo)
                files = self.record.set_listing(repo.repo_id, commit, listed)
                self.record.save()
            where = self.checkpoints_dir if repo.destination == CHECKPOINTS else "the Hugging Face cache"
            self.say(
                f"{repo.repo_id} at {repo.revision} ({commit[:12]}): {_count(files)}, "
                f"{human_size(sum(f.size for f in files))}, into {where}"
            )
            for expected in files:
                with self.explained(expected.name):
                    self.fetch_file(repo, expected, commit)
        return self.report

    def listing(self, repo: ModelRepo) -> tuple[str, list[ExpectedFile]]:
        """The commit `repo.revision` points at, and the wanted files with their sizes and digests."""
        info = self.api.model_info(
            repo.repo_id, revision=repo.revision, files_metadata=True, token=self.token
        )
        files = [_expected(repo.repo_id, s) for s in info.siblings or [] if repo.wants(s.rfilename)]
        absent = sorted(set(repo.files or ()) - {f.path for f in files})
        if absent or not files:
            raise ModelFilesError(
                f"the hub at {self.hub} lists no {', '.join(absent) or 'files'} in {repo.repo_id} at "
                f"{repo.revision}: the manifest in tts_worker/models/manifest.py needs updating"
            )
        return info.sha or repo.revision, files

    def fetch_file(self, repo: ModelRepo, expected: ExpectedFile, commit: str) -> None:
        """Leave one file whole where the model looks for it, downloading only when it is not.

        In the cache, "where" is the listed commit's snapshot: when the revision moved upstream, a file
        that did not change is still missing there, and huggingface_hub links it in without a download.
        """
        path = local_path(
            repo, expected.path, checkpoints_dir=self.checkpoints_dir, cache_dir=self.cache_dir, commit=commit
        )
        found = inspect(expected, path, hashing=self.hashing)
        if found.problem is None:
            self.verified(expected, found.verified_mtime_ns)
            self.report.present.append(expected)
            self.say(f"  present     {expected.path}")
            return
        damaged = "" if found.problem == "missing" else f"; the local copy: {found.problem}"
        self.say(f"  downloading {expected.path} ({human_size(expected.size)}{damaged})")
        # Forced when a damaged copy is in place, which huggingface_hub would otherwise return as is;
        # forced on a second try too, in case a damaged blob was linked in rather than downloaded.
        for force in (found.problem != "missing", True):
            found = inspect(expected, self.download(repo, expected, force=force), hashing="always")
            if found.problem is None or force:
                break
        if found.problem is not None:
            raise ModelFilesError(
                f"{expected.name} as downloaded from {self.hub}: {found.problem}; run again, and if it "
                f"persists the hub's copy does not match its own listing"
            )
        self.verified(expected, found.verified_mtime_ns)
        self.report.downloaded.append(expected)

    def download(self, repo: ModelRepo, expected: ExpectedFile, *, force: bool) -> Path:
        checkpoints = repo.destination == CHECKPOINTS
        destination = {"local_dir": self.checkpoints_dir} if checkpoints else {"cache_dir": self.cache_dir}
        path = hf_hub_download(
            repo.repo_id,
            expected.path,
            revision=repo.revision,
            token=self.token,
            endpoint=self.endpoint,
            force_download=force,
            **destination,
        )
        return Path(path)

    def verified(self, expected: ExpectedFile, mtime_ns: int | None) -> None:
        if mtime_ns is not None:
            self.record.mark_verified(expected, mtime_ns)
            self.record.save()

    @contextmanager
    def explained(self, what: str) -> Iterator[None]:
        """Turn what huggingface_hub and the network raise into one line that says what to do."""
        try:
            yield
        except ModelFilesError:
            raise
        except Exception as exc:
            explained = _explain(exc, hub=self.hub, what=what)
            if explained is None:
                raise  # not a failure of the hub or the network: a bug, with its traceback
            raise explained from exc


def _expected(repo_id: str, sibling: RepoSibling) -> ExpectedFile:
    if sibling.lfs is not None:
        return ExpectedFile(repo_id, sibling.rfilename, sibling.lfs.size, f"sha256:{sibling.lfs.sha256}")
    if sibling.size is None or sibling.blob_id is None:
        raise ModelFilesError(f"the hub's listing of {repo_id} has no size or id for {sibling.rfilename}")
    return ExpectedFile(repo_id, sibling.rfilename, sibling.size, f"git-sha1:{sibling.blob_id}")


def _explain(exc: Exception, *, hub: str, what: str) -> ModelFilesError | None:
    """The error to show for one met while fetching `what`; None when it is not understood."""
    check = "check the network (and any proxy), HF_ENDPOINT, and HF_TOKEN for gated repositories"
    fix = "fix tts_worker/models/manifest.py"
    if isinstance(exc, OfflineModeIsEnabled):
        return ModelFilesError("HF_HUB_OFFLINE is set, so nothing can be fetched: unset it for the fetch")
    if isinstance(exc, (GatedRepoError, RepositoryNotFoundError)):
        return ModelFilesError(
            f"the hub at {hub} refused {what} ({_status(exc)}): it does not exist there, or it is gated or "
            "private and needs HF_TOKEN set to a token that has been granted access"
        )
    if isinstance(exc, RevisionNotFoundError):
        return ModelFilesError(f"the hub at {hub} has no such revision of {what}: {fix}")
    if isinstance(exc, LocalEntryNotFoundError):
        # hf_hub_download's word for "the hub did not tell me about the file"; the cause says why.
        cause = exc.__cause__
        explained = _explain(cause, hub=hub, what=what) if isinstance(cause, Exception) else None
        return explained or HubUnreachable(f"cannot reach the Hugging Face hub at {hub} for {what}: {check}")
    if isinstance(exc, EntryNotFoundError):
        return ModelFilesError(f"the hub at {hub} has no {what}: {fix}")
    if isinstance(exc, HfHubHTTPError):
        return ModelFilesError(f"the hub at {hub} answered {_status(exc)} for {what}: try later; {check}")
    if isinstance(exc, _transport_errors()):
        return HubUnreachable(f"cannot reach the Hugging Face hub at {hub} ({_reason(exc)}): {check}")
    if isinstance(exc, OSError):
        return ModelFilesError(f"{what}: {_reason(exc)} (the files finished are kept: run again to go on)")
    return None


def _count(files: list[ExpectedFile]) -> str:
    return f"{len(files)} file{'' if len(files) == 1 else 's'}"


def _status(exc: HfHubHTTPError) -> str:
    return f"HTTP {getattr(exc.response, 'status_code', '?')}"


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _transport_errors() -> tuple[type[Exception], ...]:
    """Network failures of the HTTP client under this huggingface_hub: httpx2 from 2.0, httpx in 1.x.
    Neither derives from OSError, and which one is installed depends on the hub's version."""
    errors: list[type[Exception]] = []
    for module in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(module).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def human_size(size: int) -> str:
    """`3.2 GB`, `12.0 kB`, `80 B`: decimal units, as the hub shows sizes."""
    value, unit = float(size), "B"
    for bigger in ("kB", "MB", "GB"):
        if value < 1000:
            break
        value, unit = value / 1000, bigger
    return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
