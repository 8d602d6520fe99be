"""Content digests for the pipeline's step keys: files, folders, recipes and the code that runs a step.

make, DVC and Bazel share the rule the pipeline follows: a result is up to date when a digest of
everything that determines it matches the one recorded when it was made. This module computes those
digests. A file's digest is its content's sha256, remembered in a small JSON cache keyed by path, size,
modification time and inode (DVC's state database does the same), so a 15 GB model folder is read once
and an unchanged re-run costs a `stat` per file; touching a file re-reads it and finds the same digest.

The code digest of a command is the digest of every first-party module it imports, directly or not
(found by reading the import statements, without importing anything), plus medkd's version and pins:
editing prep/stages/teacher.py changes the teacher step's key and not the merge step's.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

from prep.config import compose
from prep.jsonio import write_text_atomic
from prep.paths import RECIPES_DIR, REPO_ROOT, resolve_path

FIRST_PARTY = ("prep", "custom_losses", "launch")
# What pip installs from: a changed pin is a changed library under every step.
PIN_FILES = (REPO_ROOT / "constraints.txt",)
CHUNK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(value: Any) -> str:
    return sha256_bytes(json.dumps(value, sort_keys=True, ensure_ascii=False, default=str).encode())


class DigestCache:
    """sha256 of files, remembered across runs in PATH (a JSON map) while a file's size, mtime and inode stay."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries: dict[str, list] = {}
        if path is not None and path.is_file():
            try:
                self.entries = json.loads(path.read_text(encoding="utf-8"))
            except ValueError:   # a torn cache only costs a re-read of the files
                self.entries = {}
        self.changed = False

    def file(self, path: Path) -> str:
        stat = path.stat()
        signature = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
        key = str(path.absolute())
        entry = self.entries.get(key)
        if entry and entry[:3] == signature:
            return entry[3]
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while block := handle.read(CHUNK):
                digest.update(block)
        self.entries[key] = [*signature, digest.hexdigest()]
        self.changed = True
        return digest.hexdigest()

    def tree(self, folder: Path) -> str:
        """One digest over every file's relative path and content (hidden files and caches left out)."""
        return sha256_json([(str(path.relative_to(folder)), self.file(path)) for path in tree_files(folder)])

    def digest(self, path: Path) -> str:
        return self.tree(path) if path.is_dir() else self.file(path)

    def save(self) -> None:
        if self.path is not None and self.changed:
            write_text_atomic(self.path, json.dumps(self.entries, sort_keys=True))
            self.changed = False


def tree_files(folder: Path) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        files += [Path(root) / name for name in sorted(names) if not name.startswith(".")]
    return files


# --------------------------------------------------------------------------- recipes

def named_paths(value: Any) -> Iterator[str]:
    """Every string in a composed recipe (nested dicts and lists), where a path or model reference may hide."""
    if isinstance(value, dict):
        for item in value.values():
            yield from named_paths(item)
    elif isinstance(value, list):
        for item in value:
            yield from named_paths(item)
    elif isinstance(value, str) and value and "\n" not in value and len(value) < 4096:
        yield value


def recipe_inputs(data: dict[str, Any], exclude: Iterable[Path] = (), _seen: set[Path] | None = None,
                  model_folder: Callable[[str], str] = str) -> list[Path]:
    """The files and folders a composed recipe names that exist (prompt files, a lexicon, a DeepSpeed config,
    a local base model), and those named by the recipes it names in turn (a teacher's serve recipe); paths
    under EXCLUDE (the run folder: other steps' outputs, keyed by those steps) are left out. MODEL_FOLDER maps a
    name to the folder it stands for (the tiny fixture's name to its built folder; the pipeline passes it)."""
    seen = set() if _seen is None else _seen
    excluded = [path.absolute() for path in exclude]
    found: list[Path] = []
    for text in named_paths(data):
        text = model_folder(text)
        if "/" in text or text.endswith((".txt", ".json", ".jsonl", ".yaml", ".yml", ".jinja")):
            path = resolve_path(text)
            if not path.exists():
                continue
        else:
            continue
        path = path.absolute()
        if path in seen or any(path.is_relative_to(root) for root in excluded):
            continue
        if path.is_dir() and not (path / "config.json").is_file():   # a model folder, not any folder (e.g. "/")
            continue
        seen.add(path)
        found.append(path)
        if path.suffix in (".yaml", ".yml") and path.is_relative_to(RECIPES_DIR.absolute()):
            found += recipe_inputs(compose(path), exclude, seen, model_folder)
    return found


# --------------------------------------------------------------------------- code

def module_file(name: str) -> Path | None:
    """prep.stages.teacher -> prep/stages/teacher.py (or the package's __init__.py); None for a third-party module."""
    if name.split(".")[0] not in FIRST_PARTY:
        return None
    base = REPO_ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path, package: str) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:   # relative import: resolved against this module's package
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)   # `from prep import teacher`
    return names


@cache
def code_files(module: str) -> tuple[Path, ...]:
    """The source files of MODULE and of every first-party module it imports, transitively, sorted."""
    found: dict[str, Path] = {}
    pending = [module]
    while pending:
        name = pending.pop()
        path = module_file(name)
        if path is None or name in found:
            continue
        found[name] = path
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        pending += imported_modules(path, package)
    return tuple(sorted(set(found.values())))


def code_parts(module: str, cache: DigestCache) -> dict[str, str]:
    """`code:<file>` -> digest for every source file MODULE runs, `pins:<file>` for the version pins and
    `pins:medkd` for the package's version."""
    parts = {f"code:{path.relative_to(REPO_ROOT)}": cache.file(path) for path in code_files(module)}
    parts.update({f"pins:{path.relative_to(REPO_ROOT)}": cache.file(path) for path in PIN_FILES if path.is_file()})
    parts["pins:medkd"] = medkd_version()
    return parts


@cache
def medkd_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("medkd")
    except PackageNotFoundError:   # a checkout used without `pip install -e .`
        return "unknown"
