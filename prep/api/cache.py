"""The exactly-once cache runner: each finished item is appended to a JSONL cache under a key, and a later
run asks only for the keys the cache lacks."""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from prep.api.endpoint import ClientStats, SpendCapReached
from prep.api.pool import ChatClient
from prep.api.settings import ClientError, RequestFailed
from prep.jsonio import JsonlAppender, read_appended

log = logging.getLogger("medkd.client")


# ---- the exactly-once cache runner ---------------------------------------------------------------

def cache_key(**parts: Any) -> str:
    """A short digest of everything that determines an answer (ids, prompt hash, model, sampling, constraint)."""
    text = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def load_cache(cache_path: str | Path) -> dict[str, dict[str, Any]]:
    """key -> row of an append-only cache; a torn last line (killed writer) is dropped, a corrupt line elsewhere is
    set aside with a warning (prep.jsonio.read_appended: its item is asked again), the first row per key wins."""
    rows: dict[str, dict[str, Any]] = {}
    for row in read_appended(cache_path):
        rows.setdefault(row.get("key"), row)
    return rows


def archive_cache(cache_path: str | Path) -> Path | None:
    """Move a cache aside (for --fresh): paid-for answers are never deleted. The stage calls it holding its output
    folder's lock (prep.locks), so no other run is appending to the cache it moves."""
    path = Path(cache_path)
    if not path.exists():
        return None
    target = path.with_name(f"{path.name}.{datetime.now():%Y%m%d-%H%M%S}.bak")
    path.rename(target)
    return target


@dataclass
class RunReport:
    total: int                       # items given
    cached: int                      # found in the cache, not asked
    asked: int                       # items started this run
    finished: int                    # items appended to the cache this run
    failed: list[dict[str, Any]]     # {"key", "item", "error", "reason"}: not cached, asked again next run
    wall_s: float
    stopped: str | None = None       # why the run stopped before asking everything (a spend cap), if it did

    def to_json(self) -> dict[str, Any]:
        return {"items": self.total, "cached": self.cached, "asked": self.asked, "finished": self.finished,
                "failed": len(self.failed), "wall_s": round(self.wall_s, 3)}


def uncached(items: list[Any], key_fn: Callable[[Any], str], cache_path: str | Path) -> list[tuple[str, Any]]:
    """(key, item) for each item whose key the cache lacks, the first of any items sharing a key."""
    done, pending = set(load_cache(cache_path)), {}
    for item in items:
        key = key_fn(item)
        if key not in done and key not in pending:
            pending[key] = item
    return list(pending.items())


async def run_cached(
    items: Iterable[Any],
    key_fn: Callable[[Any], str],
    work_fn: Callable[[Any], Awaitable[dict[str, Any]]],
    cache_path: str | Path,
    *,
    max_in_flight: int = 16,
    stats: ClientStats | None = None,
    desc: str = "items",
    label_fn: Callable[[Any], Hashable] = repr,
    abort_after_failures: int | None = None,
    progress: bool = True,
    fsync_interval_s: float = 1.0,
    client: ChatClient | None = None,
) -> RunReport:
    """Run WORK_FN on every item whose key the cache lacks, appending each result as `{"key": ..., **row}`.

    Exactly once: a row is appended (and flushed to the OS, so a SIGKILL cannot lose it) as soon as
    its item finishes; a rerun skips every key already there, so only the items in flight at a
    kill are paid twice. fsync (power loss) happens at most every FSYNC_INTERVAL_S and at the end.
    A work_fn raising RequestFailed fails that item only (not cached, reported, retried next run);
    ClientError stops the run; ABORT_AFTER_FAILURES failures in a row stop it too (the stages pass their
    recipe's client.abort_after_failures; None never stops). SpendCapReached stops it cleanly: nothing
    new starts, what is in flight finishes and is cached, and the report says why (`stopped`). CLIENT, when
    given, is told how many items are not yet started (ChatClient.backlog), for its end-of-run routing.

    Long because the task loop, the appender, the progress bar and the cancellation of what is still
    running (in `finally`, on any way out) share their state: split apart, each piece would take and
    return most of it.
    """
    from tqdm import tqdm

    started = time.perf_counter()
    items = list(items)
    pending = uncached(items, key_fn, cache_path)
    report = RunReport(len(items), len(items) - len(pending), len(pending), 0, [], 0.0)
    if not pending:
        report.wall_s = time.perf_counter() - started
        return report

    bar = tqdm(total=len(pending), desc=desc, unit="it", disable=not progress, dynamic_ncols=True, mininterval=0.5)
    appender = JsonlAppender(cache_path, fsync=False)
    queue = iter(pending)
    running: dict[asyncio.Task, tuple[str, Any]] = {}
    consecutive_failures, last_fsync, started_items = 0, time.monotonic(), 0

    def launch() -> None:
        nonlocal started_items
        if report.stopped:
            return
        for key, item in queue:
            running[asyncio.ensure_future(work_fn(item))] = (key, item)
            started_items += 1
            if len(running) >= max_in_flight:
                break
        if client is not None:
            client.backlog = len(pending) - started_items

    try:
        launch()
        while running:
            finished, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in finished:
                key, item = running.pop(task)
                error = task.exception()
                if error is None:
                    appender.append({"key": key, **task.result()})
                    report.finished += 1
                    consecutive_failures = 0
                elif isinstance(error, RequestFailed):
                    report.failed.append({"key": key, "item": label_fn(item), "error": str(error),
                                          "reason": error.reason})
                    consecutive_failures += 1
                    log.warning("%s %s failed: %s", desc, label_fn(item), error)
                elif isinstance(error, SpendCapReached):
                    if not report.stopped:
                        log.warning("%s", error)
                    report.stopped = str(error)
                    continue        # not done: no progress tick, asked next run
                else:
                    raise error
                bar.update(1)
            if abort_after_failures and consecutive_failures >= abort_after_failures:
                raise ClientError(f"{consecutive_failures} {desc} in a row failed (last: "
                                  f"{report.failed[-1]['error']}); stopping; fix the cause and run the same command "
                                  f"again to resume")
            if stats is not None:
                bar.set_postfix(failed=len(report.failed), retries=stats.retries, tok_in=stats.prompt_tokens,
                                tok_out=stats.completion_tokens, refresh=False)
            if time.monotonic() - last_fsync > fsync_interval_s:
                appender.sync()
                last_fsync = time.monotonic()
            launch()
    finally:
        for task in running:
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)
        try:
            appender.sync()
        finally:
            appender.close()
        bar.close()
        report.wall_s = time.perf_counter() - started
    return report
