"""Where medkd's files are: the two rules for relative paths, and the folders medkd keeps its own files in.

- A path given on the command line as data (cases, --out, --answers, a model folder, a rejects file, a
  pipeline's `--set out=...`) is relative to the caller's working directory, and only to it
  (`cli_path`): from /tmp, `data/sample_cases.jsonl` is /tmp/data/sample_cases.jsonl, found or not, for
  every command alike; an output lands under the directory the command was run from.
- A path named inside a recipe (a serve recipe, prompt files, a lexicon, the pipeline's case files and
  `out`), a recipe named with --config or --overlay, and a recipe value set with --set: the working
  directory when it exists there, else the repository (`resolve_path`), so the shipped recipes, which
  name the repository's files, run from any directory.

The README's commands run from the repository root, where both rules name the same file.
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


def cli_path(path: str | os.PathLike) -> Path:
    """A data path from the command line, absolute: relative to the caller's working directory, never the
    repository (so a message about it names the file that was looked at)."""
    return Path(path).expanduser().absolute()


def cache_dir() -> Path:
    """Built artefacts that are not source: the BPE ranks, the tokenizer, the tiny fixture model."""
    return Path(os.environ.get("MEDKD_CACHE", REPO_ROOT / ".cache"))


def free_gib(path: str | os.PathLike) -> float:
    """GiB free on the disk that holds PATH (or its nearest existing parent: an output folder not made yet)."""
    probe = Path(path).absolute()
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free / 2**30
