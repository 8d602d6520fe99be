"""The checkpoints a run may resume from: only complete ones.

A trainer killed while it saves (SIGKILL, a lost node, the SIGTERM a trainer gets when its launching
command dies) leaves a `checkpoint-N/` without its `trainer_state.json`, which transformers' Trainer
writes last. TRL, transformers and Axolotl all resume from the highest-numbered folder and would crash
on such a one, so both stages set it aside first: renamed `checkpoint-N.incomplete`, kept rather than
deleted, and named in the log.
"""
from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

COMPLETE_MARKER = "trainer_state.json"
INCOMPLETE_SUFFIX = ".incomplete"


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
    """--fresh: every checkpoint, complete or set aside."""
    for folder in Path(output_dir).glob("checkpoint-*"):
        if folder.is_dir():
            shutil.rmtree(folder)
