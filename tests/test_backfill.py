"""`tts-backfill`: every row once, against real Redis and real tone workers, run as a real subprocess.

"Synthesised once" is read from the workers' logs: each delivery logs `job <id> start`, and a job
that found its object already stored logs `rtf=None` (the result says `reused`), so a row whose
task started twice, or was synthesised twice, shows up in the counts.
"""

from __future__ import annotations

import collections
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu.transport.redis import PublishBatch

from devtools.stack import RedisServer, WorkerProcess
from producer.app import create_app, shown_fields
from producer.backfill import cli as backfill_cli
from producer.backfill import naming
from producer.backfill.broker import Publisher, find_queued
from producer.backfill.connect import Connections
from producer.backfill.decide import Action, decide
from producer.backfill.guard import Claim, Guard
from producer.backfill.manifest import ManifestBusy, ManifestIndex, ManifestWriter, record
from producer.backfill.progress import Progress, Tally
from producer.backfill.results import Outcome, ResultReader, TaskState
from producer.backfill.rows import InvalidRow, Row, RowReader, input_format
from producer.backfill.runner import Backfill, Options
from producer.config import ProducerConfig
from tests.conftest import WorkerHandle
from tts_contract import keys
from tts_contract.names import BACKFILL_QUEUE

ROOT = Path(__file__).resolve().parent.parent
_START = re.compile(r"job (backfill:\S+) start:")
_DONE = re.compile(r"job (backfill:\S+) done: .* rtf=(\S+)")


class Pair:
    """Two tone workers on the same Redis databases, so that jobs really run side by side."""

    def __init__(self, first: WorkerHandle, second: WorkerProcess) -> None:
        self.first, self.second, self.env = first, second, first.env

    def log(self) -> str:
        return self.first.process.log() + self.second.log()


def counts(log: str, namespace: str) -> tuple[collections.Counter[str], collections.Counter[str]]:
    """Per task id of `namespace`: deliveries started, and syntheses (not reuses)."""
    prefix = f"backfill:{namespace}:"
    starts = collections.Counter(t for t in _START.findall(log) if t.startswith(prefix))
    synthesised = collections.Counter(
        t for t, rtf in _DONE.findall(log) if t.startswith(prefix) and rtf != "None"
    )
    return starts, synthesised


@pytest.fixture(scope="module")
def pair(start_worker: Callable[..., WorkerHandle], stack_dir: Path) -> Iterator[Pair]:
    first = start_worker()
    second = WorkerProcess(first.env, log_path=stack_dir / "backfill-second.log", name="backfill-second")
    yield Pair(first, second)
    second.stop()


def write_rows(path: Path, count: int, **extra: Any) -> list[str]:
    """`count` short rows with ids; returns the ids."""
    ids = [f"row-{i}" for i in range(count)]
    with path.open("w") as out:
        for i, row_id in enumerate(ids):
            out.write(
                json.dumps({"id": row_id, "text": f"Row {i} speaks.", "output_format": "wav", **extra}) + "\n"
            )
    return ids


def cli(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "producer.backfill", *map(str, args)]


def run(env: dict[str, str], *args: str | Path, timeout: float = 150) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli(*args), env=env, capture_output=True, text=True, timeout=timeout, check=False)


def final(manifest: Path) -> dict[str, dict[str, Any]]:
    """The last record of each row that was sent (every line must be whole JSON)."""
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    return {r["id"]: r for r in records if r["status"] != "invalid"}


def sent(stdout: str) -> int:
    match = re.search(r"^sent\s+(\d+)", stdout, re.MULTILINE)
    assert match, stdout
    return int(match.group(1))


def wait_for_lines(path: Path, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() or len(path.read_text().splitlines()) < count:
        assert time.monotonic() < deadline, f"{path} has fewer than {count} lines after {timeout} s"
        time.sleep(0.1)


def read_rows(path: Path, namespace: str) -> list[Row | InvalidRow]:
    return list(RowReader(path, fmt=input_format(path), namespace=namespace, max_text_chars=10000).validate())


def assert_each_once(log: str, namespace: str, ids: list[str]) -> None:
    starts, synthesised = counts(log, namespace)
    expected = {naming.task_id(namespace, naming.object_name(i)): 1 for i in ids}
    assert dict(starts) == expected  # every row delivered once: nothing was sent twice
    assert dict(synthesised) == expected


# --- without Redis -----------------------------------------------------------------------------------


def test_importing_backfill_stays_light() -> None:
    code = (
        "import sys, producer.backfill, producer.backfill.cli;"
        "heavy = ('torch', 'numpy', 'soundfile', 'boto3', 'tts_worker', 'indextts');"
        "print([m for m in heavy if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert done.stdout.strip() == "[]"


def test_row_ids_map_to_safe_disjoint_names() -> None:
    assert naming.object_name("chapter-1.intro") == "chapter-1.intro"
    odd = naming.object_name("livre/chapitre 1: l'été")
    assert re.fullmatch(r"_[A-Za-z0-9._-]+\.[0-9a-f]{20}", odd)
    assert naming.object_name("a/b") != naming.object_name("a b")  # same readable part, other digest
    assert naming.object_name("_x") != "_x"  # a name starting with "_" is always a mapped one
    assert len(naming.session_id("n" * 40, naming.object_name("x" * 500))) <= 128
    assert naming.next_task_id("backfill:ns:42") == "backfill:ns:42:2"
    assert naming.next_task_id("backfill:ns:42:2") == "backfill:ns:42:3"


@pytest.mark.parametrize(
    ("file", "namespace"),
    [("chapters.jsonl", "chapters"), ("book.part1.jsonl", "book-part1"), ("book.part2.csv", "book-part2"),
     ("Ünïcode list.csv", "n-code-list"), ("...jsonl", "backfill")],
)  # fmt: skip
def test_the_default_namespace_is_the_file_name_without_its_extension(file: str, namespace: str) -> None:
    assert naming.namespace_for(Path(file)) == namespace
    assert naming.valid_namespace(namespace)


def test_csv_cells_take_their_column_types_and_ids_follow_content(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text(
        "id,text,enable_chunking,max_chars_per_chunk,emo_alpha,emo_vector\n"
        ',"Two\nlines.",false,120,0.5,"[0,0,0,0,0,0,0,1]"\n'
        "x,Hi,maybe,,,\n"
        "y,Hi,true,12x,,\n"
    )
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"text": "Two\nlines.", "enable_chunking": False, "max_chars_per_chunk": 120,
                    "emo_alpha": 0.5, "emo_vector": [0, 0, 0, 0, 0, 0, 0, 1.0]}) + "\n"
    )  # fmt: skip
    csv_rows = list(RowReader(tmp_path / "a.csv", fmt="csv", namespace="a", max_text_chars=100).validate())
    [jsonl_row] = RowReader(tmp_path / "a.jsonl", fmt="jsonl", namespace="a", max_text_chars=100).validate()
    assert isinstance(csv_rows[0], Row) and isinstance(jsonl_row, Row)
    assert (
        csv_rows[0].message["enable_chunking"] is False and csv_rows[0].message["max_chars_per_chunk"] == 120
    )
    assert csv_rows[0].row_id == jsonl_row.row_id and csv_rows[0].row_id.startswith("auto-")
    assert [(r.line, r.error) for r in csv_rows[1:]] == [  # type: ignore[union-attr]
        (4, "enable_chunking: must be true or false (got 'maybe')"),
        (5, "max_chars_per_chunk: must be an integer (got '12x')"),
    ]


def test_long_default_namespaces_keep_a_digest_of_the_whole_name() -> None:
    common = "chapters-of-the-collected-works-volume"  # 38 characters
    first, second = (naming.namespace_for(Path(f"{common}-{n} (draft).jsonl")) for n in (1, 2))
    assert first != second and len(first) == len(second) == 40
    assert first.startswith("chapters-of-the-collected-works") and re.fullmatch(r".{31}-[0-9a-f]{8}", first)
    assert naming.valid_namespace(first) and naming.valid_namespace(second)
    assert naming.namespace_for(Path("x" * 40 + ".jsonl")) == "x" * 40  # not cut: kept as it is


@pytest.mark.parametrize("explicit_first", [False, True])
def test_a_session_id_cannot_name_another_rows_default_object(tmp_path: Path, explicit_first: bool) -> None:
    """Row `x` writes `dup.x.<ext>` by default; a row whose own session_id is `dup.x` would overwrite
    it, in whichever order the two come."""
    default = {"id": "x", "text": "The row x."}
    explicit = {"id": "y", "text": "Another row.", "session_id": "dup.x"}
    pair = [explicit, default] if explicit_first else [default, explicit]
    (tmp_path / "dup.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pair))
    first, second = read_rows(tmp_path / "dup.jsonl", "dup")
    assert isinstance(first, Row) and first.message["session_id"] == "dup.x"
    assert isinstance(second, InvalidRow) and second.line == 2
    if explicit_first:
        assert second.error == "its object 'dup.x' (from its id) is already named by line 1"
    else:
        assert second.error == "session_id 'dup.x' already names the object of line 1"


def test_csv_rows_are_reported_on_their_physical_lines(tmp_path: Path) -> None:
    """The header is line 1, blank lines count, and a quoted cell over two lines takes both."""
    (tmp_path / "lines.csv").write_text(
        "id,text\n"
        "a,\n"  # 2: invalid (no text)
        "\n"  # 3: blank
        "b,Fine.\n"  # 4
        'c,"Two\nlines."\n'  # 5-6
        "\n"  # 7: blank
        "d,  \n"  # 8: invalid (blank text)
        "e,Hi,extra\n"  # 9: invalid (a cell too many)
    )
    found = [(r.line, type(r).__name__) for r in read_rows(tmp_path / "lines.csv", "lines")]
    assert found == [(2, "InvalidRow"), (4, "Row"), (5, "Row"), (8, "InvalidRow"), (9, "InvalidRow")]


def test_a_manifest_of_another_namespace_needs_namespace(tmp_path: Path) -> None:
    """book.part1.jsonl was once known as `book` (the default rule changed): going on under the new
    name would send its unfinished rows again under other task ids and objects."""
    rows = tmp_path / "book.part1.jsonl"
    write_rows(rows, 2)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps(record("row-0", 1, "completed", task_id="backfill:book:row-0")) + "\n")
    env = {**os.environ, "CELERY_BROKER_URL": "redis://127.0.0.1:1/0"}  # nothing listens: nothing sent
    refused = run(env, rows, "--manifest", manifest, "--dry-run")
    assert refused.returncode == 2
    assert "namespace 'book'" in refused.stderr and "pass --namespace book" in refused.stderr
    kept = run(env, rows, "--manifest", manifest, "--dry-run", "--namespace", "book")
    assert kept.returncode == 0, kept.stderr
    assert "1 completed" in kept.stdout and "1 would be sent" in kept.stdout


def test_ctrl_c_while_validating_ends_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C raises KeyboardInterrupt wherever the validating pass is; here, after its first row."""
    rows = tmp_path / "big.jsonl"
    write_rows(rows, 3)

    def interrupted(self: RowReader) -> Iterator[Row | InvalidRow]:
        yield InvalidRow(1, None, "not valid JSON")
        raise KeyboardInterrupt

    monkeypatch.setattr(RowReader, "validate", interrupted)
    try:
        status = backfill_cli.main([str(rows), "--manifest", str(tmp_path / "m.jsonl")])
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped main()")
    err = capsys.readouterr().err
    assert status == 130
    assert err.strip().splitlines()[-1] == "tts-backfill: interrupted; run the same command again to resume"
    assert "Traceback" not in err


def test_invalid_rows_are_reported_by_line_and_strict_sends_nothing(tmp_path: Path) -> None:
    rows = tmp_path / "mixed.jsonl"
    rows.write_text(
        json.dumps({"id": "a", "text": "Fine."}) + "\n\n"
        + json.dumps({"id": "b", "text": "  "}) + "\n"
        + "{not json\n"
        + json.dumps({"id": "a", "text": "Again."}) + "\n"
        + json.dumps({"id": "c", "text": "Hi.", "speakr_voice": "alice"}) + "\n"
        + json.dumps({"id": ["list"], "text": "Hi."}) + "\n"
    )  # fmt: skip
    env = {**os.environ, "CELERY_BROKER_URL": "redis://127.0.0.1:1/0"}  # nothing listens: nothing sent
    manifest = tmp_path / "m.jsonl"
    done = run(env, rows, "--manifest", manifest, "--dry-run")
    assert done.returncode == 1, done.stderr
    for expected in (
        "line 3: invalid: text: must not be blank",
        "line 4: invalid: not valid JSON",
        "line 5: invalid: id 'a' already used on line 1",
        "line 6: invalid: speakr_voice: unknown field (did you mean 'speaker_voice'?)",
        "line 7: invalid: id: must be a string or an integer",
    ):
        assert expected in done.stderr
    assert "1 valid rows, 5 invalid" in done.stdout and not manifest.exists()
    strict = run(env, rows, "--manifest", manifest, "--strict")
    assert strict.returncode == 2 and "--strict: nothing sent" in strict.stderr
    assert [r["line"] for r in map(json.loads, manifest.read_text().splitlines())] == [3, 4, 5, 6, 7]


DONE = TaskState("SUCCESS", Outcome("completed"))
FAILED = TaskState("FAILURE", Outcome("failed", error="UnknownVoice: nobody"))
PENDING = TaskState("PENDING")


@pytest.mark.parametrize(
    ("won", "claim_state", "run", "state", "retry", "action"),
    [
        (True, "claimed", "me", PENDING, False, "publish"),
        (True, "claimed", "me", DONE, False, "record"),  # an earlier claim expired, its result did not
        (False, "sent", "dead", DONE, False, "record"),
        (False, "sent", "dead", FAILED, False, "record"),
        (False, "sent", "dead", FAILED, True, "takeover"),
        (False, "sent", "alive", PENDING, False, "follow"),
        (False, "sent", "dead", PENDING, False, "resolve"),  # published, but the message may be lost
        (False, "claimed", "alive", PENDING, False, "follow"),
        (False, "claimed", "dead", PENDING, False, "resolve"),  # maybe never published
        (False, "claimed", "dead", TaskState("STARTED"), False, "follow"),
    ],
)
def test_decide(won: bool, claim_state: str, run: str, state: TaskState, retry: bool, action: str) -> None:
    claim = Claim(claim_state, run, "backfill:n:x", BACKFILL_QUEUE)  # type: ignore[arg-type]
    decided = decide(won=won, claim=claim, state=state, alive={"me", "alive"}, retry_failed=retry)
    assert decided is Action(action)


def test_a_vanished_claim_is_looked_at_again() -> None:
    assert decide(won=False, claim=None, state=PENDING, alive=set(), retry_failed=False) is Action.RECHECK


def test_manifest_has_one_writer_and_survives_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"id": "a", "status": "completed"}\n{"id": "b", "sta')
    writer = ManifestWriter(path)
    with pytest.raises(ManifestBusy):
        ManifestWriter(path)
    writer.write([{"id": "c", "status": "failed", "task_id": "t"}])
    writer.close()
    index = ManifestIndex.load(path)
    assert index.status == {"a": "completed", "c": "failed"} and index.unreadable_lines == 1


def test_the_manifest_is_private_to_its_owner(tmp_path: Path) -> None:
    """Completed lines hold presigned URLs: 0600, for a new manifest and for one made readable before."""
    fresh, older = tmp_path / "new.jsonl", tmp_path / "old.jsonl"
    older.write_text("")
    older.chmod(0o644)
    for path in (fresh, older):
        ManifestWriter(path).close()
        assert path.stat().st_mode & 0o777 == 0o600


# --- against Redis and workers -----------------------------------------------------------------------


def test_find_queued_sees_waiting_and_delivered_messages(
    redis_client: redis.Redis, redis_server: RedisServer
) -> None:
    app = create_app(
        ProducerConfig(broker_url=f"{redis_server.url}/0", result_backend=f"{redis_server.url}/1")
    )
    Publisher(app, queue="tts.held", priority=9).publish(
        [(f"backfill:q:{i}", {"text": "Hi."}) for i in range(3)]
    )
    # As a worker takes it: out of its list, into the unacked hash.
    delivered = redis_client.rpop(keys.priority_lists("tts.held")[-1])
    assert isinstance(delivered, bytes)
    redis_client.hset(keys.UNACKED, "tag-1", b"[" + delivered + b', "", "tts.held"]')
    wanted = ["backfill:q:0", "backfill:q:2", "backfill:q:9"]
    assert find_queued(redis_client, ["tts.held"], wanted) == {"backfill:q:0", "backfill:q:2"}
    app.close()


def own_env(base_env: dict[str, str], redis_server: RedisServer, db: int) -> dict[str, str]:
    """The environment of a producer on databases no worker reads."""
    return {**base_env, "CELERY_BROKER_URL": f"{redis_server.url}/{db}",
            "CELERY_RESULT_BACKEND": f"{redis_server.url}/{db + 1}"}  # fmt: skip


def store_completed(results_url: str, task_id: str) -> None:
    """A result as a worker stores it, without the kwargs (as before `result_extended`)."""
    client = redis.Redis.from_url(results_url)
    result = {"status": "completed", "url": "http://s3/x", "s3_key": "x.wav", "metadata": {"duration": 1.0}}
    client.set(f"celery-task-meta-{task_id}", json.dumps({"status": "SUCCESS", "result": result}))
    client.close()


def use_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for name in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"):
        monkeypatch.setenv(name, env[name])


def test_the_manifest_is_read_after_its_lock_is_taken(
    redis_client: redis.Redis, redis_server: RedisServer, base_env: dict[str, str], fresh_db: int,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """Another run writes its last line, then lets the lock go, between this run's start and its
    lock: that line must count (else the row is recorded a second time)."""
    rows = tmp_path / "late.jsonl"
    write_rows(rows, 1)
    env = own_env(base_env, redis_server, fresh_db)
    store_completed(env["CELERY_RESULT_BACKEND"], "backfill:late:row-0")
    use_env(monkeypatch, env)
    last_line = record("row-0", 1, "completed", task_id="backfill:late:row-0", s3_key="late.row-0.wav")

    class LateWriter(ManifestWriter):
        def __init__(self, path: Path) -> None:
            with path.open("a") as other_run:
                other_run.write(json.dumps(last_line) + "\n")
            super().__init__(path)

    monkeypatch.setattr(backfill_cli, "ManifestWriter", LateWriter)
    assert backfill_cli.main([str(rows), "--manifest", str(tmp_path / "m.jsonl")]) == 0
    assert "completed  1 (1 before this run)" in capsys.readouterr().out
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 1


def test_input_changed_between_the_two_passes_is_an_error(
    redis_client: redis.Redis, redis_server: RedisServer, base_env: dict[str, str], fresh_db: int,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """Rewritten after validation with the same size and time: only the contents tell."""
    rows = tmp_path / "edit.jsonl"
    write_rows(rows, 1)
    env = own_env(base_env, redis_server, fresh_db)
    store_completed(env["CELERY_RESULT_BACKEND"], "backfill:edit:row-0")
    use_env(monkeypatch, env)
    opened = Connections.open

    def open_after_an_edit(config: ProducerConfig) -> Connections:
        before = rows.stat()
        rows.write_text(rows.read_text().replace("Row 0", "Wow 0"))
        os.utime(rows, ns=(before.st_atime_ns, before.st_mtime_ns))
        return opened(config)

    monkeypatch.setattr(Connections, "open", open_after_an_edit)
    assert backfill_cli.main([str(rows), "--manifest", str(tmp_path / "m.jsonl")]) == 2
    assert f"{rows} changed after it was validated" in capsys.readouterr().err


def test_an_unreachable_broker_is_one_clear_message(tmp_path: Path) -> None:
    rows = tmp_path / "off.jsonl"
    write_rows(rows, 3)
    env = {**os.environ, "CELERY_BROKER_URL": "redis://:secret@127.0.0.1:1/0"}  # nothing listens
    done = run(env, rows, "--manifest", tmp_path / "m.jsonl")
    assert done.returncode == 2
    assert "tts-backfill: cannot reach the broker at redis://:**@127.0.0.1:1/0" in done.stderr
    assert "nothing sent" in done.stderr and "secret" not in done.stderr
    assert done.stdout == ""  # no summary of a run that never started


def test_published_messages_show_shortened_fields(
    redis_client: redis.Redis, redis_server: RedisServer
) -> None:
    app = create_app(
        ProducerConfig(broker_url=f"{redis_server.url}/0", result_backend=f"{redis_server.url}/1")
    )
    kwargs = {"text": "A long document. " * 60, "session_id": "k.1"}
    Publisher(app, queue="tts.shown", priority=9).publish([("backfill:k:1", kwargs)])
    app.close()
    [raw] = redis_client.lrange(keys.priority_lists("tts.shown")[-1], 0, -1)
    headers = json.loads(raw)["headers"]
    assert headers["kwargsrepr"] == shown_fields(kwargs) and len(headers["kwargsrepr"]) < 150
    assert "A long document." in headers["kwargsrepr"]


def test_messages_go_out_in_batches(
    redis_client: redis.Redis, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every message of a `publish` call and its task-sent event in one Redis round trip."""
    flushed: list[int] = []
    flush = PublishBatch.flush

    def counted(self: PublishBatch) -> None:
        flushed.append(self._buffered)
        flush(self)

    monkeypatch.setattr(PublishBatch, "flush", counted)
    app = create_app(
        ProducerConfig(broker_url=f"{redis_server.url}/0", result_backend=f"{redis_server.url}/1")
    )
    publisher = Publisher(app, queue="tts.batched", priority=9)
    publisher.publish([(f"backfill:b:{i}", {"text": "Hi.", "session_id": f"b.{i}"}) for i in range(300)])
    publisher.publish([(f"backfill:b:{i}", {"text": "Hi.", "session_id": f"b.{i}"}) for i in range(300, 302)])
    app.close()
    assert publisher.batched is True
    assert flushed == [600, 4]  # an LPUSH and an event's PUBLISH per message, one pipeline per call
    assert redis_client.llen(keys.priority_lists("tts.batched")[-1]) == 302


class Runs:
    """Backfill runs driven step by step in this process, on databases no worker reads."""

    def __init__(self, redis_server: RedisServer, db: int, workdir: Path) -> None:
        url = redis_server.url
        self.app = create_app(ProducerConfig(broker_url=f"{url}/{db}", result_backend=f"{url}/{db + 1}"))
        self.client = redis.Redis.from_url(f"{url}/{db}")
        self.workdir = workdir
        self.manifests: list[ManifestWriter] = []

    def backfill(self, guard: Guard, publisher: Publisher | None = None) -> Backfill:
        tally = Tally()
        self.manifests.append(ManifestWriter(self.workdir / f"{guard.run_id}.manifest.jsonl"))
        guard.start()
        return Backfill(
            Options(namespace="lease", queue=BACKFILL_QUEUE, priority=9), guard=guard,
            publisher=publisher or Publisher(self.app, queue=BACKFILL_QUEUE, priority=9),
            results=ResultReader(self.app), broker=self.client, manifest=self.manifests[-1], tally=tally,
            progress=Progress(tally, stream=io.StringIO(), tty=False), stop=threading.Event(),
        )  # fmt: skip

    def guard(self, run_id: str) -> Guard:
        return Guard(self.client, namespace="lease", run_id=run_id, lease_s=30)

    def queued(self) -> int:
        return int(self.client.llen(keys.priority_lists(BACKFILL_QUEUE)[-1]))

    def close(self) -> None:
        for manifest in self.manifests:
            manifest.close()
        self.client.close()
        self.app.close()


@pytest.fixture
def runs(
    redis_client: redis.Redis, redis_server: RedisServer, fresh_db: int, tmp_path: Path
) -> Iterator[Runs]:
    made = Runs(redis_server, fresh_db, tmp_path)
    yield made
    made.close()


def lease_rows(tmp_path: Path, count: int) -> list[Row]:
    write_rows(tmp_path / "lease.jsonl", count)
    return [r for r in read_rows(tmp_path / "lease.jsonl", "lease") if isinstance(r, Row)]


def test_a_run_paused_past_its_lease_does_not_publish_rows_taken_over(runs: Runs, tmp_path: Path) -> None:
    """The run claims its rows, then stalls (a stopped process, a laptop asleep) until its lease
    lapses; meanwhile another run takes the rows over as a dead run's and publishes them. Waking up,
    the run must follow those rows, not publish them a second time."""
    rows = lease_rows(tmp_path, 4)
    other = runs.backfill(runs.guard("other"))

    class StallingGuard(Guard):
        def claim(self, items: Sequence[tuple[str, Claim]]) -> list[bool]:
            won = super().claim(items)
            runs.client.delete("tts-backfill:lease:run:paused")  # the lease lapses meanwhile
            other._settle(rows, retry_failed=False)
            return won

    paused = runs.backfill(StallingGuard(runs.client, namespace="lease", run_id="paused", lease_s=30))
    paused._settle(rows, retry_failed=False)
    assert other.tally.sent == 4 and runs.queued() == 4  # the other run's messages, and no more
    assert paused.tally.sent == 0 and len(paused.tracked) == 4
    assert not any(entry.mine for entry in paused.tracked.values())  # followed: the other run's now
    assert paused.guard.run_id != "paused"  # it goes on under a new lease


def test_a_row_whose_claim_changed_hands_after_publishing_is_followed(runs: Runs, tmp_path: Path) -> None:
    rows = lease_rows(tmp_path, 3)

    class Overtaken(Publisher):
        def publish(self, jobs: Sequence[tuple[str, dict[str, Any]]]) -> None:
            super().publish(jobs)
            for row, (task, _) in zip(rows, jobs, strict=True):  # another run took the rows meanwhile
                taken = Claim("sent", "other", task, BACKFILL_QUEUE, row.digest)
                runs.client.set(f"tts-backfill:lease:row:{row.name}", taken.dump())

    backfill = runs.backfill(runs.guard("mine"), Overtaken(runs.app, queue=BACKFILL_QUEUE, priority=9))
    backfill._settle(rows, retry_failed=False)
    assert len(backfill.tracked) == 3 and not any(entry.mine for entry in backfill.tracked.values())


def test_a_claim_made_for_another_request_is_a_conflict(
    base_env: dict[str, str], redis_server: RedisServer, redis_client: redis.Redis, fresh_db: int,
    tmp_path: Path,
) -> None:  # fmt: skip
    """A live run of another input with the same default namespace holds row-0: same task id, other
    fields. This run must neither wait for that row's audio nor publish its own under that id."""
    rows = tmp_path / "shared.jsonl"
    write_rows(rows, 1)
    env = own_env(base_env, redis_server, fresh_db)
    broker = redis.Redis.from_url(env["CELERY_BROKER_URL"])
    theirs = Claim("sent", "elsewhere", "backfill:shared:row-0", BACKFILL_QUEUE, "0123456789abcdef")
    broker.set("tts-backfill:shared:row:row-0", theirs.dump())
    broker.set("tts-backfill:shared:run:elsewhere", "alive", ex=120)
    done = run(env, rows, "--manifest", tmp_path / "m.jsonl", timeout=60)
    assert done.returncode == 1, done.stderr
    assert "conflict   1" in done.stdout and sent(done.stdout) == 0
    [line] = (tmp_path / "m.jsonl").read_text().splitlines()
    entry = json.loads(line)
    assert entry["status"] == "conflict" and entry["url"] is None and "--namespace" in entry["error"]
    assert broker.get("tts-backfill:shared:row:row-0") == theirs.dump().encode()  # left alone
    assert broker.llen(keys.priority_lists(BACKFILL_QUEUE)[-1]) == 0
    broker.close()


@pytest.mark.slow
def test_every_row_once_end_to_end_and_a_rerun_sends_nothing(
    pair: Pair, redis_client: redis.Redis, tmp_path: Path, s3: Any
) -> None:
    rows = tmp_path / "e2e.jsonl"
    ids = write_rows(rows, 200)
    manifest = tmp_path / "e2e.manifest.jsonl"
    done = run(pair.env, rows, "--manifest", manifest, "--max-in-flight", "50")
    assert done.returncode == 0, done.stderr
    assert sent(done.stdout) == 200
    records = final(manifest)
    assert sorted(records) == sorted(ids) and len(manifest.read_text().splitlines()) == 200
    assert {r["status"] for r in records.values()} == {"completed"}
    assert records["row-7"]["s3_key"] == "e2e.row-7.wav" and records["row-7"]["duration"] > 0
    assert records["row-7"]["task_id"] == "backfill:e2e:row-7" and records["row-7"]["url"].startswith("http")
    assert s3.list_objects_v2(Bucket="tts-test", Prefix="e2e.row-")["KeyCount"] == 200
    assert_each_once(pair.log(), "e2e", ids)

    again = run(pair.env, rows, "--manifest", manifest)
    assert again.returncode == 0, again.stderr
    assert sent(again.stdout) == 0 and "completed  200 (200 before this run)" in again.stdout
    assert len(manifest.read_text().splitlines()) == 200
    assert_each_once(pair.log(), "e2e", ids)


@pytest.mark.slow
def test_inputs_sharing_a_namespace_get_no_audio_of_each_other(
    pair: Pair, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """a/chapters.jsonl and b/chapters.jsonl both default to namespace `chapters`, with the same row
    ids and other texts. b's rows are conflicts (by the claims a left, and by a's results once the
    claims are gone), not a's audio; with --namespace they are b's own."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ids = write_rows(tmp_path / "a" / "chapters.jsonl", 3)
    (tmp_path / "b" / "chapters.jsonl").write_text(
        "".join(json.dumps({"id": i, "text": f"Other words {n}.", "output_format": "wav"}) + "\n"
                for n, i in enumerate(ids))
    )  # fmt: skip
    assert (
        run(pair.env, tmp_path / "a" / "chapters.jsonl", "--manifest", tmp_path / "a.jsonl").returncode == 0
    )
    b_rows, b_manifest = tmp_path / "b" / "chapters.jsonl", tmp_path / "b.jsonl"
    broker = redis.Redis.from_url(pair.env["CELERY_BROKER_URL"])
    assert len(broker.keys("tts-backfill:chapters:row:*")) == 3
    for attempt in ("claims", "results"):
        done = run(pair.env, b_rows, "--manifest", b_manifest)
        assert done.returncode == 1, (attempt, done.stderr)
        assert "conflict   3" in done.stdout and sent(done.stdout) == 0
        records = [json.loads(line) for line in b_manifest.read_text().splitlines()]
        assert {r["status"] for r in records} == {"conflict"} and {r["url"] for r in records} == {None}
        assert "pass --namespace NAME" in records[-1]["error"]
        # As if the claims were gone (deleted by hand, or made before claims held digests):
        for key in broker.keys("tts-backfill:chapters:row:*"):
            broker.delete(key)
    assert broker.keys("tts-backfill:chapters:row:*") == []  # claims won for a conflict: given back
    broker.close()
    assert_each_once(pair.log(), "chapters", ids)  # nothing of b's ran under a's task ids

    apart = run(pair.env, b_rows, "--manifest", b_manifest, "--namespace", "b-chapters")
    assert apart.returncode == 0, apart.stderr
    assert {r["s3_key"] for r in final(b_manifest).values()} == {f"b-chapters.{i}.wav" for i in ids}


@pytest.mark.slow
def test_rows_in_flight_stay_within_the_bound(pair: Pair, redis_client: redis.Redis, tmp_path: Path) -> None:
    """Sampled from outside while it runs: rows claimed but not yet in the manifest (claims read
    first, so a sample never overcounts), and messages waiting in the queue."""
    rows, manifest = tmp_path / "bound.jsonl", tmp_path / "bound.manifest.jsonl"
    ids = write_rows(rows, 40)
    backfill = subprocess.Popen(
        cli(rows, "--manifest", manifest, "--max-in-flight", "3"), env=pair.env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    queues = keys.priority_lists(BACKFILL_QUEUE)
    broker = redis.Redis.from_url(pair.env["CELERY_BROKER_URL"])
    in_flight, waiting, claimed = [], [], 0
    while backfill.poll() is None:
        claims = len(broker.keys("tts-backfill:bound:row:*"))
        claimed = max(claimed, claims)
        recorded = len(manifest.read_text().splitlines()) if manifest.exists() else 0
        in_flight.append(claims - recorded)
        waiting.append(sum(int(broker.llen(q)) for q in queues))
        time.sleep(0.01)
    broker.close()
    out, err = backfill.communicate()
    assert backfill.returncode == 0, err
    assert in_flight and max(in_flight) <= 3 and max(waiting) <= 3
    assert claimed > 0  # the sampler looked where the run works (claims stay until the run ends)
    assert sorted(final(manifest)) == sorted(ids) and sent(out) == 40


@pytest.mark.slow
def test_a_killed_run_then_a_rerun_completes_every_row_once(
    pair: Pair, redis_client: redis.Redis, tmp_path: Path
) -> None:
    rows = tmp_path / "crash.jsonl"
    ids = write_rows(rows, 100)
    manifest = tmp_path / "crash.manifest.jsonl"
    args = (rows, "--manifest", manifest, "--max-in-flight", "8", "--lease-seconds", "3")
    first = subprocess.Popen(cli(*args), env=pair.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_lines(manifest, 25)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    kept = final(manifest)  # every line whole: the crash lost rows in flight, not the file
    assert 25 <= len(kept) < 100

    done = run(pair.env, *args)
    assert done.returncode == 0, done.stderr
    assert sent(done.stdout) < 100 - 25  # the rows the killed run had sent were followed, not sent again
    records = final(manifest)
    assert sorted(records) == sorted(ids) and {r["status"] for r in records.values()} == {"completed"}
    assert_each_once(pair.log(), "crash", ids)


@pytest.mark.slow
def test_two_concurrent_runs_synthesise_each_row_once(
    pair: Pair, redis_client: redis.Redis, tmp_path: Path
) -> None:
    rows = tmp_path / "twice.jsonl"
    ids = write_rows(rows, 100)
    runs = [
        subprocess.Popen(
            cli(rows, "--manifest", tmp_path / f"m{n}.jsonl", "--max-in-flight", "10"),
            env=pair.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in (1, 2)
    ]
    outputs = [r.communicate(timeout=150) for r in runs]
    assert [r.returncode for r in runs] == [0, 0], [err for _, err in outputs]
    assert sum(sent(out) for out, _ in outputs) == 100
    for n in (1, 2):  # each run's manifest has every row, whoever sent it
        records = final(tmp_path / f"m{n}.jsonl")
        assert sorted(records) == sorted(ids) and {r["status"] for r in records.values()} == {"completed"}
    assert_each_once(pair.log(), "twice", ids)


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_a_rerun_resumes(
    pair: Pair, redis_client: redis.Redis, tmp_path: Path
) -> None:
    rows = tmp_path / "stop.jsonl"
    ids = write_rows(rows, 40)
    manifest = tmp_path / "stop.manifest.jsonl"
    args = (rows, "--manifest", manifest, "--max-in-flight", "4")
    first = subprocess.Popen(
        cli(*args), env=pair.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for_lines(manifest, 8)
    first.send_signal(signal.SIGINT)
    out, err = first.communicate(timeout=30)
    assert first.returncode == 130, err
    assert "stopping" in err and "stopped    with" in out
    assert 8 <= len(final(manifest)) < 40

    done = run(pair.env, *args)
    assert done.returncode == 0, done.stderr
    assert sorted(final(manifest)) == sorted(ids)
    assert_each_once(pair.log(), "stop", ids)


@pytest.mark.slow
def test_claims_of_a_dead_run_are_resolved_without_sending_twice(
    slow_worker: WorkerHandle, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """A run died holding claims. Rows 0-2: claimed, never published: sent now. Row 3: claimed and
    published (the crash fell between the two): found waiting in the queue, followed. Row 4: marked
    sent: followed. The slow worker is kept busy meanwhile, so rows 3 and 4 are still queued."""
    rows = tmp_path / "dead.jsonl"
    ids = write_rows(rows, 5)
    tasks = [naming.task_id("dead", i) for i in ids]
    blocker = slow_worker.tts.delay(  # about 10 s: the run starts, and looks, long before it ends
        text="Keep the only worker busy for a few seconds. " * 7, output_format="wav"
    )
    wait_for_state(blocker.id, slow_worker)
    broker = redis.Redis.from_url(slow_worker.env["CELERY_BROKER_URL"])
    parsed = [r for r in read_rows(rows, "dead") if isinstance(r, Row)]
    for i, (task, row) in enumerate(zip(tasks, parsed, strict=True)):
        claim = Claim("sent" if i == 4 else "claimed", "gone", task, BACKFILL_QUEUE, row.digest)
        broker.set(f"tts-backfill:dead:row:{ids[i]}", claim.dump())
    publisher = Publisher(slow_worker.app, queue=BACKFILL_QUEUE, priority=9)
    publisher.publish([(t, row.message) for t, row in zip(tasks[3:], parsed[3:], strict=True)])
    broker.close()

    done = run(slow_worker.env, rows, "--manifest", tmp_path / "m.jsonl")
    assert done.returncode == 0, done.stderr
    assert sent(done.stdout) == 3
    assert sorted(final(tmp_path / "m.jsonl")) == ids
    assert_each_once(slow_worker.process.log(), "dead", ids)


@pytest.mark.slow
def test_messages_lost_by_the_broker_are_sent_again(
    start_worker: Callable[..., WorkerHandle],
    base_env: dict[str, str],
    redis_server: RedisServer,
    fresh_db: int,
    tmp_path: Path,
) -> None:
    """The queue is purged while no worker listens (an operator's `celery purge`, a Redis that lost its
    data): the run notices at its next checks and sends those rows again instead of waiting forever."""
    rows = tmp_path / "lost.jsonl"
    ids = write_rows(rows, 6)
    env = {**base_env, "CELERY_BROKER_URL": f"{redis_server.url}/{fresh_db}",
           "CELERY_RESULT_BACKEND": f"{redis_server.url}/{fresh_db + 1}"}  # fmt: skip
    args = (rows, "--manifest", tmp_path / "m.jsonl", "--lease-seconds", "2", "--priority", "0")
    backfill = subprocess.Popen(
        cli(*args), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    broker = redis.Redis.from_url(env["CELERY_BROKER_URL"])
    deadline = time.monotonic() + 30
    while broker.llen(BACKFILL_QUEUE) < len(ids):
        assert time.monotonic() < deadline and backfill.poll() is None, "the rows were not sent"
        time.sleep(0.05)
    assert broker.delete(BACKFILL_QUEUE) == 1  # every message gone
    broker.close()
    worker = start_worker(db=fresh_db)
    out, err = backfill.communicate(timeout=90)
    assert backfill.returncode == 0, err
    assert "6 sent again (lost by the broker)" in out
    records = final(tmp_path / "m.jsonl")
    assert sorted(records) == ids and {r["status"] for r in records.values()} == {"completed"}
    assert_each_once(worker.process.log(), "lost", ids)


def wait_for_state(task_id: str, worker: WorkerHandle, timeout: float = 30) -> None:
    result = worker.app.AsyncResult(task_id)
    deadline = time.monotonic() + timeout
    while result.state not in ("STARTED", "PROGRESS", "SUCCESS"):
        assert time.monotonic() < deadline, f"{task_id} still {result.state}"
        time.sleep(0.05)


@pytest.mark.slow
def test_failed_rows_are_sent_again_only_when_asked(
    pair: Pair, redis_client: redis.Redis, tmp_path: Path
) -> None:
    rows = tmp_path / "fails.jsonl"
    write_rows(rows, 3, speaker_voice="nobody")  # no such voice: a permanent failure on the worker
    manifest = tmp_path / "m.jsonl"
    first = run(pair.env, rows, "--manifest", manifest)
    assert first.returncode == 1
    assert {r["status"] for r in final(manifest).values()} == {"failed"}
    assert "UnknownVoice" in final(manifest)["row-0"]["error"]
    assert sent(run(pair.env, rows, "--manifest", manifest).stdout) == 0
    retried = run(pair.env, rows, "--manifest", manifest, "--retry-failed")
    assert retried.returncode == 1 and sent(retried.stdout) == 3
    assert final(manifest)["row-0"]["task_id"] == "backfill:fails:row-0:2"


@pytest.mark.slow
@pytest.mark.parametrize("priority", [9, 0])
def test_interactive_jobs_overtake_a_backfill_backlog(
    slow_worker: WorkerHandle, redis_client: redis.Redis, priority: int
) -> None:
    """A worker started with no flags reads `tts` before `tts.backfill` at each priority step, so the
    interactive job sent last is served as soon as the running backfill job ends: behind backfill's
    default priority 9, and by the queue order alone at the same priority as the interactive job (0)."""
    publisher = Publisher(slow_worker.app, queue=BACKFILL_QUEUE, priority=priority)
    backlog = [f"backfill:prio{priority}:{i}" for i in range(3)]
    # The first job runs for a few seconds: time enough to send the interactive one while it runs.
    texts = ["A backfill job that keeps the only worker busy for a few seconds. " * 2] + [
        "A backfill job of one second."
    ] * 2
    publisher.publish(
        [(t, {"text": text, "output_format": "wav", "session_id": t.replace(":", "-")})
         for t, text in zip(backlog, texts, strict=True)]
    )  # fmt: skip
    wait_for_state(backlog[0], slow_worker)
    interactive = slow_worker.tts.delay(text="Me first.", output_format="wav")
    interactive.get(timeout=60)
    for task in backlog:
        slow_worker.app.AsyncResult(task).get(timeout=60)
    log = slow_worker.process.log()
    order = [t for t in re.findall(r"job (\S+) start:", log) if t in (*backlog, interactive.id)]
    assert order == [backlog[0], interactive.id, backlog[1], backlog[2]]
