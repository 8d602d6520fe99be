"""The Axolotl config a stage-one run actually uses: a recipe, overlays merged over it, `--set` overrides.

The CPU test run and the GPU run start from the same recipe file; an overlay (e.g.
recipes/sft/overrides/cpu-tiny.yaml) changes only what the hardware forces, so the data, template
and masking keys under test are the ones users run. Composition is prep.config.compose (the one
override syntax); this module then makes every path absolute and resolves the tiny fixture's name,
so the composed config runs from anywhere. It is written next to the run's logs, so what trained
is always on disk.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from custom_losses.train.memory import check_fits
from prep import config as recipe_config
from prep.config import RecipeError
from prep.jsonio import write_text_atomic
from prep.paths import resolve_path
from prep.testing.tiny_model import resolve_model

COMPOSED_NAME = "medkd-sft.yaml"  # inside output_dir
DATASET_LISTS = ("datasets", "test_datasets")
MODEL_KEYS = ("base_model", "tokenizer_config", "base_model_config")
REQUIRED_KEYS = ("base_model", "output_dir", "datasets")


def _absolute(path: str) -> str:
    return str(resolve_path(path).absolute())


def resolve_paths(config: dict[str, Any]) -> dict[str, Any]:
    """Relative paths -> absolute (prep.paths.resolve_path); the tiny fixture's name -> its folder."""
    config = copy.deepcopy(config)
    recipe_config.resolve_path_keys(config, "sft")
    for list_key in DATASET_LISTS:
        for dataset in config.get(list_key) or []:
            if isinstance(dataset, dict) and isinstance(dataset.get("path"), str):
                local = Path(dataset["path"])
                # A hub dataset id stays as it is; a file path (with a suffix or a folder) becomes absolute.
                if local.suffix or local.is_absolute() or resolve_path(local).exists():
                    dataset["path"] = _absolute(dataset["path"])
    for key in MODEL_KEYS:
        value = config.get(key)
        if isinstance(value, str) and value:
            resolved = resolve_model(value)
            config[key] = _absolute(resolved) if resolved == value and resolve_path(value).is_dir() else resolved
    return config


def compose(recipe: str | Path, overlays: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The recipe, each overlay merged over it in order, then each `key=value` override; paths resolved."""
    return resolve_paths(recipe_config.compose(recipe, list(overlays), list(overrides)))


def check_required(config: dict[str, Any], recipe: str | Path) -> None:
    for key in REQUIRED_KEYS:
        if not config.get(key):
            raise RecipeError(recipe, key, "missing (required)")


def validate_recipe(path: str | Path, overlays: Sequence[str | Path] = (), overrides: Sequence[str] = (), *,
                    require_gpu: bool = False) -> str:
    """Compose an SFT recipe, check its required keys and hold it against the GPUs here; returns the memory note.

    An overlay (a file under recipes/sft/overrides/) is checked over every recipe in recipes/sft/.
    Without a GPU a GPU recipe is only noted (the recipe is valid; launch.sft refuses to start it), unless
    REQUIRE_GPU (the pipeline's preflight: the run is about to happen here). The datasets are not read:
    they may not exist yet (the pipeline validates before prep.stages.teacher runs).
    """
    path = resolve_path(path)
    if path.parent.name == "overrides":
        recipes = sorted(path.parent.parent.glob("*.yaml"))
        notes = [validate_recipe(recipe, [path, *overlays], overrides, require_gpu=require_gpu) for recipe in recipes]
        return "; ".join(f"{recipe.name}: {note}" for recipe, note in zip(recipes, notes))
    config = compose(path, overlays, overrides)
    check_required(config, path)
    return check_fits(config, str(path), require_gpu=require_gpu)


def dump(config: dict[str, Any]) -> str:
    return yaml.safe_dump(config, sort_keys=False, allow_unicode=True)


def write_composed(config: dict[str, Any], header: str = "") -> Path:
    """Write CONFIG to <output_dir>/medkd-sft.yaml (atomically) and return that path."""
    path = Path(config["output_dir"]) / COMPOSED_NAME
    write_text_atomic(path, header + dump(config))
    return path
