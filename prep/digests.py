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
from prep.paths import RECIPES_DIR, REPO_ROOT, cache_dir, resolve_path

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


# --------------------------------------------------------------------------- the run-identity record

# One answer, for every producer of an output, to "is this output what this recipe and these inputs make?":
# a record {"identity": {part: value}, "done": bool, ...} beside the output. A pipeline step keeps it as
# OUT/stamps/<step>.json (a step writes several outputs); SFT, distill and merge keep RUN_RECORD in the folder
# they write. The identity's parts are named: "recipe" (the composed recipe's keys, or its digest), "dep:<step>",
# "file:<path>", "code:<file>", "pins:<what>", "argv", or a plain name ("soft-label data", "starting model").
RUN_RECORD = "medkd-run.json"
_PART_WORDS = {"dep": "upstream {} changed", "file": "{} changed", "code": "code {} changed", "pins": "{} changed"}


def read_record(path: str | Path) -> dict[str, Any] | None:
    """The record at PATH (a folder means its RUN_RECORD); None when there is none or it was cut off mid-write."""
    path = Path(path)
    path = path / RUN_RECORD if path.is_dir() else path
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def as_recorded(identity: dict[str, Any]) -> dict[str, Any]:
    """IDENTITY as it reads back from a record (tuples as lists, paths as strings), so the two compare equal."""
    return json.loads(json.dumps(identity, sort_keys=True, default=str))


def write_record(path: str | Path, identity: dict[str, Any], *, done: bool, **extra: Any) -> dict[str, Any]:
    """Record IDENTITY at PATH (a folder means its RUN_RECORD), atomically; DONE says the output is complete.
    EXTRA (timings, a content digest) is kept beside it and is not part of the identity."""
    path = Path(path)
    path = path / RUN_RECORD if path.is_dir() else path
    record = {"identity": as_recorded(identity), "done": done, **as_recorded(extra)}
    if read_record(path) != record:          # several ranks may get here: write only a change
        write_text_atomic(path, json.dumps(record, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    return record


def _part_words(name: str, old: Any, new: Any) -> str:
    kind, _, what = name.partition(":")
    if kind in _PART_WORDS and what:
        return _PART_WORDS[kind].format(what)
    if name == "argv":
        return "command changed"
    if name == "recipe" and not isinstance(old, dict) and not isinstance(new, dict):
        return "recipe changed"
    return f"{name} changed: {old} -> {new}"


def identity_difference(previous: dict[str, Any], current: dict[str, Any],
                        recipe_keys: Iterable[str] | None = None) -> str | None:
    """What differs between two identities, in words (`recipe key 'lr': 0.1 -> 0.2`, `upstream teacher changed,
    data/prompts/user.txt changed`); None when nothing does. RECIPE_KEYS limits the recipe keys compared (those
    that make checkpoints another model's); every other part is always compared."""
    current = as_recorded(current)
    words = []
    old_recipe, new_recipe = previous.get("recipe"), current.get("recipe")
    if isinstance(old_recipe, dict) and isinstance(new_recipe, dict):
        keys = sorted(set(old_recipe) | set(new_recipe)) if recipe_keys is None else list(recipe_keys)
        words += [f"recipe key '{key}': {old_recipe.get(key)!r} -> {new_recipe.get(key)!r}"
                  for key in keys if old_recipe.get(key) != new_recipe.get(key)]
    names = [name for name in current if name != "recipe" or not isinstance(new_recipe, dict)]
    names += [name for name in previous if name not in current]
    words += [_part_words(name, previous.get(name), current.get(name))
              for name in dict.fromkeys(names) if previous.get(name) != current.get(name)]
    words = list(dict.fromkeys(words))
    if not words:
        return None
    return ", ".join(words[:3]) + (f" and {len(words) - 3} more" if len(words) > 3 else "")


def why_not_current(path: str | Path, identity: dict[str, Any]) -> str | None:
    """None when the record at PATH says its output is complete and made by IDENTITY; else why not, in words."""
    record = read_record(path)
    if record is None:
        return "not run yet"
    if not isinstance(record.get("identity"), dict):
        return "made by an older medkd, without a content key"
    difference = identity_difference(record["identity"], identity)
    if difference:
        return difference
    return None if record.get("done") else "did not finish"


# --------------------------------------------------------------------------- a model's identity

# What makes a model answer as it does: its weights, config and tokenizer (and an adapter's base).
MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".json", ".jinja", ".txt", ".model", ".tiktoken", ".pt")


def model_files(folder: Path) -> list[Path]:
    """The files of a model folder that determine its answers (checkpoints and logs below it left out)."""
    return [path for path in tree_files(folder) if path.suffix in MODEL_FILE_SUFFIXES
            and not path.relative_to(folder).parts[0].startswith(("checkpoint-", "runs", "logs"))
            and path.name != RUN_RECORD]


def model_digest(folder: str | Path, cache: DigestCache | None = None) -> str:
    """A digest of what a local model folder serves: its weights, config and tokenizer files, and for a LoRA
    adapter (adapter_config.json) its base model's too when that is a local folder. Each file is read once and
    remembered by (size, mtime, inode) in CACHE (default: the user-wide one under .cache/), so a retrain in place
    is a new digest and an unchanged 15 GB folder costs a stat per file."""
    folder = Path(folder).absolute()
    own = cache is None
    cache = cache or DigestCache(default_digest_cache())
    parts = [(str(path.relative_to(folder)), cache.file(path)) for path in model_files(folder)]
    adapter = folder / "adapter_config.json"
    if adapter.is_file():
        base = json.loads(adapter.read_text(encoding="utf-8")).get("base_model_name_or_path")
        if base and Path(base).is_dir():
            parts.append(("base", model_digest(base, cache)))
    if own:
        cache.save()
    return sha256_json(parts)[:16]


def default_digest_cache() -> Path:
    return cache_dir() / "digests.json"


def files_digest(named: Iterable[tuple[str, Path]]) -> str:
    """One short digest over NAMED (name, file) pairs' contents, each file read once per change and remembered in
    the user-wide DigestCache: a trainer's data or weights of many GB cost a stat per file on every launch."""
    cache = DigestCache(default_digest_cache())
    digest = sha256_json([(name, cache.file(path)) for name, path in named])[:16]
    cache.save()
    return digest
