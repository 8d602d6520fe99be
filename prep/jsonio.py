"""JSON-lines I/O shared by every stage: line-numbered reading, atomic writes, crash-safe appends."""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO


class InputError(ValueError):
    """Bad input, reported as one sentence that names the file, the line and the field."""

    def __init__(self, path: str | os.PathLike, line: int | None, problem: str, field: str | None = None):
        self.path, self.line, self.field, self.problem = str(path), line, field, problem
        where = f"{self.path}:{line}" if line is not None else self.path
        what = f"field '{field}': {problem}" if field else problem
        super().__init__(f"{where}: {what}")


def iter_json_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, text) for each non-blank line; a JSON array file yields its items.

    JSON arrays are served item by item with the line on which each item starts, so callers
    report problems the same way for both layouts.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(path, None, "file not found") from None
    except UnicodeDecodeError as err:
        line = text_line_of_byte(path.read_bytes(), err.start)
        raise InputError(path, line, f"not valid UTF-8 ({err.reason})") from None
    stripped = text.lstrip("\ufeff \t\r\n")
    if stripped.startswith("["):
        yield from _iter_array_items(path, text)
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            yield number, line


def text_line_of_byte(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def _iter_array_items(path: Path, text: str) -> Iterator[tuple[int, str]]:
    decoder = json.JSONDecoder()
    try:
        items = decoder.decode(text.lstrip("\ufeff"))
    except json.JSONDecodeError as err:
        raise InputError(path, err.lineno, f"invalid JSON array ({err.msg}, column {err.colno})") from None
    # Recover each item's starting line by re-scanning the top-level array.
    position = text.index("[") + 1
    for _item in items:
        while text[position] in " \t\r\n,":
            position += 1
        _, end = decoder.raw_decode(text, position)
        yield text.count("\n", 0, position) + 1, text[position:end]
        position = end


def parse_object_line(path: str | os.PathLike, number: int, text: str) -> dict[str, Any]:
    """One line that must hold a JSON object, or InputError naming the file and line."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(path, number, f"invalid JSON ({err.msg}, column {err.colno})") from None
    if not isinstance(row, dict):
        raise InputError(path, number, f"expected a JSON object, got {type(row).__name__}")
    return row


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a JSONL file whose every line must be a JSON object (used for our own caches and outputs)."""
    return [parse_object_line(path, number, line) for number, line in iter_json_lines(path)]


def dumps(row: Any) -> str:
    return json.dumps(row, ensure_ascii=False, separators=(",", ":"))


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[Any]) -> Path:
    """Write rows to a temporary file beside PATH, fsync, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as handle:
        for row in rows:
            handle.write(dumps(row) + "\n")
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as handle:
        handle.write(text)
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, binary=True) as handle:
        handle.write(data)
    return path


class atomic_open:
    """Context manager: a text (or BINARY) handle on a temporary file that replaces PATH only on success."""

    def __init__(self, path: str | os.PathLike, binary: bool = False):
        self.path = Path(path)
        self.binary = binary

    def __enter__(self) -> TextIO:
        fd, self.tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        # mkstemp creates 0600; outputs are ordinary files, so give them the umask's usual mode.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        self.handle = os.fdopen(fd, "wb") if self.binary else os.fdopen(fd, "w", encoding="utf-8")
        return self.handle

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.handle.close()
            os.replace(self.tmp, self.path)
        else:
            self.handle.close()
            os.unlink(self.tmp)


class JsonlAppender:
    """Append-only JSONL log: each row is one write of one full line, flushed and fsynced.

    A process killed mid-write leaves at most a torn last line; `read_appended` drops that torn
    tail (it was never acknowledged) and truncates it away so the next append starts clean.
    """

    def __init__(self, path: str | os.PathLike, fsync: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self.handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (held open for the whole run, closed by close())

    def append(self, row: Any) -> None:
        self.handle.write(dumps(row) + "\n")
        self.handle.flush()
        if self.fsync:
            os.fsync(self.handle.fileno())

    def close(self) -> None:
        self.handle.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_appended(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of an append-only log written by JsonlAppender, repairing a torn last line."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1
    if complete < len(data):
        with open(path, "r+b") as handle:
            handle.truncate(complete)
    rows = []
    for number, line in enumerate(data[:complete].decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise InputError(path, number, f"corrupt cache line ({err.msg}); delete the line or use --fresh") from None
    return rows


def write_dir_atomic(folder: str | os.PathLike, write: Any) -> Path:
    """WRITE(staging) fills a sibling folder that then replaces FOLDER: readers never see half a folder
    (e.g. a `datasets` save_to_disk)."""
    import shutil

    folder = Path(folder)
    staging, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    for path in (staging, old):
        shutil.rmtree(path, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    write(staging)
    if folder.exists():
        folder.rename(old)
    staging.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def build_dir_once(target: str | os.PathLike, build: Any) -> Path:
    """A cached build: BUILD(staging) fills a per-process staging folder that is published as TARGET unless
    TARGET exists. Two processes may build at once; the first to publish wins and the other's identical
    copy is discarded, so readers only ever see a complete folder."""
    import shutil

    target = Path(target)
    if target.exists():
        return target
    staging = target.with_name(f"{target.name}.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    build(staging)
    try:
        os.replace(staging, target)
    except OSError:  # another process published first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def save_splits(rows_by_split: dict[str, list[dict]], features: Any, folder: str | os.PathLike) -> Path:
    """A `datasets` DatasetDict of the given splits, written with write_dir_atomic.

    datasets 4.8 saves an empty split as zero shards, which load_from_disk cannot read back, so an
    empty split is written as one empty shard.
    """
    from datasets import Dataset, DatasetDict, disable_progress_bars

    disable_progress_bars()  # one bar per split per save: noise beside the stage's own progress bar
    splits = {name: Dataset.from_dict({column: [row[column] for row in rows] for column in features}, features=features)
              for name, rows in rows_by_split.items()}
    empty = {name: 1 for name, split in splits.items() if len(split) == 0}
    return write_dir_atomic(folder, lambda staging: DatasetDict(splits).save_to_disk(str(staging), num_shards=empty))
