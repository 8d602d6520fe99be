"""Which code validates which recipes: the one table from a `recipes/<folder>/` to its validator.

The pipeline's preflight and the recipe test both go through this table, so a recipe the test passes
is a recipe the pipeline accepts. Validators are named by dotted path and imported when called: the
data side (prep) must not import the training side (custom_losses), yet SFT and distillation recipes
are validated by the code that trains them.

Every validator is `validate_recipe(path, overlays=(), overrides=())`: it composes the recipe with its
overlay files and `key=value` overrides (prep.config's one syntax) and raises prep.config.RecipeError
(or ValueError) with one sentence when something is wrong. It returns what it validated (the recipe
object, which the pipeline reuses) or a note for the run's log (the SFT validator says how the predicted
GPU memory fits), or None.
"""
from __future__ import annotations

import importlib
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from prep.config import RecipeError, compose
from prep.paths import RECIPES_DIR, resolve_path

VALIDATORS: dict[str, str] = {
    "teacher": "prep.teacher:validate_recipe",
    "softlabels": "prep.softlabels:validate_recipe",
    "serve": "prep.serving:validate_recipe",
    "sft": "custom_losses.sft_config:validate_recipe",
    "distill": "custom_losses.distill:validate_recipe",
    "predict": "prep.predict:validate_recipe",
    "score": "prep.score:validate_recipe",
    "pipeline": "prep.pipeline:validate_recipe",
    "accelerate": "prep.catalogue:validate_accelerate",
    "deepspeed": "prep.catalogue:validate_deepspeed",
}
# Overlay files live in a folder of this name inside the recipe folder they change (recipes/sft/overrides/).
OVERLAY_FOLDER = "overrides"


def validator(folder: str) -> Callable[..., Any]:
    """The validator of recipes/FOLDER/, imported now; KeyError naming the folder when there is none."""
    if folder not in VALIDATORS:
        raise KeyError(f"recipes/{folder}/ has no validator in prep.catalogue.VALIDATORS")
    module_name, _, function_name = VALIDATORS[folder].partition(":")
    return getattr(importlib.import_module(module_name), function_name)


def validate(folder: str, path: str | Path, overlays: Sequence[str | Path] = (), overrides: Sequence[str] = (),
             **options: Any) -> Any:
    """Validate the recipe PATH as a recipes/FOLDER/ recipe; whatever its validator returns (a str is a note).
    OPTIONS go to that validator as they are (e.g. the SFT validator's require_gpu)."""
    return validator(folder)(path, overlays=list(overlays), overrides=list(overrides), **options)


def recipe_folder(path: str | Path) -> str:
    """`sft` for recipes/sft/x.yaml and recipes/sft/overrides/y.yaml; '' for a file outside a recipe folder."""
    try:
        parts = resolve_path(path).resolve().relative_to(RECIPES_DIR.resolve()).parts
    except ValueError:
        return ""
    return parts[0] if len(parts) > 1 else ""


def is_overlay(path: str | Path) -> bool:
    return Path(path).parent.name == OVERLAY_FOLDER


def validate_accelerate(path: str | Path, overlays: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> None:
    """An `accelerate launch --config_file` YAML, read by accelerate's own loader (its keys and enums), that
    starts at least one process on GPUs and leaves precision to the training recipe."""
    from accelerate.commands.config.config_args import load_config_from_file

    data = compose(path, overlays, overrides)
    with tempfile.TemporaryDirectory() as folder:
        composed = Path(folder) / Path(path).name
        composed.write_text(yaml.safe_dump(data), encoding="utf-8")
        try:
            config = load_config_from_file(str(composed))
        except (TypeError, ValueError, KeyError) as err:
            raise RecipeError(path, None, f"accelerate cannot load it: {err}") from None
    if config.num_processes is None or config.num_processes < 1:
        raise RecipeError(path, "num_processes", f"must be at least 1, got {config.num_processes}")
    if config.use_cpu:
        raise RecipeError(path, "use_cpu", "must be false: these configs launch GPU training")
    if str(config.mixed_precision) != "no":
        raise RecipeError(path, "mixed_precision", "must be 'no': precision comes from the training recipe")


def validate_deepspeed(path: str | Path, overlays: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> None:
    """A DeepSpeed config: a JSON object whose zero_optimization.stage is 0-3."""
    data = compose(path, overlays, overrides)
    zero = data.get("zero_optimization")
    stage = zero.get("stage") if isinstance(zero, dict) else None
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise RecipeError(path, "zero_optimization.stage", f"must be 0, 1, 2 or 3, got {stage!r}")
