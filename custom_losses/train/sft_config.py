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
import importlib
import importlib.util
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


# medkd's own keys in an SFT recipe (read by launch.multinode, dropped by nothing: Axolotl ignores them).
MEDKD_KEYS = ("effective_batch_size",)


def compose(recipe: str | Path, overlays: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The recipe, each overlay merged over it in order, then each `key=value` override; paths resolved; every
    key and value checked against Axolotl's own config schema (check_axolotl_config)."""
    config = resolve_paths(recipe_config.compose(recipe, list(overlays), list(overrides)))
    check_axolotl_config(config, recipe, overlays, overrides)
    return config


def _axolotl_schemas(plugins: Sequence[str]) -> list[Any]:
    """Axolotl's config model and the input-args models of PLUGINS (their keys are valid too)."""
    from axolotl.utils.schemas.config import AxolotlInputConfig

    schemas = [AxolotlInputConfig]
    for plugin in plugins:
        module_name, _, class_name = str(plugin).rpartition(".")
        try:
            args = getattr(importlib.import_module(module_name), class_name)().get_input_args()
            args_module, _, args_class = str(args).rpartition(".")
            schemas.append(getattr(importlib.import_module(args_module), args_class))
        except (ImportError, AttributeError, TypeError, ValueError) as err:
            raise RecipeError("plugins", None, f"Axolotl plugin {plugin} cannot be loaded ({err})") from None
    return schemas


def check_axolotl_config(config: dict[str, Any], recipe: str | Path, overlays: Sequence[str | Path] = (),
                         overrides: Sequence[str] = ()) -> None:
    """Every top-level key of the composed CONFIG is one of Axolotl's (its config schema at the pinned version,
    its plugins' arguments) or medkd's, and every value has the type Axolotl's schema wants; RecipeError naming
    the key, where it came from (--set, an overlay, the recipe file) and the closest known key, before anything
    loads. Skipped where Axolotl is not installed (the vLLM-only environment)."""
    if importlib.util.find_spec("axolotl") is None:
        return
    from pydantic import ValidationError

    # A plugin's keys are known when any file of the recipe names it: an overlay that turns the plugin off
    # (the CPU overlay's `plugins:`) leaves its keys in place, unused, as Axolotl does.
    named = [*(config.get("plugins") or [])]
    for source in [recipe, *overlays]:
        named += recipe_config.read_yaml(source).get("plugins") or []
    schemas = _axolotl_schemas(list(dict.fromkeys(named)))
    known = sorted({name for schema in schemas for name, field in schema.model_fields.items()
                    for name in (name, field.alias) if name} | set(MEDKD_KEYS))
    for key in config:
        if key not in known:
            raise RecipeError(recipe_config.key_source(key, recipe, list(overlays), list(overrides)), key,
                              recipe_config.unknown_key(key, known) + " (Axolotl's config schema)")
    # Values against Axolotl's own schema (its plugins' argument models validate only inside it, merged by
    # Axolotl at train time: their keys are checked by name above).
    try:
        # A deep copy: Axolotl's validators rewrite nested values in place (a dataset's chat_template becomes
        # an enum), and the composed config must stay plain YAML.
        schemas[0].model_validate(copy.deepcopy({key: value for key, value in config.items() if key not in MEDKD_KEYS}))
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(part) for part in first["loc"]) or None
        top = str(first["loc"][0]) if first["loc"] else None
        raise RecipeError(recipe_config.key_source(top, recipe, list(overlays), list(overrides)), key,
                          first["msg"]) from None


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
