"""The checkpoints a run may resume from: only complete ones.

A trainer killed while it saves (SIGKILL, a lost node, the SIGTERM a trainer gets when its launching
command dies) leaves a `checkpoint-N/` without its `trainer_state.json`, which transformers' Trainer
writes last. TRL, transformers and Axolotl all resume from the highest-numbered folder and would crash
on such a one, so both stages set it aside first: renamed `checkpoint-N.incomplete`, kept rather than
deleted, and named in the log.

A run also resumes only into its own checkpoints: `claim_output_dir` records what determines the
result (a run's identity: its composed recipe and the digests of its inputs) in OUTPUT_DIR/RUN_RECORD
and refuses to resume checkpoints made under another one.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prep.jsonio import write_text_atomic

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


def read_record(path: str | Path) -> dict[str, Any] | None:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except json.JSONDecodeError:  # a record cut off mid-write is no record
        return None


def identity_difference(previous: dict[str, Any], current: dict[str, Any]) -> str | None:
    """What differs between two run identities ({"recipe": {...}, other input: digest}), in words; None if nothing."""
    old_recipe, new_recipe = previous.get("recipe") or {}, current.get("recipe") or {}
    for key in sorted(set(old_recipe) | set(new_recipe)):
        if old_recipe.get(key) != new_recipe.get(key):
            return f"recipe key '{key}': {old_recipe.get(key)!r} -> {new_recipe.get(key)!r}"
    for name in sorted(set(previous) | set(current)):
        if name != "recipe" and previous.get(name) != current.get(name):
            return f"{name} changed: {previous.get(name)} -> {current.get(name)}"
    return None


def claim_output_dir(output_dir: str | Path, identity: dict[str, Any], record_name: str, fresh: bool,
                     log: Callable[[str], None] = print, extra: dict[str, Any] | None = None) -> list[Path]:
    """The complete checkpoints this run may resume from, after recording IDENTITY in OUTPUT_DIR/RECORD_NAME.

    FRESH deletes every checkpoint first. Complete checkpoints made under another identity, or under none
    recorded, raise ResumeRefused naming --fresh. EXTRA (e.g. a digest cache) is stored beside the identity.
    """
    output_dir = Path(output_dir)
    record_path = output_dir / record_name
    identity = json.loads(json.dumps(identity, sort_keys=True, default=str))  # as it reads back from the record
    if fresh:
        remove_all(output_dir)
    existing = complete_checkpoints(output_dir, log)
    previous = read_record(record_path)
    if existing:
        if previous is None or "identity" not in previous:
            raise ResumeRefused(f"output_dir {output_dir} holds checkpoints with no record of the run that made them "
                                f"({record_name}); set another output_dir (--set output_dir=...) or use --fresh")
        difference = identity_difference(previous["identity"], identity)
        if difference:
            raise ResumeRefused(f"output_dir {output_dir} holds checkpoints of another run ({difference}); set "
                                f"another output_dir (--set output_dir=...) or use --fresh")
    record = {"identity": identity, **(extra or {})}
    if previous != json.loads(json.dumps(record, default=str)):  # every rank may get here: write only a change
        write_text_atomic(record_path, json.dumps(record, indent=1, sort_keys=True, default=str) + "\n")
    return existing
