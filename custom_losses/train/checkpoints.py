"""The checkpoints a run may resume from: only complete ones.

A trainer killed while it saves (SIGKILL, a lost node, the SIGTERM a trainer gets when its launching
command dies) leaves a `checkpoint-N/` without its `trainer_state.json`, which transformers' Trainer
writes last. TRL, transformers and Axolotl all resume from the highest-numbered folder and would crash
on such a one, so both stages set it aside first: renamed `checkpoint-N.incomplete`, kept rather than
deleted, and named in the log.

A run also resumes only into its own checkpoints: `claim_output_dir` records what determines the
result (a run's identity: its composed recipe and the digests of its inputs) in OUTPUT_DIR's run record
(prep.digests, the one record every producer keeps) and refuses to resume checkpoints made under another one.
"""
from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from prep.digests import RUN_RECORD, identity_difference, read_record, write_record

COMPLETE_MARKER = "trainer_state.json"
INCOMPLETE_SUFFIX = ".incomplete"


class ResumeRefused(Exception):
    """OUTPUT_DIR holds checkpoints of another run: one sentence naming what differs and how to start fresh."""


def numbered_checkpoints(output_dir: str | Path) -> list[Path]:
    """`checkpoint-N` folders in OUTPUT_DIR, by step."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def set_aside_incomplete(output_dir: str | Path, log: Callable[[str], None] = print) -> list[Path]:
    """Rename every checkpoint without its trainer state to checkpoint-N.incomplete; returns the new paths."""
    moved = []
    for folder in numbered_checkpoints(output_dir):
        if (folder / COMPLETE_MARKER).is_file():
            continue
        target = folder.with_name(folder.name + INCOMPLETE_SUFFIX)
        shutil.rmtree(target, ignore_errors=True)   # an older leftover of the same step
        folder.rename(target)
        log(f"{folder} was cut off while saving (no {COMPLETE_MARKER}): set aside as {target.name}")
        moved.append(target)
    return moved


def complete_checkpoints(output_dir: str | Path, log: Callable[[str], None] = print) -> list[Path]:
    """The checkpoints a run can resume from, oldest first, after setting aside the incomplete ones."""
    set_aside_incomplete(output_dir, log)
    return numbered_checkpoints(output_dir)


def remove_all(output_dir: str | Path) -> None:
    """--fresh: every checkpoint, complete or set aside (tolerant of another rank deleting the same ones)."""
    for folder in Path(output_dir).glob("checkpoint-*"):
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)


def claim_output_dir(output_dir: str | Path, identity: dict[str, Any], fresh: bool,
                     log: Callable[[str], None] = print, recipe_keys: Iterable[str] | None = None,
                     **extra: Any) -> list[Path]:
    """The complete checkpoints this run may resume from, after recording IDENTITY in OUTPUT_DIR's run record
    (prep.digests.RUN_RECORD, not done until the run marks it so).

    FRESH deletes every checkpoint first. Complete checkpoints made under another identity (only RECIPE_KEYS of
    its recipe compared, when given), or under none recorded, raise ResumeRefused naming --fresh. EXTRA is stored
    beside the identity.
    """
    output_dir = Path(output_dir)
    if fresh:
        remove_all(output_dir)
    existing = complete_checkpoints(output_dir, log)
    previous = read_record(output_dir / RUN_RECORD)
    if existing:
        if previous is None or not isinstance(previous.get("identity"), dict):
            raise ResumeRefused(f"output_dir {output_dir} holds checkpoints with no record of the run that made them "
                                f"({RUN_RECORD}); set another output_dir (--set output_dir=...) or use --fresh")
        difference = identity_difference(previous["identity"], identity, recipe_keys)
        if difference:
            raise ResumeRefused(f"output_dir {output_dir} holds checkpoints of another run ({difference}); set "
                                f"another output_dir (--set output_dir=...) or use --fresh")
    output_dir.mkdir(parents=True, exist_ok=True)
    write_record(output_dir / RUN_RECORD, identity, done=False, **extra)
    return existing


def mark_finished(output_dir: str | Path) -> None:
    """The run in OUTPUT_DIR trained to the end: its record says done (prep.digests.why_not_current then passes)."""
    record = read_record(Path(output_dir) / RUN_RECORD)
    if record is None or not isinstance(record.get("identity"), dict):
        raise RuntimeError(f"{output_dir}: no run record to mark finished ({RUN_RECORD})")
    extra = {key: value for key, value in record.items() if key not in ("identity", "done")}
    write_record(Path(output_dir) / RUN_RECORD, record["identity"], done=True, **extra)
