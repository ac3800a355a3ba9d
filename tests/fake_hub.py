"""A stand-in Hugging Face hub on 127.0.0.1, for testing `./bootstrap models` without the network.

It serves exactly what `huggingface_hub` asks for when it lists and downloads model files:
- `GET /api/models/{repo}[/revision/{revision}][?blobs=true]`: the repository's commit and its files
  with size, git blob id and, for LFS files, sha256 (what `HfApi.model_info(files_metadata=True)` reads);
- `HEAD` and `GET /{repo}/resolve/{revision}/{path}`: the file, with the headers `hf_hub_download`
  requires (X-Repo-Commit, ETag or X-Linked-Etag and X-Linked-Size for LFS files, Content-Length) and
  byte ranges (`Range: bytes=N-` answered 206), which it uses to resume a dropped download;
- errors with the hub's `X-Error-Code` header (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo).

Every request is logged (method, path, Authorization, Range); faults can be injected: a download cut
off halfway the first time (`drop_once`), a file refused with 403 (`refuse`), a token required.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import unquote, urlsplit

__all__ = ["FakeHub", "FakeRepo", "Seen", "indextts_repos"]

_TEXT_SUFFIXES = (".json", ".yaml", ".md", ".txt", ".gitattributes")


@dataclass(frozen=True)
class FakeRepo:
    """A model repository: its files' contents, keyed by path."""

    repo_id: str
    files: dict[str, bytes]

    @property
    def commit(self) -> str:
        """Changes with the contents, as a new commit would: change `files` to push one."""
        tree = "".join(f"{path}:{self.etag(path)}\n" for path in sorted(self.files))
        return hashlib.sha1(f"{self.repo_id}\n{tree}".encode()).hexdigest()

    def is_lfs(self, path: str) -> bool:
        """Weights are LFS files on the hub, small text files are plain git files."""
        return not path.endswith(_TEXT_SUFFIXES)

    def etag(self, path: str) -> str:
        data = self.files[path]
        if self.is_lfs(path):
            return hashlib.sha256(data).hexdigest()
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    def sibling(self, path: str) -> dict[str, object]:
        """The file as the hub's model API lists it with `blobs=true`."""
        data = self.files[path]
        if not self.is_lfs(path):
            return {"rfilename": path, "size": len(data), "blobId": self.etag(path)}
        pointer = (
            f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.etag(path)}\nsize {len(data)}\n"
        )
        return {
            "rfilename": path,
            "size": len(data),
            "blobId": hashlib.sha1(pointer.encode()).hexdigest(),
            "lfs": {"sha256": self.etag(path), "size": len(data), "pointerSize": len(pointer)},
        }


def _content(name: str, size: int) -> bytes:
    """Deterministic bytes that differ from file to file."""
    block = hashlib.sha256(name.encode()).digest()
    return (block * (size // len(block) + 1))[:size]


def _repo(repo_id: str, sizes: dict[str, int]) -> FakeRepo:
    return FakeRepo(repo_id, {path: _content(f"{repo_id}/{path}", size) for path, size in sizes.items()})


_SIZES = {
    "IndexTeam/IndexTTS-2": {
        ".gitattributes": 120,
        "README.md": 300,
        "config.yaml": 900,
        "bpe.model": 5_000,
        "gpt.pth": 300_000,
        "s2mel.pth": 40_000,
        "wav2vec2bert_stats.pt": 2_000,
        "feat1.pt": 3_000,
        "feat2.pt": 3_000,
        "qwen0.6bemo4-merge/config.json": 700,
        "qwen0.6bemo4-merge/model.safetensors": 60_000,
        "qwen0.6bemo4-merge/tokenizer.json": 9_000,
    },
    "facebook/w2v-bert-2.0": {
        "config.json": 800,
        "preprocessor_config.json": 300,
        "model.safetensors": 50_000,
        "conformer_shaw.pt": 50_000,
        "README.md": 400,
    },
    "amphion/MaskGCT": {
        "semantic_codec/model.safetensors": 20_000,
        "acoustic_codec/model.safetensors": 20_000,
    },
    "funasr/campplus": {"campplus_cn_common.bin": 10_000, "configuration.json": 200},
    "nvidia/bigvgan_v2_22khz_80band_256x": {
        "config.json": 1_000,
        "bigvgan_generator.pt": 30_000,
        "bigvgan_discriminator_optimizer.pt": 30_000,
    },
}


def indextts_repos(sizes: dict[str, int] | None = None) -> list[FakeRepo]:
    """The five repositories IndexTTS2 loads from, laid out like the real ones, with tiny files (or
    the sizes given, keyed `<repo id>/<path>`); each helper repository also holds a file the model
    does not need, which must not be downloaded."""
    wanted = sizes or {}
    return [
        _repo(repo_id, {path: wanted.get(f"{repo_id}/{path}", size) for path, size in files.items()})
        for repo_id, files in _SIZES.items()
    ]


@dataclass(frozen=True)
class Seen:
    """One request the hub received."""

    method: str
    path: str
    authorization: str | None
    range: str | None

    @property
    def file(self) -> str | None:
        """`<repo id>/<path>` of a request for a file (HEAD or GET), None for the listing API."""
        repo_id, resolve, rest = self.path.strip("/").partition("/resolve/")
        return f"{repo_id}/{rest.partition('/')[2]}" if resolve else None


@dataclass
class FakeHub:
    """The hub, serving `repos` on 127.0.0.1 from a thread; use it as a context manager."""

    repos: Iterable[FakeRepo]
    token: str | None = None
    """When set, every request must carry `Authorization: Bearer <token>` (a gated repository)."""
    drop_once: set[str] = field(default_factory=set)
    """`<repo id>/<path>` whose first full GET is cut off halfway through the body."""
    refuse: set[str] = field(default_factory=set)
    """`<repo id>/<path>` answered 403."""
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.by_id = {repo.repo_id: repo for repo in self.repos}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.hub = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.shutdown()
        self._server.server_close()

    def record(self, seen: Seen) -> None:
        with self._lock:
            self.seen.append(seen)

    def downloads(self) -> list[Seen]:
        """Every GET of a file's content, in order."""
        with self._lock:
            return [s for s in self.seen if s.file is not None and s.method == "GET"]

    def downloaded(self) -> list[str]:
        """`<repo id>/<path>` of every GET of a file's content, in order."""
        return [str(s.file) for s in self.downloads()]

    def forget(self) -> None:
        with self._lock:
            self.seen.clear()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the hub; every answer carries Content-Length
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms wait between

    @property
    def hub(self) -> FakeHub:
        return self.server.hub  # type: ignore[attr-defined,no-any-return]

    def do_GET(self) -> None:
        self._route(body=True)

    def do_HEAD(self) -> None:
        self._route(body=False)

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: the test reads `hub.seen` instead

    def _route(self, *, body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        auth = self.headers.get("Authorization")
        self.hub.record(Seen(self.command, path, auth, self.headers.get("Range")))
        if path.startswith("/api/models/"):
            self._model_info(path.removeprefix("/api/models/"), auth)
        elif "/resolve/" in path:
            self._resolve(path, auth, body=body)
        else:
            self._error(404, "", "Not found")

    def _repo(self, repo_id: str, revision: str, auth: str | None) -> FakeRepo | None:
        repo = self.hub.by_id.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
        elif self.hub.token is not None and auth != f"Bearer {self.hub.token}":
            self._error(401, "GatedRepo", "Access to this repository is restricted")
        elif revision not in ("main", repo.commit):
            self._error(404, "RevisionNotFound", "Invalid rev id")
        else:
            return repo
        return None

    def _model_info(self, rest: str, auth: str | None) -> None:
        repo_id, _, revision = rest.partition("/revision/")
        repo = self._repo(repo_id, revision or "main", auth)
        if repo is not None:
            siblings = [repo.sibling(path) for path in sorted(repo.files)]
            gated = "manual" if self.hub.token else False
            info = {"id": repo_id, "sha": repo.commit, "private": False, "gated": gated, "siblings": siblings}
            self._send(200, {"Content-Type": "application/json"}, json.dumps(info).encode())

    def _resolve(self, path: str, auth: str | None, *, body: bool) -> None:
        repo_id, _, rest = path.strip("/").partition("/resolve/")
        revision, _, filename = rest.partition("/")
        repo = self._repo(repo_id, revision, auth)
        if repo is None:
            return
        name = f"{repo_id}/{filename}"
        if filename not in repo.files:
            self._error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": repo.commit})
        elif name in self.hub.refuse:
            self._error(403, "", "Refused by the test")
        else:
            drop = body and name in self.hub.drop_once
            if drop:
                self.hub.drop_once.discard(name)  # once: the retry that follows is served whole
            self._file(repo, filename, body=body, drop=drop)

    def _file(self, repo: FakeRepo, filename: str, *, body: bool, drop: bool) -> None:
        data = repo.files[filename]
        headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{repo.etag(filename)}"', "Accept-Ranges": "bytes"}
        if repo.is_lfs(filename):
            headers |= {"X-Linked-Etag": f'"{repo.etag(filename)}"', "X-Linked-Size": str(len(data))}
        status, start = 200, _range_start(self.headers.get("Range"))
        if start:
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        if drop and not start:
            self._send(status, headers, data, cut=len(data) // 2)
        else:
            self._send(status, headers, data[start:] if body else b"", length=len(data) - start)

    def _error(self, status: int, code: str, message: str, extra: dict[str, str] | None = None) -> None:
        headers = {"X-Error-Message": message, **({"X-Error-Code": code} if code else {}), **(extra or {})}
        self._send(
            status, {"Content-Type": "application/json", **headers}, json.dumps({"error": message}).encode()
        )

    def _send(
        self,
        status: int,
        headers: dict[str, str],
        body: bytes,
        *,
        length: int | None = None,
        cut: int | None = None,
    ) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if self.command == "HEAD":
            return
        self.wfile.write(body if cut is None else body[:cut])
        if cut is not None:
            self.wfile.flush()
            self.close_connection = True  # mid-body: the client sees the connection drop


def _range_start(header: str | None) -> int:
    """The start of `bytes=N-`, the only form huggingface_hub sends; 0 without a range."""
    if not header:
        return 0
    return int(header.removeprefix("bytes=").split("-", 1)[0])
