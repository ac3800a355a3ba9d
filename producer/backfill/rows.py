"""Reading INPUT: JSONL or CSV rows of request fields plus an optional `id`, streamed and validated.

Rows are read twice: once to validate everything before anything is sent (and to find duplicate ids
and objects), once to send. Neither pass holds more than one row's fields at a time; the first keeps
the ids and object names seen, which is what finding duplicates needs. Each pass also takes a digest
of the bytes it read, so that a file changed between the two passes is noticed.

CSV cells are text, while the request schema is strict (booleans must be booleans), so a cell is
converted by the type its column has in the schema: `true`/`false`, integers, floats, and
`emo_vector` as a JSON list. An empty cell means "not set".
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import types
import typing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from producer.backfill import naming
from tts_contract.errors import InvalidRequest
from tts_contract.schema import TTSRequest, parse_request, request_digest

__all__ = ["InvalidRow", "Row", "RowReader", "input_format"]


@dataclass(frozen=True)
class Row:
    """A valid row: its line in INPUT, its id (given or derived), its safe name and the task kwargs."""

    line: int
    row_id: str
    name: str
    message: dict[str, Any]
    own_session: bool = False

    @functools.cached_property
    def digest(self) -> str:
        """A digest of the task kwargs, kept in the row's claim and compared with existing results."""
        return request_digest(self.message)


@dataclass(frozen=True)
class InvalidRow:
    """A row left out: its line, its id when it had one, and what is wrong."""

    line: int
    row_id: str | None
    error: str


class _Digest(Protocol):
    def update(self, data: bytes, /) -> None: ...


def input_format(path: Path, given: str | None = None) -> str:
    """`jsonl` or `csv`: as given, else from the file's extension."""
    if given:
        return given
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return "csv"
    raise ValueError(f"{path}: cannot tell the format from the extension; pass --format jsonl or csv")


class RowReader:
    """Streams the rows of one INPUT file, validated, with ids and names for each."""

    def __init__(self, path: Path, *, fmt: str, namespace: str, max_text_chars: int) -> None:
        self.path = path
        self.fmt = fmt
        self.namespace = namespace
        self.max_text_chars = max_text_chars
        self.digest: str | None = None
        """The sha256 of INPUT as the last pass that reached its end read it."""

    def rows(self, *, skip: frozenset[int] = frozenset()) -> Iterator[Row | InvalidRow]:
        """Every row in order; lines in `skip` are passed over without being parsed."""
        seen = hashlib.sha256()
        records = _jsonl_records(self.path, seen) if self.fmt == "jsonl" else _csv_records(self.path, seen)
        for line, record in records:
            if line not in skip:
                yield self._row(line, record)
        self.digest = seen.hexdigest()

    def validate(self) -> Iterator[Row | InvalidRow]:
        """Every row, with a second use of an id (or of an object name) reported as invalid."""
        first_line: dict[str, int] = {}
        for row in self.rows():
            if isinstance(row, Row):
                row = _first_use(row, first_line)
            yield row

    def _row(self, line: int, record: dict[str, Any] | str) -> Row | InvalidRow:
        if isinstance(record, str):
            return InvalidRow(line, None, record)
        raw_id = record.pop("id", None)
        if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int, type(None))):
            return InvalidRow(line, None, f"id: must be a string or an integer (got {raw_id!r})")
        row_id = str(raw_id) if raw_id not in (None, "") else None
        try:
            request = parse_request(record, max_text_chars=self.max_text_chars)
        except InvalidRequest as exc:
            return InvalidRow(line, row_id, str(exc).removeprefix("invalid request: "))
        message = request.to_message()
        row_id = row_id if row_id is not None else naming.content_id(message)
        name = naming.object_name(row_id)
        own_session = "session_id" in message
        message.setdefault("session_id", naming.session_id(self.namespace, name))
        return Row(line, row_id, name, message, own_session)


def _first_use(row: Row, first_line: dict[str, int]) -> Row | InvalidRow:
    """The row, or an invalid one when its id, or the object its session names, was used before.

    Keys are kept per id and per effective session (given, or `<namespace>.<name>` by default): a row
    whose own session_id is another row's default one would otherwise overwrite that row's object."""
    session = row.message["session_id"]
    for key in (f"id:{row.name}", f"session:{session}"):
        seen = first_line.setdefault(key, row.line)
        if seen == row.line:
            continue
        if key.startswith("id:"):
            error = f"id {row.row_id!r} already used on line {seen}"
        elif row.own_session:
            error = f"session_id {session!r} already names the object of line {seen}"
        else:
            error = f"its object {session!r} (from its id) is already named by line {seen}"
        return InvalidRow(row.line, row.row_id, error)
    return row


def _jsonl_records(path: Path, seen: _Digest) -> Iterator[tuple[int, dict[str, Any] | str]]:
    # Bytes, decoded line by line, so that one line that is not UTF-8 is one invalid row.
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            seen.update(raw)
            try:
                record = (
                    json.loads(raw.decode("utf-8-sig" if number == 1 else "utf-8")) if raw.strip() else None
                )
            except ValueError as exc:  # UnicodeDecodeError is one too
                yield number, f"not valid JSON ({exc})"
                continue
            if record is not None:
                yield number, record if isinstance(record, dict) else "not a JSON object"


def _csv_records(path: Path, seen: _Digest) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """Each record with the physical line it starts on (a quoted cell may span lines; blank lines
    are skipped but counted), the header being the first line that is not blank."""
    dialect = "excel-tab" if path.suffix.lower() == ".tsv" else "excel"
    with path.open(encoding="utf-8-sig", newline="") as stream:
        reader = csv.reader(_hashed(stream, seen), dialect=dialect)
        header: list[str] | None = None
        ends = 0
        for cells in reader:
            start, ends = ends + 1, reader.line_num
            if not cells:
                continue
            if header is None:
                header = cells
            elif len(cells) > len(header):
                yield start, f"{len(cells) - len(header)} more cells than the header has columns"
            else:
                yield start, _from_cells(dict(zip(header, cells, strict=False)))  # a short row: cells unset


def _hashed(lines: Iterable[str], seen: _Digest) -> Iterator[str]:
    for line in lines:
        seen.update(line.encode("utf-8"))
        yield line


def _from_cells(cells: dict[str, str]) -> dict[str, Any] | str:
    record: dict[str, Any] = {}
    for column, cell in cells.items():
        if cell == "":
            continue
        try:
            record[column] = _convert(column, cell)
        except ValueError as exc:
            return f"{column}: {exc} (got {cell!r})"
    return record


def _convert(column: str, cell: str) -> Any:
    """A CSV cell as the type its column has in the request schema (unknown columns stay text)."""
    kind, text = _COLUMN_KINDS.get(column, str), cell.strip()
    if kind is str:
        return cell
    if kind is bool:
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
        raise ValueError("must be true or false")
    try:
        value = int(text) if kind is int else float(text) if kind is float else json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, kind):
        raise ValueError(_EXPECTED[kind])
    return value


_EXPECTED = {int: "must be an integer", float: "must be a number", list: "must be a JSON list like [0, 0.5]"}


def _kind(annotation: Any) -> type:
    """bool, int, float, list or str: the type a schema field takes, ignoring `| None`."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    origin = typing.get_origin(annotation) or annotation
    return origin if origin in (bool, int, float, list) else str


_COLUMN_KINDS = {name: _kind(field.annotation) for name, field in TTSRequest.model_fields.items()}
