"""Where medkd's files are: the one path resolver every command and recipe goes through.

A path named in a recipe or on a command line is taken relative to the working directory when it
exists there, else relative to the repository, so recipes run from any directory.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "data"
RECIPES_DIR = REPO_ROOT / "recipes"


def resolve_path(path: str | os.PathLike) -> Path:
    """PATH as given when absolute or present in the working directory, else under the repository."""
    path = Path(path).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return REPO_ROOT / path


def cache_dir() -> Path:
    """Built artefacts that are not source: the BPE ranks, the tokenizer, the tiny fixture model."""
    return Path(os.environ.get("MEDKD_CACHE", REPO_ROOT / ".cache"))


def free_gib(path: str | os.PathLike) -> float:
    """GiB free on the disk that holds PATH (or its nearest existing parent: an output folder not made yet)."""
    probe = Path(path).absolute()
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free / 2**30
