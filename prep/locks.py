"""One writer per folder: an exclusive advisory lock on FOLDER/.medkd.lock for as long as a run writes there.

`fcntl.flock` on an open file description: the kernel releases it when the holder exits, however it exits
(SIGKILL included), so a lock is never left behind and never needs deleting by hand. The file itself stays
(it holds the last holder's pid and start time, which a refused run names); a hidden name keeps it out of
every content digest (prep.digests skips dot files). The descriptor is not inherited by child processes (a
vLLM server the run starts), so the lock ends with the run that took it.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = ".medkd.lock"


class FolderInUse(RuntimeError):
    """Another process holds the folder's lock: one sentence naming it, for exit status 2."""

    def __init__(self, folder: Path, holder: dict, choose: str):
        self.folder, self.holder = folder, holder
        pid = holder.get("pid", "unknown")
        since = holder.get("since", "an unknown time")
        super().__init__(f"{folder} is in use by another medkd run (pid {pid}, since {since}); wait for it or "
                         f"choose {choose}")


def _holder(fd: int) -> dict:
    """What the lock file says of its holder ({} while the holder has not written it yet)."""
    with contextlib.suppress(OSError, ValueError):
        data = os.pread(fd, 4096, 0)
        holder = json.loads(data.decode("utf-8")) if data.strip() else {}
        return holder if isinstance(holder, dict) else {}
    return {}


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, choose: str = "another --out") -> Iterator[Path]:
    """Hold FOLDER's lock (made if missing) while the block runs; FolderInUse at once when another process
    holds it (CHOOSE names what to change instead, e.g. "another --out"). Yields the lock file's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderInUse(folder.absolute(), _holder(fd), choose) from None
        # Who holds it, for the message a refused run prints; a full disk may refuse these bytes, not the lock.
        with contextlib.suppress(OSError):
            record = json.dumps({"pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, record, 0)
        yield path
    finally:
        os.close(fd)      # releases the lock
