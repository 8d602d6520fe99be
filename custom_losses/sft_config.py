"""Compose the Axolotl config a run actually uses: a recipe, overlays merged over it, `key=value` overrides.

The CPU test run and the GPU run start from the same recipe file; an overlay (e.g.
recipes/sft/overrides/cpu-tiny.yaml) changes only what the hardware forces, so the data, template
and masking keys under test are the ones users run. The composed config is written next to the run's
logs, so what trained is always on disk.

    python -m launch.sft_config RECIPE [OVERLAY.yaml ...] [key=value ...] [--run runs/NAME]   # prints the composed YAML
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from prep.config import RecipeError, read_yaml
from prep.paths import REPO_ROOT

COMPOSED_NAME = "medkd-sft.yaml"  # inside output_dir
# The run folder the recipes are written for; `--run DIR` moves every path under it to DIR.
RECIPE_RUN = "runs/stage1"
# Keys holding file paths, made absolute against the repo root so the composed config runs from anywhere.
PATH_KEYS = ("output_dir", "dataset_prepared_path", "deepspeed", "lora_model_dir")
DATASET_LISTS = ("datasets", "test_datasets")


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """OVERLAY over BASE: mappings merge key by key, anything else (lists included) is replaced."""
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def apply_override(config: dict[str, Any], item: str) -> None:
    """`a.b=1`, `datasets.0.path=x.jsonl` (integers index lists), `--key=value` (Axolotl's CLI spelling)."""
    text = item[2:] if item.startswith("--") else item
    if "=" not in text:
        raise ValueError(f"override '{item}' must look like key=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    parts = key.strip().split(".")
    target: Any = config
    for depth, part in enumerate(parts[:-1]):
        if isinstance(target, list):
            if not part.isdigit() or int(part) >= len(target):
                raise ValueError(f"override '{item}': '{'.'.join(parts[:depth + 1])}' is not an item of a {len(target)}-item list")
            target = target[int(part)]
        else:
            if not isinstance(target.get(part), (dict, list)):
                target[part] = {}
            target = target[part]
    leaf = parts[-1]
    if isinstance(target, list):
        if not leaf.isdigit() or int(leaf) >= len(target):
            raise ValueError(f"override '{item}': '{key}' is not an item of a {len(target)}-item list")
        target[int(leaf)] = value
    else:
        target[leaf] = value


def _absolute(path: str) -> str:
    candidate = Path(path).expanduser()
    return str(candidate if candidate.is_absolute() else REPO_ROOT / candidate)


def resolve_paths(config: dict[str, Any]) -> dict[str, Any]:
    """Repo-relative paths -> absolute; `medkd/tiny-qwen2.5` -> the locally built tiny model folder."""
    from prep.tiny_model import resolve_model

    config = copy.deepcopy(config)
    for key in PATH_KEYS:
        if isinstance(config.get(key), str) and config[key]:
            config[key] = _absolute(config[key])
    for list_key in DATASET_LISTS:
        for dataset in config.get(list_key) or []:
            if isinstance(dataset, dict) and isinstance(dataset.get("path"), str):
                local = Path(dataset["path"])
                # A hub dataset id stays as it is; a file path (with a suffix or a folder) becomes absolute.
                if local.suffix or local.is_absolute() or (REPO_ROOT / local).exists():
                    dataset["path"] = _absolute(dataset["path"])
    for key in ("base_model", "tokenizer_config", "base_model_config"):
        value = config.get(key)
        if isinstance(value, str) and value:
            resolved = str(resolve_model(value))
            if resolved == value and (REPO_ROOT / value).is_dir() and not Path(value).is_absolute():
                resolved = str(REPO_ROOT / value)
            config[key] = resolved
    return config


def move_run(config: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """Every data/output path under runs/stage1/ -> the same path under RUN_DIR."""
    def moved(path: Any) -> Any:
        if isinstance(path, str) and (path == RECIPE_RUN or path.startswith(RECIPE_RUN + "/")):
            return str(Path(run_dir) / path[len(RECIPE_RUN):].lstrip("/"))
        return path

    config = copy.deepcopy(config)
    for key in PATH_KEYS:
        config[key] = moved(config.get(key)) if key in config else None
        if config[key] is None:
            del config[key]
    for list_key in DATASET_LISTS:
        for dataset in config.get(list_key) or []:
            if isinstance(dataset, dict):
                dataset["path"] = moved(dataset.get("path"))
    return config


def compose(recipe: str | Path, overlays: list[str | Path] = (), overrides: list[str] = (),
            run_dir: str | None = None) -> dict[str, Any]:
    """The recipe, each overlay merged over it in order, moved to RUN_DIR, then each override; paths resolved."""
    config = read_yaml(recipe)
    for overlay in overlays:
        config = deep_merge(config, read_yaml(overlay))
    if run_dir:
        config = move_run(config, run_dir)
    for item in overrides:
        try:
            apply_override(config, item)
        except ValueError as err:
            raise RecipeError(recipe, None, str(err)) from None
    return resolve_paths(config)


def split_args(args: list[str]) -> tuple[list[str], list[str]]:
    """Command-line words after the recipe -> (overlay files, key=value overrides)."""
    overlays, overrides = [], []
    for arg in args:
        if arg.endswith((".yaml", ".yml")) and "=" not in arg:
            overlays.append(arg)
        elif "=" in arg:
            overrides.append(arg)
        else:
            raise ValueError(f"'{arg}' is neither an overlay (.yaml) nor a key=value override")
    return overlays, overrides


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def dump(config: dict[str, Any]) -> str:
    return yaml.safe_dump(config, sort_keys=False, allow_unicode=True)


def write_composed(config: dict[str, Any], header: str = "") -> Path:
    """Write CONFIG to <output_dir>/medkd-sft.yaml (atomically) and return that path."""
    from prep.jsonio import write_text_atomic

    out_dir = Path(config["output_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / COMPOSED_NAME
    write_text_atomic(path, header + dump(config))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.sft_config", description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("rest", nargs="*", help="overlay .yaml files and key=value overrides, in order")
    parser.add_argument("--run", help=f"run folder replacing {RECIPE_RUN} in the recipe's data and output paths")
    args = parser.parse_intermixed_args(argv)
    try:
        overlays, overrides = split_args(args.rest)
        sys.stdout.write(dump(compose(args.recipe, overlays, overrides, args.run)))
    except (RecipeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
