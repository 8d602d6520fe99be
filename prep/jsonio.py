"""JSON-lines I/O shared by every stage: line-numbered reading, atomic writes, crash-safe appends."""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

log = logging.getLogger("medkd.jsonio")


class InputError(ValueError):
    """Bad input, reported as one sentence that names the file, the line and the field."""

    def __init__(self, path: str | os.PathLike, line: int | None, problem: str, field: str | None = None):
        self.path, self.line, self.field, self.problem = str(path), line, field, problem
        where = f"{self.path}:{line}" if line is not None else self.path
        what = f"field '{field}': {problem}" if field else problem
        super().__init__(f"{where}: {what}")


class DiskFull(Exception):
    """The disk refused a write (ENOSPC): one sentence naming where, for its own exit status (3).

    Never an OSError subclass, so no `except OSError` on the way up mistakes it for a missing file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        super().__init__(f"disk full at {self.path}; free space and run the same command again: nothing answered "
                         f"is lost")


_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def _chain(err: BaseException | None) -> Iterator[BaseException]:
    """ERR and the exceptions it was raised from or during (a bounded walk)."""
    for _ in range(16):
        if err is None:
            return
        yield err
        err = err.__cause__ or err.__context__


def is_disk_full(err: BaseException) -> bool:
    """Whether ERR (or one it came from) is a full disk or quota here: an OSError with ENOSPC / EDQUOT, or pyarrow's
    OSError wording it (never a message that merely quotes it, such as a server's own disk trouble)."""
    return any(isinstance(e, DiskFull) or (isinstance(e, OSError) and (
        e.errno in _FULL_ERRNOS or "No space left on device" in str(e))) for e in _chain(err))


def disk_full_at(err: BaseException, default: str | os.PathLike) -> DiskFull:
    """ERR (a full disk, is_disk_full) as DiskFull naming the file it hit, else DEFAULT."""
    for e in _chain(err):
        if isinstance(e, DiskFull):
            return e
        if isinstance(e, OSError) and e.filename:
            return DiskFull(e.filename)
    return DiskFull(default)


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
    text = text.removeprefix("\ufeff")     # a byte-order mark (Windows editors write one) is no part of the first line
    if text.lstrip(" \t\r\n").startswith("["):
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
        items = decoder.decode(text)
    except json.JSONDecodeError as err:
        if "\x00" in text:
            line = text.count("\n", 0, text.index("\x00")) + 1
            raise InputError(path, line, nul_problem(text.splitlines()[line - 1])) from None
        raise InputError(path, err.lineno, f"invalid JSON array ({err.msg}, column {err.colno})") from None
    # Recover each item's starting line by re-scanning the top-level array.
    position = text.index("[") + 1
    for _item in items:
        while text[position] in " \t\r\n,":
            position += 1
        _, end = decoder.raw_decode(text, position)
        yield text.count("\n", 0, position) + 1, text[position:end]
        position = end


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object_pairs_hook: an object, or _DuplicateKey for a key given twice."""
    row: dict[str, Any] = {}
    for key, value in pairs:
        if key in row:
            raise _DuplicateKey(key)
        row[key] = value
    return row


def nul_problem(text: str) -> str | None:
    """What to say of raw NUL bytes in a line (a crash or a copy padded the file with them), or None."""
    if "\x00" not in text:
        return None
    return (f"holds {text.count(chr(0))} raw NUL byte(s), the first at column {text.index(chr(0)) + 1} (not text: a "
            f"crashed writer or a copy padded the file with them); remove them")


def parse_object_line(path: str | os.PathLike, number: int, text: str) -> dict[str, Any]:
    """One line that must hold a JSON object, or InputError naming the file and line.

    A key given twice in one object is refused, naming it: json.loads keeps the last value, other readers
    (a grader's) may keep the first, so such a line means different things to different readers."""
    if (problem := nul_problem(text)) is not None:
        raise InputError(path, number, problem)
    try:
        row = json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as err:
        raise InputError(path, number, f"invalid JSON ({err.msg}, column {err.colno})") from None
    except ValueError as err:    # a number of more digits than Python converts (int_max_str_digits)
        if not isinstance(err, _DuplicateKey):
            raise InputError(path, number, f"invalid JSON ({err})") from None
        raise InputError(path, number, "appears twice in one object (readers disagree on which value counts: "
                                       "json.loads keeps the last, others the first); keep one", field=err.key) from None
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
            try:
                self.handle.flush()
                os.fsync(self.handle.fileno())
                self.handle.close()
                os.replace(self.tmp, self.path)
            except OSError as err:
                self._discard()
                if is_disk_full(err):
                    raise DiskFull(self.path) from err
                raise
        else:
            self._discard()
            if is_disk_full(exc) and not isinstance(exc, DiskFull):
                raise DiskFull(self.path) from exc

    def _discard(self) -> None:
        """Close (a full disk may refuse the buffered rest: nothing to keep) and delete the temporary file."""
        with contextlib.suppress(OSError):
            self.handle.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


class JsonlAppender:
    """Append-only JSONL log: each row is one write of one full line, flushed and fsynced.

    A process killed mid-write leaves at most a torn last line; `read_appended` drops that torn
    tail (it was never acknowledged) and truncates it away so the next append starts clean. A full
    disk is the same: the row it refused (maybe half written) raises DiskFull, nothing more is
    appended, and the next run finds the rows before it whole.
    """

    def __init__(self, path: str | os.PathLike, fsync: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self.full = False
        self.handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (held open for the whole run, closed by close())

    def append(self, row: Any) -> None:
        if self.full:
            raise DiskFull(self.path)
        with self._refused():
            self.handle.write(dumps(row) + "\n")
            self.handle.flush()
            if self.fsync:
                os.fsync(self.handle.fileno())

    def sync(self) -> None:
        """fsync what was appended (power loss); a no-op once the disk is full."""
        if not self.full:
            with self._refused():
                os.fsync(self.handle.fileno())

    @contextlib.contextmanager
    def _refused(self) -> Iterator[None]:
        """An ENOSPC inside the block as DiskFull naming this file; the appender takes nothing more."""
        try:
            yield
        except OSError as err:
            if not is_disk_full(err):
                raise
            self.full = True
            raise DiskFull(self.path) from err

    def close(self) -> None:
        try:
            self.handle.close()
        except OSError as err:     # the buffered rest of a refused row: already reported, never acknowledged
            if not (self.full and is_disk_full(err)):
                raise

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_appended(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of an append-only log written by JsonlAppender, repairing a torn last line.

    The file is read as bytes and each line decoded on its own, so one bad line is one problem, never the
    whole file's: a corrupt line in the middle (not UTF-8, e.g. cut inside a multi-byte character; not JSON;
    not an object) is moved to PATH's `.corrupt.jsonl` sibling with its line number and why, the file is
    rewritten without it (every other line byte for byte) and one warning names file and line. For a cache
    that costs only the row that line held, which the stage then asks for again."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1
    if complete < len(data):
        with open(path, "r+b") as handle:
            handle.truncate(complete)
    rows, corrupt, kept = [], [], []
    for number, raw in enumerate(data[:complete].split(b"\n")[:-1], start=1):
        if not raw.strip():
            kept.append(raw)
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
            problem = None if isinstance(row, dict) else f"expected a JSON object, got {type(row).__name__}"
        except UnicodeDecodeError as err:
            problem = f"not valid UTF-8 at byte {err.start} of the line ({err.reason}: cut inside a character?)"
        except json.JSONDecodeError as err:
            problem = nul_problem(raw.decode("utf-8")) or f"invalid JSON ({err.msg}, column {err.colno})"
        if problem is None:
            rows.append(row)
            kept.append(raw)
        else:
            corrupt.append((number, raw, problem))
    if corrupt:
        _set_aside_corrupt(path, corrupt, kept)
    return rows


def _set_aside_corrupt(path: Path, corrupt: list[tuple[int, bytes, str]], kept: list[bytes]) -> Path:
    """Append CORRUPT lines (number, bytes, problem) to PATH's .corrupt.jsonl sibling, then rewrite PATH with
    the KEPT lines only; one warning, on stderr and in the log."""
    aside = path.with_name(f"{path.stem}.corrupt.jsonl")
    when = time.strftime("%Y-%m-%d %H:%M:%S")
    with open(aside, "a", encoding="utf-8") as handle:
        for number, raw, problem in corrupt:
            handle.write(dumps({"file": str(path), "line": number, "problem": problem, "at": when,
                                "text": raw.decode("utf-8", "backslashreplace")}) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    write_bytes_atomic(path, b"".join(line + b"\n" for line in kept))
    number, _, problem = corrupt[0]
    more = f" (and {len(corrupt) - 1} more corrupt line(s): {', '.join(str(n) for n, _, _ in corrupt[1:6])}" \
           f"{' ...' if len(corrupt) > 6 else ''})" if len(corrupt) > 1 else ""
    line = (f"warning: {path}:{number}: corrupt line ({problem}){more} moved to {aside}; every other row is "
            f"kept, and what the line held is asked for again")
    log.warning("%s", line.removeprefix("warning: "))
    print(line, file=sys.stderr)
    return aside


def write_dir_atomic(folder: str | os.PathLike, write: Any) -> Path:
    """WRITE(staging) fills a sibling folder that then replaces FOLDER: readers never see half a folder
    (e.g. a `datasets` save_to_disk).

    The staging and set-aside names are hidden and unique to the call (`.NAME.tmp-PID-TOKEN`), so two
    processes (or threads) saving the same folder never share one: the last to finish wins, each publishes a
    whole folder. What a killed process left behind is removed by the next save (its pid no longer runs)."""
    import shutil

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(folder)
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    staging = folder.with_name(f".{folder.name}.tmp-{token}")
    set_aside: list[Path] = []
    try:
        try:
            write(staging)
        except Exception as err:            # e.g. pyarrow's wording of ENOSPC, which names no file
            if is_disk_full(err) and not isinstance(err, DiskFull):
                raise DiskFull(folder) from err
            raise
        for attempt in range(100):
            old = folder.with_name(f".{folder.name}.old-{token}-{attempt}")
            with contextlib.suppress(FileNotFoundError):
                folder.rename(old)
                set_aside.append(old)
            try:
                staging.rename(folder)
                break
            except OSError as err:      # another process published between our two renames: set it aside too
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST) or attempt == 99:
                    raise
    finally:
        for path in (staging, *set_aside):
            shutil.rmtree(path, ignore_errors=True)
    return folder


def _pid_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_abandoned(folder: Path) -> None:
    """Staging and set-aside siblings of FOLDER whose process no longer runs (and the fixed names of old)."""
    import shutil

    for path in (folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")):
        shutil.rmtree(path, ignore_errors=True)
    if not folder.parent.is_dir():
        return
    for path in folder.parent.glob(f".{folder.name}.*-*"):
        kind, _, rest = path.name[len(folder.name) + 2:].partition("-")
        pid = rest.split("-")[0]
        if kind in ("tmp", "old") and pid.isdigit() and not _pid_runs(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


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
